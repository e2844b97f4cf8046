"""Selection: exactly the k smallest (ties by row_id), other strategies, outputs in the input's format."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefsel.run_output import RunOutput
from prefsel.score_job import scores_schema
from prefsel.scoring import SCORE_COLUMNS
from prefsel.selection import SelectConfig, choose, run_select, target_k


def test_smallest_gap_exact_k_with_ties_by_row_id():
    rng = np.random.default_rng(0)
    row_ids = rng.permutation(1000)
    gaps = rng.integers(-5, 5, size=1000).astype(float)  # many ties
    k = target_k(1000, 0.1, None)
    assert k == 100
    idx = choose(row_ids, gaps, "smallest-gap", k)
    brute = sorted(zip(gaps.tolist(), row_ids.tolist()))[:k]
    assert list(zip(gaps[idx].tolist(), row_ids[idx].tolist())) == brute
    # independent of the order rows come in
    perm = rng.permutation(1000)
    idx2 = choose(row_ids[perm], gaps[perm], "smallest-gap", k)
    assert row_ids[perm][idx2].tolist() == row_ids[idx].tolist()


def test_floor_and_top_k():
    assert target_k(95, 0.1, None) == 9
    assert target_k(10, 0.3, None) == 3  # 10 * 0.3 is 2.9999999999999996 in floats
    assert target_k(95, 0.1, 7) == 7
    assert target_k(5, 0.1, 7) == 5


def test_other_strategies():
    row_ids = np.arange(20)[::-1].copy()
    gaps = np.linspace(-1, 1, 20)
    largest = choose(row_ids, gaps, "largest-gap", 3)
    assert sorted(gaps[largest].tolist()) == sorted(gaps.tolist())[-3:]
    assert gaps[largest].tolist() == sorted(gaps[largest].tolist())  # written hardest first
    r1 = choose(row_ids, gaps, "random", 5, seed=1)
    assert r1.tolist() == choose(row_ids, gaps, "random", 5, seed=1).tolist()
    assert set(r1.tolist()) != set(choose(row_ids, gaps, "random", 5, seed=2).tolist())
    perm = np.random.default_rng(3).permutation(20)
    assert set(row_ids[perm][choose(row_ids[perm], gaps[perm], "random", 5, seed=1)]) == set(row_ids[r1])
    inside = choose(row_ids, gaps, "gap-range", None, gap_range=(-0.2, 0.3))
    assert all(-0.2 <= g <= 0.3 for g in gaps[inside]) and len(inside) == int(((gaps >= -0.2) & (gaps <= 0.3)).sum())
    with pytest.raises(ValueError, match="duplicate"):
        choose(np.array([1, 1]), np.array([0.0, 1.0]), "smallest-gap", 1)


def _scores_output(tmp_path, rows: list[dict], gaps: list[float], kind: str) -> str:
    """A finished scores folder written through the real output code."""
    sample = rows[: len(rows) // 2]  # like a run: the schema comes from the first rows
    from prefsel.prepare import infer_schema, record_schema, split_record

    schema = infer_schema(sample)
    out = RunOutput(str(tmp_path / "scores"), {"t": 1}, kind="scores")
    cols = {"row_id": list(range(len(rows)))}
    recs = [split_record(r, schema) for r in rows]
    for f in record_schema(schema):
        cols[f.name] = [r[f.name] for r in recs]
    for c in SCORE_COLUMNS:
        cols[c] = [0 if c.endswith("tokens") else 0.0] * len(rows)
    cols["gap"] = gaps
    half = len(rows) // 2
    table = pa.Table.from_pydict(cols, schema=scores_schema(schema))
    out.write_chunk(0, table.slice(0, half), [])
    out.write_chunk(1, table.slice(half), [])
    out.finalize({"source_kind": kind})
    return str(tmp_path / "scores")


def test_selected_rows_in_input_format_jsonl(tmp_path):
    rows = [
        {"prompt": [{"role": "user", "content": f"q{i}"}], "chosen": f"a{i}", "rejected": f"b{i}",
         "meta": {"src": "x", "n": i}}
        for i in range(20)
    ]
    rows[15]["late_key"] = "kept"  # not in the schema: travels in _extra
    gaps = [float((i * 7) % 20) - 10 for i in range(20)]
    gaps[15] = -50.0
    scores = _scores_output(tmp_path, rows, gaps, "jsonl")
    summary = run_select(SelectConfig(scores=scores, output=str(tmp_path / "sel"), ratio=0.25))
    lines = [json.loads(x) for x in (tmp_path / "sel" / "selected.jsonl").read_text().splitlines()]
    assert summary["rows_selected"] == len(lines) == 5
    want = sorted(range(20), key=lambda i: (gaps[i], i))[:5]
    assert [x["row_id"] for x in lines] == want
    for x in lines:
        src = rows[x["row_id"]]
        assert {k: v for k, v in x.items() if k not in ("row_id", "gap")} == src
        assert x["gap"] == gaps[x["row_id"]]
    assert summary["cutoff_gap"] == gaps[want[-1]]
    assert summary["gap_quantiles"]["q00"] == min(gaps) and summary["gap_quantiles"]["q100"] == max(gaps)
    assert (tmp_path / "sel" / "gap_histogram.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(FileExistsError):
        run_select(SelectConfig(scores=scores, output=str(tmp_path / "sel")))


def test_selected_rows_in_input_format_parquet(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}", "score": i / 2} for i in range(10)]
    gaps = [float(10 - i) for i in range(10)]
    scores = _scores_output(tmp_path, rows, gaps, "parquet")
    run_select(SelectConfig(scores=scores, output=str(tmp_path / "sel"), top_k=3, strategy="largest-gap"))
    t = pq.read_table(tmp_path / "sel" / "selected.parquet")
    assert t.column_names == ["row_id", "prompt", "chosen", "rejected", "score", "gap"]
    assert t["row_id"].to_pylist() == [2, 1, 0]  # largest gaps, written hardest (smallest) first


def test_config_validation():
    with pytest.raises(ValueError, match="ratio"):
        SelectConfig(scores="s", output="o", ratio=0)
    with pytest.raises(ValueError, match="gap-range"):
        SelectConfig(scores="s", output="o", strategy="gap-range")


def _brute(row_ids, gaps, keep=lambda g: True):
    """(gap, row_id) of the rows passing `keep`, in the order key's order."""
    return sorted((g, r) for g, r in zip(gaps.tolist(), row_ids.tolist()) if keep(g))


