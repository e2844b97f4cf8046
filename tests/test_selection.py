"""Selection: exactly the k smallest (ties by row_id), other strategies, outputs in the input's format."""

from __future__ import annotations

import json

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
