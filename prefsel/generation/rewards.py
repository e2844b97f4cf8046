"""Reward-model scoring (pure torch, no Ray): one scalar per (prompt, response), batched by tokens.

Input ids come from PairTokenizer.encode under the RM's own tokenizer and chat template: prompt
ids (template over the prompt turns, generation header, one BOS) + response ids (the assistant
turn's tail with its end-of-turn token). So the RM sees [prompt turns, response] rendered once.
The reward is read by `prefsel.logprobs.batch_rewards`, the same function reward-model
training uses: the head at each sequence's last real token, found from the attention mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from prefsel.logprobs import batch_rewards, map_groups
from prefsel.packing import ForwardStats, Group, Layout, layout_for


def load_reward_model(path: str, *, dtype: str = "auto", device: str | None = None,
                      trust_remote_code: bool = False, attn_implementation: str | None = None):
    """An eval-mode AutoModelForSequenceClassification with one output (a prefsel-trained RM is one)."""
    from transformers import AutoModelForSequenceClassification

    from prefsel.models import resolve_device, resolve_dtype
    from prefsel.packing import resolve_attn

    dev = resolve_device(device)
    kwargs = {"attn_implementation": resolve_attn(attn_implementation, dev)} if attn_implementation else {}
    model = AutoModelForSequenceClassification.from_pretrained(
        path, dtype=resolve_dtype(dtype, dev), trust_remote_code=trust_remote_code, **kwargs
    )
    if model.config.num_labels != 1:
        raise ValueError(f"{path}: a reward model has one output (num_labels=1), this one has {model.config.num_labels}")
    model.to(dev).eval()
    model.requires_grad_(False)
    return model


def score_groups(
    model,
    groups: Sequence[Group],
    pad_token_id: int,
    *,
    layout: Layout | None = None,
    device: torch.device | str = "cpu",
    stats: ForwardStats | None = None,
) -> list[float]:
    """Reward of every (prompt, response) of `groups` ((prompt, responses) pairs), in (group,
    response) order; independent of how they are batched and laid out. By default a prompt's K
    responses share one run of the prompt (prefsel.packing)."""
    layout = layout_for([model], layout or Layout())
    with torch.no_grad():
        (rewards,) = map_groups([lambda batch: batch_rewards(model, batch)], groups, pad_token_id, layout,
                                device=device, stats=stats)
    return rewards
