"""Selecting pairs by gap: exact, global and deterministic (order key: gap, then row_id).

Pure numpy/pyarrow, no Ray. `choose` decides which rows are kept; `run_select` reads a finished
scores output, writes the kept rows in the input's own format (plus row_id and gap, hardest
first), a summary with gap quantiles and the cut-off, and a PNG histogram of the gaps.
"""

from __future__ import annotations

import json
import math
import posixpath
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from prefsel.prepare import EXTRA_COLUMN
from prefsel.run_output import SUMMARY, RunOutput, check_complete, read_json
from prefsel.scoring import SCORE_COLUMNS
from prefsel.sources import filesystem_for

STRATEGIES = ("smallest-gap", "largest-gap", "random", "gap-range")
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
    seed: int = 0
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"--strategy must be one of {STRATEGIES}")
        if not 0 < self.ratio <= 1:
            raise ValueError("--ratio must be in (0, 1]")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError("--top-k must be >= 0")
        if self.strategy == "gap-range":
            if self.gap_range is None or len(self.gap_range) != 2 or self.gap_range[0] > self.gap_range[1]:
                raise ValueError("--strategy gap-range needs --gap-range LO HI with LO <= HI")
        elif self.gap_range is not None:
            raise ValueError("--gap-range is only used with --strategy gap-range")


def choose(
    row_ids: np.ndarray,
    gaps: np.ndarray,
    strategy: str = "smallest-gap",
    k: int | None = None,
    *,
    seed: int = 0,
    gap_range: tuple[float, float] | None = None,
) -> np.ndarray:
    """Indices of the kept rows, hardest first (ascending gap, ties by row_id).

    k rows for smallest-gap / largest-gap / random; for gap-range every row with
    LO <= gap <= HI, capped at k when k is given. Independent of the input order.
    """
    row_ids = np.asarray(row_ids, dtype=np.int64)
    gaps = np.asarray(gaps, dtype=np.float64)
    if len(np.unique(row_ids)) != len(row_ids):
        raise ValueError("duplicate row_id in scores")
    n = len(row_ids)
    by_gap = np.lexsort((row_ids, gaps))  # primary key gap, then row_id; NaN last
    if strategy == "smallest-gap":
        keep = by_gap[: min(k if k is not None else n, n)]
    elif strategy == "largest-gap":
        desc = np.lexsort((row_ids, -gaps))
        keep = desc[: min(k if k is not None else n, n)]
    elif strategy == "random":
        by_id = np.argsort(row_ids, kind="stable")
        rng = np.random.default_rng(seed)
        keep = by_id[rng.permutation(n)[: min(k if k is not None else n, n)]]
    elif strategy == "gap-range":
        if gap_range is None:
            raise ValueError("gap-range needs (LO, HI)")
        lo, hi = gap_range
        inside = by_gap[(gaps[by_gap] >= lo) & (gaps[by_gap] <= hi)]
        keep = inside if k is None else inside[:k]
    else:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    order = np.lexsort((row_ids[keep], gaps[keep]))
    return keep[order]


def target_k(n: int, ratio: float, top_k: int | None) -> int:
    """k = floor(N * ratio), or --top-k when given."""
    if top_k is not None:
        return min(top_k, n)
    return int(math.floor(n * ratio + 1e-9))


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
    """Rows as the input had them: original fields, _extra unfolded, then row_id and gap."""
    drop = set(SCORE_COLUMNS) - {"gap"}
    rows = []
    for r in table.to_pylist():
        extra = r.pop(EXTRA_COLUMN, None)
        out = {k: v for k, v in r.items() if k not in drop and k not in ("row_id", "gap")}
        if extra:
            out.update(json.loads(extra))
        out["row_id"], out["gap"] = r["row_id"], r["gap"]
        rows.append(out)
    return rows


def _histogram(path_fs, path: str, gaps: np.ndarray, cuts: list[float], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    finite = gaps[np.isfinite(gaps)]
    ax.hist(finite, bins=min(80, max(10, int(np.sqrt(len(finite))))), color="#4C72B0", alpha=0.85)
    for c in cuts:
        ax.axvline(c, color="#C44E52", linestyle="--", linewidth=1.5, label=f"cut-off {c:.4g}")
    ax.set_xlabel("gap = r(chosen) - r(rejected)")
    ax.set_ylabel("pairs")
    ax.set_title(title)
    if cuts:
        ax.legend()
    fig.tight_layout()
    tmp = f"/tmp/prefsel-hist-{uuid.uuid4().hex[:8]}.png"
    fig.savefig(tmp)
    plt.close(fig)
    with open(tmp, "rb") as src, path_fs.open_output_stream(path) as dst:
        dst.write(src.read())


def run_select(cfg: SelectConfig) -> dict:
    """Select from a finished scores output into cfg.output; returns the summary."""
    ds, score_summary = _scores_dataset(cfg.scores)
    key = ds.to_table(columns=["row_id", "gap"])
    row_ids = key["row_id"].to_numpy()
    gaps = key["gap"].to_numpy(zero_copy_only=False)
    n = len(row_ids)
    k = target_k(n, cfg.ratio, cfg.top_k) if cfg.strategy != "gap-range" else cfg.top_k
    idx = choose(row_ids, gaps, cfg.strategy, k, seed=cfg.seed, gap_range=cfg.gap_range)
    chosen_ids = row_ids[idx]
    fmt = "jsonl" if score_summary.get("source_kind") in ("jsonl", "json") else "parquet"
    fingerprint = {"scores": cfg.scores, "strategy": cfg.strategy, "ratio": cfg.ratio, "top_k": cfg.top_k,
                   "seed": cfg.seed, "gap_range": list(cfg.gap_range) if cfg.gap_range else None}
    out = RunOutput(cfg.output, fingerprint, kind="selection", overwrite=cfg.overwrite, subdirs=())
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
        cuts = list(cfg.gap_range)
    elif cfg.strategy in ("smallest-gap", "largest-gap") and len(idx):
        cuts = [float(sel_gaps[-1] if cfg.strategy == "smallest-gap" else sel_gaps[0])]
    else:
        cuts = []
    finite = gaps[np.isfinite(gaps)]
    summary = {
        "rows_scored": int(n),
        "rows_selected": int(len(idx)),
        "strategy": cfg.strategy,
        "ratio": cfg.ratio if cfg.top_k is None and cfg.strategy != "gap-range" else None,
        "top_k": cfg.top_k,
        "seed": cfg.seed if cfg.strategy == "random" else None,
        "cutoff_gap": cuts[0] if len(cuts) == 1 else (cuts or None),
        "gap_quantiles": {f"q{int(q * 100):02d}": float(np.quantile(finite, q)) for q in QUANTILES} if len(finite) else {},
        "selected_gap_mean": float(sel_gaps.mean()) if len(idx) else None,
        "negative_gaps": int((gaps < 0).sum()),
        "scores": cfg.scores,
        "outputs": {
            "selected": f"{cfg.output.rstrip('/')}/{fname}",
            "histogram": f"{cfg.output.rstrip('/')}/gap_histogram.png",
            "summary": f"{cfg.output.rstrip('/')}/summary.json",
        },
    }
    _histogram(out.fs, out.path("gap_histogram.png"), gaps, cuts,
               f"{n} pairs, {len(idx)} selected ({cfg.strategy})")
    out.finalize(summary)
    return summary
