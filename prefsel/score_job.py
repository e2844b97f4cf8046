"""The scoring job on Ray Data: read -> validate+tokenize (CPU tasks) -> score (actor pool) -> shards.

This is the Ray layer around the pure modules (sources, prepare, scoring). Chunks of input rows
stream through the stages; the driver collects scored rows chunk by chunk and writes each
finished chunk as one shard, so memory stays bounded by what is in flight, rows are counted
exactly, and a rerun resumes at the first unfinished chunk.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from prefsel.formats import detect_format
from prefsel.prepare import infer_schema, record_schema, split_record
from prefsel.run_output import RunOutput
from prefsel.scoring import SCORE_COLUMNS
from prefsel.sources import DEFAULT_CHUNK_ROWS, Chunk, plan_source, sample_records

PREPARED_SCHEMA = pa.schema(
    [
        ("row_id", pa.int64()),
        ("chunk_id", pa.int64()),
        ("record", pa.large_string()),
        ("reason", pa.string()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("chosen_ids", pa.list_(pa.int32())),
        ("rejected_ids", pa.list_(pa.int32())),
    ]
)
_INT_SCORES = ("chosen_tokens", "rejected_tokens", "prompt_tokens")
SCORED_SCHEMA = pa.schema(
    [
        ("row_id", pa.int64()),
        ("chunk_id", pa.int64()),
        ("record", pa.large_string()),
        ("reason", pa.string()),
        *[(c, pa.int64() if c in _INT_SCORES else pa.float64()) for c in SCORE_COLUMNS],
    ]
)


@dataclass
class ScoreJobConfig:
    """Everything `prefsel score` needs; validated once in __post_init__."""

    policy: str
    reference: str
    data: str
    output: str
    tokenizer: str | None = None
    format: str | None = None  # auto-detected when None
    split: str = "train"
    chat_template: str = "auto"
    max_length: int | None = None
    truncation: str = "reject"
    beta: float = 0.1
    num_actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    dtype: str = "auto"
    max_tokens_per_batch: int = 16384
    padding_side: str = "right"
    rows_per_actor_call: int = 256
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    attn_implementation: str | None = None
    trust_remote_code: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        from prefsel.formats import FORMATS
        from prefsel.sources import absolute_local

        for name in ("policy", "reference", "tokenizer", "data"):
            setattr(self, name, absolute_local(getattr(self, name)))
        from prefsel.tokenization import TRUNCATION_MODES

        if self.format is not None and self.format not in FORMATS:
            raise ValueError(f"--format must be one of {FORMATS}")
        if self.format == "multi":
            raise ValueError("--format multi holds many responses per prompt; gap scoring needs pairs")
        if self.truncation not in TRUNCATION_MODES:
            raise ValueError(f"--truncation must be one of {TRUNCATION_MODES}")
        if not self.beta > 0:
            raise ValueError("--beta must be positive")
        if self.num_actors < 1:
            raise ValueError("--num-actors must be at least 1")
        if self.gpus_per_actor < 0 or self.cpus_per_actor < 0:
            raise ValueError("--gpus-per-actor and --cpus-per-actor must be >= 0")
        if self.chunk_rows < 1 or self.rows_per_actor_call < 1:
            raise ValueError("--chunk-rows and --rows-per-actor-call must be positive")
        if self.padding_side not in ("left", "right"):
            raise ValueError("--padding-side must be left or right")

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.policy


def model_stamp(path: str) -> str:
    """Identify a model by name, plus sizes and times of its files when it is a local folder."""
    p = Path(path)
    if not p.is_dir():
        return path
    parts = [
        f"{f.name}:{f.stat().st_size}:{int(f.stat().st_mtime)}"
        for f in sorted(p.iterdir())
        if f.is_file() and f.suffix in (".json", ".safetensors", ".bin", ".model", ".jinja")
    ]
    return path + "|" + hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def fingerprint(cfg: ScoreJobConfig, files: list[str], fmt: str) -> dict:
    """What determines the scores: a rerun must match it to resume into the same output."""
    keep = ("beta", "chat_template", "max_length", "truncation", "chunk_rows", "split", "dtype")
    return {
        "data": files,
        "format": fmt,
        "policy": model_stamp(cfg.policy),
        "reference": model_stamp(cfg.reference),
        "tokenizer": model_stamp(cfg.tokenizer_path),
        **{k: getattr(cfg, k) for k in keep},
    }


# ---- stage functions (run in Ray workers) -------------------------------------------------------

_TOKENIZERS: dict = {}


def pair_tokenizer(path: str, chat_template: str, max_length, truncation: str, trust_remote_code: bool):
    from prefsel.models import load_tokenizer
    from prefsel.tokenization import PairTokenizer

    key = (path, chat_template, max_length, truncation)
    if key not in _TOKENIZERS:  # worker processes are reused: load once per process
        tok = load_tokenizer(path, trust_remote_code=trust_remote_code)
        _TOKENIZERS[key] = PairTokenizer(tok, chat_template, max_length, truncation)
    return _TOKENIZERS[key]


def chunk_from_row(row: dict) -> Chunk:
    payload = None
    if row.get("payload"):
        payload = pa.ipc.open_stream(row["payload"]).read_all()
    return Chunk(
        int(row["chunk_id"]), row["kind"], row["path"], int(row["row_start"]), int(row["num_rows"]),
        int(row["offset"]), payload,
    )


def prepare_batch(batch: pa.Table, *, fmt: str, schema_ipc: bytes | None, tok_args: dict) -> pa.Table:
    """Ray Data task: read the chunks in `batch`, validate and tokenize their rows."""
    from prefsel.prepare import prepare_rows
    from prefsel.sources import read_chunk

    schema = pa.ipc.read_schema(pa.py_buffer(schema_ipc)) if schema_ipc else None
    tokenizer = pair_tokenizer(**tok_args)
    cols: dict[str, list] = {name: [] for name in PREPARED_SCHEMA.names}
    for row in batch.to_pylist():
        chunk = chunk_from_row(row)
        prepared = prepare_rows(read_chunk(chunk), fmt, tokenizer, schema, check_schema=chunk.kind in ("jsonl", "json"))
        for p in prepared:
            for name, value in p.as_dict().items():
                cols[name].append(value)
            cols["chunk_id"].append(chunk.chunk_id)
    return pa.Table.from_pydict(cols, schema=PREPARED_SCHEMA)


class ScoreActor:
    """Ray Data actor: holds the policy and the reference, scores the usable rows of a batch."""

    def __init__(self, cfg: ScoreJobConfig, pad_token_id: int) -> None:
        import torch

        from prefsel.models import check_same_vocab, load_causal_lm, load_tokenizer, resolve_device
        from prefsel.scoring import PairScorer, ScoreConfig

        if cfg.cpus_per_actor >= 1:
            torch.set_num_threads(int(cfg.cpus_per_actor))
        device = resolve_device("cuda" if cfg.gpus_per_actor > 0 else "cpu")
        kw = dict(dtype=cfg.dtype, device=str(device), trust_remote_code=cfg.trust_remote_code,
                  attn_implementation=cfg.attn_implementation)
        policy = load_causal_lm(cfg.policy, **kw)
        reference = load_causal_lm(cfg.reference, **kw)
        check_same_vocab(load_tokenizer(cfg.tokenizer_path, trust_remote_code=cfg.trust_remote_code), policy, reference)
        self.scorer = PairScorer(
            policy, reference, pad_token_id,
            ScoreConfig(beta=cfg.beta, max_tokens_per_batch=cfg.max_tokens_per_batch, padding_side=cfg.padding_side),
            device,
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        from prefsel.tokenization import TokenizedExample

        rows = batch.to_pylist()
        usable = [i for i, r in enumerate(rows) if r["reason"] is None]
        scores = self.scorer.score(
            [TokenizedExample(rows[i]["prompt_ids"], [rows[i]["chosen_ids"], rows[i]["rejected_ids"]]) for i in usable]
        )
        by_row = dict(zip(usable, scores))
        cols: dict[str, list] = {name: [] for name in SCORED_SCHEMA.names}
        for i, r in enumerate(rows):
            for name in ("row_id", "chunk_id", "record", "reason"):
                cols[name].append(r[name])
            s = by_row.get(i)
            for name in SCORE_COLUMNS:
                cols[name].append(None if s is None else s[name])
        return pa.Table.from_pydict(cols, schema=SCORED_SCHEMA)


# ---- driver side ----------------------------------------------------------------------------------


class ChunkSink:
    """Collects scored rows per chunk; writes a chunk's shard as soon as all its rows are in."""

    def __init__(self, out: RunOutput, chunks: list[Chunk], schema: pa.Schema) -> None:
        self.out = out
        self.expected = {c.chunk_id: c.num_rows for c in chunks}
        self.pending: dict[int, list[dict]] = {}
        self.schema = schema
        self.written = 0

    def add(self, table: pa.Table) -> None:
        for row in table.to_pylist():
            cid = row["chunk_id"]
            self.pending.setdefault(cid, []).append(row)
            if len(self.pending[cid]) == self.expected[cid]:
                self._flush(cid)

    def _flush(self, cid: int) -> None:
        rows = sorted(self.pending.pop(cid), key=lambda r: r["row_id"])
        good, rejects = [], []
        for r in rows:
            if r["reason"] is None:
                good.append(r)
            else:
                try:
                    original = json.loads(r["record"])
                except json.JSONDecodeError:
                    original = r["record"]
                rejects.append({"row_id": r["row_id"], "reason": r["reason"], "record": original})
        out_schema = scores_schema(self.schema)
        records = [split_record(json.loads(r["record"]), self.schema) for r in good]
        cols = {"row_id": [r["row_id"] for r in good]}
        for f in record_schema(self.schema):
            cols[f.name] = [rec[f.name] for rec in records]
        for name in SCORE_COLUMNS:
            cols[name] = [r[name] for r in good]
        self.out.write_chunk(cid, pa.Table.from_pydict(cols, schema=out_schema), rejects)
        self.written += 1

    def unfinished(self) -> dict[int, int]:
        return {cid: len(rows) for cid, rows in self.pending.items()}


