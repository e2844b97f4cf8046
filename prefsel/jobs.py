"""The chunked job skeleton on Ray Data, shared by score, annotate, generate and training's
reference precompute.

    plan (driver)  -> read tasks (one per read unit: read, validate, tokenize its chunks)
                   -> model actors (ActorPoolStrategy; batches counted in rows)
                   -> driver: rows grouped by chunk; a chunk is written the moment its rows are in

Why this shape: the read stage is a Ray Data `Datasource`, so a read task turns one chunk
descriptor into that chunk's prepared rows. Ray Data never fuses a read into an actor stage
that asks for a batch size (a read may change the row count), so the actor's `batch_size`
counts real rows whatever else is fused, every actor of the pool gets chunks as they are read,
and the driver receives each actor batch as soon as it is done (streaming executor,
backpressure). Each input file is read once in total: JSON lines by byte offsets, JSON arrays
by the byte ranges found when planning, Parquet by row group (sources.read_units).

A job gives three things: `prepare(chunk, rows) -> pa.Table` (runs in read tasks), a
`ModelActor` subclass (runs in the pool) and `write(chunk_id, table)` (runs in the driver).
Every prepared row carries `row_id`, `chunk_id` and `reason` (None for a usable row); actors
pass rejected rows through untouched, so every input row reaches the driver exactly once. Work
that needs no model (parsing, validation, tokenization, putting original fields into typed
columns) happens in the read tasks, which run in parallel; the actors and the driver handle
Arrow columns and convert to Python only what they compute on.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from prefsel.checks import require
from prefsel.sources import DEFAULT_CHUNK_ROWS, Chunk, RawRow, read_unit, read_units

JobRows = Callable[[Chunk, list[RawRow]], pa.Table]


# ---- Ray ------------------------------------------------------------------------------------------


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in RAY_ADDRESS, or start a local Ray on demand, reachable from this
    machine only (`local_ray_loopback`). Workers' output reaches this process (log_to_driver);
    prefsel.console decides what of it the console shows."""
    import ray

    from prefsel import console

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            # Keep Ray's dashboard: it serves the State API, which Ray Train V2's placement-group
            # cleaner polls (without it: a warning every few seconds and no cleanup).
            with local_ray_loopback():
                ray.init(num_cpus=num_cpus, log_to_driver=True)
    console.on_ray_init()


@contextlib.contextmanager
def local_ray_loopback():
    """Start a local Ray whose processes listen on 127.0.0.1 only, not on every interface.

    Ray 2.60 turns a node IP of 127.0.0.1 given to ray.init (`_node_ip_address`) or `ray start`
    back into the machine's outward address; only its local-only mode keeps the loopback: with
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (read by ray._private.ray_constants.ENABLE_RAY_CLUSTER,
    which is how Ray runs on macOS and Windows) the node IP is 127.0.0.1, so the GCS, the raylet
    (node and object managers), every worker's gRPC server, the dashboard, its agent and the
    runtime-env agent all bind 127.0.0.1 (tests/test_local_ray.py checks each listening socket).
    The constant is read when ray is imported, so it is set here for the start only and put back
    (a process-wide side effect on later `ray start` calls would refuse to start a cluster)."""
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


# ---- what determines a run's output ----------------------------------------------------------------


# Files of a model folder that decide its outputs: config and weights, and every tokenizer
# file format (tokenizer.json, SentencePiece .model, BPE merges.txt / WordPiece vocab.txt,
# tiktoken vocabularies, chat_template.jinja), and the modeling / tokenization .py files that
# --trust-remote-code runs.
MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".jinja", ".txt", ".tiktoken", ".py")


