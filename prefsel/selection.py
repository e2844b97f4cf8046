"""Selecting pairs by gap: exact, global and deterministic (order key: gap, then row_id).

Pure numpy/pyarrow, no Ray. `choose` decides which rows are kept; `run_select` reads a finished
scores output, writes the kept rows in the input's own format (plus row_id and gap, hardest
first), a summary with gap quantiles and the cut-off, and a PNG histogram of the gaps
(`--strategy suspect-labels` also writes suspect_report.{json,md} for auditing).

Filters `--min-gap G` / `--max-gap G` (exclusive: G < gap, gap < G) are applied first; every
strategy then picks among the N' rows that pass, and --ratio means k = floor(N' x ratio).
"""

from __future__ import annotations

import io
import json
import math
import posixpath
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from prefsel.prepare import EXTRA_COLUMN, restore_record
from prefsel.run_output import SUMMARY, RunOutput, check_complete, read_json
from prefsel.scoring import SCORE_COLUMNS
from prefsel.sources import filesystem_for

STRATEGIES = ("smallest-gap", "largest-gap", "random", "gap-range", "suspect-labels", "quantile-band")
RATIO_STRATEGIES = ("smallest-gap", "largest-gap", "random")  # k = floor(N' x ratio), or --top-k
SAMPLE_CHARS = 200  # text per field in the suspect-labels report
QUANTILES = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)


@dataclass
class SelectConfig:
    """How to select. Defaults follow the paper: the 10% of pairs with the smallest gaps."""

    scores: str
    output: str
    ratio: float = 0.1
    top_k: int | None = None
    strategy: str = "smallest-gap"
    gap_range: tuple[float, float] | None = None
    band: tuple[float, float] | None = None  # quantile-band: (LO, HI) in [0, 1]
    min_gap: float | None = None  # keep only gap > min_gap (before the strategy picks)
    max_gap: float | None = None  # keep only gap < max_gap
    report_rows: int = 20  # suspect-labels: rows shown in the report
    seed: int = 0
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"--strategy must be one of {STRATEGIES}")
        if not 0 < self.ratio <= 1:
            raise ValueError("--ratio must be in (0, 1]")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError("--top-k must be >= 0")
        if self.gap_range is not None:
            _require_finite("--gap-range", *self.gap_range)
        if self.strategy == "gap-range":
            if self.gap_range is None or len(self.gap_range) != 2 or self.gap_range[0] > self.gap_range[1]:
                raise ValueError("--strategy gap-range needs --gap-range LO HI with LO <= HI")
        elif self.gap_range is not None:
            raise ValueError("--gap-range is only used with --strategy gap-range")
        if self.strategy == "quantile-band":
            if self.band is None or len(self.band) != 2 or not 0 <= self.band[0] <= self.band[1] <= 1:
                raise ValueError("--strategy quantile-band needs --band LO HI with 0 <= LO <= HI <= 1")
        elif self.band is not None:
            raise ValueError("--band is only used with --strategy quantile-band")
        for name in ("min_gap", "max_gap"):
            v = getattr(self, name)
            if v is not None:
                _require_finite(f"--{name.replace('_', '-')}", v)
        if self.min_gap is not None and self.max_gap is not None and not self.min_gap < self.max_gap:
            raise ValueError("--min-gap must be below --max-gap (both bounds are exclusive)")
        if self.report_rows < 0:
            raise ValueError("--report-rows must be >= 0")


def _require_finite(flag: str, *values: float) -> None:
    """Refuse a NaN or infinite bound: every comparison with NaN is false, so such a bound would
    silently keep no row (and an infinite one is no bound)."""
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{flag} must be a finite number, got {bad[0]}")


def json_gap(value: float) -> float | None:
    """A gap as strict JSON allows it: None (null) for a NaN or infinite gap, whose bare NaN /
    Infinity Python's json would write and strict JSON readers refuse. Scoring does not reject
    a pair whose log-probs are not finite, so such gaps can reach a scores output."""
    value = float(value)
    return value if math.isfinite(value) else None


