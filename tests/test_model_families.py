"""Model families whose forward is not Llama's, against the plain transformers model.

Each family is a tiny random model built here (nothing is downloaded), scored through
`layout_for` in every layout of tests/test_packing.py; the reference is each sequence alone
through the model's own forward in float64 (as test_packing's, in the model's own attention).
The families:

- composite Gemma (AutoModelForCausalLM loads Gemma 3 4B+ and Gemma 4 as *ForConditionalGeneration):
  sliding windows and the final soft-cap live in the text config;
- logit transforms after the LM head: Falcon-H1 (lm_head_multiplier), HyperCLOVAX (multiplies by
  logits_scaling, where Granite divides), RecurrentGemma (logits_soft_cap), Inkling (hidden states
  over a width multiplier; the head's padding rows cut off), MPT (names a logit_scale its forward
  never uses), and Cohere, Granite, MiniCPM3 as before;
- models prefsel cannot pack, which run padded: ALiBi (Bloom, MPT, Falcon with alibi=True),
  recurrent layers (Falcon-H1, RecurrentGemma, Inkling's hybrids, RWKV), and right-padded where
  pads before a sequence would reach it (RWKV, RecurrentGemma);
- the probe (`logprobs.checked_layout`), which catches what none of these rules knows.
"""

from __future__ import annotations

import copy
import random
import warnings

import pytest
import torch
import transformers as tf
from test_packing import LAYOUTS, run

from prefsel import packing
from prefsel.logprobs import batch_logprobs, batch_rewards, logit_transform
from prefsel.packing import Layout, layout_for, one_batch
from prefsel.tiny import build_tiny_family

V = 97  # vocabulary; probe and test tokens stay below it


def _common(**kw) -> dict:
    out = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    out.update(kw)
    return out


_WINDOWED = dict(head_dim=8, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                 final_logit_softcapping=3.0)


def _gemma3_composite():
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=28, patch_size=14)
    # the soft-cap in the text config is one Gemma3ForConditionalGeneration's forward never applies
    cfg = tf.Gemma3Config(text_config=_common(**_WINDOWED), vision_config=vision, mm_tokens_per_image=4)
    return tf.AutoModelForCausalLM.from_config(cfg)


def _gemma4_composite():
    return tf.AutoModelForCausalLM.from_config(tf.Gemma4Config(text_config=_common(**_WINDOWED, global_head_dim=8)))


def _gemma3n_composite():
    pytest.importorskip("timm")  # Gemma 3n's vision tower is a timm model
    text = _common(**_WINDOWED, hidden_size_per_layer_input=8, num_kv_shared_layers=0, laurel_rank=4,
                   altup_num_inputs=2, activation_sparsity_pattern=[0.0, 0.0], intermediate_size=[64, 64],
                   vocab_size_per_layer_input=V)
    return tf.AutoModelForCausalLM.from_config(tf.Gemma3nConfig(text_config=text))


def _falcon_h1():
    return tf.FalconH1ForCausalLM(tf.FalconH1Config(**_common(
        lm_head_multiplier=0.25, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_d_state=8,
        mamba_n_groups=1, mamba_chunk_size=8, head_dim=8)))


def _recurrent_gemma():
    return tf.RecurrentGemmaForCausalLM(tf.RecurrentGemmaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, lru_width=32, attention_window_size=4,
        block_types=["recurrent", "attention", "recurrent"], logits_soft_cap=3.0))


def _inkling():
    cfg = tf.InklingTextConfig(**_common(head_dim=8, vocab_size=V + 7, unpadded_vocab_size=V,
                                         logits_mup_width_multiplier=4.0, n_routed_experts=4,
                                         num_experts_per_tok=2, moe_intermediate_size=16))
    model = tf.InklingForCausalLM(cfg)
    model.set_experts_implementation("eager")  # grouped_mm has no float64 kernel for the reference
    return model


def _minicpm3():
    return tf.MiniCPM3ForCausalLM(tf.MiniCPM3Config(**_common(
        num_key_value_heads=4, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, kv_lora_rank=8,
        q_lora_rank=8, dim_model_base=8, scale_depth=1.0)))


# family -> (builder, packs: prefsel packs it); every layout must still give the reference
FAMILIES = {
    "gemma3-composite": (_gemma3_composite, True),
    "gemma4-composite": (_gemma4_composite, True),
    "gemma3n-composite": (_gemma3n_composite, True),
    "falcon_h1": (_falcon_h1, False),
    "hyperclovax": (lambda: tf.HyperCLOVAXForCausalLM(tf.HyperCLOVAXConfig(**_common(logits_scaling=4.0, head_dim=8))),
                    True),
    "recurrent_gemma": (_recurrent_gemma, False),
    "inkling": (_inkling, False),
    "mpt-logit-scale": (lambda: tf.MptForCausalLM(tf.MptConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4,
                                                               logit_scale=0.5)), False),
    "bloom": (lambda: tf.BloomForCausalLM(tf.BloomConfig(vocab_size=V, hidden_size=32, n_layer=2, n_head=4)), False),
    "falcon-alibi": (lambda: tf.FalconForCausalLM(tf.FalconConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                                                  num_attention_heads=4, alibi=True)), False),
    "rwkv": (lambda: tf.RwkvForCausalLM(tf.RwkvConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                                      attention_hidden_size=32, intermediate_size=64)), False),
    # transforms prefsel had before, guarding their reading of the config
    "cohere": (lambda: tf.CohereForCausalLM(tf.CohereConfig(**_common(logit_scale=0.5))), True),
    "granite": (lambda: tf.GraniteForCausalLM(tf.GraniteConfig(**_common(logits_scaling=4.0))), True),
    "minicpm3": (_minicpm3, True),
}
# pads before a sequence reach it: padded layouts are right-padded
RIGHT_PADDED = ("recurrent_gemma", "rwkv")


