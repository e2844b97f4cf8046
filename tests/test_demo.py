"""`prefsel demo --quick` end to end on the local Ray (CPU): the table's shape, loadable models, and
what the console shows (the command as a user runs it, in a subprocess with its own local Ray).

One run for the whole file (a few minutes on 2 shared cores: 14 short Ray Train runs).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from prefsel.demo.methods import METHODS, METRICS

MAX_CONSOLE_LINES = 40


@pytest.fixture(scope="module")
def quick_demo_run(tmp_path_factory):
    """(output folder, results.json, what the command printed: stdout and stderr together)."""
    out = tmp_path_factory.mktemp("demo") / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    res = subprocess.run([sys.executable, "-m", "prefsel.cli", "demo", "--quick", "--output", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, timeout=840)
    assert res.returncode == 0, res.stdout[-5000:]
    with open(out / "results.json") as f:
        return out, json.load(f), res.stdout


@pytest.fixture(scope="module")
def quick_demo(quick_demo_run):
    return quick_demo_run[:2]


def test_demo_quick_console_is_short(quick_demo_run):
    """A clean console: one line per stage, the table, the log's path; Ray's INFO lines and the
    reward models' load reports are in OUTPUT/prefsel.log instead (prefsel.console)."""
    from prefsel.demo.runner import STAGES

    out, res, text = quick_demo_run
    lines = text.splitlines()
    assert len(lines) <= MAX_CONSOLE_LINES, text
    for i, name in enumerate(STAGES, 1):
        assert sum(line.startswith(f"[{i}/{len(STAGES)}] {name} ") for line in lines) == 1, (name, text)
    assert sum(line.startswith("|") for line in lines) == 2 + len(METHODS)  # the table
    assert lines[-1] == f"log: {out / 'prefsel.log'}"
    for noise in ("LOAD REPORT", "\tINFO ", "Running in local mode", "Setting accelerator to CPU"):
        assert noise not in text, noise
    log = (out / "prefsel.log").read_text()
    assert "LOAD REPORT" in log and "Running in local mode" in log and "Started a local Ray instance" in log
    assert "[prefsel demo] train rm on" in log  # each run's detail line


def _inversions(answer: str) -> int:
    xs = answer.strip(" .").split()
    return sum(a > b for i, a in enumerate(xs) for b in xs[i + 1:])


def test_sort_task_has_exact_error_sizes_and_flips():
    from prefsel.demo.task import make_sort_pairs

    rows = make_sort_pairs(400, seed=7, mislabeled=0.1)
    assert rows == make_sort_pairs(400, seed=7, mislabeled=0.1)  # deterministic in the seed
    assert rows != make_sort_pairs(400, seed=8, mislabeled=0.1)
    flipped = 0
    for r in rows:
        letters = r["prompt"].removeprefix("Sort: ").removesuffix("\nAnswer:").split()
        good, bad = (r["rejected"], r["chosen"]) if r["mislabeled"] else (r["chosen"], r["rejected"])
        assert good == " " + " ".join(sorted(letters)) + "."
        assert sorted(bad.strip(" .").split()) == sorted(letters)  # same letters, reordered
        assert _inversions(good) == 0 and _inversions(bad) == r["error"] in (1, 2, 3, 4)
        flipped += r["mislabeled"]
    assert 20 <= flipped <= 60  # ~10% of 400
    assert not any(r["mislabeled"] for r in make_sort_pairs(200, seed=1, mislabeled=0.0))


def test_sft_objective_is_mean_token_nll():
    """The sft task's loss is -(sum of response log-probs) / (response tokens), chosen response only."""
    import torch

    from prefsel.logprobs import collate_sequences, response_logprobs
    from prefsel.tiny import build_tiny_llama
    from prefsel.train.objectives import LogpModule, sft_objective

    model = build_tiny_llama(50, seed=1)
    rows = [{"prompt_ids": [1, 5, 6], "response_ids": [[7, 8, 2], [9, 2]]},
            {"prompt_ids": [1, 4], "response_ids": [[10, 11, 12, 2], [13, 2]]}]
    loss, st = sft_objective(rows, LogpModule(model), 0)
    ids, attn, resp = collate_sequences([r["prompt_ids"] for r in rows], [r["response_ids"][0] for r in rows],
                                        0, "right", None)
    lp = response_logprobs(model, ids, attn, resp)
    assert loss.item() == pytest.approx(-(lp.sum() / 7).item(), rel=1e-5)
    # the logged loss is token-weighted, as trained: a sum over tokens, divided by loss_n when logged
    assert st["n"] == 2 and st["loss"] == pytest.approx(-lp.sum().item(), rel=1e-5) and st["loss_n"] == 7
    loss.backward()
    assert any(p.grad is not None and torch.any(p.grad != 0) for p in model.parameters())


