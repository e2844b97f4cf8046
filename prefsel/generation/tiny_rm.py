"""A tiny random reward model (LlamaForSequenceClassification, one output) for tests and demos."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def build_tiny_reward_model(out_dir: str | os.PathLike, tokenizer, *, seed: int = 0, hidden_size: int = 32,
                            num_layers: int = 2) -> str:
    """Save a randomly initialised 1-output sequence classifier with `tokenizer`; returns its folder."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        num_labels=1, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    d = Path(out_dir)
    model.eval().save_pretrained(d)
    tokenizer.save_pretrained(d)
    return str(d)