def floor_share(n: int, fraction: float) -> int:
    """floor(n * fraction), exact for the decimal the fraction was written as.

    A ratio is typed as a decimal ("0.57") but held as the nearest float, a little below or above
    it; n * float is rounded again, so floor() loses a row at some n (floor(10**8 * 0.57) gives
    56999999). The float's shortest repr is the decimal typed, so Fraction(repr) is exact."""
    return math.floor(n * Fraction(repr(float(fraction))))


def gap_filter(gaps: np.ndarray, min_gap: float | None = None, max_gap: float | None = None) -> np.ndarray:
    """Mask of the rows that pass --min-gap / --max-gap: min_gap < gap < max_gap (exclusive).

    No filter: every row (NaN included). With a filter, a NaN gap never passes.
    """
    gaps = np.asarray(gaps, dtype=np.float64)
    mask = np.ones(len(gaps), dtype=bool)
    if min_gap is not None:
        mask &= gaps > min_gap
    if max_gap is not None:
        mask &= gaps < max_gap
    return mask


def band_positions(n: int, lo: float, hi: float) -> tuple[int, int]:
    """The quantile band's positions in the (gap, row_id) order: [floor(n*lo), floor(n*hi)), half-open.
    `n` counts the rows that have a place in that order: those that pass the filters, NaN gaps
    left out (a NaN has no quantile; counted, NaN rows took the top band's places)."""
    return min(n, floor_share(n, lo)), min(n, floor_share(n, hi))


def band_of(gaps: np.ndarray, lo: float, hi: float) -> tuple[int, int]:
    """`band_positions` for the gaps that passed the filters: only the non-NaN ones are ranked."""
    return band_positions(int(np.count_nonzero(~np.isnan(gaps))), lo, hi)


def choose(
    row_ids: np.ndarray,
    gaps: np.ndarray,
    strategy: str = "smallest-gap",
    k: int | None = None,
    *,
    seed: int = 0,
    gap_range: tuple[float, float] | None = None,
    band: tuple[float, float] | None = None,
    min_gap: float | None = None,
    max_gap: float | None = None,
) -> np.ndarray:
    """Indices of the kept rows, hardest first (ascending gap, ties by row_id).

    First the filters (min_gap < gap < max_gap, exclusive) leave N' rows; then, among them:
    k rows for smallest-gap / largest-gap / random; for gap-range every row with
    LO <= gap <= HI; for suspect-labels every row with gap < 0; for quantile-band the rows at
    positions floor(N' * LO) .. floor(N' * HI) - 1 of the (gap, row_id) order, N' less its NaN
    gaps here (a NaN has no quantile, and is in no band); these three are
    capped at k (the hardest k) when k is given. Independent of the input order.
    """
    row_ids = np.asarray(row_ids, dtype=np.int64)
    gaps = np.asarray(gaps, dtype=np.float64)
    if len(np.unique(row_ids)) != len(row_ids):
        raise ValueError("duplicate row_id in scores")
    sub = np.flatnonzero(gap_filter(gaps, min_gap, max_gap))
    ids, g = row_ids[sub], gaps[sub]
    n = len(sub)
    take = n if k is None else min(k, n)
    by_gap = np.lexsort((ids, g))  # primary key gap, then row_id; NaN last
    if strategy == "smallest-gap":
        keep = by_gap[:take]
    elif strategy == "largest-gap":
        desc = np.lexsort((ids, -g))
        keep = desc[:take]
    elif strategy == "random":
        by_id = np.argsort(ids, kind="stable")
        rng = np.random.default_rng(seed)
        keep = by_id[rng.permutation(n)[:take]]
    elif strategy == "gap-range":
        if gap_range is None:
            raise ValueError("gap-range needs (LO, HI)")
        lo, hi = gap_range
        keep = by_gap[(g[by_gap] >= lo) & (g[by_gap] <= hi)][:take]
    elif strategy == "suspect-labels":
        keep = by_gap[g[by_gap] < 0][:take]
    elif strategy == "quantile-band":
        if band is None:
            raise ValueError("quantile-band needs (LO, HI)")
        a, b = band_of(g, *band)  # NaN sorts last: by_gap[:non-NaN count] is ordered
        keep = by_gap[a:b][:take]
    else:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    order = np.lexsort((ids[keep], g[keep]))
    return sub[keep[order]]