def test_demo_quick_table_shape_and_sizes(quick_demo):
    out, res = quick_demo
    n = res["data"]["train_pairs"]
    assert n == res["config"]["n_train"]
    k = math.floor(n * 0.1)
    assert res["data"]["selected_pairs"] == k
    table = res["table"]
    assert list(table) == list(METHODS)  # smallest-gap, smallest gap > 0, middle band, random, largest-gap, full
    for m in METHODS:
        row = table[m]
        assert row["pairs"] == ([n] if m == "full" else [k])
        for metric in METRICS:
            assert math.isfinite(row[metric]["mean"]), (m, metric)
        assert 0.0 <= row["rm_accuracy"]["mean"] <= 1.0
        assert 0.0 <= row["dpo_reward_accuracy"]["mean"] <= 1.0
        assert row["heldout_loglik"]["mean"] < 0.0
        assert row["train_s"]["mean"] > 0
    runs = res["runs"]
    assert len(runs) == len(METHODS) * len(res["seeds"]["methods"])
    for r in runs:
        assert r["pairs"] == r["dpo_pairs"] == (n if r["method"] == "full" else k)
    md = (out / "results.md").read_text()
    table_lines = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table_lines) == 2 + len(METHODS)  # header, separator, one line per method
    for label in ("smallest-gap 10%", "random 10%", "largest-gap 10%", "all 100%", "RM accuracy",
                  "DPO reward accuracy"):
        assert label in md
    assert (out / "figure.png").stat().st_size > 1000
    assert (out / "selections" / "smallest-gap" / "gap_histogram.png").exists()
    with open(out / "selections" / "smallest-gap" / "selected.jsonl") as f:
        sel = [json.loads(line) for line in f]
    assert len(sel) == k


def test_demo_models_load_back_with_transformers(quick_demo):
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    _, res = quick_demo
    causal = [res["models"]["sft"], res["models"]["scorer_dpo"]] + [r["dpo_model"] for r in res["runs"]]
    rms = [r["rm_model"] for r in res["runs"]]
    assert len(causal) == 2 + len(METHODS) and len(rms) == len(METHODS)
    tok = AutoTokenizer.from_pretrained(res["models"]["sft"])
    ids = torch.tensor([tok("Sort: c a b\nAnswer: a b c.")["input_ids"]])
    for path in causal:
        assert os.path.isdir(path)
        m = AutoModelForCausalLM.from_pretrained(path)
        assert m(ids).logits.shape[-1] == len(tok)
    for path in rms:
        m = AutoModelForSequenceClassification.from_pretrained(path)
        assert m.config.num_labels == 1
        assert m(ids).logits.shape == (1, 1)


def test_demo_gap_selections_are_exact(quick_demo):
    """Each gap selection of the demo is exactly its rule on the scored gaps, k pairs each."""
    from prefsel.demo.methods import GAP_SELECTIONS, METHOD_LABELS
    from prefsel.selection import _scores_dataset

    out, res = quick_demo
    n = res["data"]["train_pairs"]
    k = res["data"]["selected_pairs"]
    t = _scores_dataset(str(out / "scores"))[0].to_table(columns=["row_id", "gap"])
    order = sorted(zip(t["gap"].to_pylist(), t["row_id"].to_pylist()))
    assert len(order) == n
    sel = {}
    for m in GAP_SELECTIONS:
        with open(out / "selections" / m / "selected.jsonl") as f:
            sel[m] = [(r["gap"], r["row_id"]) for r in map(json.loads, f)]
        assert len(sel[m]) == k, m
        assert res["selection"][m]["selected_negative_gaps"] == sum(g < 0 for g, _ in sel[m]), m
        assert METHOD_LABELS[m] in (out / "results.md").read_text()
    assert sel["smallest-gap"] == order[:k]
    assert sel["smallest-positive-gap"] == [x for x in order if x[0] > 0][:k]
    assert res["selection"]["smallest-positive-gap"]["selected_negative_gaps"] == 0
    lo = math.floor(n * 0.45 + 1e-9)
    assert sel["middle-band"] == order[lo:lo + k]
    assert sel["largest-gap"] == sorted(sorted(order, key=lambda x: (-x[0], x[1]))[:k])
    assert res["selection"]["smallest-gap"]["negative_gaps"] == sum(g < 0 for g, _ in order)
