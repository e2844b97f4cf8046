"""`prefsel generate` on Ray Data: prompts -> K sampled responses each -> multi-response rows.

Pipeline (the score job's style): chunk descriptors -> prepare (CPU tasks: read, validate,
chat-template + tokenize the prompt) -> materialized; the driver registers every row (rejects
go straight to their chunk), then the usable rows go to the backend:
  hf:   actor pool of GenerateActor (transformers generate, seeded per sample);
  vllm: flat_map into K requests per prompt -> ray.data.llm vLLM processor.
Both return one row per sample; the driver groups samples by row_id, and writes a chunk's shard
as soon as all its rows are complete. Counts add up: rows_in = rows_out + rows_rejected.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from prefsel.formats import RowError
from prefsel.generation.hf_backend import SampleRequest, SamplingConfig
from prefsel.generation.output import JsonlRunOutput
from prefsel.generation.prompts import encode_prompt, parse_prompt_row, sample_seed
from prefsel.generation.vllm_backend import SAMPLE_COLUMNS
from prefsel.sources import DEFAULT_CHUNK_ROWS, Chunk, plan_source

BACKENDS = ("vllm", "hf")
PREPARED_SCHEMA = pa.schema([
    ("row_id", pa.int64()), ("chunk_id", pa.int64()), ("record", pa.large_string()),
    ("reason", pa.string()), ("prompt_ids", pa.list_(pa.int32())),
])
SAMPLE_SCHEMA = pa.schema([
    ("row_id", pa.int64()), ("chunk_id", pa.int64()), ("sample_index", pa.int64()),
    ("sample_text", pa.large_string()), ("sample_tokens", pa.int64()), ("sample_finished", pa.bool_()),
    ("sample_error", pa.string()),
])
assert tuple(SAMPLE_SCHEMA.names) == SAMPLE_COLUMNS


@dataclass
class GenerateConfig:
    prompts: str
    model: str
    output: str
    backend: str = "hf"
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    tokenizer: str | None = None
    chat_template: str = "auto"
    max_prompt_length: int | None = None
    split: str = "train"
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    # hf backend
    num_actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    dtype: str = "auto"
    max_tokens_per_batch: int = 16384
    max_batch_size: int = 64
    rows_per_actor_call: int = 16
    # vllm backend
    tensor_parallel_size: int = 1
    num_replicas: int = 1
    vllm_batch_size: int = 64
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    accelerator_type: str | None = None
    trust_remote_code: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {BACKENDS}")
        if self.num_actors < 1 or self.num_replicas < 1 or self.tensor_parallel_size < 1:
            raise ValueError("--num-actors, --num-replicas and --tensor-parallel-size must be at least 1")
        if self.chunk_rows < 1 or self.rows_per_actor_call < 1 or self.max_batch_size < 1:
            raise ValueError("--chunk-rows, --rows-per-actor-call and --max-batch-size must be positive")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ValueError("--max-prompt-length must be positive")

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.model


def fingerprint(cfg: GenerateConfig, files: list[str]) -> dict:
    from prefsel.score_job import model_stamp

    return {
        "data": files, "model": model_stamp(cfg.model), "tokenizer": model_stamp(cfg.tokenizer_path),
        "backend": cfg.backend, "sampling": asdict(cfg.sampling), "chat_template": cfg.chat_template,
        "max_prompt_length": cfg.max_prompt_length, "chunk_rows": cfg.chunk_rows, "split": cfg.split,
        "dtype": cfg.dtype,
    }


# ---- stage functions (Ray workers) ----------------------------------------------------------------

def prepare_prompts(rows, tokenizer, max_prompt_length: int | None) -> list[dict]:
    """Validate and tokenize raw prompt rows (sources.RawRow); every row comes out, maybe with a reason."""
    from prefsel.prepare import dumps

    out = []
    for r in rows:
        if r.record is None:
            out.append({"row_id": r.row_id, "record": r.raw or "", "reason": r.error or "row: unreadable",
                        "prompt_ids": []})
            continue
        text = dumps(r.record)
        try:
            ids = encode_prompt(tokenizer, parse_prompt_row(r.record).example)
            if max_prompt_length is not None and len(ids) > max_prompt_length:
                raise RowError(f"field 'prompt': too long: {len(ids)} tokens > max_prompt_length {max_prompt_length}")
            out.append({"row_id": r.row_id, "record": text, "reason": None, "prompt_ids": ids})
        except RowError as e:
            out.append({"row_id": r.row_id, "record": text, "reason": str(e), "prompt_ids": []})
    return out


def prepare_batch(batch: pa.Table, *, tok_args: dict, max_prompt_length: int | None) -> pa.Table:
    """Ray Data task: read the chunks in `batch`; validate and tokenize their prompts."""
    from prefsel.score_job import chunk_from_row, pair_tokenizer
    from prefsel.sources import read_chunk

    tokenizer = pair_tokenizer(**tok_args)
    rows = []
    for row in batch.to_pylist():
        chunk = chunk_from_row(row)
        for p in prepare_prompts(read_chunk(chunk), tokenizer, max_prompt_length):
            rows.append({**p, "chunk_id": chunk.chunk_id})
    return pa.Table.from_pylist(rows, schema=PREPARED_SCHEMA)


def usable_only(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_null(batch["reason"])).select(["row_id", "chunk_id", "prompt_ids"])


class GenerateActor:
    """Ray Data actor (hf backend): holds the policy; one output row per (prompt, sample)."""

    def __init__(self, cfg: GenerateConfig) -> None:
        import torch

        from prefsel.models import load_causal_lm, load_tokenizer, resolve_device

        if cfg.cpus_per_actor >= 1:
            torch.set_num_threads(int(cfg.cpus_per_actor))
        self.cfg = cfg
        self.device = resolve_device("cuda" if cfg.gpus_per_actor > 0 else "cpu")
        self.model = load_causal_lm(cfg.model, dtype=cfg.dtype, device=str(self.device),
                                    trust_remote_code=cfg.trust_remote_code)
        self.tokenizer = load_tokenizer(cfg.tokenizer_path, trust_remote_code=cfg.trust_remote_code)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from prefsel.generation.hf_backend import generate_samples

        s = self.cfg.sampling
        reqs = [
            SampleRequest((r["row_id"], r["chunk_id"], k), r["prompt_ids"], sample_seed(s.seed, r["row_id"], k))
            for r in batch.to_pylist()
            for k in range(s.num_samples)
        ]
        results = generate_samples(self.model, self.tokenizer, reqs, s, device=self.device,
                                   max_tokens_per_batch=self.cfg.max_tokens_per_batch,
                                   max_batch_size=self.cfg.max_batch_size)
        rows = [
            {"row_id": x.key[0], "chunk_id": x.key[1], "sample_index": x.key[2], "sample_text": x.text,
             "sample_tokens": len(x.token_ids), "sample_finished": x.finished, "sample_error": x.error}
            for x in results
        ]
        return pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)


# ---- driver side ------------------------------------------------------------------------------------

def assemble_row(record: dict, row_id: int, samples: list[dict]) -> tuple[dict | None, str | None, dict]:
    """(output row, reject reason, stats) of one prompt from its samples (any order).

    Existing responses are kept first; empty samples are dropped (counted); a sample that failed
    rejects the row; a stale `rewards` is dropped (it no longer lines up with `responses`).
    """
    samples = sorted(samples, key=lambda s: s["sample_index"])
    stats = {"samples": len(samples), "samples_empty": 0, "generated_tokens": 0, "samples_unfinished": 0}
    errors = [s["sample_error"] for s in samples if s.get("sample_error")]
    if errors:
        return None, f"{errors[0]} ({len(errors)} of {len(samples)} samples failed)", stats
    existing = list(record.get("responses") or [])
    new, tokens, finished = [], [], []
    for s in samples:
        stats["generated_tokens"] += int(s["sample_tokens"])
        if not s["sample_text"].strip():
            stats["samples_empty"] += 1
            continue
        stats["samples_unfinished"] += 0 if s["sample_finished"] else 1
        new.append(s["sample_text"])
        tokens.append(int(s["sample_tokens"]))
        finished.append(bool(s["sample_finished"]))
    if not existing and not new:
        return None, f"generation: all {len(samples)} samples empty", stats
    out = {"row_id": row_id}
    out.update({k: v for k, v in record.items() if k not in ("row_id", "rewards", "responses",
                                                             "response_tokens", "finished")})
    out["responses"] = existing + new
    out["response_tokens"] = [None] * len(existing) + tokens
    out["finished"] = [None] * len(existing) + finished
    return out, None, stats


class GenerationSink:
    """Groups sample rows by prompt and writes each chunk once all its rows are done."""

    def __init__(self, out: JsonlRunOutput, chunks: list[Chunk], num_samples: int) -> None:
        self.out = out
        self.num_samples = num_samples
        self.expected = {c.chunk_id: c.num_rows for c in chunks}
        self.done: dict[int, list[tuple[int, dict | None, dict | None]]] = {c.chunk_id: [] for c in chunks}
        self.pending: dict[int, dict] = {}
        self.stats = {"samples": 0, "samples_empty": 0, "generated_tokens": 0, "samples_unfinished": 0,
                      "prompt_tokens": 0}
        self.written = 0

    def register(self, row: dict) -> None:
        cid, rid = row["chunk_id"], row["row_id"]
        if row["reason"] is not None:
            try:
                original = json.loads(row["record"])
            except json.JSONDecodeError:
                original = row["record"]
            self.done[cid].append((rid, None, {"row_id": rid, "reason": row["reason"], "record": original}))
        else:
            self.pending[rid] = {"chunk_id": cid, "record": row["record"], "samples": []}

    def check_all(self) -> None:
        for cid in list(self.done):
            self._maybe_flush(cid)

    def add_sample(self, s: dict) -> None:
        p = self.pending[s["row_id"]]
        p["samples"].append(s)
        if len(p["samples"]) == self.num_samples:
            del self.pending[s["row_id"]]
            record = json.loads(p["record"])
            row, reason, stats = assemble_row(record, s["row_id"], p["samples"])
            for k, v in stats.items():
                self.stats[k] += v
            reject = None if reason is None else {"row_id": s["row_id"], "reason": reason, "record": record}
            self.done[p["chunk_id"]].append((s["row_id"], row, reject))
            self._maybe_flush(p["chunk_id"])

    def _maybe_flush(self, cid: int) -> None:
        if cid in self.done and len(self.done[cid]) == self.expected[cid]:
            items = sorted(self.done.pop(cid), key=lambda x: x[0])
            self.out.write_rows(cid, [r for _, r, _ in items if r is not None],
                                [j for _, _, j in items if j is not None])
            self.written += 1

    def unfinished(self) -> dict:
        return {cid: len(v) for cid, v in self.done.items()}


def run_generate(cfg: GenerateConfig) -> dict:
    """Generate `num_samples` responses per prompt of `cfg.prompts` into `cfg.output`."""
    import ray
    from ray.data import ActorPoolStrategy

    from prefsel.generation.hf_backend import eos_ids
    from prefsel.models import load_tokenizer
    from prefsel.score_job import chunk_rows_for_ray, init_ray

    t0 = time.time()
    if cfg.backend == "vllm":
        from prefsel.generation.vllm_backend import require_vllm

        require_vllm()
    plan = plan_source(cfg.prompts, cfg.chunk_rows, cfg.split)
    out = JsonlRunOutput(cfg.output, fingerprint(cfg, plan.files), kind="generations", overwrite=cfg.overwrite)
    done = out.done_chunks()
    todo = [c for c in plan.chunks if c.chunk_id not in done]
    sink = GenerationSink(out, todo, cfg.sampling.num_samples)
    if todo:
        init_ray()
        tok_args = dict(path=cfg.tokenizer_path, chat_template=cfg.chat_template, max_length=None,
                        truncation="reject", trust_remote_code=cfg.trust_remote_code)
        prepared = ray.data.from_items(chunk_rows_for_ray(todo), override_num_blocks=len(todo)).map_batches(
            prepare_batch, batch_size=1, batch_format="pyarrow", num_cpus=1,
            fn_kwargs=dict(tok_args=tok_args, max_prompt_length=cfg.max_prompt_length),
        ).materialize()
        for b in prepared.select_columns(["row_id", "chunk_id", "record", "reason", "prompt_ids"]).iter_batches(
                batch_format="pyarrow", batch_size=4096):
            for row in b.to_pylist():
                sink.stats["prompt_tokens"] += len(row["prompt_ids"] or [])
                row.pop("prompt_ids")
                sink.register(row)
        sink.check_all()
        usable = prepared.map_batches(usable_only, batch_format="pyarrow", batch_size=None)
        if sink.pending:
            if cfg.backend == "hf":
                samples = usable.map_batches(
                    GenerateActor, batch_size=cfg.rows_per_actor_call, batch_format="pyarrow",
                    compute=ActorPoolStrategy(size=cfg.num_actors), num_gpus=cfg.gpus_per_actor,
                    num_cpus=cfg.cpus_per_actor, fn_constructor_kwargs=dict(cfg=cfg),
                )
                parse = None
            else:
                samples, parse = _vllm_samples(cfg, usable, eos_ids(load_tokenizer(
                    cfg.tokenizer_path, trust_remote_code=cfg.trust_remote_code)))
            for b in samples.iter_batches(batch_format="pyarrow", batch_size=None):
                for s in b.to_pylist():
                    sink.add_sample(parse(s) if parse else s)
        if sink.pending or sink.done:
            raise RuntimeError(f"generation ended incomplete: {len(sink.pending)} prompts without all samples; "
                               f"chunks (rows done): {sink.unfinished()}")
    wall = time.time() - t0
    c = out.count()
    rows_in = plan.num_rows
    if rows_in != c["rows_out"] + c["rows_rejected"]:
        raise RuntimeError(f"row accounting failed: {rows_in} in, {c['rows_out']} out + {c['rows_rejected']} rejected")
    tokens = sink.stats["generated_tokens"]
    summary = {
        "rows_in": rows_in, "rows_out": c["rows_out"], "rows_rejected": c["rows_rejected"],
        "reject_reasons": c["reject_reasons"], "responses": c["responses"],
        **{k: v for k, v in sink.stats.items()},
        "tokens_per_s": round(tokens / wall, 1) if wall > 0 and not done else None,
        "wall_s": round(wall, 2), "resumed_chunks": len(done), "chunks": len(plan.chunks),
        "backend": cfg.backend, "model": cfg.model, "num_samples": cfg.sampling.num_samples,
        "temperature": cfg.sampling.temperature, "top_p": cfg.sampling.top_p,
        "max_tokens": cfg.sampling.max_tokens, "seed": cfg.sampling.seed, "prompts": cfg.prompts,
        "outputs": {"multi": f"{cfg.output.rstrip('/')}/multi", "rejects": f"{cfg.output.rstrip('/')}/rejects",
                    "summary": f"{cfg.output.rstrip('/')}/summary.json"},
    }
    out.finalize(summary)
    return summary


def _vllm_samples(cfg: GenerateConfig, usable, stop_ids: list[int]):
    from prefsel.generation.vllm_backend import (
        build_vllm_processor,
        parse_output_row,
        processor_config_kwargs,
        request_rows,
    )

    kwargs = processor_config_kwargs(
        cfg.model, tensor_parallel_size=cfg.tensor_parallel_size, num_replicas=cfg.num_replicas,
        batch_size=cfg.vllm_batch_size, max_model_len=cfg.max_model_len, dtype=cfg.dtype,
        gpu_memory_utilization=cfg.gpu_memory_utilization, trust_remote_code=cfg.trust_remote_code,
        accelerator_type=cfg.accelerator_type,
    )
    processor = build_vllm_processor(kwargs, stop_ids, cfg.sampling.max_tokens)
    requests = usable.flat_map(request_rows, fn_kwargs=dict(cfg=cfg.sampling, stop_ids=stop_ids))
    max_tokens = cfg.sampling.max_tokens
    return processor(requests), (lambda row: parse_output_row(row, stop_ids, max_tokens))