def target_k(n: int, ratio: float, top_k: int | None) -> int:
    """k = floor(N * ratio), or --top-k when given."""
    if top_k is not None:
        return min(top_k, n)
    return floor_share(n, ratio)


def _scores_dataset(uri: str) -> tuple[pads.Dataset, dict]:
    manifest = check_complete(uri)
    if manifest.get("kind") != "scores":
        raise ValueError(f"{uri} is a {manifest.get('kind')} output, not scores")
    fs, path = filesystem_for(uri.rstrip("/"))
    summary = read_json(fs, posixpath.join(path, SUMMARY))
    # Only whole shards (part-NNNNNN.parquet): a temporary file left by a killed writer, or the
    # folder marker objects some object stores keep, are not data.
    infos = fs.get_file_info(pafs.FileSelector(posixpath.join(path, "scores"), allow_not_found=True))
    shards = sorted(
        i.path for i in infos
        if i.type == pafs.FileType.File and posixpath.basename(i.path).startswith("part-")
        and i.path.endswith(".parquet")
    )
    if not shards:
        raise ValueError(f"{uri}: no score shards under {uri.rstrip('/')}/scores")
    return pads.dataset(shards, format="parquet", filesystem=fs), summary


def _restore_records(table: pa.Table) -> list[dict]:
    """Rows as the input had them: original fields, _extra unfolded, then row_id and gap. An
    input's own different `row_id` or `gap` (a prompt id from `prefsel generate`, an earlier
    run's gap) is kept as `input_row_id` / `input_gap` (input_input_... if that is taken too)."""
    rows = []
    for r in table.to_pylist():
        out = restore_record(r)
        for name, value in (("row_id", r["row_id"]), ("gap", json_gap(r["gap"]))):
            if name in out and out[name] != value:
                kept = f"input_{name}"
                while kept in out:
                    kept = f"input_{kept}"
                out[kept] = out.pop(name)
            out[name] = value
        rows.append(out)
    return rows


def _short(value, limit: int = SAMPLE_CHARS) -> str:
    """A field as one line of text (chat messages as "role: content"), its head and tail when long."""
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        text = " | ".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in value)
    elif isinstance(value, str):
        text = value
    else:
        text = json.dumps(value, ensure_ascii=False)
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    half = (limit - 5) // 2
    return f"{text[:half]} ... {text[-half:]}"


def _suspect_report(records: list[dict], count: int, n_scored: int, n_filtered: int, listed: int) -> dict:
    """count, shares and a sample (the most negative gaps first) of the pairs the scorer contradicts."""
    sample = []
    for r in records:
        row = {"row_id": r["row_id"], "gap": r["gap"]}
        for f in ("prompt", "chosen", "rejected"):
            if f in r:
                row[f] = _short(r[f])
        sample.append(row)
    return {
        "what": "pairs with gap < 0: the DPO scorer prefers the rejected response (likely label errors)",
        "count": count,
        "share_of_scored": count / n_scored if n_scored else 0.0,
        "share_of_filtered": count / n_filtered if n_filtered else 0.0,
        "rows_scored": n_scored,
        "rows_after_filter": n_filtered,
        "listed_in_selection": listed,
        "sample": sample,
    }


def _gap_text(gap: float | None) -> str:
    """A gap in the report's table; None is a gap that was not finite (see json_gap)."""
    return "not finite" if gap is None else f"{gap:.4g}"


