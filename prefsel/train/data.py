"""Training rows: read with the core's sources/formats/tokenizer, and the deterministic batch plan.

A training row is a plain dict (so it travels through Ray Data as Arrow):

    row_id        stable id from prefsel.sources (position in the input)
    prompt_ids    list[int]
    response_ids  list[list[int]]  pairs: [chosen, rejected]; multi: the n responses
    rewards       list[float]      multi only (RM scores), else []
    margin        float            rm with --margin-column, else 0.0
    ref_logps     list[float]      one per response, with --ref-mode precompute (else absent)

Rows that cannot be used are not dropped in silence: they are counted with their reason.
The batch plan is a pure function of (seed, epoch, number of rows), identical on every rank
and for every world size, which is what makes resume and DDP-vs-ZeRO comparisons exact.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from prefsel.formats import RowError, detect_format, to_example
from prefsel.jobs import ActorResources, ModelActor, group_by_owner, map_actor_pool
from prefsel.prepare import unexpected_reason
from prefsel.sources import not_object_reason, plan_source, read_chunk, sample_records, value_problem
from prefsel.summary import reason_kind


@dataclass
class LoadedData:
    rows: list[dict]
    fmt: str
    rows_in: int
    rejected: Counter = field(default_factory=Counter)

    @property
    def rows_rejected(self) -> int:
        return sum(self.rejected.values())


def load_rows(
    data: str,
    task: str,
    pair_tokenizer,
    *,
    fmt: str | None = None,
    split: str = "train",
    margin_column: str | None = None,
) -> LoadedData:
    """Read, validate and tokenize every row of `data` for `task` (dpo / hps / rm / sft)."""
    plan = plan_source(data, split=split)
    sample = sample_records(plan)
    if not sample:
        raise ValueError(f"--data {data!r}: no usable rows")
    fmt = fmt or detect_format(sample)
    if task == "hps" and fmt != "multi":
        raise ValueError(f"prefsel train hps needs multi-response rows (prompt, responses, rewards); got {fmt}")
    if task in ("dpo", "rm", "sft") and fmt == "multi":  # sft would silently train on responses[0]
        raise ValueError(f"prefsel train {task} needs pairs; the data holds many responses per prompt (multi)")
    rows, rejected, rows_in = [], Counter(), 0
    for chunk in plan.chunks:
        for raw in read_chunk(chunk):
            rows_in += 1
            try:  # one bad row never aborts the run: any failure is counted with its reason
                if raw.error or not isinstance(raw.record, dict):
                    raise RowError(raw.error or not_object_reason(raw.record))
                problem = value_problem(raw.record)
                if problem:
                    raise RowError(problem)
                ex = to_example(raw.record, fmt)
                row = {"row_id": raw.row_id, "rewards": [], "margin": 0.0}
                if task == "hps":
                    if ex.rewards is None:
                        raise RowError("field 'rewards': HPS needs reward-model scores (run prefsel annotate)")
                    if len(ex.responses) < 2:
                        raise RowError("field 'responses': HPS needs at least 2 responses")
                    row["rewards"] = [float(r) for r in ex.rewards]
                if margin_column:
                    value = raw.record.get(margin_column)
                    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                        raise RowError(f"field '{margin_column}': expected a finite number, got {value!r}")
                    row["margin"] = float(value)
                tok = pair_tokenizer.encode(ex)
                row["prompt_ids"] = list(tok.prompt_ids)
                row["response_ids"] = [list(r) for r in tok.response_ids]
            except RowError as e:
                rejected[reason_kind(str(e))] += 1
                continue
            except Exception as e:  # noqa: BLE001
                rejected[reason_kind(unexpected_reason(e))] += 1
                continue
            rows.append(row)
    return LoadedData(rows, fmt, rows_in, rejected)


# ---- the batch plan ------------------------------------------------------------------------------


def steps_per_epoch(num_rows: int, train_batch_size: int) -> int:
    """Optimizer steps per epoch: full global batches only (the last partial batch is dropped)."""
    return num_rows // train_batch_size


def epoch_order(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The row order of one epoch: a permutation seeded by (seed, epoch); same on every rank."""
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


