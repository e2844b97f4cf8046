"""The GPU suite (bench/gpu_suite.sh), rehearsed on CPU with tiny shapes, the way a GPU session
runs it: every step must succeed, and what they measure must be right, not only printed.

A GPU is lent to few sessions and for 15 minutes; this keeps every script it runs working in
between (score_gpu.py, score_pipeline.py, serve_load.py, train_gpu.py), and the deadline that
keeps a call inside that budget."""

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
STEPS = ["score_tiny", "train_tiny", "pipeline_tiny", "serve_tiny"]  # `all`, in priority order


def _run_suite(tmp_path_factory, *args: str) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("gpu_suite")
    env = {**os.environ, "OUT": str(out), "STAGE": str(tmp_path_factory.mktemp("stage")),
           "RAY_AUTH_MODE": "disabled", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "bench/gpu_suite.sh", *args, "--tiny"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # what the device returns: at most 8 files, so one archive and one table a call and no more
    assert sorted(f.name for f in out.iterdir()) == ["suite.md", "suite.tar.gz"]
    return out, proc


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out, proc = _run_suite(tmp_path_factory, "all")
    back = tmp_path_factory.mktemp("returned")
    with tarfile.open(out / "suite.tar.gz") as tar:  # the tests read the archive, as bench/RESULTS.md is written from it
        tar.extractall(back, filter="data")
    return out, back, proc.stdout


def _json(back: Path, name: str) -> dict:
    return json.loads((back / "suite" / f"{name}.json").read_text())


def test_every_step_succeeds_and_comes_back_in_one_archive(suite):
    out, _, log = suite
    steps = re.findall(r"^== (\w+): rc (\d+)", log, re.M)
    assert [s for s, _ in steps] == STEPS
    assert all(rc == "0" for _, rc in steps), steps
    assert "next:" not in log  # no deadline: nothing left out
    assert (out / "suite.tar.gz").stat().st_size > 0
    tables = (out / "suite.md").read_text()
    assert "| " in tables and all(f"## {s} (rc 0 in" in tables for s in STEPS)


def test_a_deadline_leaves_out_the_steps_that_cannot_fit_and_names_the_next_call(tmp_path_factory):
    # the deadline is counted from the script's start: 1 s leaves no step its minimum (30 s here)
    out, proc = _run_suite(tmp_path_factory, "score", "serving", "--deadline", "1")
    assert not re.findall(r"^== (\w+): rc", proc.stdout, re.M)
    left = re.findall(r"^== (\w+): not run, (-?\d+) s left", proc.stdout, re.M)
    assert [s for s, _ in left] == ["score_tiny", "pipeline_tiny", "serve_tiny"]  # parts expand in priority order
    assert "next: bash bench/gpu_suite.sh score_tiny pipeline_tiny serve_tiny --tiny --deadline SECONDS" in proc.stdout
    assert "# GPU suite on CPU" in (out / "suite.md").read_text()


def test_score_rows_agree_and_the_published_loop_does_not(suite):
    _, back, _ = suite
    d = _json(back, "score_tiny")
    assert d["complete"] is True  # rewritten after every row, complete only at the end
    rows = {r["row"]: r for r in d["rows"]}
    assert len(rows) == 7  # 3 layouts x (sdpa, flex_attention) + the published loop
    for name, r in rows.items():
        assert r["pairs_per_s"] > 0 and 0 < r["mfu"]
        if name.startswith("prefsel"):
            assert r["max_gap_diff"] < 1e-5, name
    assert rows["published loop (re-created), fp16, batch 8"]["max_gap_diff"] > 0.1  # pads summed in
    # float32 on CPU both ways; --exactness-pairs 8 scores the first 8 of the 16 in other batches,
    # so only float rounding differs (the bf16 gaps on the GPU are off by more)
    assert d["exactness"]["pairs"] == 8 and d["exactness"]["k"] == 1
    assert d["exactness"]["max_err"] < 1e-5 and d["exactness"]["overlap"] == 1
    assert "Self CPU time total" in (back / "suite" / "profile_tiny.txt").read_text()


def test_pipeline_runs_the_bare_engines_batches(suite):
    _, back, _ = suite
    d = _json(back, "pipeline_tiny")
    assert d["pipeline"]["rows_scored"] == d["pairs"] and d["pipeline"]["rows_rejected"] == 0
    assert d["same_batches"] is True and d["max_gap_diff"] < 1e-6
    assert d["steady_vs_bare"] > 0


def test_serving_answers_every_request_and_measures_the_bare_forward(suite):
    _, back, _ = suite
    d = _json(back, "serve_tiny")
    assert all(cell["errors"] == 0 for row in d["rows"] for cell in (row["on"], row["off"]))
    s = d["summary"]
    assert s["bare_forward_p50_ms"] > 0 and s["c1_on_p50_ms"] > 0 and s["c16_on_pairs_per_s"] > 0


def test_training_matches_trl_step_by_step(suite):
    _, back, _ = suite
    d = _json(back, "train_tiny")
    assert not d["errors"]
    assert d["check"]["token_mismatches"] == 0
    assert all(c["abs_diff"] < 1e-5 for c in d["check"]["checks"])
    trl, ours = (d["results"][k] for k in ("TRL DPOTrainer (fp32 weights)", "prefsel, Ray Train worker, ZeRO-2, packed"))
    assert len(ours["losses"]) == len(trl["losses"]) == 4
    assert ours["losses"] == pytest.approx(trl["losses"], abs=1e-5)  # the same batches, the same optimizer
    assert ours["peak_rss_gib"] > 0 and trl["tokens"] == ours["tokens"]
    on, off = (next(m for m in d["memory"] if m["recompute_head"] is v) for v in (True, False))
    assert on["response_tokens"] == off["response_tokens"] == 4096