def model_stamp(path: str) -> str:
    """Identify a model by name, plus sizes and times of its files when it is a local folder."""
    p = Path(path)
    if not p.is_dir():
        return path
    parts = [
        f"{f.name}:{f.stat().st_size}:{int(f.stat().st_mtime)}"
        for f in sorted(p.iterdir())
        if f.is_file() and f.suffix in MODEL_FILE_SUFFIXES
    ]
    return path + "|" + hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def input_stamps(files: list[str], content_hash: bool = False) -> dict[str, str]:
    """What identifies each input file's content: size and modification time (object storage:
    its LastModified), or with `content_hash` the SHA-256 of its bytes. A `datasets` folder is
    stamped by its files; a hub dataset by its name. A resumed run whose stamps differ is refused."""
    from pyarrow import fs as pafs

    from prefsel.sources import filesystem_for

    stamps = {}
    for uri in files:
        try:
            fs, path = filesystem_for(uri)
            info = fs.get_file_info(path)
        except (OSError, ValueError):
            stamps[uri] = "name"
            continue
        if info.type == pafs.FileType.Directory:
            inner = [i for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                     if i.type == pafs.FileType.File]
        elif info.type == pafs.FileType.File:
            inner = [info]
        else:
            stamps[uri] = "name"
            continue
        parts = []
        for i in sorted(inner, key=lambda i: i.path):
            if content_hash:
                h = hashlib.sha256()
                with fs.open_input_stream(i.path) as f:
                    while block := f.read(1 << 22):
                        h.update(block)
                parts.append(f"{i.path}:sha256={h.hexdigest()}")
            else:
                mtime = i.mtime_ns if i.mtime_ns is not None else None
                parts.append(f"{i.path}:size={i.size}:mtime_ns={mtime}")
        stamps[uri] = parts[0].split(":", 1)[1] if len(parts) == 1 and inner[0].path == path else \
            hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    return stamps


def chat_template_stamp(chat_template: str) -> str:
    """What identifies --chat-template: "auto" and "none" as they are (auto's template is in the
    tokenizer's files, stamped with them); a template file by its path and the SHA-256 of its
    text, so an edit between a killed run and its rerun is caught (a template is a few KB)."""
    p = Path(chat_template)
    if chat_template in ("auto", "none") or not p.is_file():
        return chat_template  # not a file: the tokenizer refuses it, in this run and any rerun
    return f"{chat_template}|sha256={hashlib.sha256(p.read_bytes()).hexdigest()}"


@dataclass(kw_only=True)
class JobConfig:
    """What every job over a corpus takes besides its models and its own settings (keyword-only,
    so each job's config declares its required models and paths first). `model_field` names the
    model whose tokenizer is used when `tokenizer` is not given."""

    tokenizer: str | None = None
    chat_template: str = "auto"
    split: str = "train"
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    dtype: str = "auto"
    trust_remote_code: bool = False
    hash_inputs: bool = False  # fingerprint inputs by content (SHA-256), not size + mtime
    overwrite: bool = False

    model_field = "model"

    def __post_init__(self) -> None:
        from prefsel.models import DTYPES
        from prefsel.tokenization import check_chat_template

        # checked here, in the driver: a bad value found in the actors kills the run after Ray has
        # started and leaves an unfinished output that the corrected rerun's fingerprint refuses
        require((self.chunk_rows >= 1, "chunk_rows: must be positive"),
                (self.dtype in DTYPES, f"dtype: must be one of {', '.join(DTYPES)}, got {self.dtype!r}"))
        self.chat_template = check_chat_template(self.chat_template)

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or getattr(self, self.model_field)


def job_fingerprint(cfg: JobConfig, files: list[str], models: tuple[str, ...], settings: tuple[str, ...]) -> dict:
    """What determines a job's output, for resume: the input files' stamps, each model's and the
    tokenizer's stamp, the shared settings of JobConfig and the job's own named `settings`."""
    return {
        "data": input_stamps(files, cfg.hash_inputs),
        # how "data" was stamped, so a rerun that switches --hash-inputs is told so (not that a
        # file changed); only when on, so the fingerprints of runs without it stay as they were
        **({"hash_inputs": True} if cfg.hash_inputs else {}),
        **{name: model_stamp(getattr(cfg, name)) for name in models},
        "tokenizer": model_stamp(cfg.tokenizer_path),
        "chat_template": chat_template_stamp(cfg.chat_template),
        **{k: getattr(cfg, k) for k in ("chunk_rows", "split", *settings)},
        "dtype": compute_dtype(cfg),
    }


