"""The forward: a model's backbone once, then its head only where it is read.

This is the one place that knows a model's anatomy, shared by the batch pipeline, the HTTP
endpoint, the trainers and the reward-model annotation, so they can never disagree:

- `backbone_and_head` finds the backbone and the head of a causal LM (its output embedding) or
  of a sequence classifier (`score`, `classifier`, `v_head`, ...), peft wrappers unwrapped;
- `batch_logprobs` reads summed response log-probs of a `TokenBatch` (prefsel.packing: padded,
  packed, or packed with shared prompts): the backbone runs with the batch's own positions and
  mask, then the LM head only at the states that predict response tokens, in chunks,
  log-softmax in float32 whatever dtype the model is in, sums in float64, so it never holds a
  [tokens x vocab] float32 tensor for the whole batch (nor logits for prompt tokens), and under
  autograd keeps none for backward either (the head is recomputed per chunk there);
- `batch_rewards` reads a sequence classifier's scalar at each sequence's LAST REAL token
  (transformers' own pooling looks for the last token that is not `pad_token_id`; when
  pad == EOS and a sequence ends with EOS, that is the token before it);
- `map_groups` runs functions of a TokenBatch over (prompt, responses) groups, batched by the
  layout's token budget, every function on the same batches (policy and reference see
  identical tensors); `response_logprobs` / `sequence_rewards` take padded tensors;
- `logit_transform` is what a family's forward does to its head's output (scale, soft-cap,
  vocabulary padding cut off), and `checked_layout` probes a layout once per model against the
  model's own forward, the safety net for what neither knows (packing.layout_for calls it).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from prefsel.packing import (
    DEFAULT_MAX_TOKENS_PER_BATCH,
    ForwardStats,
    Group,
    Layout,
    TokenBatch,
    one_batch,
    plan_batches,
    text_config,
)

__all__ = ["DEFAULT_MAX_TOKENS_PER_BATCH", "DEFAULT_CHUNK_TOKENS", "Layout", "TokenBatch", "ForwardStats"]

DEFAULT_CHUNK_TOKENS = 1024  # LM-head rows per float32 logits chunk


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


def batch_hidden_states(model: torch.nn.Module, backbone: torch.nn.Module, batch: TokenBatch) -> torch.Tensor:
    """[B * W, H] last hidden states of a TokenBatch, flattened so its flat indices read them."""
    dtype = _activation_dtype(backbone)  # an additive mask must match the attention's dtype
    out = backbone(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask_for(unwrap_adapters(model).config, dtype),
        position_ids=batch.position_ids,
        use_cache=False,
    )
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden.flatten(0, 1)


def _activation_dtype(backbone: torch.nn.Module) -> torch.dtype:
    """The dtype the backbone computes in: its input embeddings' (quantized weights elsewhere
    are not), or the first floating parameter's."""
    emb = backbone.get_input_embeddings() if hasattr(backbone, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    if weight is not None and weight.is_floating_point():
        return weight.dtype
    return next((p.dtype for p in backbone.parameters() if p.is_floating_point()), torch.float32)


@dataclass(frozen=True)
class LogitTransform:
    """What a family's forward() does to its LM head's output, in this order: keep the first
    `vocab` entries (the head is padded to a round size), multiply by `scale`, soft-cap to
    cap * tanh(logits / cap)."""

    vocab: int | None = None
    scale: float = 1.0
    cap: float | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.vocab is not None and self.vocab < logits.shape[-1]:
            logits = logits[..., : self.vocab]
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.cap:
            logits = torch.tanh(logits / self.cap) * self.cap
        return logits


# composite models whose forward() applies none of the transforms their text config names
# (Gemma3ForConditionalGeneration never soft-caps; Gemma3ForCausalLM, Gemma 3n and Gemma 4 do)
_HEAD_AS_IS = ("Gemma3ForConditionalGeneration",)


def logit_transform(model: torch.nn.Module) -> LogitTransform:
    """The transform `model`'s forward() applies after its LM head, as transformers 5 families
    read it from their (text) config; tests/test_model_families.py checks each family against
    its own forward, and `checked_layout` any model once."""
    model = unwrap_adapters(model)
    if type(model).__name__ in _HEAD_AS_IS:
        return LogitTransform()
    cfg = text_config(model.config)
    kind = getattr(cfg, "model_type", None) or ""

    def number(name: str) -> float | None:
        value = getattr(cfg, name, None)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    scale = 1.0
    if kind.startswith("cohere") and number("logit_scale"):  # MPT's config names one its forward never uses
        scale *= number("logit_scale")
    if number("logits_scaling"):  # Granite divides (MiniCPM3 its hidden states, before a head without bias)
        scale *= number("logits_scaling") if kind == "hyperclovax" else 1.0 / number("logits_scaling")
    if number("lm_head_multiplier"):  # Falcon-H1
        scale *= number("lm_head_multiplier")
    if number("logits_mup_width_multiplier"):  # Inkling divides its hidden states (a head without bias)
        scale /= number("logits_mup_width_multiplier")
    # Gemma 2/3/3n/4, VaultGemma, Inkling 2; RecurrentGemma; xLSTM
    cap = number("final_logit_softcapping") or number("logits_soft_cap") or number("output_logit_soft_cap")
    vocab = getattr(cfg, "unpadded_vocab_size", None)  # Inkling: the head's padding rows are cut off
    return LogitTransform(vocab=vocab if isinstance(vocab, int) else None, scale=scale, cap=cap)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions count real tokens only, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def batch_logprobs(
    model: torch.nn.Module,
    batch: TokenBatch,
    *,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    sum_dtype: torch.dtype = torch.float64,
    recompute_head: bool = True,
) -> torch.Tensor:
    """Sum of log p(token | prefix) over each sequence's response tokens: [S] in `sum_dtype`
    (float64 by default, so long responses do not lose digits), in the batch's sequence order.

    Gradients flow through it for training. With `recompute_head` (the default) a chunk's
    float32 logits are not kept for the backward pass: the head runs again per chunk there
    (activation checkpointing of the head alone). Kept, they would cost 4 x vocabulary bytes per
    response token until backward (2.1 GB for 4k tokens at a 128k vocabulary), for one more head
    matmul per token (about 2 x hidden x vocabulary FLOPs). No effect without gradients."""
    backbone, head = backbone_and_head(model, "lm")
    transform = logit_transform(model)
    hidden = batch_hidden_states(model, backbone, batch)
    states = hidden[batch.target_index]
    targets = batch.target_ids
    recompute = recompute_head and torch.is_grad_enabled()
    token_logps = []
    for start in range(0, states.shape[0], chunk_tokens):
        chunk = (transform, head, states[start : start + chunk_tokens], targets[start : start + chunk_tokens])
        token_logps.append(checkpoint(_head_logps, *chunk, use_reentrant=False) if recompute else _head_logps(*chunk))
    sums = torch.zeros(batch.num_sequences, dtype=sum_dtype, device=hidden.device)
    if token_logps:
        sums = sums.index_add(0, batch.target_seq, torch.cat(token_logps).to(sum_dtype))
    return sums


def _head_logps(transform: LogitTransform, head: torch.nn.Module, states: torch.Tensor,
                targets: torch.Tensor) -> torch.Tensor:
    """log p(target) at each state: the head, logits in float32, the family's logit transform."""
    logits = transform(head(states).float())
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)


