"""The log-prob computation: sum of response-token log-probabilities per sequence.

This is the one implementation shared by the batch pipeline, the HTTP endpoint and the
trainers. It runs the model's backbone once, then applies the LM head only at response
positions and in chunks, with log-softmax in float32 whatever dtype the model is in, so it never
holds a [tokens x vocab] float32 tensor for the whole batch (nor logits for prompt tokens).
Pads never enter the sum: positions come from the attention mask, and only positions marked in
`response_mask` are gathered.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

DEFAULT_CHUNK_TOKENS = 1024


def unwrap_adapters(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (its adapters are injected in place, so they
    still act); any other model as it is."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _backbone_and_head(model):
    model = unwrap_adapters(model)
    head = model.get_output_embeddings()
    backbone = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if head is None or backbone is None or backbone is model:
        raise TypeError(
            f"{type(model).__name__}: expected a causal LM with a backbone and an output embedding"
        )
    return backbone, head


def _postprocess_logits(model, logits: torch.Tensor) -> torch.Tensor:
    # Some families transform logits after the head; mirror what their forward() does.
    cfg = model.config
    scale = getattr(cfg, "logit_scale", None)  # Cohere multiplies
    if scale is not None and isinstance(scale, (int, float)):
        logits = logits * scale
    scaling = getattr(cfg, "logits_scaling", None)  # Granite divides
    if scaling is not None and isinstance(scaling, (int, float)):
        logits = logits / scaling
    cap = getattr(cfg, "final_logit_softcapping", None)  # Gemma 2/3
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions count real tokens only, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    sum_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Sum of log p(token | prefix) over the tokens marked in `response_mask`, per row.

    input_ids, attention_mask, response_mask: [B, T]; the first token of a row can never be
    scored (it has no prefix). Returns [B] in `sum_dtype` (float64 by default, so the sum over
    long responses does not lose digits; gradients flow through it for training).
    """
    if input_ids.shape != attention_mask.shape or input_ids.shape != response_mask.shape:
        raise ValueError("input_ids, attention_mask and response_mask must have the same shape")
    backbone, head = _backbone_and_head(model)
    out = backbone(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    # Token t is predicted from the hidden state at t-1.
    target_mask = (response_mask[:, 1:] & attention_mask[:, 1:].bool())
    rows, cols = target_mask.nonzero(as_tuple=True)
    targets = input_ids[:, 1:][rows, cols]
    states = hidden[:, :-1][rows, cols]
    token_logps = []
    for start in range(0, states.shape[0], chunk_tokens):
        logits = head(states[start : start + chunk_tokens]).float()
        logits = _postprocess_logits(model, logits)
        tgt = targets[start : start + chunk_tokens]
        token_logps.append(logits.gather(-1, tgt[:, None]).squeeze(-1) - logits.logsumexp(-1))
    sums = torch.zeros(input_ids.shape[0], dtype=sum_dtype, device=input_ids.device)
    if token_logps:
        sums = sums.index_add(0, rows, torch.cat(token_logps).to(sum_dtype))
    return sums


def collate_sequences(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_token_id: int,
    padding_side: str = "right",
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad prompt+response sequences into (input_ids, attention_mask, response_mask)."""
    if padding_side not in ("left", "right"):
        raise ValueError("padding_side must be 'left' or 'right'")
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    width = max(lengths)
    n = len(lengths)
    ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    attn = torch.zeros((n, width), dtype=torch.long)
    resp = torch.zeros((n, width), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        off = 0 if padding_side == "right" else width - lengths[i]
        seq = torch.tensor([*p, *r], dtype=torch.long)
        ids[i, off : off + len(seq)] = seq
        attn[i, off : off + len(seq)] = 1
        resp[i, off + len(p) : off + len(seq)] = True
    if device is not None:
        ids, attn, resp = ids.to(device), attn.to(device), resp.to(device)
    return ids, attn, resp


def plan_token_batches(
    lengths: Sequence[int], max_tokens: int, max_batch_size: int | None = None
) -> list[list[int]]:
    """Group sequence indices into batches whose padded size (rows x longest) fits `max_tokens`.

    Sorted by length (longest first) so batch-mates have similar lengths and little padding;
    a sequence longer than the budget gets a batch of its own. Deterministic for given lengths.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        width = lengths[cur[0]] if cur else lengths[i]
        full = max_batch_size is not None and len(cur) >= max_batch_size
        if cur and ((len(cur) + 1) * width > max_tokens or full):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches
