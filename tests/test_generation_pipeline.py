"""generate (hf backend) -> annotate -> to-pairs on a real local Ray, tiny models, through the CLI."""

from __future__ import annotations

import json

import pytest

from helpers import write_jsonl
from prefsel.cli import main
from prefsel.formats import detect_format, to_example
from prefsel.generation.output import read_rejects, read_rows
from prefsel.sources import resolve_data

LONG = "I will tell you a very long story about the weather and the sea and the mountains. " * 3


@pytest.fixture(scope="module")
def run_dirs(ray_local, tiny_models, tmp_path_factory):
    from prefsel.generation.tiny_rm import build_tiny_reward_model
    from prefsel.models import load_tokenizer

    tmp = tmp_path_factory.mktemp("gen")
    prompts = write_jsonl(tmp / "prompts.jsonl", [
        {"prompt": "What is the capital of France?", "source": "a"},
        {"prompt": [{"role": "user", "content": "Tell me a story."}], "responses": [LONG], "rewards": [0.5]},
        {"prompt": ""},
        "not json",
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
        {"prompt": "word " * 200},
    ])
    rm = build_tiny_reward_model(tmp / "rm", load_tokenizer(tiny_models[0]))
    gen = ["generate", "--prompts", str(prompts), "--model", tiny_models[0], "--backend", "hf", "-n", "3",
           "--max-tokens", "8", "--seed", "1", "--max-prompt-length", "40"]
    assert main([*gen, "--chunk-rows", "2", "--output", str(tmp / "gen")]) == 0
    return {"tmp": tmp, "gen_cmd": gen, "rm": rm, "policy": tiny_models[0]}


def test_generate_rows_and_rejects(run_dirs):
    out = run_dirs["tmp"] / "gen"
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["rows_in"], summary["rows_out"], summary["rows_rejected"]) == (6, 3, 3)
    assert summary["samples"] == 9 and summary["generated_tokens"] > 0 and summary["stats_cover"] == "all chunks"
    rows = read_rows(str(out))
    assert [r["row_id"] for r in rows] == [0, 1, 4]
    assert rows[0]["source"] == "a" and rows[0]["prompt"] == "What is the capital of France?"
    empty = summary["samples_empty"]
    assert sum(len(r["responses"]) for r in rows) == 1 + 9 - empty
    for r in rows:
        new = [x for x, t in zip(r["responses"], r["response_tokens"]) if t is not None]
        assert 3 - empty <= len(new) <= 3 and len(r["finished"]) == len(r["responses"])
        assert all(0 < t <= 8 for t in r["response_tokens"] if t is not None)
        assert "rewards" not in r  # stale rewards dropped: they no longer line up
        to_example(r, "multi")
    assert rows[1]["responses"][0] == LONG and rows[1]["response_tokens"][0] is None
    reasons = {r["row_id"]: r["reason"] for r in read_rejects(str(out))}
    assert set(reasons) == {2, 3, 5}
    assert reasons[2] == "field 'prompt': empty prompt"
    assert reasons[3].startswith("row: invalid JSON")
    assert "max_prompt_length 40" in reasons[5]
    assert not (run_dirs["tmp"] / "gen.partial").exists()
    # the same command again: a finished output is not overwritten silently
    assert main([*run_dirs["gen_cmd"], "--chunk-rows", "2", "--output", str(out)]) == 2


def test_generate_is_seeded_whatever_the_chunking(run_dirs):
    tmp = run_dirs["tmp"]
    assert main([*run_dirs["gen_cmd"], "--chunk-rows", "5", "--max-batch-size", "1", "--rows-per-actor-call", "1",
                 "--output", str(tmp / "gen2")]) == 0
    a, b = read_rows(str(tmp / "gen")), read_rows(str(tmp / "gen2"))
    assert [r["responses"] for r in a] == [r["responses"] for r in b]


def test_annotate_then_pairs(run_dirs):
    from prefsel.generation.rewards import load_reward_model, score_groups
    from prefsel.models import load_tokenizer
    from prefsel.packing import Layout
    from prefsel.tokenization import PairTokenizer

    tmp = run_dirs["tmp"]
    assert main(["annotate", "--data", str(tmp / "gen"), "--reward-model", run_dirs["rm"], "--max-length", "48",
                 "--output", str(tmp / "multi"), "--max-tokens-per-batch", "64"]) == 0
    summary = json.loads((tmp / "multi" / "summary.json").read_text())
    assert (summary["rows_in"], summary["rows_out"], summary["rows_rejected"]) == (3, 2, 1)
    rejects = read_rejects(str(tmp / "multi"))
    assert [r["row_id"] for r in rejects] == [1] and "too long" in rejects[0]["reason"]
    rows = read_rows(str(tmp / "multi"))
    assert [r["row_id"] for r in rows] == [0, 4]
    tok = load_tokenizer(run_dirs["rm"])
    model = load_reward_model(run_dirs["rm"], device="cpu")
    for r in rows:
        ex = to_example(r, "multi")
        assert len(r["rewards"]) == len(r["responses"])
        enc = PairTokenizer(tok).encode(ex)
        ref = score_groups(model, [(enc.prompt_ids, [x]) for x in enc.response_ids], tok.pad_token_id,
                           layout=Layout(packing=False))
        assert r["rewards"] == pytest.approx(ref, abs=1e-5)  # aligned with responses, layout-independent
    # the reward model ran each kept row's prompt once for all its responses (summary's accounting)
    encoded = [PairTokenizer(tok).encode(to_example(r, "multi")) for r in rows]
    fwd = summary["forward"]
    assert fwd["share_prompt"] and fwd["sequences"] == sum(len(e.response_ids) for e in encoded)
    once = sum(len(e.prompt_ids) + sum(map(len, e.response_ids)) for e in encoded)
    each = sum(len(e.prompt_ids) * len(e.response_ids) + sum(map(len, e.response_ids)) for e in encoded)
    assert once <= fwd["tokens_forwarded"] < each  # (a 64-token budget may cut a row into segments)

    assert main(["to-pairs", "--data", str(tmp / "multi"), "--output", str(tmp / "pairs"),
                 "--strategy", "best-worst"]) == 0
    pairs = read_rows(str(tmp / "pairs"))
    assert [p["row_id"] for p in pairs] == [0, 4]
    for p, r in zip(pairs, rows):
        assert p["chosen_reward"] == max(r["rewards"]) and p["rejected_reward"] == min(r["rewards"])
        assert to_example(p, "pairs").responses == [p["chosen"], p["rejected"]]
    # `prefsel select` / `score` read the pairs folder as the `pairs` format
    from prefsel.sources import plan_source, sample_records

    assert detect_format(sample_records(plan_source(resolve_data(str(tmp / "pairs"))))) == "pairs"


def test_vllm_backend_wiring_with_a_fake_engine(run_dirs, monkeypatch):
    """The vllm path's Ray wiring (fan-out, regrouping, error rows) with a fake engine; the real
    vLLM engine is not exercised here (needs a GPU and `prefsel[vllm]`)."""
    import prefsel.generation.vllm_backend as vb
    from prefsel.generation.prompts import sample_seed

    def _fake_engine(row: dict) -> dict:
        """Stands in for Ray's vLLM stage + postprocess (a closure: pickled by value to the workers)."""
        from prefsel.generation.vllm_backend import parse_output_row

        sp = row["sampling_params"]
        assert sp["n"] == 1 and list(row["tokenized_prompt"]) and sp["max_tokens"] == 8
        out = {"row_id": row["row_id"], "chunk_id": row["chunk_id"], "sample_index": row["sample_index"]}
        if row["row_id"] == 4 and row["sample_index"] == 1:  # error rows skip postprocess, as in Ray
            return {**out, "__inference_error__": "boom", "generated_text": "", "generated_tokens": []}
        return parse_output_row({**out, "generated_text": f"seed {sp['seed']}", "generated_tokens": [5, 6, 2],
                                 "__inference_error__": ""}, [2])

    monkeypatch.setattr(vb, "require_vllm", lambda: None)
    monkeypatch.setattr(vb, "build_vllm_processor", lambda kw, stops, check=True: (lambda ds: ds.map(_fake_engine)))
    tmp = run_dirs["tmp"]
    cmd = [("vllm" if a == "hf" else a) for a in run_dirs["gen_cmd"]]
    assert main([*cmd, "--output", str(tmp / "genv")]) == 0
    rows = read_rows(str(tmp / "genv"))
    assert [r["row_id"] for r in rows] == [0, 1]
    assert rows[0]["responses"] == [f"seed {sample_seed(1, 0, k)}" for k in range(3)]
    assert rows[0]["response_tokens"] == [2, 2, 2] and rows[0]["finished"] == [True] * 3
    reasons = {r["row_id"]: r["reason"] for r in read_rejects(str(tmp / "genv"))}
    assert reasons[4] == "generation error: boom (1 of 3 samples failed)" and set(reasons) == {2, 3, 4, 5}


