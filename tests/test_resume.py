"""A resumed run never mixes inputs: the fingerprint stamps every input file, and a rerun after
an edit is refused with the file named (locally here; on S3 in tests/test_object_storage.py)."""

from __future__ import annotations

import os

import pytest

from helpers import read_scores, write_jsonl
from prefsel.demo_data import make_demo_pairs
from prefsel.run_output import RunOutput
from prefsel.score_job import ScoreJobConfig, fingerprint, run_score
from prefsel.sources import plan_source


def _unfinished(cfg: ScoreJobConfig) -> None:
    """The state a killed run leaves: an output folder whose manifest holds the run's fingerprint."""
    RunOutput(cfg.output, fingerprint(cfg, plan_source(cfg.data, cfg.chunk_rows).files, "pairs"), kind="scores")


def test_edited_input_is_refused_and_named(ray_local, tiny_models, tmp_path):
    rows = make_demo_pairs(12, seed=1)
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    cfg = ScoreJobConfig(policy=tiny_models[0], reference=tiny_models[1], data=str(data),
                         output=str(tmp_path / "out"), chunk_rows=4, max_length=512)
    _unfinished(cfg)
    write_jsonl(data, rows[::-1] + rows[:2])  # edited between the kill and the rerun
    with pytest.raises(FileExistsError, match=r"input file changed since the unfinished run: .*in\.jsonl"):
        run_score(cfg)
    # the same input again resumes into the same output
    cfg2 = ScoreJobConfig(policy=tiny_models[0], reference=tiny_models[1], data=str(data),
                          output=str(tmp_path / "out2"), chunk_rows=4, max_length=512)
    _unfinished(cfg2)
    s = run_score(cfg2)
    assert s["rows_scored"] == len(rows) + 2
    assert read_scores(tmp_path / "out2")["row_id"].to_pylist() == list(range(len(rows) + 2))


def test_same_size_same_mtime_edit_needs_hash_inputs(tiny_models, tmp_path):
    """Size + mtime miss an edit that keeps both; --hash-inputs (content SHA-256) catches it."""
    rows = make_demo_pairs(8, seed=2)
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    st = os.stat(data)
    swapped = data.read_text().replace("Answer", "Answxr", 1)
    assert len(swapped) == len(data.read_text())
    common = dict(policy=tiny_models[0], reference=tiny_models[1], data=str(data), chunk_rows=4)
    by_stamp = ScoreJobConfig(output=str(tmp_path / "a"), **common)
    by_hash = ScoreJobConfig(output=str(tmp_path / "b"), hash_inputs=True, **common)
    fp_stamp = fingerprint(by_stamp, [str(data)], "pairs")
    fp_hash = fingerprint(by_hash, [str(data)], "pairs")
    data.write_text(swapped)
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert fingerprint(by_stamp, [str(data)], "pairs") == fp_stamp  # the documented limit of stamps
    assert fingerprint(by_hash, [str(data)], "pairs") != fp_hash