def test_gap_filters_compose_with_every_strategy_ratio_and_top_k():
    rng = np.random.default_rng(5)
    row_ids = rng.permutation(1000) + 17
    gaps = rng.integers(-3, 6, size=1000).astype(float)  # 9 values: ties everywhere
    positive = _brute(row_ids, gaps, lambda g: g > 0)  # --min-gap 0 is exclusive: gap 0 is out
    n_pos = len(positive)
    assert n_pos == int((gaps > 0).sum()) and n_pos < 1000
    k = target_k(n_pos, 0.1, None)
    assert k == n_pos // 10  # the ratio applies to the N' rows that pass the filter
    # the cut falls inside a run of equal gaps: row_id decides who is in
    assert positive[k - 1][0] == positive[k][0]
    idx = choose(row_ids, gaps, "smallest-gap", k, min_gap=0.0)
    assert list(zip(gaps[idx].tolist(), row_ids[idx].tolist())) == positive[:k]
    assert gaps[idx].min() > 0
    # same through --top-k, and independent of the input order
    perm = rng.permutation(1000)
    idx2 = choose(row_ids[perm], gaps[perm], "smallest-gap", 37, min_gap=0.0)
    assert list(zip(gaps[perm][idx2].tolist(), row_ids[perm][idx2].tolist())) == positive[:37]
    # both bounds, exclusive: -1 < gap < 3
    inside = _brute(row_ids, gaps, lambda g: -1 < g < 3)
    idx = choose(row_ids, gaps, "smallest-gap", None, min_gap=-1.0, max_gap=3.0)
    assert list(zip(gaps[idx].tolist(), row_ids[idx].tolist())) == inside
    assert set(gaps[idx].tolist()) == {0.0, 1.0, 2.0}
    # largest-gap below --max-gap: the k largest of gap < 2, ties by row_id (smaller row_id first)
    below = [(g, r) for g, r in zip(gaps.tolist(), row_ids.tolist()) if g < 2]
    want = sorted(below, key=lambda t: (-t[0], t[1]))[:50]
    idx = choose(row_ids, gaps, "largest-gap", 50, max_gap=2.0)
    assert sorted(zip(gaps[idx].tolist(), row_ids[idx].tolist())) == sorted(want)
    assert gaps[idx].tolist() == sorted(gaps[idx].tolist())  # written hardest first
    # random among the filtered rows only, seeded
    idx = choose(row_ids, gaps, "random", 40, seed=3, min_gap=0.0, max_gap=4.0)
    assert len(idx) == 40 and all(0 < g < 4 for g in gaps[idx])
    assert idx.tolist() == choose(row_ids, gaps, "random", 40, seed=3, min_gap=0.0, max_gap=4.0).tolist()
    assert set(row_ids[perm][choose(row_ids[perm], gaps[perm], "random", 40, seed=3, min_gap=0.0, max_gap=4.0)]) \
        == set(row_ids[idx])
    # gap-range inside the filter window
    idx = choose(row_ids, gaps, "gap-range", None, gap_range=(-2.0, 2.0), min_gap=0.0)
    assert list(zip(gaps[idx].tolist(), row_ids[idx].tolist())) == _brute(row_ids, gaps, lambda g: 0 < g <= 2)
    # a filter that keeps nothing keeps nothing
    assert len(choose(row_ids, gaps, "smallest-gap", 10, min_gap=100.0)) == 0


