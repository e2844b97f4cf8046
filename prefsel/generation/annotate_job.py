"""`prefsel annotate` on Ray Data: multi-response rows -> `rewards` from a reward model.

chunk descriptors -> prepare (CPU tasks: read, validate as `multi`, tokenize prompt and each
response with the RM's tokenizer and chat template; over-long rows get a reason) -> RewardActor
pool (batched by tokens) -> driver writes each chunk's shard when all its rows are in.
Input: a `prefsel generate` output (its multi/ folder is read), or any JSON lines / Parquet /
datasets source with `prompt` and `responses`. Output rows keep every field and gain `rewards`
(one float per response, same order); rows_in = rows_out + rows_rejected.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

import pyarrow as pa

from prefsel.formats import RowError, to_example
from prefsel.generation.output import JsonlRunOutput
from prefsel.sources import DEFAULT_CHUNK_ROWS, Chunk, plan_source

PREPARED_SCHEMA = pa.schema([
    ("row_id", pa.int64()), ("out_id", pa.int64()), ("chunk_id", pa.int64()), ("record", pa.large_string()),
    ("reason", pa.string()), ("prompt_ids", pa.list_(pa.int32())), ("response_ids", pa.list_(pa.list_(pa.int32()))),
])
SCORED_SCHEMA = pa.schema([
    ("row_id", pa.int64()), ("out_id", pa.int64()), ("chunk_id", pa.int64()), ("record", pa.large_string()),
    ("reason", pa.string()), ("rewards", pa.list_(pa.float64())), ("tokens", pa.int64()),
])


@dataclass
class AnnotateConfig:
    data: str
    reward_model: str
    output: str
    tokenizer: str | None = None
    chat_template: str = "auto"
    max_length: int | None = None
    split: str = "train"
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    num_actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    dtype: str = "auto"
    max_tokens_per_batch: int = 16384
    rows_per_actor_call: int = 64
    attn_implementation: str | None = None
    trust_remote_code: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.num_actors < 1 or self.chunk_rows < 1 or self.rows_per_actor_call < 1:
            raise ValueError("--num-actors, --chunk-rows and --rows-per-actor-call must be positive")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError("--max-length must be at least 2")

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.reward_model


def fingerprint(cfg: AnnotateConfig, files: list[str]) -> dict:
    from prefsel.score_job import model_stamp

    return {"data": files, "reward_model": model_stamp(cfg.reward_model), "tokenizer": model_stamp(cfg.tokenizer_path),
            "chat_template": cfg.chat_template, "max_length": cfg.max_length, "chunk_rows": cfg.chunk_rows,
            "split": cfg.split, "dtype": cfg.dtype}


def prepare_rows(rows, tokenizer) -> list[dict]:
    """Validate (`multi`) and tokenize raw rows with the RM tokenizer; every row comes out."""
    from prefsel.prepare import dumps

    out = []
    for r in rows:
        base = {"row_id": r.row_id, "out_id": r.row_id, "prompt_ids": [], "response_ids": []}
        if r.record is None:
            out.append({**base, "record": r.raw or "", "reason": r.error or "row: unreadable"})
            continue
        rec = r.record
        if isinstance(rec, dict) and isinstance(rec.get("row_id"), int) and not isinstance(rec.get("row_id"), bool):
            base["out_id"] = rec["row_id"]  # keep the id given by `prefsel generate`
        text = dumps(rec)
        try:
            ex = to_example(rec, "multi")
            tok = tokenizer.encode(ex)
            out.append({**base, "record": text, "reason": None, "prompt_ids": tok.prompt_ids,
                        "response_ids": tok.response_ids})
        except RowError as e:
            out.append({**base, "record": text, "reason": str(e)})
    return out


def prepare_batch(batch: pa.Table, *, tok_args: dict) -> pa.Table:
    from prefsel.score_job import chunk_from_row, pair_tokenizer
    from prefsel.sources import read_chunk

    tokenizer = pair_tokenizer(**tok_args)
    rows = []
    for row in batch.to_pylist():
        chunk = chunk_from_row(row)
        rows += [{**p, "chunk_id": chunk.chunk_id} for p in prepare_rows(read_chunk(chunk), tokenizer)]
    return pa.Table.from_pylist(rows, schema=PREPARED_SCHEMA)


def score_rows(model, rows: list[dict], pad_token_id: int, max_tokens_per_batch: int, device) -> list[dict]:
    """Rewards for the usable rows of a batch (all their responses batched together by tokens)."""
    from prefsel.generation.rewards import score_sequences

    prompts, responses, owner = [], [], []
    for i, r in enumerate(rows):
        if r["reason"] is None:
            for resp in r["response_ids"]:
                prompts.append(r["prompt_ids"])
                responses.append(resp)
                owner.append(i)
    values = score_sequences(model, prompts, responses, pad_token_id,
                             max_tokens_per_batch=max_tokens_per_batch, device=device) if prompts else []
    per_row: dict[int, list[float]] = {}
    for i, v in zip(owner, values):
        per_row.setdefault(i, []).append(v)
    out = []
    for i, r in enumerate(rows):
        rewards, reason, tokens = None, r["reason"], 0
        if reason is None:
            rewards = per_row[i]
            tokens = sum(len(r["prompt_ids"]) + len(x) for x in r["response_ids"])
            if not all(math.isfinite(v) for v in rewards):
                reason, rewards = "reward: non-finite reward from the reward model (overflow? try --dtype fp32)", None
        out.append({k: r[k] for k in ("row_id", "out_id", "chunk_id", "record")} |
                   {"reason": reason, "rewards": rewards, "tokens": tokens})
    return out


class RewardActor:
    """Ray Data actor: holds the reward model; adds `rewards` to usable rows."""

    def __init__(self, cfg: AnnotateConfig, pad_token_id: int) -> None:
        import torch

        from prefsel.generation.rewards import load_reward_model
        from prefsel.models import resolve_device

        if cfg.cpus_per_actor >= 1:
            torch.set_num_threads(int(cfg.cpus_per_actor))
        self.cfg = cfg
        self.pad = pad_token_id
        self.device = resolve_device("cuda" if cfg.gpus_per_actor > 0 else "cpu")
        self.model = load_reward_model(cfg.reward_model, dtype=cfg.dtype, device=str(self.device),
                                       trust_remote_code=cfg.trust_remote_code,
                                       attn_implementation=cfg.attn_implementation)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = score_rows(self.model, batch.to_pylist(), self.pad, self.cfg.max_tokens_per_batch, self.device)
        return pa.Table.from_pylist(rows, schema=SCORED_SCHEMA)


class AnnotateSink:
    def __init__(self, out: JsonlRunOutput, chunks: list[Chunk]) -> None:
        self.out = out
        self.expected = {c.chunk_id: c.num_rows for c in chunks}
        self.pending: dict[int, list[dict]] = {}
        self.tokens = 0

    def add(self, table: pa.Table) -> None:
        for row in table.to_pylist():
            self.tokens += row["tokens"] or 0
            cid = row["chunk_id"]
            self.pending.setdefault(cid, []).append(row)
            if len(self.pending[cid]) == self.expected[cid]:
                self._flush(cid)

    def _flush(self, cid: int) -> None:
        good, rejects = [], []
        for r in sorted(self.pending.pop(cid), key=lambda r: r["row_id"]):
            try:
                record = json.loads(r["record"])
            except json.JSONDecodeError:
                record = r["record"]
            if r["reason"] is not None:
                rejects.append({"row_id": r["out_id"], "reason": r["reason"], "record": record})
            else:
                row = {"row_id": r["out_id"]}
                row.update({k: v for k, v in record.items() if k not in ("row_id", "rewards")})
                row["rewards"] = r["rewards"]
                good.append(row)
        self.out.write_rows(cid, good, rejects)


def run_annotate(cfg: AnnotateConfig) -> dict:
    import ray
    from ray.data import ActorPoolStrategy

    from prefsel.models import load_tokenizer
    from prefsel.score_job import chunk_rows_for_ray, init_ray

    t0 = time.time()
    plan = plan_source(cfg.data, cfg.chunk_rows, cfg.split)
    out = JsonlRunOutput(cfg.output, fingerprint(cfg, plan.files), kind="multi", overwrite=cfg.overwrite)
    done = out.done_chunks()
    todo = [c for c in plan.chunks if c.chunk_id not in done]
    sink = AnnotateSink(out, todo)
    if todo:
        init_ray()
        tok = load_tokenizer(cfg.tokenizer_path, trust_remote_code=cfg.trust_remote_code)
        tok_args = dict(path=cfg.tokenizer_path, chat_template=cfg.chat_template, max_length=cfg.max_length,
                        truncation="reject", trust_remote_code=cfg.trust_remote_code)
        ds = ray.data.from_items(chunk_rows_for_ray(todo), override_num_blocks=len(todo))
        ds = ds.map_batches(prepare_batch, batch_size=1, batch_format="pyarrow", num_cpus=1,
                            fn_kwargs=dict(tok_args=tok_args))
        ds = ds.map_batches(
            RewardActor, batch_size=cfg.rows_per_actor_call, batch_format="pyarrow",
            compute=ActorPoolStrategy(size=cfg.num_actors), num_gpus=cfg.gpus_per_actor,
            num_cpus=cfg.cpus_per_actor, fn_constructor_kwargs=dict(cfg=cfg, pad_token_id=tok.pad_token_id),
        )
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            sink.add(batch)
        if sink.pending:
            raise RuntimeError(f"chunks ended incomplete: { {c: len(v) for c, v in sink.pending.items()} }")
    wall = time.time() - t0
    c = out.count()
    if plan.num_rows != c["rows_out"] + c["rows_rejected"]:
        raise RuntimeError(f"row accounting failed: {plan.num_rows} in, {c['rows_out']} out + {c['rows_rejected']} rejected")
    summary = {
        "rows_in": plan.num_rows, "rows_out": c["rows_out"], "rows_rejected": c["rows_rejected"],
        "reject_reasons": c["reject_reasons"], "responses_scored": c["responses"], "tokens": sink.tokens,
        "tokens_per_s": round(sink.tokens / wall, 1) if wall > 0 and not done else None,
        "wall_s": round(wall, 2), "resumed_chunks": len(done), "chunks": len(plan.chunks),
        "reward_model": cfg.reward_model, "max_length": cfg.max_length, "data": cfg.data,
        "outputs": {"multi": f"{cfg.output.rstrip('/')}/multi", "rejects": f"{cfg.output.rstrip('/')}/rejects",
                    "summary": f"{cfg.output.rstrip('/')}/summary.json"},
    }
    out.finalize(summary)
    return summary
