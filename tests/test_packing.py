"""The packed layouts (prefsel.packing) against sequences run one at a time.

Independent reference: each (prompt, response) alone through the model's own forward in float64,
log-softmax and sum by hand. Every layout (padded right/left, packed, packed with a shared
prompt, tiny budgets that split a shared group) must give the same log-probs (float32, 1e-5) and
rewards, for four model families whose attention or positions differ, with sdpa and eager (and
FlexAttention), on rows from every data format: multi-turn chat, one-token responses, a response
that is only EOS, an empty prompt, HPS rows with many responses.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

from prefsel.formats import to_example
from prefsel.logprobs import batch_logprobs, batch_rewards, map_groups, padded_batch, response_logprobs
from prefsel.packing import (
    ForwardStats,
    Layout,
    one_batch,
    plan_batches,
    plan_rows,
    resolve_attn,
    segments_of,
)
from prefsel.tiny import TINY_FAMILIES, build_tiny_family, build_tiny_tokenizer
from prefsel.tokenization import PairTokenizer

LAYOUTS = {
    "padded-right": Layout(packing=False),
    "padded-left": Layout(packing=False, padding_side="left"),
    "packed": Layout(share_prompt=False),
    "packed-shared": Layout(),
    "packed-shared-budget-24": Layout(max_tokens=24),  # shared groups split into several segments
    "packed-shared-2-rows": Layout(max_tokens=10**6, max_rows=2),
}

ROWS = [
    ("pairs", {"prompt": "What is the capital of France?", "chosen": " Paris.", "rejected": " Rome, I think."}),
    ("conversation", {  # multi-turn: the prompt holds earlier turns, the responses the last one
        "chosen": [{"role": "system", "content": "Be brief."},
                   {"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Red."},
                   {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Red."},
                     {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Blue is a color too."}]}),
    ("hh", {"chosen": "\n\nHuman: hi there\n\nAssistant: hello friend",
            "rejected": "\n\nHuman: hi there\n\nAssistant: go away"}),
]


@pytest.fixture(scope="module")
def tok():
    texts = [str(r) for _, r in ROWS] + ["the quick brown fox jumps over the lazy dog"] * 4
    return build_tiny_tokenizer(texts, vocab_size=300)


@pytest.fixture(scope="module")
def groups(tok):
    pt = PairTokenizer(tok)
    out = []
    for fmt, row in ROWS:
        ex = pt.encode(to_example(row, fmt))
        out.append((ex.prompt_ids, list(ex.response_ids)))
    eos, bos = tok.eos_token_id, tok.bos_token_id
    rng = random.Random(0)
    words = lambda n: [rng.randrange(10, len(tok)) for _ in range(n)]  # noqa: E731
    out += [
        ([bos, *words(5)], [[eos], words(1)]),  # a response that is only EOS; a one-token response
        ([bos], [words(3), words(7)]),  # a one-token prompt (BOS only)
        ([], [words(4), words(2)]),  # no prompt: a sequence's first token is never scored
        ([bos, *words(9)], [words(rng.randrange(1, 8)) + [eos] for _ in range(12)]),  # an HPS row, K=12
    ]
    return out


def reference_logprobs(model, groups) -> list[float]:
    """Each sequence alone, float64, the model's own forward with eager attention (no prefsel code)."""
    m64 = _eager64(model)
    out = []
    with torch.no_grad():
        for prompt, responses in groups:
            for r in responses:
                ids = torch.tensor([[*prompt, *r]])
                logp = m64(input_ids=ids).logits[0].log_softmax(-1)
                p = len(prompt)
                out.append(sum(float(logp[p + j - 1, t]) for j, t in enumerate(r) if p + j >= 1))
    return out


def _eager64(model):
    m64 = copy.deepcopy(model).double()
    m64.config._attn_implementation = "eager"
    return m64


def reference_rewards(model, groups) -> list[float]:
    m64 = _eager64(model)
    with torch.no_grad():
        return [float(m64(input_ids=torch.tensor([[*p, *r]])).logits[0, 0]) for p, rs in groups for r in rs]


def run(model, groups, layout, fn=batch_logprobs, stats=None) -> list[float]:
    with torch.no_grad():
        (out,) = map_groups([lambda b: fn(model, b)], groups, 0, layout, stats=stats)
    return out


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_every_layout_matches_sequences_run_alone(tok, groups, family, attn):
    if family == "gemma2" and attn == "sdpa":
        pytest.skip("transformers runs Gemma 2 with eager only (soft-capping); --attn auto picks it")
    model = build_tiny_family(family, len(tok), seed=3, attn_implementation=attn)
    want = reference_logprobs(model, groups)
    lengths = [len(p) + len(r) for p, rs in groups for r in rs]
    assert max(lengths) > model.config.sliding_window if family in ("mistral", "gemma2") else True
    got = {name: run(model, groups, layout) for name, layout in LAYOUTS.items()}
    for name, values in got.items():
        assert values == pytest.approx(want, abs=1e-5), f"{family}/{attn}/{name} vs alone, float64"
        assert values == pytest.approx(got["padded-right"], abs=1e-5), f"{family}/{attn}/{name} vs padded"


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_rewards_match_sequences_run_alone(tok, groups, family):
    model = build_tiny_family(family, len(tok), seed=4, num_labels=1)
    want = reference_rewards(model, groups)
    for name, layout in LAYOUTS.items():
        assert run(model, groups, layout, batch_rewards) == pytest.approx(want, abs=1e-5), name