def scores_schema(schema: pa.Schema) -> pa.Schema:
    """Columns of a scores shard: row_id, the original fields, _extra, the score columns."""
    return pa.schema(
        [
            ("row_id", pa.int64()),
            *record_schema(schema),
            *[(c, pa.int64() if c in _INT_SCORES else pa.float64()) for c in SCORE_COLUMNS],
        ]
    )


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in RAY_ADDRESS, or start a local Ray on demand."""
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            # Keep Ray's dashboard: it serves the State API, which Ray Train V2's placement-group
            # cleaner polls (without it: a warning every few seconds and no cleanup).
            ray.init(num_cpus=num_cpus, log_to_driver=True)


def chunk_rows_for_ray(chunks: list[Chunk]) -> list[dict]:
    items = []
    for c in chunks:
        payload = b""
        if c.payload is not None:
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, c.payload.schema) as w:
                w.write_table(c.payload)
            payload = sink.getvalue().to_pybytes()
        items.append({**{k: getattr(c, k) for k in ("chunk_id", "kind", "path", "row_start", "num_rows", "offset")},
                      "payload": payload})
    return items


def run_score(cfg: ScoreJobConfig) -> dict:
    """Score every pair of `cfg.data` into `cfg.output`; returns the summary (also summary.json)."""
    import ray
    from ray.data import ActorPoolStrategy

    from prefsel.models import load_tokenizer
    from prefsel.summary import score_summary

    t0 = time.time()
    plan = plan_source(cfg.data, cfg.chunk_rows, cfg.split)
    sample = sample_records(plan)
    fmt = cfg.format or detect_format(sample)
    if fmt == "multi":
        raise ValueError("the data holds many responses per prompt (multi); gap scoring needs pairs")
    schema = plan.schema if plan.schema is not None else infer_schema(sample)
    out = RunOutput(cfg.output, fingerprint(cfg, plan.files, fmt), kind="scores", overwrite=cfg.overwrite)
    done = out.done_chunks()
    todo = [c for c in plan.chunks if c.chunk_id not in done]
    tok = load_tokenizer(cfg.tokenizer_path, trust_remote_code=cfg.trust_remote_code)
    sink = ChunkSink(out, todo, schema)
    if todo:
        init_ray()
        tok_args = dict(path=cfg.tokenizer_path, chat_template=cfg.chat_template, max_length=cfg.max_length,
                        truncation=cfg.truncation, trust_remote_code=cfg.trust_remote_code)
        schema_ipc = schema.serialize().to_pybytes() if plan.kind in ("jsonl", "json") else None
        ds = ray.data.from_items(chunk_rows_for_ray(todo), override_num_blocks=len(todo))
        ds = ds.map_batches(
            prepare_batch, batch_size=1, batch_format="pyarrow", num_cpus=1,
            fn_kwargs=dict(fmt=fmt, schema_ipc=schema_ipc, tok_args=tok_args),
        )
        ds = ds.map_batches(
            ScoreActor,
            batch_size=cfg.rows_per_actor_call,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(size=cfg.num_actors),
            num_gpus=cfg.gpus_per_actor,
            num_cpus=cfg.cpus_per_actor,
            fn_constructor_kwargs=dict(cfg=cfg, pad_token_id=tok.pad_token_id),
        )
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            sink.add(batch)
        if sink.pending:
            raise RuntimeError(f"chunks ended incomplete (chunk: rows received): {sink.unfinished()}")
    wall = time.time() - t0
    summary = score_summary(out, plan, fmt, cfg, wall, resumed_chunks=len(done))
    summary["source_kind"] = plan.kind
    summary["outputs"] = {
        "scores": f"{cfg.output.rstrip('/')}/scores",
        "rejects": f"{cfg.output.rstrip('/')}/rejects",
        "summary": f"{cfg.output.rstrip('/')}/summary.json",
    }
    out.finalize(summary)
    return summary