def reference_logprobs(model, groups) -> list[float]:
    """test_packing's reference (each sequence alone, float64, no prefsel code) in the model's own
    attention: transformers' Falcon ALiBi gives other log-probs in eager than in sdpa (0.13 nats)."""
    m64 = copy.deepcopy(model).double()
    out = []
    with torch.no_grad():
        for prompt, responses in groups:
            for r in responses:
                logp = m64(input_ids=torch.tensor([[*prompt, *r]])).logits[0].log_softmax(-1)
                p = len(prompt)
                out.append(sum(float(logp[p + j - 1, t]) for j, t in enumerate(r) if p + j >= 1))
    return out


def build(family: str, seed: int = 0) -> torch.nn.Module:
    builder, _ = FAMILIES[family]
    torch.manual_seed(seed)
    model = builder()
    with torch.no_grad():  # weights large enough that scales and caps move log-probs by nats
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def groups():
    rng = random.Random(0)
    words = lambda n: [rng.randrange(3, V) for _ in range(n)]  # noqa: E731
    return [
        (words(9), [words(5), words(7)]),  # prompt and responses longer than the window of 4
        (words(3), [words(1), words(2), words(6), words(4)]),  # an HPS row; a one-token response
        ([], [words(4), words(3)]),  # no prompt
        ([words(1)[0]], [words(8)]),  # a one-token prompt
    ]


def _probe_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "on a probe" in str(w.message)]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_layout_matches_the_plain_model_alone(groups, family):
    """Every layout, as layout_for adapts it, gives the float64 reference; the layout is the one
    the rules choose (packed where prefsel can pack), not one the probe had to fall back to."""
    model = build(family)
    want = reference_logprobs(model, groups)
    _, packs = FAMILIES[family]
    for name, layout in LAYOUTS.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            adapted = layout_for([model], layout)
        assert not _probe_warnings(caught), f"{family}/{name}: {_probe_warnings(caught)}"
        assert adapted.packing == (layout.packing and packs), f"{family}/{name}: {adapted}"
        if family in RIGHT_PADDED:
            assert adapted.padding_side == "right", f"{family}/{name}"
        assert run(model, groups, adapted) == pytest.approx(want, rel=1e-6, abs=1e-5), f"{family}/{name} vs alone"


def test_logit_transforms_read_the_text_config_and_the_family():
    """What each family's forward does after its head, as prefsel reads it."""
    assert logit_transform(build("gemma4-composite")).cap == 3.0  # in text_config only
    assert logit_transform(build("gemma3-composite")).cap is None  # its forward never soft-caps
    assert logit_transform(build("falcon_h1")).scale == 0.25
    assert logit_transform(build("hyperclovax")).scale == 4.0  # multiplies
    assert logit_transform(build("granite")).scale == 0.25  # divides
    assert logit_transform(build("mpt-logit-scale")).scale == 1.0  # transformers' MPT ignores it
    ink = logit_transform(build("inkling"))
    assert (ink.vocab, ink.scale) == (V, 0.25)


def test_packed_batches_refuse_models_they_cannot_keep_apart():
    """A packed batch handed straight to the forward (not through layout_for) fails loudly."""
    batch = one_batch([([5, 6, 7], [[8, 9], [10]])], 0, Layout())
    for family, match in (("bloom", "ALiBi"), ("rwkv", "recurrent"), ("falcon_h1", "layer types")):
        with torch.no_grad(), pytest.raises(ValueError, match=match):
            batch_logprobs(build(family), batch)


def test_probe_falls_back_to_padded_where_packing_disagrees(groups, monkeypatch):
    """With the ALiBi rule gone, MPT's shared prompts are wrong (the second response sees the
    prompt at the first one's length too far): the probe sees it and scores padded, with a warning."""
    monkeypatch.setattr(packing, "_ALIBI_TYPES", ())
    model = build("mpt-logit-scale", seed=1)
    with pytest.warns(RuntimeWarning, match="on a probe"):
        adapted = layout_for([model], Layout())
    assert adapted == Layout().padded("right")
    assert run(model, groups, adapted) == pytest.approx(reference_logprobs(model, groups), abs=1e-5)


def test_probe_refuses_a_family_whose_head_it_does_not_know():
    """RoBERTa as a decoder runs dense + GELU + norm before its output embedding, which prefsel
    takes for the head: every layout is wrong, so layout_for raises instead of scoring."""
    model = build_roberta()
    with pytest.raises(ValueError, match="in every layout"):
        layout_for([model], Layout())


def build_roberta() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = tf.RobertaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, is_decoder=True)
    return tf.RobertaForCausalLM(cfg).eval()


def test_probe_passes_reward_models_and_runs_once_per_model(monkeypatch):
    """A sequence classifier is probed through its reward; a second layout_for is a lookup."""
    from prefsel import logprobs

    model = build_tiny_family("llama", V, seed=2, num_labels=1)
    calls = []
    probe = logprobs._probe
    monkeypatch.setattr(logprobs, "_probe", lambda *a: calls.append(a[2]) or probe(*a))
    for _ in range(3):
        assert layout_for([model], Layout()).shares
    assert calls == ["reward"]
    batch = one_batch([([5, 6, 7], [[8, 9], [10]])], 0, Layout())
    with torch.no_grad():
        assert batch_rewards(model, batch).shape == (2,)