def test_suspect_labels_are_the_negative_gaps():
    row_ids = np.array([5, 3, 9, 1, 7, 2, 8])
    gaps = np.array([-1.0, 0.5, -1.0, -3.0, 0.0, -1.0, 2.0])
    idx = choose(row_ids, gaps, "suspect-labels")
    # gap 0 is not suspect; equal gaps (-1) in row_id order
    assert row_ids[idx].tolist() == [1, 2, 5, 9]
    assert row_ids[choose(row_ids, gaps, "suspect-labels", 2)].tolist() == [1, 2]  # --top-k: the most negative
    assert row_ids[choose(row_ids, gaps, "suspect-labels", min_gap=-2.0)].tolist() == [2, 5, 9]


def test_quantile_band_ranks_only_gaps_that_have_a_place():
    """NaN gaps (scoring keeps pairs whose log-probs are not finite) sort last but have no
    quantile: the top band is the largest real gaps, not the NaN rows, and bands still
    partition the ordered rows. ±inf are ordered values and keep their places."""
    gaps = np.array([0.1 * i for i in range(8)] + [np.nan, np.nan, -np.inf])
    row_ids = np.arange(len(gaps))
    top = choose(row_ids, gaps, "quantile-band", band=(0.8, 1.0))
    assert gaps[top].tolist() == [0.6000000000000001, 0.7000000000000001]  # 9 ordered rows: positions 7, 8
    assert gaps[choose(row_ids, gaps, "quantile-band", band=(0.0, 0.2))].tolist() == [-np.inf]
    parts = [choose(row_ids, gaps, "quantile-band", band=b) for b in ((0, 0.5), (0.5, 1.0))]
    assert sorted(np.concatenate(parts).tolist()) == [r for r in range(len(gaps)) if not np.isnan(gaps[r])]


def test_quantile_band_exact_positions():
    rng = np.random.default_rng(11)
    row_ids = rng.permutation(1000)
    gaps = rng.integers(-4, 4, size=1000).astype(float)
    order = _brute(row_ids, gaps)
    idx = choose(row_ids, gaps, "quantile-band", band=(0.45, 0.55))
    assert list(zip(gaps[idx].tolist(), row_ids[idx].tolist())) == order[450:550]
    # the band's edges fall inside runs of equal gaps: row_id decides
    assert order[449][0] == order[450][0] or order[549][0] == order[550][0]
    from prefsel.selection import band_positions

    assert band_positions(95, 0.45, 0.55) == (42, 52)  # floor(42.75), floor(52.25)
    assert band_positions(10, 0.3, 0.7) == (3, 7)  # 10 * 0.3 is 2.9999999999999996 in floats
    assert band_positions(1000, 0.0, 1.0) == (0, 1000)
    # contiguous bands partition the rows: [floor(N*LO), floor(N*HI)) is half-open
    parts = [choose(row_ids, gaps, "quantile-band", band=b) for b in ((0, 0.3), (0.3, 0.7), (0.7, 1.0))]
    assert [len(p) for p in parts] == [300, 400, 300]
    assert np.concatenate(parts).tolist() == choose(row_ids, gaps, "quantile-band", band=(0, 1)).tolist()
    # quantiles of the filtered rows; --top-k caps, keeping the band's hardest rows
    pos = _brute(row_ids, gaps, lambda g: g > 0)
    a, b = band_positions(len(pos), 0.25, 0.75)
    idx = choose(row_ids, gaps, "quantile-band", band=(0.25, 0.75), min_gap=0.0)
    assert list(zip(gaps[idx].tolist(), row_ids[idx].tolist())) == pos[a:b]
    idx = choose(row_ids, gaps, "quantile-band", 10, band=(0.25, 0.75), min_gap=0.0)
    assert list(zip(gaps[idx].tolist(), row_ids[idx].tolist())) == pos[a:a + 10]