def compute_dtype(cfg: JobConfig) -> str:
    """The dtype a job's actors compute in, `auto` resolved for the device they ask for (bf16 with
    GPUs, float32 without; prefsel.models.resolve_dtype): a run started on GPUs is not resumed on
    CPUs into the same output, nor one started in fp32 on GPUs in bf16."""
    import torch

    from prefsel.models import resolve_dtype

    device = torch.device("cuda" if cfg.resources.gpus_per_actor > 0 else "cpu")
    return str(resolve_dtype(cfg.dtype, device)).removeprefix("torch.")


# ---- the tokenizer, once per worker process --------------------------------------------------------

_TOKENIZERS: dict = {}


@dataclass(frozen=True)
class TokenizerSpec:
    """How a job's read tasks tokenize: built into a PairTokenizer once per worker process."""

    path: str
    chat_template: str = "auto"
    max_length: int | None = None
    truncation: str = "reject"
    trust_remote_code: bool = False
    strip_responses: bool = True
    exact_continuation: bool = True

    def load(self, tokenizer=None):
        """The PairTokenizer, built once per process; `tokenizer` is this spec's already loaded
        transformers tokenizer, when the caller has it (the driver), so it is not loaded twice."""
        from prefsel.models import load_tokenizer
        from prefsel.tokenization import PairTokenizer

        if self not in _TOKENIZERS:  # Ray reuses worker processes: load once per process
            tok = tokenizer or load_tokenizer(self.path, trust_remote_code=self.trust_remote_code)
            _TOKENIZERS[self] = PairTokenizer(tok, self.chat_template, self.max_length, self.truncation,
                                              strip_responses=self.strip_responses,
                                              exact_continuation=self.exact_continuation)
        return _TOKENIZERS[self]


# ---- the read stage: a Datasource with one read task per read unit --------------------------------


def _datasource_class():
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    class ChunkDatasource(Datasource):
        """One read task per read unit (a chunk, or the chunks of one Parquet row group); the task
        reads its rows and hands them to the job's `prepare`, one output block per chunk."""

        def __init__(self, chunks: list[Chunk], prepare: JobRows) -> None:
            self.units = read_units(chunks)
            self.prepare = prepare

        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list:
            prepare = self.prepare

            def make(unit: list[Chunk]):
                def read() -> Iterator[pa.Table]:
                    for chunk, rows in read_unit(unit):
                        yield prepare(chunk, rows)

                meta = BlockMetadata(num_rows=sum(c.num_rows for c in unit), size_bytes=None,
                                     input_files=None, exec_stats=None)
                return ReadTask(read, meta)

            return [make(u) for u in self.units]

    return ChunkDatasource


# ---- the model stage ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ActorResources:
    """The actor pool: how many model replicas, and what each one holds."""

    num_actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    rows_per_actor_call: int = 256

    def __post_init__(self) -> None:
        require((self.num_actors >= 1, "num_actors: must be at least 1"),
                (self.gpus_per_actor >= 0, "gpus_per_actor: must be >= 0"),
                (self.cpus_per_actor >= 0, "cpus_per_actor: must be >= 0"),
                (self.rows_per_actor_call >= 1, "rows_per_actor_call: must be positive"))


def check_attn(attn: str, resources: ActorResources) -> None:
    """Refuse a bad --attn in the driver; flex_attention also when the actors hold no GPU."""
    from prefsel.packing import resolve_attn

    resolve_attn(attn, "cpu" if resources.gpus_per_actor == 0 else None)


