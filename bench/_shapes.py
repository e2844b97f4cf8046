"""Shared by the GPU benchmarks (bench/score_gpu.py, score_pipeline.py, serve_load.py,
train_gpu.py): random-initialised Llama-architecture models of the issue's shapes, and text
rows whose token counts are exactly the ones drawn.

- `SHAPES`: Llama-3.2-1B and Llama-3.1-8B shapes (vocabulary 128256), and `tiny` for CPU smoke
  runs (`--tiny`);
- `build_shape`: one model of a shape, random weights, built directly on the device;
- `build_word_tokenizer`: a word-level tokenizer ("w17" is one token, whitespace separates), so
  a text of k words is exactly k tokens (plus BOS for a prompt, EOS for a response);
- `shape_rows`: prompt/chosen/rejected text rows with prompt length uniform in [50, 450) and
  each response in [100, 600) tokens (the issue's synthetic pairs, as text for the pipeline,
  the endpoint and the trainers);
- `save_shape_pair`: policy and reference (different seeds) with that tokenizer, saved with
  save_pretrained, so `prefsel score`, `prefsel serve` and `prefsel train` load them from local
  folders like real users' models. Nothing is downloaded.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch

SHAPES = {  # hidden, layers, ffn, heads, kv heads, vocab
    "1b": (2048, 16, 8192, 32, 8, 128256),
    "8b": (4096, 32, 14336, 32, 8, 128256),
    "tiny": (64, 2, 128, 4, 2, 512),
}
PROMPT_LEN = (50, 450)  # half-open ranges of token counts, as the issue draws them
RESPONSE_LEN = (100, 600)
TINY_PROMPT_LEN = (5, 40)
TINY_RESPONSE_LEN = (5, 60)
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
MAX_WORDS = 32000


def word_count(vocab: int) -> int:
    """Words in the tokenizer that save_shape_pair saves beside a model of `vocab` ids (rows
    drawn from more words would meet <unk>)."""
    return min(MAX_WORDS, vocab - len(SPECIALS))


def lengths_for(shape: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """(prompt, response) length ranges: the issue's, or short ones for the tiny CPU shape."""
    return (TINY_PROMPT_LEN, TINY_RESPONSE_LEN) if shape == "tiny" else (PROMPT_LEN, RESPONSE_LEN)


def shape_config(shape: str, attn: str | None = None, **overrides):
    from transformers import LlamaConfig

    h, layers, ffn, heads, kv, vocab = SHAPES[shape]
    kw = dict(hidden_size=h, num_hidden_layers=layers, intermediate_size=ffn, num_attention_heads=heads,
              num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if attn:
        kw["attn_implementation"] = attn
    kw.update(overrides)
    return LlamaConfig(**kw)


def build_shape(shape: str, seed: int, dtype: torch.dtype, device: str, attn: str | None = "sdpa", **overrides):
    """A random-initialised LlamaForCausalLM of `shape` (config `overrides` applied) on `device`
    in `dtype`, in eval mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(shape_config(shape, attn, **overrides)).to(dtype)
    return model.eval()


def non_embedding_params(model: torch.nn.Module) -> int:
    """Parameters that cost 2 FLOPs per token (the MFU numerator's; embeddings and head excluded)."""
    return sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)


def build_word_tokenizer(words: int = 32000):
    """Word-level fast tokenizer: "w0".."w{words-1}" are one token each, BOS is added to every
    encoded text (as Llama's tokenizer does), EOS is "</s>", pad "<pad>"; ids 0-3 are specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    vocab.update({f"w{i}": len(SPECIALS) + i for i in range(words)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def shape_rows(n: int, *, shape: str = "1b", words: int | None = None, seed: int = 0) -> list[dict]:
    """`n` text pairs: prompt of k words with k uniform in the shape's prompt range (BOS makes it
    k+1 tokens: the issue's ranges count the text), chosen/rejected likewise in the response range
    (each gets EOS). Responses start with a space so a joined string tokenizes the same. `words`:
    the tokenizer's (default: the one saved with the shape's models, `word_count`)."""
    (p_lo, p_hi), (r_lo, r_hi) = lengths_for(shape)
    words = words or word_count(SHAPES[shape][-1])
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(f"w{rng.randrange(words)}" for _ in range(rng.randrange(lo, hi)))

    return [{"prompt": text(p_lo, p_hi), "chosen": " " + text(r_lo, r_hi), "rejected": " " + text(r_lo, r_hi)}
            for _ in range(n)]


def save_shape_pair(shape: str, out_dir: str | os.PathLike, *, dtype: torch.dtype = torch.bfloat16,
                    device: str = "cpu", words: int = MAX_WORDS, **overrides) -> tuple[str, str]:
    """Save a random policy (seed 1) and reference (seed 0) of `shape` (config `overrides`
    applied, e.g. vocab_size) with the word tokenizer; returns (policy_dir, reference_dir).
    Skips a folder that already holds a saved model."""
    vocab = overrides.get("vocab_size", SHAPES[shape][-1])
    tokenizer = build_word_tokenizer(min(words, word_count(vocab)))
    paths = []
    for name, seed in (("policy", 1), ("reference", 0)):
        d = Path(out_dir) / name
        if not (d / "config.json").exists():
            model = build_shape(shape, seed, dtype, device, **overrides)
            model.save_pretrained(d)
            tokenizer.save_pretrained(d)
            del model
        paths.append(str(d))
    return paths[0], paths[1]