def test_run_select_filters_summary_and_negative_counts(tmp_path):
    import glob
    import tempfile

    rows = [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(40)]
    gaps = [float(i % 8) - 2 for i in range(40)]  # -2..5, each 5 times: 10 negative, 5 zero
    scores = _scores_output(tmp_path, rows, gaps, "jsonl")
    tmp_before = set(glob.glob(os.path.join(tempfile.gettempdir(), "prefsel-hist-*")))
    s = run_select(SelectConfig(scores=scores, output=str(tmp_path / "pos"), ratio=0.2, min_gap=0.0))
    assert s["rows_scored"] == 40 and s["rows_after_filter"] == 25  # gaps 1..5
    assert s["rows_selected"] == 5 == target_k(25, 0.2, None)  # floor(N' x ratio), not floor(N x ratio) = 8
    assert s["ratio"] == 0.2 and s["ratio_of"] == "rows_after_filter" and s["min_gap"] == 0.0
    lines = [json.loads(x) for x in (tmp_path / "pos" / "selected.jsonl").read_text().splitlines()]
    assert [x["row_id"] for x in lines] == sorted((i for i in range(40) if gaps[i] > 0),
                                                  key=lambda i: (gaps[i], i))[:5]
    assert all(x["gap"] == 1.0 for x in lines)
    assert s["negative_gaps"] == 10 and s["selected_negative_gaps"] == 0 and s["selected_negative_share"] == 0.0
    # every selection counts its negative-gap pairs
    s = run_select(SelectConfig(scores=scores, output=str(tmp_path / "small"), top_k=12))
    assert s["rows_after_filter"] == 40 and s["selected_negative_gaps"] == 10
    assert s["selected_negative_share"] == pytest.approx(10 / 12)
    s = run_select(SelectConfig(scores=scores, output=str(tmp_path / "top"), top_k=3, strategy="largest-gap",
                                max_gap=4.0))
    assert s["rows_after_filter"] == 30 and s["rows_selected"] == 3 and s["ratio"] is None
    assert s["cutoff_gap"] == 3.0
    s = run_select(SelectConfig(scores=scores, output=str(tmp_path / "band"), strategy="quantile-band",
                                band=(0.5, 0.75)))
    assert s["band_positions"] == [20, 30] and s["rows_selected"] == 10
    assert s["cutoff_gap"] == [2.0, 3.0]
    # the histogram is rendered in memory: no temporary file left anywhere, only the outputs
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "prefsel-hist-*"))) == tmp_before
    assert sorted(p.name for p in (tmp_path / "pos").iterdir()) == [
        "gap_histogram.png", "manifest.json", "selected.jsonl", "summary.json"]
    assert (tmp_path / "pos" / "gap_histogram.png").read_bytes()[:4] == b"\x89PNG"