def batch_rewards(model: torch.nn.Module, batch: TokenBatch) -> torch.Tensor:
    """[S] float32 reward of each sequence: the classifier head at its last real token.
    Gradients flow through it for reward-model training."""
    backbone, head = backbone_and_head(model, "reward")
    hidden = batch_hidden_states(model, backbone, batch)
    return head(hidden[batch.last_index]).float()[:, 0]


def padded_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 response_mask: torch.Tensor | None = None) -> TokenBatch:
    """A TokenBatch of padded rows (any padding side): one sequence per row, its response tokens
    marked in `response_mask`; a sequence's first token is never scored (it has no prefix)."""
    if input_ids.shape != attention_mask.shape or (response_mask is not None and input_ids.shape != response_mask.shape):
        raise ValueError("input_ids, attention_mask and response_mask must have the same shape")
    b, w = input_ids.shape
    attn = attention_mask.bool()
    resp = response_mask.bool() if response_mask is not None else torch.zeros_like(attn)
    target = resp[:, 1:] & attn[:, 1:] & attn[:, :-1]  # a sequence's first token has no prefix, pads before it
    rows, cols = target.nonzero(as_tuple=True)
    last = w - 1 - attn.flip(-1).long().argmax(-1)
    row_ids = torch.arange(b, device=input_ids.device)
    return TokenBatch(
        input_ids=input_ids, position_ids=position_ids_from_mask(attention_mask),
        segment=torch.where(attn, row_ids[:, None], torch.full_like(input_ids, -1)),
        branch=torch.zeros_like(input_ids), padded=True,
        target_index=rows * w + cols, target_ids=input_ids[rows, cols + 1], target_seq=rows,
        last_index=row_ids * w + last, sequence_ids=list(range(b)),
        stats=ForwardStats(sequences=b, tokens=int(attn.sum()), slots=b * w, forwards=1),
    )


