"""Reward-model scoring (pure torch, no Ray): one scalar per (prompt, response), batched by tokens.

Input ids come from PairTokenizer.encode under the RM's own tokenizer and chat template: prompt
ids (template over the prompt turns, generation header, one BOS) + response ids (the assistant
turn's tail with its end-of-turn token). So the RM sees [prompt turns, response] rendered once.
The reward is read by `prefsel.logprobs.sequence_rewards`, the same function reward-model
training uses: the head at each sequence's last real token, found from the attention mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from prefsel.logprobs import DEFAULT_MAX_TOKENS_PER_BATCH, map_token_batches, sequence_rewards


def load_reward_model(path: str, *, dtype: str = "auto", device: str | None = None,
                      trust_remote_code: bool = False, attn_implementation: str | None = None):
    """An eval-mode AutoModelForSequenceClassification with one output (a prefsel-trained RM is one)."""
    from transformers import AutoModelForSequenceClassification

    from prefsel.models import resolve_device, resolve_dtype

    dev = resolve_device(device)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForSequenceClassification.from_pretrained(
        path, dtype=resolve_dtype(dtype, dev), trust_remote_code=trust_remote_code, **kwargs
    )
    if model.config.num_labels != 1:
        raise ValueError(f"{path}: a reward model has one output (num_labels=1), this one has {model.config.num_labels}")
    model.to(dev).eval()
    model.requires_grad_(False)
    return model


def score_sequences(
    model,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_token_id: int,
    *,
    max_tokens_per_batch: int = DEFAULT_MAX_TOKENS_PER_BATCH,
    device: torch.device | str = "cpu",
) -> list[float]:
    """Reward of each prompt+response pair, in input order; independent of how they are batched."""
    with torch.no_grad():
        (rewards,) = map_token_batches(
            [lambda ids, attn, _resp: sequence_rewards(model, ids, attn)], prompts, responses, pad_token_id,
            max_tokens=max_tokens_per_batch, device=device,
        )
    return rewards