def test_suspect_labels_report(tmp_path):
    long = "x" * 150 + " MIDDLE " + "y" * 150
    rows = [{"prompt": [{"role": "user", "content": f"question {i}"}], "chosen": f"good {i}",
             "rejected": long if i == 3 else f"bad {i}"} for i in range(50)]
    gaps = [float(i % 10) - 1.5 for i in range(50)]  # -1.5, -0.5 negative: 10 of 50
    gaps[3] = -9.0  # the strongest disagreement: first in the report
    gaps[7] = -0.5
    negatives = sorted((i for i in range(50) if gaps[i] < 0), key=lambda i: (gaps[i], i))
    assert len(negatives) == 12
    scores = _scores_output(tmp_path, rows, gaps, "jsonl")
    s = run_select(SelectConfig(scores=scores, output=str(tmp_path / "sus"), strategy="suspect-labels",
                                report_rows=5))
    assert s["rows_selected"] == 12 and s["ratio"] is None
    assert s["suspect_labels"] == {"count": 12, "share_of_filtered": 12 / 50, "share_of_scored": 12 / 50}
    assert s["selected_negative_gaps"] == 12 and s["selected_negative_share"] == 1.0
    lines = [json.loads(x) for x in (tmp_path / "sus" / "selected.jsonl").read_text().splitlines()]
    assert [x["row_id"] for x in lines] == negatives  # the full list, most negative first
    rep = json.loads((tmp_path / "sus" / "suspect_report.json").read_text())
    assert rep["count"] == 12 and rep["share_of_scored"] == 12 / 50 and rep["listed_in_selection"] == 12
    assert [r["row_id"] for r in rep["sample"]] == negatives[:5]
    assert [r["gap"] for r in rep["sample"]] == [gaps[i] for i in negatives[:5]]
    first = rep["sample"][0]
    assert first["prompt"] == "user: question 3" and first["chosen"] == "good 3"
    assert len(first["rejected"]) <= 200 and first["rejected"].startswith("xxx") and first["rejected"].endswith("yyy")
    assert "MIDDLE" not in first["rejected"]
    md = (tmp_path / "sus" / "suspect_report.md").read_text()
    assert "12 of 50 pairs (24.00%)" in md
    assert len([x for x in md.splitlines() if x.startswith("| ")]) == 1 + 5  # header + sample rows
    # filters apply first: count and share are of the N' rows that pass
    s = run_select(SelectConfig(scores=scores, output=str(tmp_path / "sus2"), strategy="suspect-labels",
                                min_gap=-1.0, top_k=3))
    assert s["rows_after_filter"] == 50 - 6 and s["suspect_labels"]["count"] == 6  # gap -0.5: five + row 7
    assert s["suspect_labels"]["share_of_filtered"] == 6 / 44 and s["rows_selected"] == 3


def test_cli_select_new_strategies(tmp_path):
    from prefsel.cli import main

    rows = [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(20)]
    gaps = [float(i) - 4 for i in range(20)]
    scores = _scores_output(tmp_path, rows, gaps, "jsonl")
    assert main(["select", "--scores", scores, "--output", str(tmp_path / "b"), "--strategy", "quantile-band",
                 "--band", "0.25", "0.5", "--min-gap", "-1", "--max-gap", "15"]) == 0
    s = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert s["rows_after_filter"] == 15 and s["band_positions"] == [3, 7] and s["rows_selected"] == 4
    assert main(["select", "--scores", scores, "--output", str(tmp_path / "s"), "--strategy", "suspect-labels",
                 "--report-rows", "2"]) == 0
    assert len(json.loads((tmp_path / "s" / "suspect_report.json").read_text())["sample"]) == 2
    assert main(["select", "--scores", scores, "--output", str(tmp_path / "x"), "--strategy", "quantile-band"]) == 2
    assert main(["select", "--scores", scores, "--output", str(tmp_path / "y"), "--min-gap", "1",
                 "--max-gap", "1"]) == 2


def test_new_config_validation():
    with pytest.raises(ValueError, match="--band"):
        SelectConfig(scores="s", output="o", strategy="quantile-band")
    with pytest.raises(ValueError, match="--band"):
        SelectConfig(scores="s", output="o", strategy="quantile-band", band=(0.6, 0.4))
    with pytest.raises(ValueError, match="--band"):
        SelectConfig(scores="s", output="o", strategy="quantile-band", band=(0.5, 1.5))
    with pytest.raises(ValueError, match="--band is only"):
        SelectConfig(scores="s", output="o", band=(0.1, 0.2))
    with pytest.raises(ValueError, match="--min-gap must be below"):
        SelectConfig(scores="s", output="o", min_gap=1.0, max_gap=1.0)
    with pytest.raises(ValueError, match="--min-gap must be a finite number"):
        SelectConfig(scores="s", output="o", min_gap=float("nan"))
    SelectConfig(scores="s", output="o", strategy="suspect-labels", min_gap=-5.0)


def test_ratio_and_band_positions_are_exact_at_large_n():
    """k = floor(N x ratio) for the decimal typed: floats alone (or a 1e-9 margin) lose a row at
    large N (10**8 x 0.57 is 56999999.99999999 in floats)."""
    from fractions import Fraction

    from prefsel.selection import band_positions

    assert target_k(10**8, 0.57, None) == 57_000_000
    assert band_positions(10**8, 0.29, 0.57) == (29_000_000, 57_000_000)
    for r in ("0.1", "0.29", "0.3", "0.33", "0.57", "0.7"):
        for n in [*range(1, 300), *range(10**8, 10**8 + 300)]:
            assert target_k(n, float(r), None) == int(n * Fraction(r)), (r, n)


