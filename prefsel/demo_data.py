"""The small arithmetic preference set used by the tests and bench/score_cpu.py.

(`prefsel demo` has its own task: prefsel.demo.task.)

Arithmetic questions with a correct chosen answer and a rejected answer that is wrong by a
controlled amount; a few pairs are deliberately mislabeled. Generated deterministically from a
seed; `python -m prefsel.demo_data` rewrites prefsel/data/demo_pairs.jsonl.
"""

from __future__ import annotations

import json
import random
from importlib import resources
from pathlib import Path

DEMO_PAIRS_FILE = "demo_pairs.jsonl"


def make_demo_pairs(n: int = 256, seed: int = 0, mislabeled: float = 0.1) -> list[dict]:
    """Deterministic arithmetic preference pairs in the `pairs` format (string fields)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        op = rng.choice(["+", "-", "*"])
        right = {"+": a + b, "-": a - b, "*": a * b}[op]
        off = rng.choice([1, 2, 10, 100]) * rng.choice([-1, 1])
        wrong = right + off
        chosen = f" {a} {op} {b} = {right}. The answer is {right}."
        rejected = f" {a} {op} {b} = {wrong}. The answer is {wrong}."
        flipped = rng.random() < mislabeled
        if flipped:
            chosen, rejected = rejected, chosen
        rows.append(
            {
                "id": f"arith-{i:04d}",
                "prompt": f"Question: what is {a} {op} {b}?\nAnswer:",
                "chosen": chosen,
                "rejected": rejected,
                "error": abs(off),
                "mislabeled": flipped,
            }
        )
    return rows


def demo_pairs_path() -> str:
    """Path of the bundled pair set inside the installed package."""
    return str(resources.files("prefsel") / "data" / DEMO_PAIRS_FILE)


def demo_corpus_texts() -> list[str]:
    """Text to train the tiny tokenizer on: the demo pairs plus chat-ish filler."""
    rows = make_demo_pairs(512, seed=1)
    texts = [r["prompt"] + r["chosen"] + r["rejected"] for r in rows]
    texts += [
        "Human: hello there, how are you? Assistant: I am fine, thank you for asking.",
        "user: please summarise the text. assistant: here is a short summary of the text.",
        "The quick brown fox jumps over the lazy dog. A helpful, honest and harmless answer.",
    ] * 20
    return texts


if __name__ == "__main__":
    out = Path(__file__).parent / "data" / DEMO_PAIRS_FILE
    with open(out, "w") as f:
        for r in make_demo_pairs():
            f.write(json.dumps(r) + "\n")
    print(f"wrote {out}")