def response_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    sum_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """`batch_logprobs` of padded rows ([B, T] tensors): [B]."""
    return batch_logprobs(model, padded_batch(input_ids, attention_mask, response_mask),
                          chunk_tokens=chunk_tokens, sum_dtype=sum_dtype)


def sequence_rewards(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """`batch_rewards` of padded rows ([B, T] tensors), any padding side: [B]."""
    return batch_rewards(model, padded_batch(input_ids, attention_mask))


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


def map_groups(
    fns: Sequence[Callable[[TokenBatch], torch.Tensor]],
    groups: Sequence[Group],
    pad_token_id: int,
    layout: Layout,
    *,
    device: torch.device | str | None = None,
    stats: ForwardStats | None = None,
) -> list[list[float]]:
    """Apply each `fn(batch) -> [S]` to every sequence of `groups` ((prompt, responses) pairs):
    one flat list of floats per fn, in (group, response) order. Every fn forwards the same
    batches; `stats` (if given) accumulates one model's token accounting.

    Results stay on the device until every batch is launched: reading one back would wait for
    the GPU, and the next batch would then be built while the GPU sits idle."""
    total = sum(len(rs) for _, rs in groups)
    out = [[0.0] * total for _ in fns]
    launched = []
    for batch in plan_batches(groups, pad_token_id, layout, device):
        launched.append((batch.sequence_ids, [fn(batch).detach() for fn in fns]))
        if stats is not None:
            stats.add(batch.stats)
    for sequence_ids, values in launched:
        for m, v in enumerate(values):
            for j, x in zip(sequence_ids, v.tolist()):
                out[m][j] = float(x)
    return out


# -- the probe: a layout against the model's own forward, once per model ----------------------

# (prompt length, response lengths) of the probe's groups: packed, two segments share a row;
# shared, a whole group is one segment; every sequence is longer than a window of 4
_PROBE_SHAPE = ((6, (3, 4)), (2, (1, 2)), (1, (3,)))
# largest |prefsel - own forward| per response token (an LM, nats) or per reward: float32 layouts
# agree to ~1e-6; in bf16 logits near 20 are rounded to 0.125, and each layout rounds its own way
_PROBE_TOLERANCE = {torch.float64: 1e-4, torch.float32: 1e-3}
_PROBE_TOLERANCE_16BIT = 0.5
_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {layout: layout to use}


def checked_layout(model: torch.nn.Module, layout: Layout) -> Layout:
    """`layout` if prefsel's forward in it gives `model`'s own forward's results (each sequence
    run alone) on a tiny probe; else the right-padded layout if that does, with a warning.
    Raises ValueError when that disagrees too: the model's forward computes something prefsel's
    does not (a logit transform it does not know). Once per model and layout; a model that is
    neither a causal LM nor a sequence classifier is not probed."""
    kind = _model_kind(model)
    if kind is None:
        return layout
    done = _CHECKED.setdefault(model, {})
    if layout not in done:
        done[layout] = _checked(model, layout, kind)
    return done[layout]


def _model_kind(model: torch.nn.Module) -> str | None:
    for kind in ("lm", "reward"):
        try:
            backbone_and_head(model, kind)
            return kind
        except TypeError:
            continue
    return None


def _checked(model: torch.nn.Module, layout: Layout, kind: str) -> Layout:
    name = type(unwrap_adapters(model)).__name__
    err, tol = _probe(model, layout, kind)
    if err <= tol:
        return layout
    safe = layout.padded("right")
    if safe != layout and _probe(model, safe, kind)[0] <= tol:
        warnings.warn(f"{name}: the {'shared ' if layout.shares else ''}{'packed' if layout.packing else 'padded'} "
                      f"layout is {err:.3g} per token away from the model's own forward on a probe (tolerance "
                      f"{tol:g}); scoring it padded on the right instead", RuntimeWarning, stacklevel=4)
        return safe
    raise ValueError(f"{name}: prefsel's forward is {err:.3g} per token away from the model's own forward on a "
                     f"probe (tolerance {tol:g}), in every layout: its family transforms hidden states or logits "
                     f"in a way prefsel does not know")


def _probe(model: torch.nn.Module, layout: Layout, kind: str) -> tuple[float, float]:
    """(largest |prefsel in `layout` - the model's own forward of each sequence alone| per
    response token, the tolerance for the model's dtype), in eval mode, without gradients."""
    base = unwrap_adapters(model)
    backbone, _ = backbone_and_head(model, kind)
    dtype = _activation_dtype(backbone)
    device = base.get_input_embeddings().weight.device
    groups = _probe_groups(base.config)
    training = base.training
    base.eval()
    try:
        with torch.no_grad():
            batch = one_batch(groups, 0, layout, device)
            got = batch.in_order((batch_logprobs if kind == "lm" else batch_rewards)(model, batch)).tolist()
            want = [_own_forward(base, prompt, r, kind, device) for prompt, rs in groups for r in rs]
    finally:
        base.train(training)
    sizes = [len(r) if kind == "lm" else 1 for _, rs in groups for r in rs]
    err = max(abs(g - w) / n for g, w, n in zip(got, want, sizes))
    return err, _PROBE_TOLERANCE.get(dtype, _PROBE_TOLERANCE_16BIT)


def _probe_groups(config) -> list[Group]:
    """Deterministic token ids from 3 on, none of them a special token (a reward model's own
    forward pools at the last token that is not its pad token)."""
    cfg = text_config(config)
    special = set()
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        ids = getattr(cfg, name, None)
        special |= set(ids) if isinstance(ids, (list, tuple)) else {ids}
    total = sum(p + sum(rs) for p, rs in _PROBE_SHAPE)
    tokens = iter([t for t in range(3, 3 + total + len(special)) if t not in special][:total])
    vocab = getattr(cfg, "vocab_size", None) or total + 3
    take = lambda n: [next(tokens) % vocab for _ in range(n)]  # noqa: E731
    return [(take(p), [take(n) for n in rs]) for p, rs in _PROBE_SHAPE]


def _own_forward(model: torch.nn.Module, prompt: Sequence[int], response: Sequence[int], kind: str,
                 device: torch.device) -> float:
    """The model's own forward of one sequence: its summed response log-probs, or its reward."""
    out = model(input_ids=torch.tensor([[*prompt, *response]], device=device)).logits[0].float()
    if kind == "reward":
        return float(out[0])
    logp = out.log_softmax(-1)
    p = len(prompt)
    return sum(float(logp[p + j - 1, t]) for j, t in enumerate(response) if p + j >= 1)