def test_flex_attention_block_mask_matches(tok, groups):
    model = build_tiny_family("gemma2", len(tok), seed=5, attn_implementation="flex_attention")
    want = reference_logprobs(model, groups)
    assert run(model, groups, Layout()) == pytest.approx(want, abs=1e-5)


def test_flex_attention_is_refused_on_the_cpu_where_its_compiler_fails(tiny_models):
    """Loading with flex_attention for the CPU fails at once, naming the flag and the way out,
    instead of a C++ compile error from torch's CPU compiler at some batch shape mid-run."""
    from prefsel.generation.rewards import load_reward_model
    from prefsel.models import load_causal_lm

    assert resolve_attn("flex_attention", "cuda:0") == "flex_attention"
    assert resolve_attn("sdpa", "cpu") == "sdpa" and resolve_attn("auto", "cpu") is None
    with pytest.raises(ValueError, match="attn: flex_attention needs a GPU.*use sdpa"):
        load_causal_lm(tiny_models[0], device="cpu", attn_implementation="flex_attention")
    with pytest.raises(ValueError, match="attn: flex_attention needs a GPU"):
        load_reward_model(tiny_models[0], device="cpu", attn_implementation="flex_attention")


def test_gradients_through_the_packed_forward_equal_the_padded_ones(tok, groups):
    model = build_tiny_family("qwen2", len(tok), seed=6).train()
    grads = {}
    for name in ("padded-right", "packed-shared"):
        model.zero_grad()
        batch = one_batch(groups, 0, LAYOUTS[name])
        values = batch.in_order(batch_logprobs(model, batch))
        (values * torch.linspace(0.5, 1.5, len(values), dtype=values.dtype)).sum().backward()
        grads[name] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert grads["packed-shared"].abs().max() > 0
    torch.testing.assert_close(grads["packed-shared"], grads["padded-right"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # gemma2: the soft-cap is recomputed too
def test_head_recompute_gives_the_same_gradients_and_keeps_no_logits(tok, groups, family):
    """recompute_head: identical loss and gradients, and autograd no longer holds any
    [chunk x vocab] float32 logits between forward and backward (counted with saved-tensor hooks)."""
    model = build_tiny_family(family, len(tok), seed=8).train()
    batch = one_batch(groups, 0, Layout())
    n_targets = int(batch.target_ids.numel())
    logits_bytes = n_targets * len(tok) * 4
    out = {}
    for recompute in (False, True):
        model.zero_grad()
        saved: list[torch.Tensor] = []

        def pack(t):
            saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            values = batch_logprobs(model, batch, chunk_tokens=16, recompute_head=recompute)
        vocab_wide = sum(t.numel() * t.element_size() for t in saved
                         if t.dim() == 2 and t.shape[-1] == len(tok) and t.shape[0] <= 16)
        (values * torch.linspace(0.5, 1.5, len(values), dtype=values.dtype)).sum().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        out[recompute] = (values.detach(), grads, vocab_wide)
    assert out[False][2] >= logits_bytes  # without it: at least one float32 logits tensor per target
    assert out[True][2] == 0  # with it: no [chunk x vocab] tensor is held for backward
    torch.testing.assert_close(out[True][0], out[False][0], atol=0, rtol=0)
    assert out[True][1].abs().max() > 0
    torch.testing.assert_close(out[True][1], out[False][1], atol=1e-7, rtol=1e-6)


def test_padded_tensors_and_token_batches_agree(tok, groups):
    """response_logprobs (padded [B, T] tensors, the old entry point) is the same function."""
    from prefsel.logprobs import collate_sequences

    model = build_tiny_family("llama", len(tok), seed=7)
    flat = [(p, r) for p, rs in groups for r in rs]
    ids, attn, resp = collate_sequences([p for p, _ in flat], [r for _, r in flat], 0, "left")
    with torch.no_grad():
        assert response_logprobs(model, ids, attn, resp).tolist() == pytest.approx(run(model, groups, Layout()), abs=1e-5)
        assert batch_logprobs(model, padded_batch(ids, attn, resp)).tolist() == pytest.approx(
            reference_logprobs(model, groups), abs=1e-5)


# ---- the plan and the accounting -------------------------------------------------------------


def test_shared_segment_layout_positions_and_mask():
    """[prompt | r1 | r2]: responses continue the prompt's positions and see it, not each other."""
    (batch,) = plan_batches([([1, 2, 3], [[4, 5], [6]])], 0, Layout())
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 6]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 3]]
    assert batch.branch.tolist() == [[0, 0, 0, 1, 1, 2]]
    # targets: 4 <- state of 3 (slot 2), 5 <- slot 3; 6 <- the prompt's last state (slot 2)
    assert batch.target_index.tolist() == [2, 3, 2] and batch.target_ids.tolist() == [4, 5, 6]
    assert batch.last_index.tolist() == [4, 5]

    class Cfg:
        _attn_implementation = "sdpa"
        dtype = torch.float32

    mask = batch.attention_mask_for(Cfg())
    seen = (mask[0, 0] == 0).int().tolist()
    assert seen == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                    [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 1]]
    assert mask.dtype == torch.float32  # additive: a boolean 4D mask is silently wrong with eager