@pytest.mark.parametrize("kw,flag", [
    (dict(strategy="gap-range", gap_range=(float("nan"), 1.0)), "--gap-range"),
    (dict(strategy="gap-range", gap_range=(0.0, float("inf"))), "--gap-range"),
    (dict(max_gap=float("nan")), "--max-gap"),
    (dict(min_gap=float("-inf")), "--min-gap"),
])
def test_non_finite_bounds_are_refused_naming_the_flag(kw, flag):
    """A NaN bound fails every comparison and would silently select nothing."""
    with pytest.raises(ValueError, match=f"^{flag} must be a finite number, got"):
        SelectConfig(scores="s", output="o", **kw)


def test_cli_refuses_a_nan_gap_range(tmp_path, capsys):
    from prefsel.cli import main

    rows = [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(4)]
    scores = _scores_output(tmp_path, rows, [0.5, -1.0, 2.0, 0.0], "jsonl")
    assert main(["select", "--scores", scores, "--output", str(tmp_path / "x"), "--strategy", "gap-range",
                 "--gap-range", "nan", "1"]) == 2
    assert "--gap-range must be a finite number" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_non_finite_gaps_are_null_in_selected_jsonl_and_summary(tmp_path):
    """Scoring keeps a pair whose log-probs are not finite, so a gap may be NaN or infinite; the
    selection's JSON files stay strict JSON (null), with the same rows selected."""
    rows = [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(6)]
    gaps = [0.5, float("nan"), -1.0, float("-inf"), 2.0, 0.0]
    scores = _scores_output(tmp_path, rows, gaps, "jsonl")

    def strict(text: str):
        def refuse(value):
            raise ValueError(f"not strict JSON: {value}")
        return json.loads(text, parse_constant=refuse)

    s = run_select(SelectConfig(scores=scores, output=str(tmp_path / "all"), ratio=1.0))
    lines = [strict(x) for x in (tmp_path / "all" / "selected.jsonl").read_text().split("\n") if x]
    assert [x["row_id"] for x in lines] == [3, 2, 5, 0, 4, 1]  # -inf first, NaN last
    assert [x["gap"] for x in lines] == [None, -1.0, 0.0, 0.5, 2.0, None]
    summary = strict((tmp_path / "all" / "summary.json").read_text())
    assert summary["cutoff_gap"] is None and summary["selected_gap_mean"] is None
    assert s["rows_selected"] == 6
    # the suspect report lists the -inf gap too (gap < 0), as strict JSON and in its table
    run_select(SelectConfig(scores=scores, output=str(tmp_path / "sus"), strategy="suspect-labels"))
    rep = strict((tmp_path / "sus" / "suspect_report.json").read_text())
    assert [(r["row_id"], r["gap"]) for r in rep["sample"]] == [(3, None), (2, -1.0)]
    assert "not finite" in (tmp_path / "sus" / "suspect_report.md").read_text()


def test_an_inputs_own_row_id_and_gap_are_kept_beside_prefsels(tmp_path):
    """A to-pairs row carries the prompt's row_id, a selection scored again its old gap: the
    selected line holds prefsel's row_id and gap, and the input's own ones as input_row_id /
    input_gap (an input_row_id already there is kept too); equal values are not repeated."""
    rows = [{"row_id": 100 + i, "prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}", "gap": 9.0}
            for i in range(6)]
    rows[1]["input_row_id"] = "taken"
    rows[2]["row_id"] = 2  # the same as its position: nothing to keep apart
    scores = _scores_output(tmp_path, rows, [float(i) for i in range(6)], "jsonl")
    run_select(SelectConfig(scores=scores, output=str(tmp_path / "sel"), ratio=0.5))
    lines = [json.loads(x) for x in (tmp_path / "sel" / "selected.jsonl").read_text().splitlines()]
    texts = [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(3)]
    assert lines == [
        {**texts[0], "input_row_id": 100, "input_gap": 9.0, "row_id": 0, "gap": 0.0},
        {**texts[1], "input_row_id": "taken", "input_input_row_id": 101, "input_gap": 9.0, "row_id": 1, "gap": 1.0},
        {**texts[2], "input_gap": 9.0, "row_id": 2, "gap": 2.0},
    ]
