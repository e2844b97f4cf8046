"""prefsel.console: what a long command prints, and what goes to OUTPUT/prefsel.log instead.

The demo's console as a user sees it (<= 40 lines, every stage) is checked by
tests/test_demo.py on its one `prefsel demo --quick` run; here a short `prefsel train rm` (Ray Train
local mode) keeps the detail in the log (in this process, on the session's Ray) and shows it with
--verbose (in a subprocess, as a user runs it).
"""

from __future__ import annotations

import json
import logging

import pytest

from prefsel.console import is_expected_load_report, is_noise

RM_REPORT = """\x1b[1mLlamaForSequenceClassification LOAD REPORT\x1b[0m from: runs/demo/models/sft/final
Key            | Status     | 
---------------+------------+-
lm_head.weight | UNEXPECTED | 
score.weight   | MISSING    | 

Notes:
- UNEXPECTED:\tcan be ignored when loading from different task/architecture; not ok if you expect identical arch.
- MISSING:\tthose params were newly initialized because missing from the checkpoint."""


def test_expected_load_report_is_only_the_head_swap():
    assert is_expected_load_report(RM_REPORT) and is_noise(RM_REPORT)
    # a real problem: weights of the body missing, or a shape mismatch, stays on the console
    body = RM_REPORT.replace("score.weight   | MISSING", "model.layers.0.mlp.up_proj.weight | MISSING")
    assert not is_expected_load_report(body) and not is_noise(body)
    mismatch = RM_REPORT.replace("lm_head.weight | UNEXPECTED", "score.weight | MISMATCH")
    assert not is_expected_load_report(mismatch)
    assert not is_noise("Some weights of the model checkpoint were not used")
    assert is_noise("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")


def test_session_restores_logging(tmp_path):
    """Every change is undone: handlers, filters, dictConfig, warnings capture, environment."""
    import logging.config
    import os

    import ray  # noqa: F401  (a session imports it: Ray's logger gets its handler then)
    from transformers.utils import logging as hf_logging

    from prefsel import console

    hf_logging.get_logger("transformers")
    before = {name: list(lg.handlers) for name, lg in [("", logging.getLogger()), ("ray", logging.getLogger("ray"))]}
    filters = {id(h): list(h.filters) for hs in before.values() for h in hs}
    dict_config = logging.config.dictConfig
    env = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
    (tmp_path / "out").mkdir()
    with console.session("score", str(tmp_path / "out"), verbose=False) as s:
        assert console.current() is s
        logging.getLogger("ray.data").info("an INFO line of Ray Data")
        logging.getLogger("transformers.modeling_utils").warning(RM_REPORT)
    assert console.current() is None
    assert logging.config.dictConfig is dict_config
    assert os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == env
    assert {name: list(lg.handlers) for name, lg in [("", logging.getLogger()), ("ray", logging.getLogger("ray"))]} \
        == before
    assert {id(h): list(h.filters) for hs in before.values() for h in hs} == filters
    log = (tmp_path / "out" / "prefsel.log").read_text()
    assert "an INFO line of Ray Data" in log and "LOAD REPORT" in log
    with console.session("to-pairs", None) as s:  # not a long command: nothing changes
        assert s is None


@pytest.fixture
def live_handlers(capfd):
    """Console handlers made earlier in the session hold the stream of the test that made them
    (pytest swaps sys.stderr per test); point them at this test's, as a terminal session has one."""
    import sys

    import ray.data  # noqa: F401
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("transformers")
    changed = []
    for lg in [logging.getLogger()] + [l for l in logging.Logger.manager.loggerDict.values()
                                       if isinstance(l, logging.Logger)]:
        for h in lg.handlers:
            if type(h).__name__ in ("StreamHandler", "PlainRayHandler") and h.stream is not sys.stderr:
                changed.append((h, h.stream))
                h.stream = sys.stderr  # (not setStream: it flushes the old, closed stream)
    yield capfd
    for h, old in changed:
        h.stream = old


def _toy_pairs(path, n=16):
    rows = [{"prompt": f"Sort: {c} a\nAnswer:", "chosen": f" a {c}.", "rejected": f" {c} a."}
            for c in "bcdefghijklmnopqrstuvwxyz"[:n]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_quiet_keeps_the_detail_in_the_log(tiny_models, ray_local, tmp_path, capfd):
    from prefsel.cli import main

    capfd.readouterr()
    assert main([*_train_rm(tiny_models, tmp_path), "--output", str(tmp_path / "quiet")]) == 0
    quiet = capfd.readouterr()
    text = quiet.out + quiet.err
    assert "LOAD REPORT" not in text and "Running in local mode" not in text, text
    assert "execution finished" not in text  # Ray Data's INFO line
    assert "prefsel train rm:" in quiet.out  # the result
    assert f"log: {tmp_path / 'quiet' / 'prefsel.log'}" in quiet.out
    log = (tmp_path / "quiet" / "prefsel.log").read_text()
    assert "LOAD REPORT" in log and "Running in local mode" in log and " INFO ray." in log  # Ray's INFO lines


def test_verbose_shows_the_detail(tiny_models, tmp_path):
    """As a user runs it (a subprocess with its own local Ray): Ray's INFO lines and transformers'
    load report on the console, and in the log all the same."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    res = subprocess.run([sys.executable, "-m", "prefsel.cli", *_train_rm(tiny_models, tmp_path), "--verbose",
                          "--output", str(tmp_path / "verbose")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:]
    text = res.stdout
    assert "LOAD REPORT" in text and "Running in local mode" in text and "INFO worker.py" in text, text
    assert "prefsel train rm:" in text
    log = (tmp_path / "verbose" / "prefsel.log").read_text()
    assert "LOAD REPORT" in log and "Running in local mode" in log


def _train_rm(tiny_models, tmp_path) -> list[str]:
    return ["train", "rm", "--model", tiny_models[0], "--data", _toy_pairs(tmp_path / "pairs.jsonl"),
            "--chat-template", "none", "--local-mode", "--strategy", "ddp", "--num-workers", "1", "--epochs", "1",
            "--train-batch-size", "8", "--micro-train-batch-size", "8", "--no-tensorboard", "--no-progress",
            "--overwrite"]


def test_a_real_warning_reaches_the_console(tmp_path, live_handlers):
    capfd = live_handlers
    import warnings

    from prefsel import console

    with console.session("select", str(tmp_path), verbose=False):
        logging.getLogger("ray.data").info("quiet")
        logging.getLogger("ray.data").warning("a real Ray Data warning")
        warnings.warn("a real Python warning", UserWarning)
    err = capfd.readouterr().err
    assert "a real Ray Data warning" in err and "a real Python warning" in err
    assert "quiet" not in err
    log = (tmp_path / "prefsel.log").read_text()
    assert "quiet" in log and "a real Ray Data warning" in log and "a real Python warning" in log