def test_plan_covers_every_sequence_once_within_budget():
    rng = random.Random(1)
    groups = [([1] * rng.randrange(0, 30), [[2] * rng.randrange(1, 40) for _ in range(rng.randrange(1, 6))])
              for _ in range(60)]
    total = sum(len(rs) for _, rs in groups)
    longest_group = max(len(p) + sum(len(r) for r in rs) for p, rs in groups)  # bounds any segment
    for layout in (Layout(max_tokens=128), Layout(max_tokens=64, share_prompt=False), Layout(max_tokens=1),
                   Layout(packing=False, max_tokens=200), Layout(max_tokens=100, varlen=True)):
        seen = []
        for batch in plan_batches(groups, 0, layout):
            b, w = batch.input_ids.shape
            if layout.varlen:
                assert b == 1
            if b > 1 or layout.varlen:  # one row may exceed the budget only when a segment does
                assert b * w <= layout.max_tokens, layout
            else:
                assert w <= max(layout.max_tokens, longest_group), layout
            seen += batch.sequence_ids
        assert sorted(seen) == list(range(total)), layout
    # a shared group longer than the budget is cut into segments, each with the prompt
    segs = segments_of([([9] * 10, [[1] * 8, [2] * 8, [3] * 8])], Layout(max_tokens=30))
    assert [len(rs) for _, rs in segs] == [2, 1]
    assert plan_rows([10, 6, 6, 4], 100, None, pack=True) == [[[0], [1, 3], [2]]]


def test_stats_count_tokens_slots_and_the_padded_two_pass_baseline():
    # two pairs: prompts 3 and 5 tokens, responses (2, 4) and (1, 1)
    groups = [([1, 1, 1], [[2, 2], [3, 3, 3, 3]]), ([1] * 5, [[2], [3]])]
    stats = {}
    for name, layout in (("shared", Layout()), ("packed", Layout(share_prompt=False)),
                         ("padded", Layout(packing=False))):
        st = ForwardStats()
        for batch in plan_batches(groups, 0, layout):
            st.add(batch.stats)
        stats[name] = st.as_dict()
    # padded two-pass: 4 rows as wide as the longest sequence (3 + 4 = 7)
    assert all(s["padded_two_pass_tokens"] == 4 * 7 for s in stats.values())
    assert stats["padded"]["slots_forwarded"] == 28 and stats["padded"]["saving"] == 0.0
    assert stats["padded"]["tokens_forwarded"] == 5 + 7 + 6 + 6
    assert stats["packed"]["tokens_forwarded"] == 24
    assert stats["shared"]["tokens_forwarded"] == (3 + 2 + 4) + (5 + 1 + 1)  # each prompt once: 16
    # shared segments 9 and 7 tokens: rows 9 wide, the 7 in a row of its own (9 + 7 > 9)
    assert stats["shared"]["slots_forwarded"] == 18
    assert stats["shared"]["saving"] == round(1 - 18 / 28, 4)
    assert stats["shared"]["pad_fraction"] == round(1 - 16 / 18, 4)


def test_flash_attention_layout_packs_by_positions_and_never_shares():
    layout = Layout().for_attention("flash_attention_2")
    assert layout.varlen and not layout.shares
    batches = list(plan_batches([([1, 2], [[3], [4, 5]]), ([6], [[7, 8, 9]])], 0, layout))
    assert len(batches) == 1 and batches[0].input_ids.shape[0] == 1
    assert batches[0].position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2]]  # longest first

    class Cfg:
        _attn_implementation = "flash_attention_2"

    assert batches[0].attention_mask_for(Cfg()) is None  # varlen: positions restart, no mask
    (shared,) = plan_batches([([1, 2], [[3], [4, 5]])], 0, Layout())
    with pytest.raises(ValueError, match="cannot share a prompt"):
        shared.attention_mask_for(Cfg())
    assert Layout().for_attention("some_kernel") == Layout(packing=False, share_prompt=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash_attention_2 needs a CUDA GPU and flash-attn")
def test_flash_attention_varlen_matches_on_gpu(tok, groups):  # pragma: no cover - GPU only
    pytest.importorskip("flash_attn")
    model = build_tiny_family("llama", len(tok), seed=8, attn_implementation="flash_attention_2").cuda().half()
    want = run(model.float().half(), groups, Layout(packing=False))
    got = run(model, groups, Layout().for_attention("flash_attention_2"))
    assert got == pytest.approx(want, abs=2e-2)