class ModelActor:
    """Base of the jobs' Ray Data actors: device and threads from the pool's resources, and the
    plumbing around `process`. A subclass names the columns it reads (`inputs`), the ones it
    uses up (`consumed`, dropped from its output) and the ones it adds (`results`); it loads its
    models in __init__ and implements `process(rows)`: one dict of result columns per usable
    row (a "reason" in it rejects that row). Every other column passes through in Arrow,
    untouched and never converted to Python, and an `actor` column says who processed a row."""

    inputs: tuple[str, ...] = ()
    consumed: tuple[str, ...] | None = None  # None: the inputs
    results: pa.Schema = pa.schema([])
    # a prefsel.packing.ForwardStats that `process` accumulates into (one model's forwards); each
    # call's counts ride on its first row in FORWARD_COLUMNS, summed and dropped by ChunkCollector
    forward_stats = None

    def __init__(self, resources: ActorResources) -> None:
        import torch

        from prefsel.models import resolve_device

        if resources.cpus_per_actor >= 1 and resources.gpus_per_actor == 0:
            torch.set_num_threads(int(resources.cpus_per_actor))
        self.device = resolve_device("auto" if resources.gpus_per_actor > 0 else "cpu")  # a GPU node without CUDA (simulated) runs on CPU
        self.actor_id = f"{socket.gethostname()}:{os.getpid()}"

    def process(self, rows: list[dict]) -> list[dict]:
        raise NotImplementedError

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow.compute as pc

        n = batch.num_rows
        usable = (list(range(n)) if "reason" not in batch.column_names
                  else pc.indices_nonzero(pc.is_null(batch["reason"])).to_pylist())
        rows = batch.select(list(self.inputs)).take(usable).to_pylist() if usable else []
        out = dict.fromkeys(usable, {})
        out.update(zip(usable, self.process(rows) if rows else []))
        consumed = self.inputs if self.consumed is None else self.consumed
        table = batch.drop_columns([c for c in consumed if c in batch.column_names])
        for f in self.results:
            values = [out.get(i, {}).get(f.name) for i in range(n)]
            if f.name == "reason":  # a row rejected here keeps the new reason; others their own
                old = table["reason"].to_pylist()
                table = table.set_column(table.schema.get_field_index("reason"), "reason",
                                         pa.array([v if v is not None else o for v, o in zip(values, old)], pa.string()))
            else:
                table = table.append_column(f, pa.array(values, f.type))
        table = table.append_column("actor", pa.array([self.actor_id] * n, pa.string()))
        if self.forward_stats is not None:
            counts = self.forward_stats.take()
            for col, f in FORWARD_COLUMNS.items():
                table = table.append_column(col, pa.array([getattr(counts, f)] + [0] * (n - 1), pa.int64()))
        return table


FORWARD_COLUMNS = {"fwd_sequences": "sequences", "fwd_tokens": "tokens", "fwd_slots": "slots",
                   "fwd_two_pass": "padded_two_pass", "fwd_forwards": "forwards"}


# ---- the driver ---------------------------------------------------------------------------------


class ChunkCollector:
    """Groups rows by chunk and hands a chunk (an Arrow table sorted by row_id) to `write` as
    soon as all its rows are in. Memory is bounded by the chunks in flight; `rows_per_actor`
    counts who processed the usable rows."""

    def __init__(self, chunks: list[Chunk], write: Callable[[int, pa.Table], None]) -> None:
        self.expected = {c.chunk_id: c.num_rows for c in chunks}
        self.pending: dict[int, list[pa.Table]] = {}
        self.received: Counter = Counter()
        self.write = write
        self.rows_per_actor: Counter = Counter()
        self.writes: list[tuple[float, int]] = []  # (seconds since start, rows) of each written chunk
        self.t0 = time.time()
        self.forward: dict[str, int] = {}  # ModelActor.forward_stats summed over every call

    @property
    def first_write_s(self) -> float | None:
        """Start-up: seconds until the first chunk was written (Ray workers, models, first chunk)."""
        return self.writes[0][0] if self.writes else None

    def steady_rows_per_s(self) -> float | None:
        """Rows per second from the first written chunk to the last: throughput without start-up."""
        if len(self.writes) < 2 or self.writes[-1][0] <= self.writes[0][0]:
            return None
        return sum(n for _, n in self.writes[1:]) / (self.writes[-1][0] - self.writes[0][0])

    def add(self, table: pa.Table) -> None:
        import pyarrow.compute as pc

        if "actor" in table.column_names:
            usable = table.filter(pc.is_null(table["reason"])) if "reason" in table.column_names else table
            for actor, count in zip(*pc.value_counts(usable["actor"]).flatten()):
                self.rows_per_actor[actor.as_py()] += count.as_py()
        if "fwd_tokens" in table.column_names:
            for col, f in FORWARD_COLUMNS.items():
                self.forward[f] = self.forward.get(f, 0) + pc.sum(table[col]).as_py()
            table = table.drop_columns(list(FORWARD_COLUMNS))
        for cid in pc.unique(table["chunk_id"]).to_pylist():
            part = table.filter(pc.equal(table["chunk_id"], cid))
            self.pending.setdefault(cid, []).append(part)
            self.received[cid] += part.num_rows
            if self.received[cid] == self.expected[cid]:
                whole = pa.concat_tables(self.pending.pop(cid)).sort_by("row_id")
                self.write(cid, whole)
                self.writes.append((time.time() - self.t0, whole.num_rows))

    def forward_summary(self, layout, attn: str | None) -> dict | None:
        """Per model (all forward the same batches): tokens forwarded, the slots a padded
        two-pass layout would have used, the saving and the pad fraction, with the layout
        (a prefsel.packing.Layout) and attention backend that produced them."""
        if not self.forward:
            return None
        from prefsel.packing import ForwardStats

        return {"packing": layout.packing, "share_prompt": layout.shares, "attn": attn,
                **ForwardStats(**self.forward).as_dict()}

    def check_done(self) -> None:
        if self.pending:
            raise RuntimeError(
                "chunks ended incomplete (chunk: rows received): "
                f"{ {cid: self.received[cid] for cid in self.pending} }"
            )


