"""Reward-model scoring (pure torch, no Ray): one scalar per (prompt, response), batched by tokens.

Input ids come from PairTokenizer.encode under the RM's own tokenizer and chat template: prompt
ids (template over the prompt turns, generation header, one BOS) + response ids (the assistant
turn's tail with its end-of-turn token). So the RM sees [prompt turns, response] rendered once.

The reward is the head's output at the LAST REAL token of each sequence, found from the attention
mask. (transformers' SequenceClassification pooling finds the last token that is not
`pad_token_id`; when pad == EOS and the sequence ends with EOS, that is the token BEFORE the EOS.
Computing the head on the backbone's hidden state at the mask's last position avoids this.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from prefsel.logprobs import collate_sequences, plan_token_batches, position_ids_from_mask


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


def _backbone_and_head(model):
    backbone = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    head = None
    for name in ("score", "classifier", "v_head", "value_head"):
        cand = getattr(model, name, None)
        if isinstance(cand, torch.nn.Module):
            head = cand
            break
    if backbone is None or backbone is model or head is None:
        return None, None
    return backbone, head


def sequence_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] float32 rewards at each row's last attended token (any padding side)."""
    last = attention_mask.shape[1] - 1 - attention_mask.flip(-1).long().argmax(-1)
    backbone, head = _backbone_and_head(model)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    if backbone is None:  # unknown layout: the model's own pooling (right padding, pad != EOS assumed)
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()
    out = backbone(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return head(hidden[rows, last]).float()[:, 0]


def score_sequences(
    model,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_token_id: int,
    *,
    max_tokens_per_batch: int = 16384,
    device: torch.device | str = "cpu",
) -> list[float]:
    """Reward of each prompt+response pair, in input order; independent of how they are batched."""
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    rewards = [0.0] * len(lengths)
    with torch.no_grad():
        for batch in plan_token_batches(lengths, max_tokens_per_batch):
            ids, attn, _ = collate_sequences([prompts[i] for i in batch], [responses[i] for i in batch],
                                             pad_token_id, "right", device)
            for i, v in zip(batch, sequence_rewards(model, ids, attn).tolist()):
                rewards[i] = float(v)
    return rewards
