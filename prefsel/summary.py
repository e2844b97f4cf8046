"""Run summaries: counted from what was written, so the numbers describe the output itself."""

from __future__ import annotations

import json
import posixpath
from collections import Counter

import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyarrow import fs as pafs


def _reason_kind(reason: str) -> str:
    """Group reasons by their field and cause, without the row-specific detail."""
    head, _, rest = reason.partition(": ")
    cause = rest.split(":")[0].split(" (")[0]
    if cause.startswith(("too long", "response alone too long")):
        cause = cause.split(":")[0]
    if cause.startswith("invalid JSON"):
        cause = "invalid JSON"
    return f"{head}: {cause}"[:120]


def count_output(fs: pafs.FileSystem, root: str) -> dict:
    """Rows, tokens and reject reasons in an output folder's shards."""
    scored = tokens = 0
    for info in fs.get_file_info(pafs.FileSelector(posixpath.join(root, "scores"), allow_not_found=True)):
        if not info.path.endswith(".parquet"):
            continue
        with fs.open_input_file(info.path) as f:
            t = pq.read_table(f, columns=["prompt_tokens", "chosen_tokens", "rejected_tokens"])
        scored += t.num_rows
        if t.num_rows:
            tokens += int(pc.sum(t["prompt_tokens"]).as_py()) * 2
            tokens += int(pc.sum(t["chosen_tokens"]).as_py()) + int(pc.sum(t["rejected_tokens"]).as_py())
    reasons: Counter = Counter()
    for info in fs.get_file_info(pafs.FileSelector(posixpath.join(root, "rejects"), allow_not_found=True)):
        if not info.path.endswith(".jsonl"):
            continue
        with fs.open_input_stream(info.path) as f:
            for line in f.read().decode("utf-8").splitlines():
                if line.strip():
                    reasons[_reason_kind(json.loads(line)["reason"])] += 1
    return {"rows_scored": scored, "rows_rejected": sum(reasons.values()), "tokens": tokens, "reasons": reasons}


def score_summary(out, plan, fmt: str, cfg, wall: float, resumed_chunks: int) -> dict:
    """Summary of a scoring run; checks rows_in == rows_scored + rows_rejected."""
    c = count_output(out.fs, out.dir)
    rows_in = plan.num_rows
    if rows_in != c["rows_scored"] + c["rows_rejected"]:
        raise RuntimeError(
            f"row accounting failed: {rows_in} rows in, {c['rows_scored']} scored + "
            f"{c['rows_rejected']} rejected"
        )
    return {
        "rows_in": rows_in,
        "rows_scored": c["rows_scored"],
        "rows_rejected": c["rows_rejected"],
        "reject_reasons": dict(c["reasons"].most_common()),
        "format": fmt,
        "tokens": c["tokens"],
        "tokens_per_s": round(c["tokens"] / wall, 1) if wall > 0 and not resumed_chunks else None,
        "wall_s": round(wall, 2),
        "resumed_chunks": resumed_chunks,
        "chunks": len(plan.chunks),
        "beta": cfg.beta,
        "policy": cfg.policy,
        "reference": cfg.reference,
        "data": cfg.data,
    }


def print_summary(title: str, summary: dict, console=None) -> None:
    """A short table on the console (rich)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=title, show_header=False, title_justify="left")
    for k, v in summary.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a}={b}" for a, b in v.items()) or "-"
        table.add_row(k, str(v))
    console.print(table)