def map_actor_pool(ds, actor_cls: type, actor_kwargs: dict[str, Any], resources: ActorResources):
    """`ds` through a pool of `actor_cls(resources=..., **actor_kwargs)`, batches of
    `rows_per_actor_call` rows (pyarrow)."""
    from ray.data import ActorPoolStrategy

    return ds.map_batches(
        actor_cls,
        batch_size=resources.rows_per_actor_call,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=resources.num_actors),
        num_gpus=resources.gpus_per_actor,
        num_cpus=resources.cpus_per_actor,
        fn_constructor_kwargs={"resources": resources, **actor_kwargs},
    )


def group_by_owner(owner: list[int], values: list[float], n: int) -> list[list[float]]:
    """Flat per-response values -> per row, its responses' values in order (`owner[j]`: the row of value j)."""
    out: list[list[float]] = [[] for _ in range(n)]
    for i, v in zip(owner, values):
        out[i].append(float(v))
    return out


def read_prepared(chunks: list[Chunk], prepare: JobRows, concurrency: int = 2):
    """The read stage alone: a Ray Dataset of the prepared rows of `chunks` (one read task per
    read unit, one block per chunk).

    Read tasks ask for no CPU of their own: reading and tokenizing cost a small fraction of a
    model forward, and on a machine whose cores all went to model actors (2 actors x 1 CPU on 2
    cores) a 1-CPU read could never be scheduled. `concurrency` caps the read tasks in flight;
    Ray Data's backpressure keeps them from running far ahead of the actors."""
    import ray

    init_ray()
    return ray.data.read_datasource(_datasource_class()(chunks, prepare), override_num_blocks=len(chunks),
                                    num_cpus=0, concurrency=concurrency)


def run_chunks(
    chunks: list[Chunk],
    prepare: JobRows,
    actor_cls: type,
    actor_kwargs: dict[str, Any],
    resources: ActorResources,
    write: Callable[[int, pa.Table], None],
) -> ChunkCollector:
    """Stream `chunks` through read+prepare -> the actor pool -> `write`, one chunk at a time.

    `actor_cls(resources=..., **actor_kwargs)` is built once per pool member. Returns the
    collector (rows per actor, time to the first written chunk)."""
    collector = ChunkCollector(chunks, write)
    if not chunks:
        return collector
    ds = map_actor_pool(read_prepared(chunks, prepare, concurrency=resources.num_actors + 1),
                        actor_cls, actor_kwargs, resources)
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        collector.add(batch)
    collector.check_done()
    return collector


def original_record(text: str) -> Any:
    """A prepared row's `record` back as the original object (or the raw text of a line that
    did not parse)."""
    import json

    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
        return text