def global_batch(order: np.ndarray, step_in_epoch: int, train_batch_size: int) -> np.ndarray:
    return order[step_in_epoch * train_batch_size : (step_in_epoch + 1) * train_batch_size]


def rank_micro_batches(batch: np.ndarray, rank: int, world: int, micro: int) -> list[np.ndarray]:
    """This rank's contiguous slice of a global batch, cut into micro-batches."""
    per = len(batch) // world
    mine = batch[rank * per : (rank + 1) * per]
    return [mine[i : i + micro] for i in range(0, len(mine), micro)]


def hps_rng(seed: int, epoch: int, row_id: int) -> np.random.Generator:
    """The sampler's generator for one row in one epoch: a fresh, reproducible draw each epoch."""
    return np.random.default_rng([seed, 7919, epoch, row_id])


# ---- reference log-probs, precomputed on Ray Data -----------------------------------------------------


class RefLogpActor(ModelActor):
    """Adds `ref_logps` (one per response) with prefsel.scoring.groups_logprobs: each row's
    responses share its prompt (prefsel.packing), as in the trainer's online reference."""

    inputs = ("prompt_ids", "response_ids")
    consumed = ()
    results = pa.schema([("ref_logps", pa.list_(pa.float64()))])

    def __init__(self, resources: ActorResources, ref_path: str, pad_token_id: int, max_tokens: int, dtype: str,
                 trust_remote_code: bool = False, attn_implementation: str | None = "auto", packing: bool = True,
                 share_prompt: bool = True) -> None:
        super().__init__(resources)
        from prefsel.models import load_causal_lm
        from prefsel.scoring import ScoreConfig

        self.model = load_causal_lm(ref_path, dtype=dtype, device=str(self.device), trust_remote_code=trust_remote_code,
                                    attn_implementation=attn_implementation)
        self.pad = pad_token_id
        self.cfg = ScoreConfig(max_tokens_per_batch=max_tokens, packing=packing, share_prompt=share_prompt)

    def process(self, rows: list[dict]) -> list[dict]:
        from prefsel.scoring import groups_logprobs

        (flat,) = groups_logprobs([self.model], [(r["prompt_ids"], r["response_ids"]) for r in rows], self.pad,
                                  self.cfg, self.device)
        owner = [i for i, r in enumerate(rows) for _ in r["response_ids"]]
        return [{"ref_logps": v} for v in group_by_owner(owner, flat, len(rows))]


def to_ray_dataset(rows: list[dict]):
    import ray

    return ray.data.from_items(rows, override_num_blocks=max(1, min(16, len(rows) // 64 or 1)))


def precompute_reference(ds, cfg, pad_token_id: int):
    """ds (Ray Dataset of training rows) -> the same rows with `ref_logps`, materialized.

    Rows go to a pool of `cfg.ref_actors` RefLogpActors in batches of 64 rows; the `actor`
    column says which actor computed a row (rows per actor are in the training summary)."""
    resources = ActorResources(num_actors=cfg.ref_actors, gpus_per_actor=1.0 if cfg.use_gpu else 0.0,
                               cpus_per_actor=1.0, rows_per_actor_call=64)
    kwargs = dict(ref_path=cfg.reference_path, pad_token_id=pad_token_id, max_tokens=cfg.ref_batch_tokens,
                  dtype=cfg.reference_dtype, trust_remote_code=cfg.trust_remote_code,
                  attn_implementation=cfg.attn_implementation, packing=cfg.packing, share_prompt=cfg.share_prompt)
    return map_actor_pool(ds, RefLogpActor, kwargs, resources).materialize()


def rows_from_shard(shard) -> list[dict]:
    """All rows of a Ray Train dataset shard as plain python, ordered by row_id."""
    rows = []
    for r in shard.iter_rows():
        row = {
            "row_id": int(r["row_id"]),
            "prompt_ids": [int(t) for t in r["prompt_ids"]],
            "response_ids": [[int(t) for t in x] for x in r["response_ids"]],
            "rewards": [float(x) for x in (r.get("rewards") if r.get("rewards") is not None else [])],
            "margin": float(r.get("margin") or 0.0),
        }
        if r.get("ref_logps") is not None:
            row["ref_logps"] = [float(x) for x in r["ref_logps"]]
        rows.append(row)
    rows.sort(key=lambda x: x["row_id"])
    return rows
