"""`prefsel to-pairs`: multi-response rows with rewards -> preference pairs (pure; no Ray).

Strategies (choice made by prefsel.losses, the code the HPS trainer uses):
  hps         chosen = best reward (ties: lowest index); rejected drawn among the responses
              rated below it with P(j) ∝ exp(gamma * r_j) (hps_sample_negative) — the HPS
              public code's pair construction, less its pairs of two tied responses. gamma > 0
              favours hard negatives, 0 is uniform, < 0 easy ones. Seeded per row:
              rng = default_rng([seed mod 2^32, row_id mod 2^64]), so the pair of a row does not
              depend on the order, sharding or the other rows.
  best-worst  chosen = best, rejected = worst (ties: the last lowest).
A row whose responses all tie is rejected (no pair of it states a preference).
Output rows: row_id, prompt (string or messages, as given), chosen, rejected, chosen_reward,
rejected_reward, chosen_index, rejected_index, and the row's other fields — the `pairs`
format that `prefsel score/select` and DPO training read.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from prefsel.formats import RowError, to_example
from prefsel.generation.prompts import carried_row_id
from prefsel.jobs import input_stamps
from prefsel.prepare import record_text, unexpected_reason
from prefsel.sources import not_object_reason, value_problem
from prefsel.losses import hps_sample_negative, hps_select_chosen

STRATEGIES = ("hps", "best-worst")
_DROP = ("row_id", "responses", "rewards", "response_tokens", "finished")


def choose_pair(rewards, strategy: str, *, gamma: float = 1.0, seed: int = 0, row_id: int = 0,
                responses: list | None = None) -> tuple[int, int]:
    """(chosen index, rejected index) of one row. Only a response rated below the best is a
    negative: one tied with it states no preference (as a pair it is noise, and the same text
    twice is a pair with no gradient), so a row whose responses all tie is a reject. With
    `responses`, a copy of the chosen text is no negative either, whatever its reward (rewards
    from elsewhere may differ by rounding between copies)."""
    r = np.asarray(rewards, dtype=np.float64)
    if r.size < 2:
        raise RowError(f"field 'responses': need at least 2 responses to make a pair, got {r.size}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    chosen = hps_select_chosen(r)
    lower = np.flatnonzero(r < r[chosen])
    if lower.size == 0:
        raise RowError(f"field 'rewards': all {r.size} responses tie at {r[chosen]:.6g}: no pair states a preference")
    if responses is not None:
        lower = np.array([j for j in lower if responses[j] != responses[chosen]], dtype=np.int64)
        if lower.size == 0:
            raise RowError("field 'responses': every response rated below the best is a copy of it: "
                           "no pair states a preference")
    if strategy == "best-worst":
        return chosen, int(lower[r[lower] == r[lower].min()][-1])
    # hps: the sampler on the best and the responses below it (the same draw as on the whole row
    # when nothing ties with the best); row ids are folded to the seed's range (a negative id too)
    keep = np.concatenate([[chosen], lower])
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(row_id) % 2**64])
    c, j = hps_sample_negative(r[keep], gamma, rng)
    return int(keep[c]), int(keep[j])


def make_pair(record: dict, row_id: int, strategy: str, *, gamma: float = 1.0, seed: int = 0,
              min_reward_gap: float | None = None) -> dict:
    """One pair row from one annotated multi row; raises RowError naming the field."""
    ex = to_example(record, "multi")
    if ex.rewards is None:
        raise RowError("field 'rewards': missing (run `prefsel annotate` first)")
    c, j = choose_pair(ex.rewards, strategy, gamma=gamma, seed=seed, row_id=row_id, responses=ex.responses)
    gap = ex.rewards[c] - ex.rewards[j]
    if min_reward_gap is not None and gap < min_reward_gap:
        raise RowError(f"field 'rewards': reward gap {gap:.4g} < min_reward_gap {min_reward_gap}")
    out = {"row_id": row_id, "prompt": record["prompt"], "chosen": ex.responses[c], "rejected": ex.responses[j],
           "chosen_reward": ex.rewards[c], "rejected_reward": ex.rewards[j], "chosen_index": c, "rejected_index": j}
    out.update({k: v for k, v in record.items() if k not in _DROP and k not in out})
    return out


@dataclass
class ToPairsConfig:
    data: str
    output: str
    strategy: str = "hps"
    gamma: float = 1.0
    seed: int = 0
    min_reward_gap: float | None = None
    split: str = "train"
    chunk_rows: int = 4096
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"--strategy must be one of {STRATEGIES}")
        if self.chunk_rows < 1:
            raise ValueError("--chunk-rows must be positive")
        if not math.isfinite(self.gamma):
            raise ValueError(f"--gamma must be a finite number, got {self.gamma!r}")


def run_to_pairs(cfg: ToPairsConfig) -> dict:
    from prefsel.generation.output import JsonlRunOutput
    from prefsel.sources import plan_source, read_chunk

    t0 = time.time()
    plan = plan_source(cfg.data, cfg.chunk_rows, cfg.split)
    fp = {"data": input_stamps(plan.files), "strategy": cfg.strategy, "gamma": cfg.gamma, "seed": cfg.seed,
          "min_reward_gap": cfg.min_reward_gap, "chunk_rows": cfg.chunk_rows, "split": cfg.split}
    out = JsonlRunOutput(cfg.output, fp, kind="pairs", overwrite=cfg.overwrite,
                         inputs=[("--data", f) for f in (cfg.data, *plan.files)])
    done = out.done_chunks()
    for chunk in plan.chunks:
        if chunk.chunk_id in done:
            continue
        good, rejects = [], []
        for r in read_chunk(chunk):
            rec = r.record
            try:
                rid = carried_row_id(rec, r.row_id)
            except RowError as e:  # kept as generate and annotate keep it; beyond int64, a reject
                rejects.append({"row_id": r.row_id, "reason": str(e), "record": record_text(rec)})
                continue
            if not isinstance(rec, dict):
                rejects.append({"row_id": rid, "reason": r.error or not_object_reason(rec),
                                "record": r.raw if rec is None else rec})
                continue
            problem = value_problem(rec)
            if problem:  # a value JSON cannot carry: keep the record as (escaped) text
                rejects.append({"row_id": rid, "reason": problem, "record": record_text(rec)})
                continue
            try:  # one bad row never aborts the job: any failure is its reject reason
                good.append(make_pair(rec, rid, cfg.strategy, gamma=cfg.gamma, seed=cfg.seed,
                                      min_reward_gap=cfg.min_reward_gap))
            except RowError as e:
                rejects.append({"row_id": rid, "reason": str(e), "record": rec})
            except Exception as e:  # noqa: BLE001
                rejects.append({"row_id": rid, "reason": unexpected_reason(e), "record": record_text(rec)})
        out.write_rows(chunk.chunk_id, good, rejects)
    c = out.count()
    if plan.num_rows != c["rows_out"] + c["rows_rejected"]:
        raise RuntimeError(f"row accounting failed: {plan.num_rows} in, {c['rows_out']} out + {c['rows_rejected']} rejected")
    summary = {"rows_in": plan.num_rows, "rows_out": c["rows_out"], "rows_rejected": c["rows_rejected"],
               "reject_reasons": c["reject_reasons"], "strategy": cfg.strategy, "gamma": cfg.gamma, "seed": cfg.seed,
               "wall_s": round(time.time() - t0, 2), "resumed_chunks": len(done), "data": cfg.data,
               "outputs": {"pairs": f"{cfg.output.rstrip('/')}/pairs", "rejects": f"{cfg.output.rstrip('/')}/rejects",
                           "summary": f"{cfg.output.rstrip('/')}/summary.json"}}
    out.finalize(summary)
    return summary