def _suspect_markdown(rep: dict) -> str:
    def cell(v) -> str:
        return str(v).replace("|", "\\|")

    lines = [
        "# Suspect labels: pairs with gap < 0",
        "",
        f"{rep['count']} of {rep['rows_after_filter']} pairs ({100 * rep['share_of_filtered']:.2f}%) have a negative "
        f"gap: the scorer prefers the rejected response ({rep['rows_scored']} scored). Full list: the selection file "
        f"({rep['listed_in_selection']} rows), most negative first. Sample of {len(rep['sample'])}:",
        "",
    ]
    cols = ["row_id", "gap"] + [f for f in ("prompt", "chosen", "rejected") if rep["sample"] and f in rep["sample"][0]]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rep["sample"]:
        lines.append("| " + " | ".join(cell(_gap_text(r[c]) if c == "gap" else r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _histogram(path_fs, path: str, gaps: np.ndarray, cuts: list[float], title: str,
               filters: dict[str, float] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    finite = gaps[np.isfinite(gaps)]
    ax.hist(finite, bins=min(80, max(10, int(np.sqrt(len(finite))))), color="#4C72B0", alpha=0.85)
    for c in cuts:
        ax.axvline(c, color="#C44E52", linestyle="--", linewidth=1.5, label=f"cut-off {c:.4g}")
    for name, v in (filters or {}).items():
        ax.axvline(v, color="#555555", linestyle=":", linewidth=1.5, label=f"--{name.replace('_', '-')} {v:.4g}")
    ax.set_xlabel("gap = r(chosen) - r(rejected)")
    ax.set_ylabel("pairs")
    ax.set_title(title)
    if cuts or filters:
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()  # rendered in memory, written once: no temporary file anywhere
    fig.savefig(buf, format="png")
    plt.close(fig)
    with path_fs.open_output_stream(path) as dst:
        dst.write(buf.getvalue())


def run_select(cfg: SelectConfig) -> dict:
    """Select from a finished scores output into cfg.output; returns the summary."""
    ds, score_summary = _scores_dataset(cfg.scores)
    key = ds.to_table(columns=["row_id", "gap"])
    row_ids = key["row_id"].to_numpy()
    gaps = key["gap"].to_numpy(zero_copy_only=False)
    n = len(row_ids)
    passed = gap_filter(gaps, cfg.min_gap, cfg.max_gap)
    n_filtered = int(passed.sum())  # N': the ratio applies to the rows that pass the filters
    uses_ratio = cfg.strategy in RATIO_STRATEGIES
    k = target_k(n_filtered, cfg.ratio, cfg.top_k) if uses_ratio else cfg.top_k
    idx = choose(row_ids, gaps, cfg.strategy, k, seed=cfg.seed, gap_range=cfg.gap_range, band=cfg.band,
                 min_gap=cfg.min_gap, max_gap=cfg.max_gap)
    chosen_ids = row_ids[idx]
    fmt = "jsonl" if score_summary.get("source_kind") in ("jsonl", "json") else "parquet"
    fingerprint = {"scores": cfg.scores, "strategy": cfg.strategy, "ratio": cfg.ratio, "top_k": cfg.top_k,
                   "seed": cfg.seed, "gap_range": list(cfg.gap_range) if cfg.gap_range else None,
                   "band": list(cfg.band) if cfg.band else None, "min_gap": cfg.min_gap, "max_gap": cfg.max_gap}
    out = RunOutput(cfg.output, fingerprint, kind="selection", overwrite=cfg.overwrite, subdirs=(),
                    inputs=[("--scores", cfg.scores)])
    table = ds.to_table(filter=pc.field("row_id").isin(pa.array(chosen_ids, pa.int64())))
    pos = {int(r): i for i, r in enumerate(chosen_ids)}
    table = table.take(pa.array(np.argsort([pos[int(r)] for r in table["row_id"].to_pylist()], kind="stable")))
    fname = f"selected.{fmt}"
    if fmt == "jsonl":
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _restore_records(table))
        with out.fs.open_output_stream(out.path(fname)) as f:
            f.write(body.encode("utf-8"))
    else:
        keep = [c for c in table.column_names if c not in set(SCORE_COLUMNS) - {"gap"}]
        if EXTRA_COLUMN in keep and table[EXTRA_COLUMN].null_count == table.num_rows:
            keep.remove(EXTRA_COLUMN)
        with out.fs.open_output_stream(out.path(fname)) as f:
            pq.write_table(table.select(keep), f)
    sel_gaps = gaps[idx]
    if cfg.strategy == "gap-range":
        cuts = [float(v) for v in cfg.gap_range]
    elif cfg.strategy in ("smallest-gap", "largest-gap") and len(idx):
        cuts = [float(sel_gaps[-1] if cfg.strategy == "smallest-gap" else sel_gaps[0])]
    elif cfg.strategy == "quantile-band" and len(idx):
        cuts = [float(sel_gaps[0]), float(sel_gaps[-1])]
    elif cfg.strategy == "suspect-labels":
        cuts = [0.0]
    else:
        cuts = []
    finite = gaps[np.isfinite(gaps)]
    root = cfg.output.rstrip("/")
    summary = {
        "rows_scored": int(n),
        "rows_after_filter": n_filtered,
        "rows_selected": int(len(idx)),
        "strategy": cfg.strategy,
        "min_gap": cfg.min_gap,
        "max_gap": cfg.max_gap,
        "ratio": cfg.ratio if cfg.top_k is None and uses_ratio else None,
        "ratio_of": "rows_after_filter" if cfg.top_k is None and uses_ratio else None,
        "top_k": cfg.top_k,
        "seed": cfg.seed if cfg.strategy == "random" else None,
        "band": list(cfg.band) if cfg.band else None,
        "band_positions": list(band_of(gaps[passed], *cfg.band)) if cfg.band else None,
        "cutoff_gap": json_gap(cuts[0]) if len(cuts) == 1 else ([json_gap(c) for c in cuts] or None),
        "gap_quantiles": {f"q{int(q * 100):02d}": float(np.quantile(finite, q)) for q in QUANTILES} if len(finite) else {},
        "selected_gap_mean": json_gap(sel_gaps.mean()) if len(idx) else None,
        "negative_gaps": int((gaps < 0).sum()),
        "selected_negative_gaps": int((sel_gaps < 0).sum()),
        "selected_negative_share": float((sel_gaps < 0).mean()) if len(idx) else 0.0,
        "scores": cfg.scores,
        "outputs": {
            "selected": f"{root}/{fname}",
            "histogram": f"{root}/gap_histogram.png",
            "summary": f"{root}/summary.json",
        },
    }
    if cfg.strategy == "suspect-labels":
        n_neg = int((gaps[passed] < 0).sum())
        report = _suspect_report(_restore_records(table.slice(0, cfg.report_rows)), n_neg, int(n), n_filtered,
                                 int(len(idx)))
        with out.fs.open_output_stream(out.path("suspect_report.json")) as f:
            f.write(json.dumps(report, indent=2, ensure_ascii=False).encode("utf-8"))
        with out.fs.open_output_stream(out.path("suspect_report.md")) as f:
            f.write(_suspect_markdown(report).encode("utf-8"))
        summary["suspect_labels"] = {"count": n_neg, "share_of_filtered": report["share_of_filtered"],
                                     "share_of_scored": report["share_of_scored"]}
        summary["outputs"]["suspect_report"] = f"{root}/suspect_report.json"
        summary["outputs"]["suspect_report_md"] = f"{root}/suspect_report.md"
    filters = {k: float(v) for k, v in (("min_gap", cfg.min_gap), ("max_gap", cfg.max_gap)) if v is not None}
    kept = f"{n_filtered} after filter, " if filters else ""
    _histogram(out.fs, out.path("gap_histogram.png"), gaps, [c for c in cuts if math.isfinite(c)],
               f"{n} pairs, {kept}{len(idx)} selected ({cfg.strategy})", filters)
    out.finalize(summary)
    return summary
