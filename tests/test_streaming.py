"""The job skeleton streams for real: every actor works, shards land as chunks finish, a kill at
any point keeps what finished, each file is read once (prefsel.jobs, prefsel.sources)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import read_scores, write_jsonl
from prefsel.demo_data import make_demo_pairs
from prefsel.jobs import ActorResources
from prefsel.score_job import ScoreJobConfig, run_score
from prefsel.sources import plan_source, read_chunk, read_unit, read_units


def _rows(n: int) -> list[dict]:
    base = make_demo_pairs(64, seed=3)
    return [base[i % len(base)] | {"n": i} for i in range(n)]


@pytest.fixture
def pool_starts_whole(ray_local, monkeypatch):
    """Ray Data starts feeding an actor pool as soon as one actor is up; on a loaded 2-core
    machine the second one can come up after the first has taken every batch. Waiting for the
    whole pool makes "both actors get rows" a property of the job, not of start-up timing. The
    read stage's zero-CPU request is still what this checks: reads that took a CPU would find
    none free once both actors hold theirs, and the job would stall (pytest-timeout)."""
    from ray.data import DataContext

    monkeypatch.setattr(DataContext.get_current(), "wait_for_min_actors_s", 600)
    return ray_local


def test_two_actors_both_score(pool_starts_whole, tiny_models, tmp_path):
    """Two 1-CPU actors on the 2-CPU local Ray: both get chunks (reads take no CPU of their own)."""
    rows = _rows(240)
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    s = run_score(ScoreJobConfig(policy=tiny_models[0], reference=tiny_models[1], data=str(data), output=str(out),
                                 chunk_rows=10, resources=ActorResources(num_actors=2, cpus_per_actor=1,
                                                                         rows_per_actor_call=10)))
    per_actor = s["rows_per_actor"]
    assert len(per_actor) == 2, per_actor
    assert all(n > 0 for n in per_actor.values()), per_actor
    assert sum(per_actor.values()) == s["rows_scored"] == len(rows)
    assert read_scores(out)["row_id"].to_pylist() == list(range(len(rows)))


def test_annotate_two_actors_both_score(pool_starts_whole, tiny_models, tmp_path):
    from prefsel.generation.annotate_job import AnnotateConfig, run_annotate
    from prefsel.generation.tiny_rm import build_tiny_reward_model
    from prefsel.models import load_tokenizer

    rm = build_tiny_reward_model(tmp_path / "rm", load_tokenizer(tiny_models[0]))
    rows = [{"prompt": f"question {i}?", "responses": [f"answer {i}", f"other {i} reply"]} for i in range(120)]
    data = write_jsonl(tmp_path / "multi.jsonl", rows)
    s = run_annotate(AnnotateConfig(data=str(data), reward_model=str(rm), output=str(tmp_path / "ann"),
                                    chunk_rows=6, resources=ActorResources(num_actors=2, cpus_per_actor=1,
                                                                           rows_per_actor_call=6)))
    assert s["rows_out"] == len(rows)
    assert len(s["rows_per_actor"]) == 2 and all(n > 0 for n in s["rows_per_actor"].values()), s["rows_per_actor"]


def _shards(folder) -> int:
    return len(list(folder.glob("part-*.parquet"))) if folder.exists() else 0


def test_shards_land_as_chunks_finish_and_kills_resume(tiny_models, tmp_path):
    """Shards appear while the run goes on (the first well before half the rows are scored), and a
    driver killed at several points keeps every finished chunk: the rerun resumes them and every
    row_id comes out exactly once."""
    rows = _rows(600)
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    args = ["--policy", tiny_models[0], "--reference", tiny_models[1], "--data", str(data),
            "--output", str(out), "--chunk-rows", "10"]  # default --rows-per-actor-call (256)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    shards = tmp_path / "out.partial" / "scores"
    total = len(rows) // 10
    seen_partial = []
    for kill_at in (1, total // 3):
        proc = subprocess.Popen([sys.executable, "-m", "prefsel.cli", "score", *args], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            n = _shards(shards)
            if n:
                seen_partial.append(n)
            if n >= kill_at:
                break
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not out.exists(), "the run finished before it could be killed; make the input larger"
    assert seen_partial and min(seen_partial) < total / 2, (seen_partial, total)
    kept = _shards(shards)
    assert kept >= total // 3
    from prefsel.cli import main

    assert main(["score", *args]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_chunks"] == kept
    assert summary["rows_in"] == summary["rows_scored"] == len(rows)
    assert read_scores(out)["row_id"].to_pylist() == list(range(len(rows)))


def test_each_file_read_once(tmp_path, monkeypatch):
    """A JSON array is parsed once when planning (chunks read their byte range only); a Parquet
    row group is decoded once for all of its chunks."""
    rows = [{"prompt": f"p{i} é", "chosen": "c", "rejected": "r", "m": [i, {"k": "ü"}]} for i in range(53)]
    (tmp_path / "a.json").write_text("\ufeff[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "]")
    plan = plan_source(str(tmp_path / "a.json"), 7)
    loads = []
    real = json.loads
    monkeypatch.setattr(json, "loads", lambda s, *a, **k: loads.append(len(s)) or real(s, *a, **k))
    got = [r.record for c in plan.chunks for r in read_chunk(c)]
    monkeypatch.undo()
    assert got == rows
    whole = (tmp_path / "a.json").stat().st_size
    assert len(loads) == len(plan.chunks) and max(loads) < whole / 4  # each chunk parses its own bytes

    rows = [{k: v for k, v in r.items() if k != "m"} for r in rows]  # Parquet: one type per column
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "b.parquet", row_group_size=20)
    plan = plan_source(str(tmp_path / "b.parquet"), 6)
    units = read_units(plan.chunks)
    assert len(units) == 3 and all(len({c.group for c in u}) == 1 for u in units)
    decoded = []
    real_rg = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, i, *a, **k: decoded.append(i) or real_rg(self, i, *a, **k))
    got = [(r.row_id, r.record) for u in units for _, rr in read_unit(u) for r in rr]
    assert decoded == [0, 1, 2]  # one decode per row group, not per chunk
    assert [g[0] for g in got] == list(range(len(rows))) and [g[1] for g in got] == rows


@pytest.mark.parametrize("bad", ["[", '[{"a": 1} {"b": 2}]', '"text"'])
def test_bad_json_array_is_a_clear_error(tmp_path, bad):
    (tmp_path / "x.json").write_text(bad)
    with pytest.raises(ValueError, match="x.json"):
        plan_source(str(tmp_path / "x.json"), 4)


def test_generate_two_actors_both_work(pool_starts_whole, tiny_models, tmp_path):
    from prefsel.cli import main

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Say something about {i}."} for i in range(24)])
    out = tmp_path / "gen"
    assert main(["generate", "--prompts", str(prompts), "--model", tiny_models[0], "--backend", "hf", "-n", "2",
                 "--max-tokens", "6", "--chunk-rows", "2", "--rows-per-actor-call", "2", "--num-actors", "2",
                 "--cpus-per-actor", "1", "--output", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["rows_out"] + s["rows_rejected"] == 24
    assert len(s["rows_per_actor"]) == 2 and all(n > 0 for n in s["rows_per_actor"].values()), s["rows_per_actor"]


def test_reference_precompute_two_actors_both_work(pool_starts_whole, tiny_models):
    """Training's reference precompute: the same actor base, a pool of --ref-actors."""
    from collections import Counter

    from prefsel.models import load_tokenizer
    from prefsel.train.config import TrainConfig
    from prefsel.train.data import precompute_reference, to_ray_dataset

    tok = load_tokenizer(tiny_models[0])
    ids = tok("a fairly long prompt about the sea and the mountains " * 4)["input_ids"]
    rows = [{"row_id": i, "prompt_ids": ids, "response_ids": [ids[: 10 + i % 7], ids[: 5 + i % 3]],
             "rewards": [], "margin": 0.0} for i in range(256)]
    cfg = TrainConfig("dpo", tiny_models[1], "d", "/tmp/unused", train_batch_size=8, ref_actors=2)
    out = precompute_reference(to_ray_dataset(rows), cfg, tok.pad_token_id).take_all()
    assert sorted(r["row_id"] for r in out) == list(range(len(rows)))
    per_actor = Counter(r["actor"] for r in out)
    assert len(per_actor) == 2 and min(per_actor.values()) > 0, per_actor


def test_library_errors_name_the_flag(tiny_models, tmp_path, capsys):
    """A config error names its field; the CLI says which flag that is."""
    from prefsel.cli import main

    data = write_jsonl(tmp_path / "in.jsonl", make_demo_pairs(4))
    base = ["score", "--policy", tiny_models[0], "--reference", tiny_models[1], "--data", str(data),
            "--output", str(tmp_path / "o")]
    assert main([*base, "--beta", "-1"]) == 2
    assert "error: --beta: must be a positive number" in capsys.readouterr().err
    assert main([*base, "--num-actors", "0"]) == 2
    assert "error: --num-actors: must be at least 1" in capsys.readouterr().err