def test_generate_over_its_own_output_keeps_row_ids_and_draws_new_samples(run_dirs, monkeypatch):
    """Generating again over a generate output appends new samples: seeded after the responses a
    row came with (before: sample k of the rerun repeated sample k of the first run, so the
    appended responses were exact copies), under the row's own row_id (before: renumbered by
    position, [0, 1, 4] -> [0, 1, 2]); hf and vllm (fake engine) backends alike."""
    import prefsel.generation.vllm_backend as vb
    from prefsel.generation.prompts import sample_seed

    tmp = run_dirs["tmp"]
    first = read_rows(str(tmp / "gen"))
    gen = list(run_dirs["gen_cmd"])
    gen[gen.index("--prompts") + 1] = str(tmp / "gen")
    assert main([*gen, "--output", str(tmp / "gen-again")]) == 0
    again = read_rows(str(tmp / "gen-again"))
    assert [r["row_id"] for r in again] == [r["row_id"] for r in first] == [0, 1, 4]
    for a, b in zip(first, again):
        old = a["responses"]
        assert b["responses"][:len(old)] == old and len(b["responses"]) > len(old)
        assert b["responses"][len(old):] != old[len(old) - 3:]  # not the first run's samples again

    def _fake_engine(row: dict) -> dict:
        from prefsel.generation.vllm_backend import parse_output_row

        out = {"row_id": row["row_id"], "chunk_id": row["chunk_id"], "sample_index": row["sample_index"]}
        return parse_output_row({**out, "generated_text": f"seed {row['sampling_params']['seed']}",
                                 "generated_tokens": [5, 2], "__inference_error__": ""}, [2])

    monkeypatch.setattr(vb, "require_vllm", lambda: None)
    monkeypatch.setattr(vb, "build_vllm_processor", lambda kw, stops, check=True: (lambda ds: ds.map(_fake_engine)))
    cmd = [("vllm" if a == "hf" else a) for a in gen]
    assert main([*cmd, "--output", str(tmp / "genv-again")]) == 0
    for a, b in zip(first, read_rows(str(tmp / "genv-again"))):
        n = len(a["responses"])
        assert b["row_id"] == a["row_id"]
        assert b["responses"] == a["responses"] + [f"seed {sample_seed(1, a['row_id'], n + k)}" for k in range(3)]


def test_annotate_rescores_stale_rewards_and_truncates_on_request(run_dirs):
    """An old `rewards` that no longer lines up with the responses is replaced, not a reject;
    --truncation prompt-left keeps an over-long prompt's end (the reject names that flag)."""
    from prefsel.generation.rewards import load_reward_model, score_groups
    from prefsel.models import load_tokenizer
    from prefsel.packing import Layout
    from prefsel.tokenization import PairTokenizer

    tmp = run_dirs["tmp"]
    rows = [{"prompt": "Name a color.", "responses": [" red", " blue", " a long green"], "rewards": [1.0, 2.0]},
            {"prompt": "word " * 60, "responses": [" yes", " no"]}]
    data = write_jsonl(tmp / "stale.jsonl", rows)
    base = ["annotate", "--data", str(data), "--reward-model", run_dirs["rm"], "--max-length", "24"]
    assert main([*base, "--output", str(tmp / "stale_reject")]) == 0
    reasons = [r["reason"] for r in read_rejects(str(tmp / "stale_reject"))]
    assert len(reasons) == 1 and "--truncation prompt-left keeps its end" in reasons[0]  # the long prompt
    assert main([*base, "--truncation", "prompt-left", "--output", str(tmp / "stale_cut")]) == 0
    got = read_rows(str(tmp / "stale_cut"))
    assert [len(r["rewards"]) for r in got] == [3, 2] and not read_rejects(str(tmp / "stale_cut"))
    tok = load_tokenizer(run_dirs["rm"])
    model = load_reward_model(run_dirs["rm"], device="cpu")
    cut = PairTokenizer(tok, max_length=24, truncation="prompt-left")
    for r, src in zip(got, rows):
        enc = cut.encode(to_example({k: v for k, v in src.items() if k != "rewards"}, "multi"))
        assert len(enc.prompt_ids) + max(map(len, enc.response_ids)) <= 24
        ref = score_groups(model, [(enc.prompt_ids, [x]) for x in enc.response_ids], tok.pad_token_id,
                           layout=Layout(packing=False))
        assert r["rewards"] == pytest.approx(ref, abs=1e-5)
    # annotating a folder into itself is refused before its rows are deleted
    assert main(["annotate", "--data", str(tmp / "stale_cut"), "--reward-model", run_dirs["rm"],
                 "--output", str(tmp / "stale_cut"), "--overwrite"]) == 2
    assert read_rows(str(tmp / "stale_cut")) == got
