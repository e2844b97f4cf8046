"""Test helpers: writing input files and reading outputs back."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w") as f:
        for r in rows:
            f.write(r if isinstance(r, str) else json.dumps(r))
            f.write("\n")
    return path


def read_scores(out: Path):
    return pq.read_table(Path(out) / "scores").sort_by("row_id")


def read_rejects(out: Path) -> list[dict]:
    rows = []
    for f in sorted((Path(out) / "rejects").glob("*.jsonl")):
        rows += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return sorted(rows, key=lambda r: r["row_id"])


def U(text: str) -> dict:
    return {"role": "user", "content": text}


def A(text: str) -> dict:
    return {"role": "assistant", "content": text}


def S(text: str) -> dict:
    return {"role": "system", "content": text}
