"""The demo's synthetic preference task: sort a few letters.

Chosen = the letters in order. Rejected = the sorted letters with `error` disjoint adjacent
swaps, i.e. exactly `error` inversions: 1 is the hardest pair to tell apart, 4 the easiest.
Sortedness is a local property (every neighbouring pair in order), which a tiny transformer
learns in a few hundred steps, so the gap scorer has something real to measure. A share of
the training pairs is flipped (mislabeled); held-out pairs never are. Deterministic in the seed.
"""

from __future__ import annotations

import random

LETTERS = "abcdefghijklmnopqrstuvwxyz"
ERRORS = (1, 2, 3, 4)


def _swap_adjacent(seq: list[str], k: int, rng: random.Random) -> list[str]:
    """`seq` with k disjoint adjacent swaps (k inversions if seq is sorted and distinct)."""
    n = len(seq)
    while True:
        starts = sorted(rng.sample(range(n - 1), k))
        if all(b - a >= 2 for a, b in zip(starts, starts[1:])):
            break
    out = list(seq)
    for i in starts:
        out[i], out[i + 1] = out[i + 1], out[i]
    return out


def make_sort_pairs(n: int, seed: int = 0, mislabeled: float = 0.02, min_len: int = 10,
                    max_len: int = 14) -> list[dict]:
    """`n` sorting pairs in the `pairs` format, with `error` (inversions) and `mislabeled` columns."""
    if not 2 * max(ERRORS) <= min_len <= max_len <= len(LETTERS):
        raise ValueError(f"need {2 * max(ERRORS)} <= min_len <= max_len <= {len(LETTERS)}")
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        letters = rng.sample(LETTERS, rng.randint(min_len, max_len))
        ordered = sorted(letters)
        error = rng.choice(ERRORS)
        wrong = _swap_adjacent(ordered, error, rng)
        chosen, rejected = " " + " ".join(ordered) + ".", " " + " ".join(wrong) + "."
        flipped = rng.random() < mislabeled
        if flipped:
            chosen, rejected = rejected, chosen
        rows.append({
            "id": f"sort-{seed}-{i:05d}",
            "prompt": "Sort: " + " ".join(letters) + "\nAnswer:",
            "chosen": chosen,
            "rejected": rejected,
            "error": error,
            "mislabeled": flipped,
        })
    return rows
