"""The GPU suite (bench/gpu_suite.sh), rehearsed on CPU with tiny shapes, the way a GPU session
runs it: each part's steps must succeed, and what they measure must be right, not only printed.

A GPU is lent to few sessions and for 30 minutes; this keeps every script it runs working in
between (score_gpu.py, score_pipeline.py, serve_load.py, train_gpu.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("score", "train", "serving")  # the order of the device calls


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite")
    env = {**os.environ, "OUT": str(out), "STAGE": str(tmp_path_factory.mktemp("stage")),
           "RAY_AUTH_MODE": "disabled", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "bench/gpu_suite.sh", "all", "--tiny"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # what the device returns: at most 8 files, so one archive and one table per part and no more
    assert sorted(f.name for f in out.iterdir()) == sorted(f"{p}.{e}" for p in PARTS for e in ("md", "tar.gz"))
    back = tmp_path_factory.mktemp("returned")
    for part in PARTS:  # the tests read the archives, as bench/RESULTS.md is written from them
        with tarfile.open(out / f"{part}.tar.gz") as tar:
            tar.extractall(back, filter="data")
    return out, back, proc.stdout


def _json(back: Path, part: str, name: str) -> dict:
    return json.loads((back / part / f"{name}.json").read_text())


def test_every_step_succeeds_and_comes_back_as_one_archive_per_part(suite):
    out, _, log = suite
    steps = re.findall(r"^== (\w+): rc (\d+)", log, re.M)
    assert [s for s, _ in steps] == ["score_tiny", "train_tiny", "pipeline_tiny", "serve_tiny"]
    assert all(rc == "0" for _, rc in steps), steps
    for part in PARTS:
        assert (out / f"{part}.tar.gz").stat().st_size > 0
        assert "| " in (out / f"{part}.md").read_text()  # the tables


def test_score_rows_agree_and_the_published_loop_does_not(suite):
    _, back, _ = suite
    d = _json(back, "score", "score_tiny")
    assert d["complete"] is True  # rewritten after every row, complete only at the end
    rows = {r["row"]: r for r in d["rows"]}
    assert len(rows) == 7  # 3 layouts x (sdpa, flex_attention) + the published loop
    for name, r in rows.items():
        assert r["pairs_per_s"] > 0 and 0 < r["mfu"]
        if name.startswith("prefsel"):
            assert r["max_gap_diff"] < 1e-5, name
    assert rows["published loop (re-created), fp16, batch 8"]["max_gap_diff"] > 0.1  # pads summed in
    assert d["exactness"]["max_err"] == 0.0  # float32 on CPU both ways: the same numbers
    assert "Self CPU time total" in (back / "score" / "profile_tiny.txt").read_text()


def test_pipeline_runs_the_bare_engines_batches(suite):
    _, back, _ = suite
    d = _json(back, "serving", "pipeline_tiny")
    assert d["pipeline"]["rows_scored"] == d["pairs"] and d["pipeline"]["rows_rejected"] == 0
    assert d["same_batches"] is True and d["max_gap_diff"] < 1e-6
    assert d["steady_vs_bare"] > 0


def test_serving_answers_every_request_and_measures_the_bare_forward(suite):
    _, back, _ = suite
    d = _json(back, "serving", "serve_tiny")
    assert all(cell["errors"] == 0 for row in d["rows"] for cell in (row["on"], row["off"]))
    s = d["summary"]
    assert s["bare_forward_p50_ms"] > 0 and s["c1_on_p50_ms"] > 0 and s["c16_on_pairs_per_s"] > 0


def test_training_matches_trl_step_by_step(suite):
    _, back, _ = suite
    d = _json(back, "train", "train_tiny")
    assert not d["errors"]
    assert d["check"]["token_mismatches"] == 0
    assert all(c["abs_diff"] < 1e-5 for c in d["check"]["checks"])
    trl, ours = (d["results"][k] for k in ("TRL DPOTrainer (fp32 weights)", "prefsel, Ray Train worker, ZeRO-2, packed"))
    assert len(ours["losses"]) == len(trl["losses"]) == 4
    assert ours["losses"] == pytest.approx(trl["losses"], abs=1e-5)  # the same batches, the same optimizer
    assert ours["peak_rss_gib"] > 0 and trl["tokens"] == ours["tokens"]
    on, off = (next(m for m in d["memory"] if m["recompute_head"] is v) for v in (True, False))
    assert on["response_tokens"] == off["response_tokens"] == 4096
