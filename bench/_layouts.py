"""Shared by bench/score_cpu.py --layouts and bench/score_gpu.py: time prefsel's forward layouts
(padded two-pass, packed, packed with shared prompts) on one set of token ids, in one run.

Numbers per layout: seconds (best of `repeats`), pairs (or prompts) per second, tokens/s where
tokens are the logical tokens of every (prompt, response) sequence, the prompt counted once
per response (the same numerator for every layout, so the tokens/s ratio is the speed-up), the
tokens and slots (tokens + pads) one model forwarded, and the largest |difference| of a
sequence's log-prob (or reward) from the padded layout's.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

import torch

from prefsel.logprobs import batch_logprobs, batch_rewards, map_groups
from prefsel.packing import ForwardStats, Group, Layout, layout_for

LAYOUTS = {
    "padded (two-pass)": Layout(packing=False),
    "packed": Layout(share_prompt=False),
    "packed + shared prompt": Layout(),
}


def make_groups(n: int, responses: int, prompt_len: tuple[int, int], response_len: tuple[int, int],
                vocab: int, seed: int = 0) -> list[Group]:
    """`n` prompts with `responses` responses each, lengths uniform in the half-open ranges."""
    rng = random.Random(seed)

    def ids(lo_hi):
        return [rng.randrange(3, vocab) for _ in range(rng.randrange(*lo_hi))]

    return [(ids(prompt_len), [ids(response_len) for _ in range(responses)]) for _ in range(n)]


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_layouts(models: Sequence[torch.nn.Module], groups: list[Group], *, kind: str = "logprobs",
                 max_tokens: int = 16384, repeats: int = 2, device="cpu",
                 layouts: dict[str, Layout] | None = None) -> list[dict]:
    """One row per layout; every model forwards the same batches (policy and reference)."""
    fn = batch_logprobs if kind == "logprobs" else batch_rewards
    layouts = layouts or LAYOUTS
    logical = sum(len(p) + len(r) for p, rs in groups for r in rs)
    rows, base = [], None
    for name, layout in layouts.items():
        # as the scorer, the annotator and the trainers run it: adapted to the models' attention
        layout = layout_for(models, Layout(packing=layout.packing, share_prompt=layout.share_prompt,
                                           max_tokens=max_tokens))
        best, values, stats = None, None, None
        for _ in range(repeats):
            st = ForwardStats()
            sync(device)
            t0 = time.perf_counter()
            with torch.inference_mode():
                values = map_groups([lambda b, m=m: fn(m, b) for m in models], groups, 0, layout, device=device,
                                    stats=st)
            sync(device)
            dt = time.perf_counter() - t0
            if best is None or dt < best:
                best, stats = dt, st
        flat = [v for per_model in values for v in per_model]
        base = base or flat
        d = stats.as_dict()
        rows.append({
            "layout": name, "seconds": round(best, 3), "rows_per_s": round(len(groups) / best, 2),
            "tokens_per_s": round(len(models) * logical / best, 1), "tokens_forwarded": d["tokens_forwarded"],
            "slots_forwarded": d["slots_forwarded"], "pad_fraction": d["pad_fraction"],
            "max_abs_diff_vs_padded": max(abs(a - b) for a, b in zip(flat, base)),
        })
    for r in rows:
        r["speedup_vs_padded"] = round(rows[0]["seconds"] / r["seconds"], 2)
        r["work_vs_padded"] = round(r["slots_forwarded"] / rows[0]["slots_forwarded"], 3)
    return rows


def print_table(title: str, rows: list[dict], unit: str = "pairs") -> None:
    print(f"\n{title}")
    print(f"| layout | {unit}/s | tokens/s | speed-up | slots forwarded (vs padded) | pad fraction | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layout']} | {r['rows_per_s']:.1f} | {r['tokens_per_s']:.0f} | {r['speedup_vs_padded']:.2f}x | "
              f"{r['slots_forwarded']} ({r['work_vs_padded']:.3f}) | {r['pad_fraction']:.3f} | "
              f"{r['max_abs_diff_vs_padded']:.1e} |")
