"""A tiny random reward model (LlamaForSequenceClassification, one output) for tests and demos."""

from __future__ import annotations

import os
from pathlib import Path


def build_tiny_reward_model(out_dir: str | os.PathLike, tokenizer, *, seed: int = 0, hidden_size: int = 32,
                            num_layers: int = 2) -> str:
    """Save a randomly initialised 1-output sequence classifier with `tokenizer`; returns its folder."""
    from prefsel.tiny import build_tiny_llama

    model = build_tiny_llama(len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                             num_layers=num_layers, seed=seed, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, num_labels=1)
    d = Path(out_dir)
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return str(d)
