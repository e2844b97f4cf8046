"""Run summaries: counted from what was written, so the numbers describe the output itself."""

from __future__ import annotations

import json
import posixpath
import re
from collections import Counter

import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyarrow import fs as pafs


_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")
_VALUE = re.compile(r"\b(unknown role|got roles|got) ('[^']*'|\"[^\"]*\"|\[[^\]]*\]|-?inf|nan|None|True|False)")


def reason_kind(reason: str) -> str:
    """Group reasons by their field and whole cause, without the row-specific detail: numbers
    (token counts, positions, indices) become N and quoted values after "got" / "unknown role"
    become <value>; the cause itself is kept whole (no cut at its first colon: HH's
    "no '\\n\\nAssistant:' turn" stays whole)."""
    kind = _NUMBER.sub("N", reason)
    kind = re.sub(r"\[N\]", "[i]", kind)
    kind = _VALUE.sub(r"\1 <value>", kind)
    return kind if len(kind) <= 300 else kind[:299] + "…"


def all_rejected_error(summary: dict, top: int = 3) -> str | None:
    """The failure message of a run in which no row could be scored, with its top reasons;
    None when at least one row was scored. An empty input is a failure too."""
    if summary.get("rows_scored", 0) > 0:
        return None
    rows_in = summary.get("rows_in", 0)
    if not rows_in:
        return "no rows to score: the input is empty"
    reasons = Counter(summary.get("reject_reasons") or {})
    shown = "; ".join(f"{r} ({n} rows)" for r, n in reasons.most_common(top))
    more = len(reasons) - top
    if more > 0:
        shown += f"; and {more} more reason{'s' if more > 1 else ''} (see rejects/)"
    return f"all {rows_in} rows were rejected, none scored: {shown}"


def jsonl_lines(data: bytes) -> list[str]:
    """The non-blank lines of a JSON-lines file's bytes, split on "\\n" only.

    Not str.splitlines(): it also splits at U+2028, U+2029, U+0085 and other separators, which
    JSON text written with ensure_ascii=False (prefsel.prepare.dumps) holds raw inside strings,
    so one record would become two halves that are not JSON."""
    return [line for line in data.decode("utf-8").split("\n") if line.strip()]


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
            for line in jsonl_lines(f.read()):
                reasons[reason_kind(json.loads(line)["reason"])] += 1
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
        "beta": cfg.scoring.beta,
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
