"""`prefsel generate` on Ray Data: prompts -> K sampled responses each -> multi-response rows.

hf backend: a job on the shared skeleton (prefsel.jobs): read tasks validate, chat-template and
tokenize each chunk's prompts; `GenerateActor`s (transformers generate, seeded per sample) turn
each usable prompt into its output row; the driver writes a chunk's shard as soon as all its
rows are in.
vllm backend: the same read stage, materialized; the driver registers every row (rejects go
straight to their chunk), the usable rows go through flat_map (K requests per prompt) into the
ray.data.llm vLLM processor, and the driver groups the samples back by row_id (a vLLM engine
replica owns the GPU; its samples come back one per request, in any order).
Counts add up: rows_in = rows_out + rows_rejected.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from prefsel.checks import require
from prefsel.formats import RowError
from prefsel.generation.hf_backend import SampleRequest, SamplingConfig
from prefsel.generation.output import JsonlRunOutput
from prefsel.generation.prompts import carried_row_id, encode_prompt, parse_prompt_row, sample_seed
from prefsel.generation.vllm_backend import SAMPLE_COLUMNS
from prefsel.jobs import ActorResources, JobConfig, ModelActor, TokenizerSpec, job_fingerprint, original_record, run_chunks
from prefsel.logprobs import DEFAULT_MAX_TOKENS_PER_BATCH
from prefsel.sources import Chunk, RawRow, plan_source

BACKENDS = ("vllm", "hf")
# row_id: the row's position in this input (the key samples are grouped by); out_id: the id it
# is written with and seeded by (`carried_row_id`); first_sample: the index of its first new
# sample, after the responses it came with, so a rerun over its own output draws new samples
PREPARED_SCHEMA = pa.schema([
    ("row_id", pa.int64()), ("out_id", pa.int64()), ("first_sample", pa.int64()), ("chunk_id", pa.int64()),
    ("record", pa.large_string()), ("reason", pa.string()), ("prompt_ids", pa.list_(pa.int32())),
])
SAMPLE_SCHEMA = pa.schema([
    ("row_id", pa.int64()), ("chunk_id", pa.int64()), ("sample_index", pa.int64()),
    ("sample_text", pa.large_string()), ("sample_tokens", pa.int64()), ("sample_finished", pa.bool_()),
    ("sample_error", pa.string()),
])
assert tuple(SAMPLE_SCHEMA.names) == SAMPLE_COLUMNS
STAT_KEYS = ("samples", "samples_empty", "generated_tokens", "samples_unfinished", "prompt_tokens")


@dataclass
class GenerateConfig(JobConfig):
    prompts: str
    model: str
    output: str
    backend: str = "vllm"
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    max_prompt_length: int | None = None
    # hf backend
    resources: ActorResources = field(default_factory=lambda: ActorResources(rows_per_actor_call=16))
    max_tokens_per_batch: int = DEFAULT_MAX_TOKENS_PER_BATCH
    max_batch_size: int = 64
    # vllm backend
    tensor_parallel_size: int = 1
    num_replicas: int = 1
    vllm_batch_size: int = 64
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    accelerator_type: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        require((self.backend in BACKENDS, f"backend: must be one of {BACKENDS}"),
                (self.num_replicas >= 1, "num_replicas: must be at least 1"),
                (self.tensor_parallel_size >= 1, "tensor_parallel_size: must be at least 1"),
                (self.max_batch_size >= 1, "max_batch_size: must be positive"),
                (self.max_prompt_length is None or self.max_prompt_length >= 1, "max_prompt_length: must be positive"))


def fingerprint(cfg: GenerateConfig, files: list[str]) -> dict:
    return {**job_fingerprint(cfg, files, ("model",), ("backend", "max_prompt_length")),
            "sampling": asdict(cfg.sampling)}


# ---- stage functions (Ray workers) ----------------------------------------------------------------

def prepare_prompts(rows, tokenizer, max_prompt_length: int | None, positions: int | None = None,
                    max_tokens: int = 0) -> list[dict]:
    """Validate and tokenize raw prompt rows (sources.RawRow); every row comes out, maybe with a reason.
    With `positions` (the hf backend's model), a prompt whose `max_tokens` new tokens could run
    past them is a reject: generating there crashes a learned-position model (vLLM stops a
    request at its own max_model_len instead). The full prompt + max_tokens must fit, one more
    than generating needs (the last token is never fed back): the row must fit to be scored and
    trained on."""
    from prefsel.prepare import dumps, record_text, unexpected_reason
    from prefsel.sources import not_object_reason, value_problem

    out = []
    for r in rows:
        base = {"row_id": r.row_id, "out_id": r.row_id, "first_sample": 0}
        if r.record is None:
            out.append({**base, "record": r.reject_text(), "reason": r.error or not_object_reason(None),
                        "prompt_ids": []})
            continue
        text = None
        try:  # one bad row never aborts the job: any failure is its reject reason
            problem = value_problem(r.record) if isinstance(r.record, dict) else None
            if problem:
                raise RowError(problem)
            text = dumps(r.record)
            row = parse_prompt_row(r.record)
            ids = encode_prompt(tokenizer, row.example)
            base.update(out_id=carried_row_id(r.record, r.row_id), first_sample=len(row.existing))
            if max_prompt_length is not None and len(ids) > max_prompt_length:
                raise RowError(f"field 'prompt': too long: {len(ids)} tokens > max_prompt_length {max_prompt_length}")
            if positions is not None and len(ids) + max_tokens > positions:
                raise RowError(f"field 'prompt': too long: {len(ids)} tokens + max_tokens {max_tokens} > the "
                               f"model's {positions} positions")
            out.append({**base, "record": text, "reason": None, "prompt_ids": ids})
        except RowError as e:
            out.append({**base, "record": text or record_text(r.record), "reason": str(e), "prompt_ids": []})
        except Exception as e:  # noqa: BLE001
            out.append({**base, "record": text or record_text(r.record), "reason": unexpected_reason(e),
                        "prompt_ids": []})
    return out


@dataclass(frozen=True)
class PreparePrompts:
    """Read-task stage: validate, chat-template and tokenize a chunk's prompts."""

    tokenizer: TokenizerSpec
    max_prompt_length: int | None
    positions: int | None = None  # hf backend: prompt + max_tokens must fit the model's positions
    max_tokens: int = 0

    def __call__(self, chunk: Chunk, rows: list[RawRow]) -> pa.Table:
        prepared = prepare_prompts(rows, self.tokenizer.load(), self.max_prompt_length, self.positions,
                                   self.max_tokens)
        return pa.Table.from_pylist([{**p, "chunk_id": chunk.chunk_id} for p in prepared], schema=PREPARED_SCHEMA)


def usable_only(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_null(batch["reason"])).select(["row_id", "out_id", "first_sample", "chunk_id",
                                                               "prompt_ids"])


class GenerateActor(ModelActor):
    """hf backend: holds the policy; turns each usable prompt into its output row (K samples)."""

    inputs = ("out_id", "first_sample", "record", "prompt_ids")
    consumed = ("first_sample", "prompt_ids")
    results = pa.schema([("reason", pa.string()), ("output", pa.large_string()), *[(k, pa.int64()) for k in STAT_KEYS]])

    def __init__(self, resources: ActorResources, cfg: GenerateConfig) -> None:
        super().__init__(resources)
        from prefsel.models import load_causal_lm, load_tokenizer

        self.cfg = cfg
        self.model = load_causal_lm(cfg.model, dtype=cfg.dtype, device=str(self.device),
                                    trust_remote_code=cfg.trust_remote_code)
        self.tokenizer = load_tokenizer(cfg.tokenizer_path, trust_remote_code=cfg.trust_remote_code)

    def process(self, rows: list[dict]) -> list[dict]:
        from prefsel.generation.hf_backend import generate_samples

        s = self.cfg.sampling
        reqs = [SampleRequest((i, k), r["prompt_ids"], sample_seed(s.seed, r["out_id"], r["first_sample"] + k))
                for i, r in enumerate(rows) for k in range(s.num_samples)]
        results = generate_samples(self.model, self.tokenizer, reqs, s, device=self.device,
                                   max_tokens_per_batch=self.cfg.max_tokens_per_batch,
                                   max_batch_size=self.cfg.max_batch_size)
        samples: list[list[dict]] = [[] for _ in rows]
        for x in results:
            samples[x.key[0]].append({"sample_index": x.key[1], "sample_text": x.text, "sample_tokens": len(x.token_ids),
                                      "sample_finished": x.finished, "sample_error": x.error})
        out = []
        for r, smp in zip(rows, samples):
            row, reason, stats = assemble_row(json.loads(r["record"]), r["out_id"], smp)
            stats["prompt_tokens"] = len(r["prompt_ids"])
            out.append({"reason": reason, "output": None if row is None else json.dumps(row, ensure_ascii=False),
                        **stats})
        return out


class GeneratedShardWriter:
    """Driver stage (hf backend): one chunk's rows -> its JSON lines shard + rejects."""

    def __init__(self, out: JsonlRunOutput) -> None:
        self.out = out
        self.stats = dict.fromkeys(STAT_KEYS, 0)

    def __call__(self, chunk_id: int, table: pa.Table) -> None:
        rows = table.to_pylist()
        for r in rows:
            for k in STAT_KEYS:
                self.stats[k] += r.get(k) or 0
        good = [json.loads(r["output"]) for r in rows if r["reason"] is None]
        rejects = [{"row_id": r["out_id"], "reason": r["reason"], "record": original_record(r["record"])}
                   for r in rows if r["reason"] is not None]
        self.out.write_rows(chunk_id, good, rejects)


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
    """vllm backend: groups sample rows by prompt and writes each chunk once all its rows are done."""

    def __init__(self, out: JsonlRunOutput, chunks: list[Chunk], num_samples: int) -> None:
        self.out = out
        self.num_samples = num_samples
        self.expected = {c.chunk_id: c.num_rows for c in chunks}
        self.done: dict[int, list[tuple[int, dict | None, dict | None]]] = {c.chunk_id: [] for c in chunks}
        self.pending: dict[int, dict] = {}
        self.stats = dict.fromkeys(STAT_KEYS, 0)

    def register(self, row: dict) -> None:
        cid, rid = row["chunk_id"], row["row_id"]
        if row["reason"] is not None:
            reject = {"row_id": row["out_id"], "reason": row["reason"], "record": original_record(row["record"])}
            self.done[cid].append((rid, None, reject))
        else:
            self.pending[rid] = {"chunk_id": cid, "out_id": row["out_id"], "record": row["record"], "samples": []}

    def check_all(self) -> None:
        for cid in list(self.done):
            self._maybe_flush(cid)

    def add_sample(self, s: dict) -> None:
        p = self.pending[s["row_id"]]
        p["samples"].append(s)
        if len(p["samples"]) == self.num_samples:
            del self.pending[s["row_id"]]
            record = json.loads(p["record"])
            row, reason, stats = assemble_row(record, p["out_id"], p["samples"])
            for k, v in stats.items():
                self.stats[k] += v
            reject = None if reason is None else {"row_id": p["out_id"], "reason": reason, "record": record}
            self.done[p["chunk_id"]].append((s["row_id"], row, reject))
            self._maybe_flush(p["chunk_id"])

    def _maybe_flush(self, cid: int) -> None:
        if cid in self.done and len(self.done[cid]) == self.expected[cid]:
            items = sorted(self.done.pop(cid), key=lambda x: x[0])
            self.out.write_rows(cid, [r for _, r, _ in items if r is not None],
                                [j for _, _, j in items if j is not None])

    def unfinished(self) -> dict:
        return {cid: len(v) for cid, v in self.done.items()}


def _hf_room(cfg: GenerateConfig) -> tuple[int | None, int]:
    """(the model's positions, max_tokens) that a prompt must fit with the hf backend, or
    (None, 0): vLLM checks its own max_model_len (which knows rope scaling). Refuses a max_tokens
    that leaves no room for any prompt."""
    if cfg.backend != "hf":
        return None, 0
    from prefsel.models import model_positions

    found = model_positions(cfg.model, trust_remote_code=cfg.trust_remote_code)
    if found is None:
        return None, 0
    limit, source = found
    if cfg.sampling.max_tokens >= limit:
        raise ValueError(f"max_tokens: {cfg.sampling.max_tokens} leaves no room for a prompt in the model's "
                         f"{limit} positions ({source}); give at most {limit - 1}")
    return limit, cfg.sampling.max_tokens


def run_generate(cfg: GenerateConfig) -> dict:
    """Generate `num_samples` responses per prompt of `cfg.prompts` into `cfg.output`."""
    t0 = time.time()
    if cfg.backend == "vllm":
        from prefsel.generation.vllm_backend import require_vllm

        require_vllm()
    if cfg.max_prompt_length is not None:  # a longer prompt than the model's positions must not pass
        from prefsel.models import check_max_length

        check_max_length(cfg.max_prompt_length, cfg.model, field="max_prompt_length",
                         trust_remote_code=cfg.trust_remote_code)
    room = _hf_room(cfg)  # before an output exists
    plan = plan_source(cfg.prompts, cfg.chunk_rows, cfg.split)
    out = JsonlRunOutput(cfg.output, fingerprint(cfg, plan.files), kind="generations", overwrite=cfg.overwrite,
                         inputs=[("--model", cfg.model), ("--tokenizer", cfg.tokenizer),
                                 *(("--prompts", f) for f in (cfg.prompts, *plan.files))])
    done = out.done_chunks()
    todo = [c for c in plan.chunks if c.chunk_id not in done]
    prepare = PreparePrompts(TokenizerSpec(cfg.tokenizer_path, cfg.chat_template, None, "reject",
                                           cfg.trust_remote_code), cfg.max_prompt_length,
                             *room)
    rows_per_actor = {}
    if cfg.backend == "hf":
        writer = GeneratedShardWriter(out)
        collector = run_chunks(todo, prepare, GenerateActor, dict(cfg=cfg), cfg.resources, writer)
        stats, rows_per_actor = writer.stats, dict(collector.rows_per_actor)
    else:
        stats = _run_vllm(cfg, out, todo, prepare)
    wall = time.time() - t0
    c = out.count()
    rows_in = plan.num_rows
    if rows_in != c["rows_out"] + c["rows_rejected"]:
        raise RuntimeError(f"row accounting failed: {rows_in} in, {c['rows_out']} out + {c['rows_rejected']} rejected")
    tokens = stats["generated_tokens"]
    summary = {
        "rows_in": rows_in, "rows_out": c["rows_out"], "rows_rejected": c["rows_rejected"],
        "reject_reasons": c["reject_reasons"], "responses": c["responses"], **stats,
        # rows and responses count the whole output; the sample and token counts this run's chunks
        "stats_cover": "all chunks" if not done else f"the {len(todo)} chunks generated by this run",
        "rows_per_actor": rows_per_actor,
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


def _run_vllm(cfg: GenerateConfig, out: JsonlRunOutput, todo: list[Chunk], prepare: PreparePrompts) -> dict:
    """The vllm backend's driver loop (see the module docstring); returns the sample stats."""
    from prefsel.generation.hf_backend import eos_ids
    from prefsel.jobs import read_prepared
    from prefsel.models import load_tokenizer

    sink = GenerationSink(out, todo, cfg.sampling.num_samples)
    if not todo:
        return sink.stats
    prepared = read_prepared(todo, prepare).materialize()
    for b in prepared.select_columns(["row_id", "out_id", "chunk_id", "record", "reason", "prompt_ids"]).iter_batches(
            batch_format="pyarrow", batch_size=4096):
        for row in b.to_pylist():
            sink.stats["prompt_tokens"] += len(row["prompt_ids"] or [])
            row.pop("prompt_ids")
            sink.register(row)
    sink.check_all()
    if sink.pending:
        usable = prepared.map_batches(usable_only, batch_format="pyarrow", batch_size=None)
        # the stop ids vLLM uses: the tokenizer's EOS and the model's generation_config.json EOS ids
        stop_ids = eos_ids(load_tokenizer(cfg.tokenizer_path, trust_remote_code=cfg.trust_remote_code), cfg.model)
        samples, parse = _vllm_samples(cfg, usable, stop_ids)
        for b in samples.iter_batches(batch_format="pyarrow", batch_size=None):
            for s in b.to_pylist():
                sink.add_sample(parse(s))
    if sink.pending or sink.done:
        raise RuntimeError(f"generation ended incomplete: {len(sink.pending)} prompts without all samples; "
                           f"chunks (rows done): {sink.unfinished()}")
    return sink.stats


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
    processor = build_vllm_processor(kwargs, stop_ids)
    requests = usable.flat_map(request_rows, fn_kwargs=dict(cfg=cfg.sampling, stop_ids=stop_ids))
    return processor(requests), (lambda row: parse_output_row(row, stop_ids))
