"""The forward: a model's backbone once, then its head only where it is read.

This is the one place that knows a model's anatomy, shared by the batch pipeline, the HTTP
endpoint, the trainers and the reward-model annotation, so they can never disagree:

- `backbone_and_head` finds the backbone and the head of a causal LM (its output embedding) or
  of a sequence classifier (`score`, `classifier`, `v_head`, ...), peft wrappers unwrapped;
- `hidden_states` runs the backbone with positions from the attention mask, so left padding
  does not shift them;
- `response_logprobs` reads summed response log-probs: the LM head only at response positions
  and in chunks, log-softmax in float32 whatever dtype the model is in, sums in float64, so it
  never holds a [tokens x vocab] float32 tensor for the whole batch (nor logits for prompt
  tokens). Pads never enter the sum: only positions marked in `response_mask` are gathered;
- `sequence_rewards` reads a sequence classifier's scalar at each row's LAST REAL token, found
  from the attention mask (transformers' own pooling looks for the last token that is not
  `pad_token_id`; when pad == EOS and a sequence ends with EOS, that is the token before it).

Collation (`collate_sequences`) and the token-budget batch plan (`plan_token_batches`,
`map_token_batches`) live here too: every caller batches sequences the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

DEFAULT_CHUNK_TOKENS = 1024  # LM-head rows per float32 logits chunk
DEFAULT_MAX_TOKENS_PER_BATCH = 16384  # padded tokens per forward (rows x longest)


def unwrap_adapters(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (its adapters are injected in place, so they
    still act); any other model as it is."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


REWARD_HEADS = ("score", "classifier", "v_head", "value_head")


def backbone_and_head(model: torch.nn.Module, kind: str = "lm") -> tuple[torch.nn.Module, torch.nn.Module]:
    """(backbone, head) of a causal LM (`kind="lm"`: the output embedding) or of a sequence
    classifier (`kind="reward"`: the first of REWARD_HEADS it has). Raises TypeError otherwise."""
    model = unwrap_adapters(model)
    backbone = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if kind == "lm":
        head = model.get_output_embeddings()
        what = "a causal LM with a backbone and an output embedding"
    elif kind == "reward":
        head = next((h for h in (getattr(model, n, None) for n in REWARD_HEADS) if isinstance(h, torch.nn.Module)),
                    None)
        what = f"a sequence classifier with a backbone and a head named one of {REWARD_HEADS}"
    else:
        raise ValueError(f"kind must be 'lm' or 'reward', got {kind!r}")
    if head is None or backbone is None or backbone is model:
        raise TypeError(f"{type(model).__name__}: expected {what}")
    return backbone, head


def hidden_states(backbone: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T, H] last hidden states, positions counted over real tokens only."""
    out = backbone(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


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
    backbone, head = backbone_and_head(model, "lm")
    hidden = hidden_states(backbone, input_ids, attention_mask)
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


def sequence_rewards(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] float32 reward of each row: the classifier head at the row's last real token.

    Any padding side; gradients flow through it for reward-model training.
    """
    backbone, head = backbone_and_head(model, "reward")
    hidden = hidden_states(backbone, input_ids, attention_mask)
    last = attention_mask.shape[1] - 1 - attention_mask.flip(-1).long().argmax(-1)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    return head(hidden[rows, last]).float()[:, 0]


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


def map_token_batches(
    fns: Sequence[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]],
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_token_id: int,
    *,
    max_tokens: int,
    max_batch_size: int | None = None,
    padding_side: str = "right",
    device: torch.device | str | None = None,
) -> list[list[float]]:
    """Apply each `fn(input_ids, attention_mask, response_mask) -> [B]` to every
    (prompt, response) sequence, batched by `plan_token_batches`; one list of floats per fn, in
    input order. Every fn forwards the same batches (policy and reference see identical tensors).
    """
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    out = [[0.0] * len(lengths) for _ in fns]
    for batch in plan_token_batches(lengths, max_tokens, max_batch_size):
        ids, attn, resp = collate_sequences(
            [prompts[i] for i in batch], [responses[i] for i in batch], pad_token_id, padding_side, device
        )
        for m, fn in enumerate(fns):
            for j, v in zip(batch, fn(ids, attn, resp).tolist()):
                out[m][j] = float(v)
    return out
