"""`prefsel annotate`: multi-response rows -> `rewards` from a reward model.

A job on the shared skeleton (prefsel.jobs): read tasks validate each row as `multi` and tokenize
the prompt and every response with the RM's tokenizer and chat template (over-long rows get a
reason); `RewardActor`s score every response (prefsel.generation.rewards, batched by tokens);
the driver writes each chunk's JSON lines shard when all its rows are in.
Input: a `prefsel generate` output (its multi/ folder is read), or any JSON lines / Parquet /
datasets source with `prompt` and `responses`. Output rows keep every field and gain `rewards`
(one float per response, same order); rows_in = rows_out + rows_rejected.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import pyarrow as pa

from prefsel.checks import require
from prefsel.formats import RowError, to_example
from prefsel.generation.output import JsonlRunOutput
from prefsel.generation.prompts import carried_row_id
from prefsel.jobs import ActorResources, ModelActor, TokenizerSpec, group_by_owner
from prefsel.jobs import JobConfig, check_attn, job_fingerprint, original_record, run_chunks
from prefsel.packing import DEFAULT_MAX_TOKENS_PER_BATCH, ForwardStats, Layout
from prefsel.sources import Chunk, RawRow, plan_source
from prefsel.tokenization import TRUNCATION_MODES

PREPARED_SCHEMA = pa.schema([
    ("row_id", pa.int64()), ("out_id", pa.int64()), ("chunk_id", pa.int64()), ("record", pa.large_string()),
    ("reason", pa.string()), ("prompt_ids", pa.list_(pa.int32())), ("response_ids", pa.list_(pa.list_(pa.int32()))),
])


@dataclass
class AnnotateConfig(JobConfig):
    data: str
    reward_model: str
    output: str
    max_length: int | None = None  # None: the reward model's context
    truncation: str = "reject"  # or prompt-left: an over-long row loses prompt tokens from the left
    max_tokens_per_batch: int = DEFAULT_MAX_TOKENS_PER_BATCH
    attn_implementation: str = "auto"
    packing: bool = True  # prefsel.packing: several sequences per forward row
    share_prompt: bool = True  # a row's K responses share one run of its prompt
    resources: ActorResources = field(default_factory=lambda: ActorResources(rows_per_actor_call=64))

    model_field = "reward_model"

    def __post_init__(self) -> None:
        super().__post_init__()
        require((self.max_length is None or self.max_length >= 2, "max_length: must be at least 2"),
                (self.truncation in TRUNCATION_MODES, f"truncation: must be one of {TRUNCATION_MODES}"))
        check_attn(self.attn_implementation, self.resources)
        self.layout  # validates the layout fields

    @property
    def layout(self) -> Layout:
        return Layout(packing=self.packing, share_prompt=self.share_prompt, max_tokens=self.max_tokens_per_batch)


def fingerprint(cfg: AnnotateConfig, files: list[str]) -> dict:
    return job_fingerprint(cfg, files, ("reward_model",), ("max_length", "truncation"))


def prepare_multi_rows(rows, tokenizer) -> list[dict]:
    """Validate (`multi`) and tokenize raw rows with the RM tokenizer; every row comes out."""
    from prefsel.prepare import dumps, record_text, unexpected_reason
    from prefsel.sources import not_object_reason, value_problem

    out = []
    for r in rows:
        base = {"row_id": r.row_id, "out_id": r.row_id, "prompt_ids": [], "response_ids": []}
        if r.record is None:
            out.append({**base, "record": r.reject_text(), "reason": r.error or not_object_reason(None)})
            continue
        rec = r.record
        text = None
        try:  # one bad row never aborts the job: any failure is its reject reason
            problem = value_problem(rec) if isinstance(rec, dict) else None
            if problem:
                raise RowError(problem)
            base["out_id"] = carried_row_id(rec, r.row_id)  # the id `prefsel generate` gave
            text = dumps(rec)
            # an old `rewards` is replaced, not validated: a row re-annotated after its responses changed
            ex = to_example({k: v for k, v in rec.items() if k != "rewards"}, "multi")
            tok = tokenizer.encode(ex)
            out.append({**base, "record": text, "reason": None, "prompt_ids": tok.prompt_ids,
                        "response_ids": tok.response_ids})
        except RowError as e:
            out.append({**base, "record": text or record_text(rec), "reason": str(e)})
        except Exception as e:  # noqa: BLE001
            out.append({**base, "record": text or record_text(rec), "reason": unexpected_reason(e)})
    return out


@dataclass(frozen=True)
class PrepareMulti:
    """Read-task stage: validate and tokenize a chunk's multi-response rows."""

    tokenizer: TokenizerSpec

    def __call__(self, chunk: Chunk, rows: list[RawRow]) -> pa.Table:
        prepared = [{**p, "chunk_id": chunk.chunk_id} for p in prepare_multi_rows(rows, self.tokenizer.load())]
        return pa.Table.from_pylist(prepared, schema=PREPARED_SCHEMA)


class RewardActor(ModelActor):
    """Holds the reward model; adds `rewards` (one per response) to usable rows."""

    inputs = ("prompt_ids", "response_ids")
    results = pa.schema([("reason", pa.string()), ("rewards", pa.list_(pa.float64())), ("tokens", pa.int64())])

    def __init__(self, resources: ActorResources, cfg: AnnotateConfig, pad_token_id: int) -> None:
        super().__init__(resources)
        from prefsel.generation.rewards import load_reward_model

        self.cfg = cfg
        self.pad = pad_token_id
        self.model = load_reward_model(cfg.reward_model, dtype=cfg.dtype, device=str(self.device),
                                       trust_remote_code=cfg.trust_remote_code,
                                       attn_implementation=cfg.attn_implementation)
        self.forward_stats = ForwardStats()

    def process(self, rows: list[dict]) -> list[dict]:
        return score_rows(self.model, rows, self.pad, self.cfg.layout, self.device, self.forward_stats)


def score_rows(model, rows: list[dict], pad_token_id: int, layout: Layout, device,
               stats: ForwardStats | None = None) -> list[dict]:
    """{rewards, tokens} (or a reject reason) for each usable row; all responses batched by
    tokens, each row's responses sharing its prompt (by default).

    A row's copies of one response (same token ids: common at low temperature or for short
    answers) are scored once and share that reward exactly. Scored apart, their rewards differed
    in the last float digits with their batch-mates, and to-pairs then paired a text with itself."""
    from prefsel.generation.rewards import score_groups

    distinct = [list(dict.fromkeys(map(tuple, r["response_ids"]))) for r in rows]
    values = score_groups(model, [(r["prompt_ids"], [list(x) for x in d]) for r, d in zip(rows, distinct)],
                          pad_token_id, layout=layout, device=device, stats=stats) if rows else []
    owner = [i for i, d in enumerate(distinct) for _ in d]
    per_distinct = group_by_owner(owner, values, len(rows))
    out = []
    for i, r in enumerate(rows):
        reward_of = dict(zip(distinct[i], per_distinct[i]))
        rewards = [reward_of[tuple(x)] for x in r["response_ids"]]
        if not all(math.isfinite(v) for v in rewards):
            out.append({"reason": "reward: non-finite reward from the reward model (overflow? try --dtype fp32)"})
            continue
        out.append({"rewards": rewards, "tokens": sum(len(r["prompt_ids"]) + len(x) for x in r["response_ids"])})
    return out


class AnnotateShardWriter:
    """Driver stage: one chunk's rows -> its JSON lines shard (fields + rewards) + rejects."""

    def __init__(self, out: JsonlRunOutput) -> None:
        self.out = out
        self.tokens = 0

    def __call__(self, chunk_id: int, table: pa.Table) -> None:
        good, rejects = [], []
        for r in table.to_pylist():
            record = original_record(r["record"])
            if r["reason"] is not None:
                rejects.append({"row_id": r["out_id"], "reason": r["reason"], "record": record})
                continue
            self.tokens += r["tokens"] or 0
            row = {"row_id": r["out_id"]}
            row.update({k: v for k, v in record.items() if k not in ("row_id", "rewards")})
            row["rewards"] = r["rewards"]
            good.append(row)
        self.out.write_rows(chunk_id, good, rejects)


def run_annotate(cfg: AnnotateConfig) -> dict:
    from prefsel.models import load_tokenizer, resolve_max_length

    t0 = time.time()
    plan = plan_source(cfg.data, cfg.chunk_rows, cfg.split)
    tok = load_tokenizer(cfg.tokenizer_path, trust_remote_code=cfg.trust_remote_code)
    # Unset: the reward model's context (too long is a reject, not a silent score). Set: refused
    # here, before an output or an actor exists, when over its positions.
    cfg = replace(cfg, max_length=resolve_max_length(cfg.max_length, tok, [cfg.reward_model],
                                                     trust_remote_code=cfg.trust_remote_code))
    out = JsonlRunOutput(cfg.output, fingerprint(cfg, plan.files), kind="multi", overwrite=cfg.overwrite,
                         inputs=[("--reward-model", cfg.reward_model), ("--tokenizer", cfg.tokenizer),
                                 *(("--data", f) for f in (cfg.data, *plan.files))])
    done = out.done_chunks()
    todo = [c for c in plan.chunks if c.chunk_id not in done]
    writer = AnnotateShardWriter(out)
    spec = TokenizerSpec(cfg.tokenizer_path, cfg.chat_template, cfg.max_length, cfg.truncation, cfg.trust_remote_code)
    collector = run_chunks(todo, PrepareMulti(spec), RewardActor, dict(cfg=cfg, pad_token_id=tok.pad_token_id),
                           cfg.resources, writer)
    wall = time.time() - t0
    c = out.count()
    if plan.num_rows != c["rows_out"] + c["rows_rejected"]:
        raise RuntimeError(f"row accounting failed: {plan.num_rows} in, {c['rows_out']} out + {c['rows_rejected']} rejected")
    summary = {
        "rows_in": plan.num_rows, "rows_out": c["rows_out"], "rows_rejected": c["rows_rejected"],
        "reject_reasons": c["reject_reasons"], "responses_scored": c["responses"], "tokens": writer.tokens,
        "tokens_per_s": round(writer.tokens / wall, 1) if wall > 0 and not done else None,
        "wall_s": round(wall, 2), "resumed_chunks": len(done), "chunks": len(plan.chunks),
        "rows_per_actor": dict(collector.rows_per_actor),
        "forward": collector.forward_summary(cfg.layout, cfg.attn_implementation),
        "reward_model": cfg.reward_model, "max_length": cfg.max_length, "truncation": cfg.truncation, "data": cfg.data,
        "outputs": {"multi": f"{cfg.output.rstrip('/')}/multi", "rejects": f"{cfg.output.rstrip('/')}/rejects",
                    "summary": f"{cfg.output.rstrip('/')}/summary.json"},
    }
    out.finalize(summary)
    return summary
