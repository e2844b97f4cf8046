"""The scoring job on a real local Ray: formats, rejects and counts, invariance, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import read_rejects, read_scores, write_jsonl
from prefsel.demo_data import make_demo_pairs
from prefsel.formats import to_example
from prefsel.models import load_causal_lm, load_tokenizer
from prefsel.jobs import ActorResources
from prefsel.score_job import ScoreJobConfig, run_score
from prefsel.scoring import SCORE_COLUMNS, PairScorer, ScoreConfig
from prefsel.tokenization import PairTokenizer

pytestmark = pytest.mark.usefixtures("ray_local")

BASE = make_demo_pairs(24, seed=3)


def _good_rows(fmt: str) -> list[dict]:
    rows = []
    for r in BASE:
        p, c, j = r["prompt"], r["chosen"].strip(), r["rejected"].strip()
        if fmt == "pairs":
            rows.append({"id": r["id"], "prompt": p, "chosen": r["chosen"], "rejected": r["rejected"]})
        elif fmt == "pairs-messages":
            rows.append({
                "id": r["id"],
                "prompt": [{"role": "user", "content": p}],
                "chosen": [{"role": "assistant", "content": c}],
                "rejected": [{"role": "assistant", "content": j}],
            })
        elif fmt == "conversation":
            turn = [{"role": "system", "content": "Be exact."}, {"role": "user", "content": p}]
            rows.append({
                "id": r["id"],
                "chosen": turn + [{"role": "assistant", "content": c}],
                "rejected": turn + [{"role": "assistant", "content": j}],
            })
        elif fmt == "hh":
            pre = f"\n\nHuman: {p}\n\nAssistant:"
            rows.append({"id": r["id"], "chosen": f"{pre} {c}", "rejected": f"{pre} {j}"})
    return rows


# Broken rows of each format: (row, the field the reason must name).
BROKEN = {
    "pairs": [
        ({"id": "x1", "prompt": "Q?", "rejected": "no"}, "chosen"),
        ({"id": "x2", "prompt": "Q?", "chosen": "yes", "rejected": "   "}, "rejected"),
        ({"id": "x3", "prompt": "Q?", "chosen": 5, "rejected": "no"}, "chosen"),
        ({"id": "x4", "prompt": "Q?", "chosen": "yes " * 200, "rejected": "no"}, "chosen"),
    ],
    "pairs-messages": [
        ({"id": "x1", "prompt": [{"content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
          "rejected": [{"role": "assistant", "content": "b"}]}, "prompt[0]"),
        ({"id": "x2", "prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "robot", "content": "a"}],
          "rejected": [{"role": "assistant", "content": "b"}]}, "chosen[0].role"),
        ({"id": "x3", "prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": ""}],
          "rejected": [{"role": "assistant", "content": "b"}]}, "chosen"),
    ],
    "conversation": [
        ({"id": "x1", "chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
          "rejected": [{"role": "user", "content": "DIFFERENT"}, {"role": "assistant", "content": "c"}]}, "rejected"),
        ({"id": "x2", "chosen": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
          "rejected": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "c"}]}, "chosen"),
    ],
    "hh": [
        ({"id": "x1", "chosen": "\n\nHuman: hi\n\nAssistant: yes", "rejected": "\n\nHuman: hi there"}, "rejected"),
        ({"id": "x2", "chosen": "\n\nHuman: hi\n\nAssistant: yes", "rejected": "\n\nHuman: bye\n\nAssistant: no"}, "rejected"),
        ({"id": "x3", "chosen": "\n\nHuman: hi\n\nAssistant: yes", "rejected": "\n\nHuman: hi\n\nAssistant:   "}, "rejected"),
    ],
}


def _mixed(fmt: str) -> tuple[list, dict[int, str]]:
    """Good rows with broken ones spliced in; returns rows and {row_id: field} of the broken."""
    rows: list = list(_good_rows(fmt))
    expect: dict[int, str] = {}
    for i, (row, _) in enumerate(BROKEN[fmt]):
        rows.insert(3 + 5 * i, row)
    for row, field in BROKEN[fmt]:
        expect[rows.index(row)] = field
    rows.insert(len(rows) - 2, "{this is not json")
    expect[len(rows) - 3] = "row"
    return rows, expect


def _direct_scores(tiny_models, rows, fmt, **tok_kw):
    """Independent of Ray: the pure scorer on each row alone (batch of one)."""
    policy, reference = tiny_models
    tok = load_tokenizer(policy)
    pt = PairTokenizer(tok, **tok_kw)
    scorer = PairScorer(load_causal_lm(policy), load_causal_lm(reference), tok.pad_token_id,
                        ScoreConfig(max_tokens_per_batch=1))
    return [scorer.score([pt.encode(to_example(r, fmt))])[0] for r in rows]


@pytest.mark.parametrize("fmt", ["pairs", "pairs-messages", "conversation", "hh"])
def test_every_format_scores_rejects_and_counts(tiny_models, tmp_path, fmt):
    rows, expect = _mixed(fmt)
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    cfg = ScoreJobConfig(policy=tiny_models[0], reference=tiny_models[1], data=str(data), output=str(out),
                         chunk_rows=7, max_length=120)
    summary = run_score(cfg)
    real_fmt = "pairs" if fmt.startswith("pairs") else fmt
    assert summary["format"] == real_fmt
    assert summary["rows_in"] == len(rows) == summary["rows_scored"] + summary["rows_rejected"]
    assert summary["rows_rejected"] == len(expect)
    rejects = read_rejects(out)
    assert [r["row_id"] for r in rejects] == sorted(expect)
    for r in rejects:
        field = expect[r["row_id"]]
        assert f"'{field}" in r["reason"] or r["reason"].startswith(field), (field, r["reason"])
    assert json.loads((out / "summary.json").read_text())["rows_scored"] == summary["rows_scored"]
    assert not (tmp_path / "out.partial").exists()

    table = read_scores(out)
    good_ids = [i for i in range(len(rows)) if i not in expect]
    assert table["row_id"].to_pylist() == good_ids
    for col in ("row_id", *SCORE_COLUMNS):
        assert col in table.column_names
    # Original fields come back as they were.
    originals = {i: rows[i] for i in good_ids}
    for rec in table.select([c for c in table.column_names if c in ("row_id", "id", "prompt", "chosen", "rejected")]).to_pylist():
        src = originals[rec["row_id"]]
        for k in ("id", "chosen", "rejected", "prompt"):
            if k in src:
                assert rec[k] == src[k]
    # Every score equals the pure scorer on the row alone.
    expected = _direct_scores(tiny_models, [rows[i] for i in good_ids], real_fmt)
    got = table.to_pylist()
    for e, g in zip(expected, got):
        for col in ("chosen_logp", "rejected_logp", "chosen_ref_logp", "rejected_ref_logp", "gap"):
            assert g[col] == pytest.approx(e[col], abs=1e-5)
        for col in ("chosen_tokens", "rejected_tokens", "prompt_tokens"):
            assert g[col] == e[col]
        assert g["gap"] == pytest.approx(g["chosen_reward"] - g["rejected_reward"], abs=1e-12)


def test_invariance_to_actors_batching_and_padding(tiny_models, tmp_path):
    rows = _good_rows("pairs") + _good_rows("pairs")[:10]
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    runs = {
        "one_actor_big_batches": dict(resources=ActorResources(num_actors=1, rows_per_actor_call=256),
                                      scoring=ScoreConfig(max_tokens_per_batch=100000)),
        "two_actors_small_calls": dict(resources=ActorResources(num_actors=2, cpus_per_actor=0.5, rows_per_actor_call=3),
                                       scoring=ScoreConfig(max_tokens_per_batch=64)),
        "padded_left": dict(resources=ActorResources(num_actors=1),
                            scoring=ScoreConfig(padding_side="left", max_tokens_per_batch=500, packing=False)),
        "packed_unshared": dict(resources=ActorResources(num_actors=1), scoring=ScoreConfig(share_prompt=False)),
    }
    gaps = {}
    for name, kw in runs.items():
        out = tmp_path / name
        summary = run_score(ScoreJobConfig(policy=tiny_models[0], reference=tiny_models[1], data=str(data),
                                           output=str(out), chunk_rows=5, **kw))
        t = read_scores(out)
        # one model's token accounting, summed over actors and calls: a shared prompt runs once
        fwd, sc = summary["forward"], kw["scoring"]
        p, c, r = (np.array(t[f"{k}_tokens"].to_pylist()) for k in ("prompt", "chosen", "rejected"))
        assert fwd["sequences"] == 2 * len(rows) and fwd["tokens_forwarded"] <= fwd["slots_forwarded"]
        assert fwd["tokens_forwarded"] == int((p * (1 if sc.packing and sc.share_prompt else 2) + c + r).sum()), name
        if not sc.packing:
            assert fwd["saving"] == 0.0  # the padded layout is the two-pass baseline
        elif sc.share_prompt:  # a prompt once per pair, so always fewer slots
            assert fwd["slots_forwarded"] < fwd["padded_two_pass_tokens"], name
        else:  # packing alone saves only the pads; these calls of 5 similar pairs have few
            assert fwd["slots_forwarded"] <= fwd["padded_two_pass_tokens"], name
        assert t["row_id"].to_pylist() == list(range(len(rows)))
        gaps[name] = np.array(t["gap"].to_pylist())
    base = gaps.pop("one_actor_big_batches")
    for name, g in gaps.items():
        np.testing.assert_allclose(g, base, atol=1e-5, err_msg=name)


def test_parquet_and_datasets_inputs(tiny_models, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _good_rows("pairs-messages")
    pq.write_table(pa.Table.from_pylist(rows[:10]), tmp_path / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[10:]), tmp_path / "b.parquet")
    out_pq = tmp_path / "out_pq"
    s1 = run_score(ScoreJobConfig(policy=tiny_models[0], reference=tiny_models[1], data=str(tmp_path / "*.parquet"),
                                  output=str(out_pq), chunk_rows=4))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    out_hf = tmp_path / "out_hf"
    s2 = run_score(ScoreJobConfig(policy=tiny_models[0], reference=tiny_models[1], data=str(tmp_path / "hf"),
                                  output=str(out_hf), chunk_rows=6))
    assert s1["rows_scored"] == s2["rows_scored"] == len(rows)
    assert s1["source_kind"] == "parquet" and s2["source_kind"] == "hf_disk"
    np.testing.assert_allclose(read_scores(out_pq)["gap"].to_numpy(), read_scores(out_hf)["gap"].to_numpy(), atol=1e-6)
    # message lists keep their structure
    assert read_scores(out_hf)["chosen"].to_pylist()[0] == rows[0]["chosen"]


def test_existing_or_foreign_output_is_refused(tiny_models, tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", _good_rows("pairs")[:6])
    out = tmp_path / "out"
    kw = dict(policy=tiny_models[0], reference=tiny_models[1], data=str(data), output=str(out))
    run_score(ScoreJobConfig(**kw))
    with pytest.raises(FileExistsError, match="already exists"):
        run_score(ScoreJobConfig(**kw))
    # an unfinished run of other settings in the same place is refused, not mixed
    (tmp_path / "out2.partial").mkdir()
    (tmp_path / "out2.partial" / "manifest.json").write_text(json.dumps({"kind": "scores", "fingerprint": {"beta": 9}}))
    with pytest.raises(FileExistsError, match="different input"):
        run_score(ScoreJobConfig(**{**kw, "output": str(tmp_path / "out2")}))


def test_crashed_run_is_not_complete_and_resumes(tiny_models, tmp_path):
    rows = _good_rows("pairs") * 6
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    args = ["--policy", tiny_models[0], "--reference", tiny_models[1], "--data", str(data),
            "--output", str(out), "--chunk-rows", "4", "--rows-per-actor-call", "4"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-m", "prefsel.cli", "score", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    shards = tmp_path / "out.partial" / "scores"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if shards.exists() and len(list(shards.glob("part-*.parquet"))) >= 2:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if not (tmp_path / "out.partial").exists():
        pytest.fail("the run finished before it could be killed; make the input larger")
    assert not out.exists(), "a killed run must not leave a complete-looking output"
    done_before = len(list(shards.glob("part-*.parquet")))
    from prefsel.selection import SelectConfig, run_select

    with pytest.raises(ValueError, match="unfinished"):
        run_select(SelectConfig(scores=str(out), output=str(tmp_path / "sel")))
    from prefsel.cli import main

    assert main(["score", *args]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_chunks"] >= min(done_before, 1)
    assert summary["rows_in"] == summary["rows_scored"] == len(rows)
    t = read_scores(out)
    assert t["row_id"].to_pylist() == list(range(len(rows)))  # nothing lost, nothing twice


def test_cli_select_in_one_job(tiny_models, tmp_path):
    from prefsel.cli import main

    rows = _good_rows("pairs")
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "sel"
    assert main(["select", "--policy", tiny_models[0], "--reference", tiny_models[1], "--data", str(data),
                 "--output", str(out), "--ratio", "0.25"]) == 0
    lines = [json.loads(x) for x in (out / "selected.jsonl").read_text().splitlines()]
    scores = read_scores(tmp_path / "sel-scores")
    k = int(len(rows) * 0.25)
    order = sorted(zip(scores["gap"].to_pylist(), scores["row_id"].to_pylist()))[:k]
    assert [x["row_id"] for x in lines] == [rid for _, rid in order]
    assert set(lines[0]) == {"id", "prompt", "chosen", "rejected", "row_id", "gap"}
    assert (out / "gap_histogram.png").stat().st_size > 1000
    # bad arguments are a clear error, not a traceback
    assert main(["select", "--scores", str(tmp_path / "nope"), "--output", str(tmp_path / "x")]) == 2
