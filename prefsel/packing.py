"""Sequence layouts for the one forward: padded, packed, and packed with a shared prompt.

The unit of work is a group: one prompt and the responses that follow it (a pair's chosen and
rejected, an HPS row's K samples). Every layout yields a `TokenBatch` whose sequences are the
(prompt, response) concatenations, in group order, and whose hidden states are read at the same
logical positions, so log-probs and rewards agree across layouts to float rounding.

| layout | a forward row holds | a prompt is run | attention |
|---|---|---|---|
| padded (`packing=False`) | one sequence, pads after (or before) it | once per response | transformers' causal mask from a 2D mask |
| packed | several whole sequences, pads only at the row's tail | once per response | block-diagonal causal |
| packed + shared (default) | segments `[prompt, r1, ..., rK]`, several per row | once per segment | a response sees the prompt and itself, not its siblings |

Positions restart at 0 in every segment; a shared prompt's responses all continue from the
prompt's end (positions p, p+1, ...), as they would alone. A response's first token is predicted
from the prompt's last hidden state, which in a shared segment is not the token just before it:
each target therefore carries the flat index of the state that predicts it (`target_index`).

Rows are as wide as the longest segment of their batch and filled first-fit-decreasing, so the
attention work per row never exceeds the padded layout's; a forward holds rows x width <=
`max_tokens` slots (a segment longer than that gets a forward of its own). A shared group too long
for one segment is cut into several, each repeating the prompt. The masks are built from three
per-slot tensors (segment id, branch, position) the way each attention backend needs them: an
additive float [B, 1, W, W] mask for sdpa/eager (a boolean one is silently wrong with eager; no
mask at all lets packed sequences see each other), a FlexAttention BlockMask, or, for
flash_attention_2, no mask and positions that restart (varlen), which cannot share a prompt.
Sliding-window layers get their own mask, the window counted in positions (read from the text
config of composite models: Gemma 3 4B+, Gemma 3n and Gemma 4 load as *ForConditionalGeneration).

Packing needs a model whose only token mixing is attention under that mask, at the distances
position_ids give; `layout_for` keeps the others padded (`unpackable` says why), and checks the
layout once per model against the model's own forward (`logprobs.checked_layout`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

DEFAULT_MAX_TOKENS_PER_BATCH = 16384  # rows x width slots per forward
ATTN_CHOICES = ("auto", "sdpa", "eager", "flex_attention", "flash_attention_2")
# backends for which prefsel builds a mask that keeps packed sequences (and shared prompts) apart
_MASKED = ("sdpa", "eager", "flex_attention")

# one prompt and its responses, token ids
Group = tuple[Sequence[int], Sequence[Sequence[int]]]

# Layer types prefsel's masks steer; any other (linear_attention, hybrid, chunked_attention, ...)
# mixes tokens in a way they do not reach.
_MASKED_LAYER_TYPES = ("full_attention", "sliding_attention")
# ALiBi adds a bias built from slot indices (MPT) or from the 2D mask's running count (Bloom,
# Falcon with alibi=True), never from position_ids: in a packed row a shared prompt's second
# response sees it at the first response's length too far, and Bloom's and Falcon's bias
# builders cannot take a 4D mask at all (an unpacking error).
_ALIBI_TYPES = ("bloom", "mpt")
# Recurrent models whose recurrence takes no attention mask: the state runs through every slot
# of a row, the previous sequence's and pads before it too (RWKV and xLSTM name no layer types).
_UNMASKED_RECURRENT_TYPES = ("rwkv", "xlstm", "recurrent_gemma")


def text_config(config):
    """The config of a model's language part: `get_text_config()` for composite (multimodal)
    configs, whose top level holds no layer types, windows or logit transforms; the config itself
    otherwise, or where several text parts make that ambiguous (MusicGen)."""
    get_text = getattr(config, "get_text_config", None)
    if not callable(get_text):
        return config
    try:
        return get_text()
    except ValueError:
        return config


def unpackable(config) -> str | None:
    """Why packed rows would be wrong for a model with this config, or None: prefsel's masks
    keep a row's sequences apart only where attention under them is the only token mixing and
    positions come from position_ids."""
    cfg = text_config(config)
    kind = getattr(cfg, "model_type", None)
    if kind in _ALIBI_TYPES or getattr(cfg, "alibi", None) is True:
        return f"{kind}: ALiBi biases come from slot indices, not position_ids"
    if kind in _UNMASKED_RECURRENT_TYPES:
        return f"{kind}: a recurrent state runs on through every slot of a row"
    other = sorted(set(getattr(cfg, "layer_types", None) or ()) - set(_MASKED_LAYER_TYPES))
    if other:
        return f"{kind}: layer types {', '.join(other)} are not steered by an attention mask"
    return None


@dataclass(frozen=True)
class Layout:
    """How sequences are laid out for a forward. Defaults: packed, prompts shared."""

    packing: bool = True
    share_prompt: bool = True
    padding_side: str = "right"
    max_tokens: int = DEFAULT_MAX_TOKENS_PER_BATCH
    max_rows: int | None = None  # rows per forward (padded: sequences per forward)
    varlen: bool = False  # one row per forward, as wide as the budget (flash_attention_2)
    # the model's hidden size when its attention is dense (sdpa/eager compute every query-key
    # score of a row, masked or not): a shared segment then takes a response only while that
    # costs less than running the prompt again (see `segments_of`); None: share without limit
    dense_hidden: int | None = None

    def __post_init__(self) -> None:
        if self.padding_side not in ("left", "right"):
            raise ValueError("padding_side: must be 'left' or 'right'")
        if self.max_tokens < 1:
            raise ValueError("max_tokens_per_batch: must be positive")
        if self.max_rows is not None and self.max_rows < 1:
            raise ValueError("max_batch_size: must be positive")

    @property
    def shares(self) -> bool:
        return self.packing and self.share_prompt

    def for_attention(self, attn: str | None, hidden_size: int | None = None) -> Layout:
        """This layout as `attn` can run it: flash_attention_2 packs by positions only (varlen),
        one row per forward, and cannot share a prompt; other unknown backends stay padded;
        dense attention (sdpa, eager) bounds shared segments by their cost for `hidden_size`."""
        if not self.packing or attn is None:
            return self
        if attn in ("sdpa", "eager"):  # several models: the smallest hidden size bounds segments most
            sizes = [h for h in (self.dense_hidden, hidden_size) if h]
            return replace(self, dense_hidden=min(sizes) if sizes else None)
        if attn == "flex_attention":
            return self
        if attn == "flash_attention_2":
            return Layout(packing=True, share_prompt=False, max_tokens=self.max_tokens, varlen=True)
        return self.padded()

    def padded(self, padding_side: str | None = None) -> Layout:
        """The padded layout with this one's budget (and padding side unless given)."""
        return Layout(packing=False, share_prompt=False, padding_side=padding_side or self.padding_side,
                      max_tokens=self.max_tokens, max_rows=self.max_rows)

    def for_config(self, config) -> Layout:
        """This layout as a model with `config` runs it exactly: padded where packing is not
        (`unpackable`), right-padded where pads before a sequence would reach it (a recurrent
        model that takes no mask; pads after a sequence never reach it in a causal model)."""
        if self.packing and unpackable(config) is None:
            return self
        kind = getattr(text_config(config), "model_type", None)
        side = "right" if kind in _UNMASKED_RECURRENT_TYPES else self.padding_side
        return self.padded(side) if self.packing or side != self.padding_side else self


def layout_for(models: Sequence[torch.nn.Module], layout: Layout) -> Layout:
    """`layout` as the models run it exactly: what their configs allow (Layout.for_config),
    their attention backends (Layout.for_attention), then once per model and layout a probe
    against the model's own forward (logprobs.checked_layout), which falls back to the padded
    layout if packing still disagrees with it."""
    from prefsel.logprobs import checked_layout  # logprobs imports this module

    for m in models:
        cfg = text_config(m.config)
        layout = layout.for_config(m.config).for_attention(getattr(cfg, "_attn_implementation", None),
                                                           getattr(cfg, "hidden_size", None))
    for m in models:
        layout = checked_layout(m, layout)
    return layout


def resolve_attn(attn: str | None, device: torch.device | str | None = None) -> str | None:
    """The `attn_implementation` to load models with on `device`. `auto` (and None): transformers'
    default, sdpa where the architecture supports it, else eager (Gemma 2): both exact with
    prefsel's additive masks, on CPU and GPU. flex_attention only on a GPU: transformers compiles
    it, and torch 2.13's CPU compiler fails (a C++ compile error) on some of the batch shapes a
    run meets (seen at the third shape of packed batches), so a CPU job could die mid-run."""
    if attn is None or attn == "auto":
        return None
    if attn not in ATTN_CHOICES:
        raise ValueError(f"attn: must be one of {', '.join(ATTN_CHOICES)}, got {attn!r}")
    if attn == "flex_attention" and device is not None and torch.device(device).type == "cpu":
        raise ValueError("attn: flex_attention needs a GPU (torch compiles it, and its CPU compiler fails on some "
                         "batch shapes); on the CPU use sdpa or auto, which score the same")
    return attn


@dataclass
class ForwardStats:
    """Token accounting of the forwards of one model (every model forwards the same batches).

    tokens: real tokens forwarded; slots: rows x width (tokens + pads); padded_two_pass: the slots
    a padded layout would have used with every (prompt, response) as its own row, batched by the
    same token budget (prefsel's layout before packing, and what the common trainers do).
    """

    sequences: int = 0
    tokens: int = 0
    slots: int = 0
    padded_two_pass: int = 0
    forwards: int = 0

    FIELDS = ("sequences", "tokens", "slots", "padded_two_pass", "forwards")

    def add(self, other: ForwardStats) -> None:
        for f in self.FIELDS:
            setattr(self, f, getattr(self, f) + getattr(other, f))

    def take(self) -> ForwardStats:
        """A copy of the counts so far; this one starts again from zero."""
        out = ForwardStats(**{f: getattr(self, f) for f in self.FIELDS})
        for f in self.FIELDS:
            setattr(self, f, 0)
        return out

    def as_dict(self) -> dict:
        saving = 1.0 - self.slots / self.padded_two_pass if self.padded_two_pass else 0.0
        pad = 1.0 - self.tokens / self.slots if self.slots else 0.0
        return {"sequences": self.sequences, "tokens_forwarded": self.tokens, "slots_forwarded": self.slots,
                "padded_two_pass_tokens": self.padded_two_pass, "saving": round(saving, 4),
                "pad_fraction": round(pad, 4), "forwards": self.forwards}


@dataclass
class TokenBatch:
    """One forward's tensors and where to read its sequences' results.

    input_ids, position_ids, segment, branch: [B, W]; segment is -1 on pads; branch is 0 on a
    segment's shared part and k on its k-th response (when shared), so a slot may attend to an
    earlier slot of its segment whose branch is 0 or its own. target_index / target_ids /
    target_seq: [N] flat index (into B*W) of the state predicting each response token, the token,
    and its sequence; last_index: [S] flat index of each sequence's last token.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segment: torch.Tensor
    branch: torch.Tensor
    padded: bool
    target_index: torch.Tensor
    target_ids: torch.Tensor
    target_seq: torch.Tensor
    last_index: torch.Tensor
    sequence_ids: list[int]
    stats: ForwardStats
    _masks: dict = field(default_factory=dict, repr=False)

    @property
    def num_sequences(self) -> int:
        return len(self.sequence_ids)

    def in_order(self, values: torch.Tensor) -> torch.Tensor:
        """[S] per-sequence values (batch order) -> sequence-id order; differentiable. For a
        batch holding every sequence of its groups (`one_batch`)."""
        order = torch.empty(len(self.sequence_ids), dtype=torch.long)
        order[torch.tensor(self.sequence_ids, dtype=torch.long)] = torch.arange(len(self.sequence_ids))
        return values[order.to(values.device)]

    def attention_mask_2d(self) -> torch.Tensor:
        return (self.segment >= 0).long()

    def attention_mask_for(self, config, dtype: torch.dtype = torch.float32) -> object:
        """The `attention_mask` argument for a backbone with this config whose activations are in
        `dtype`: a 2D mask (padded layout), an additive 4D mask in `dtype` or a BlockMask
        (packed), a dict of them keyed by layer type for models with sliding-window layers, or
        None (flash_attention_2 varlen)."""
        if self.padded:
            return self.attention_mask_2d()
        reason = unpackable(config)
        if reason is not None:
            raise ValueError(f"packed sequences: {reason} (use --no-packing)")
        config = text_config(config)  # the language part's attention, layer types and windows
        attn = getattr(config, "_attn_implementation", None) or "eager"
        if attn == "flash_attention_2":
            if bool((self.branch > 0).any()):
                raise ValueError("flash_attention_2 cannot share a prompt: use --no-share-prompt or --attn sdpa")
            return None
        if attn not in _MASKED:
            raise ValueError(f"packed sequences need sdpa, eager, flex_attention or flash_attention_2; "
                             f"the model runs {attn!r} (use --no-packing)")
        windows = _layer_windows(config)
        made = {}
        for kind, window in windows.items():
            key = (attn, dtype, window)
            if key not in self._masks:
                self._masks[key] = (_block_mask(self, window) if attn == "flex_attention"
                                    else _additive_mask(self, window, dtype))
            made[kind] = self._masks[key]
        return made[None] if None in made else made


def _layer_windows(config) -> dict:
    """{layer type: sliding window or None}; {None: window} for a model with one mask for all layers."""
    types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if types is None:
        if getattr(config, "use_sliding_window", True) is False:
            window = None
        return {None: window}
    return {t: window if t == "sliding_attention" else None for t in set(types)}  # others: `unpackable`


def _allowed(batch: TokenBatch, window: int | None) -> torch.Tensor:
    """[B, W, W] bool: query slot q may attend key slot k."""
    seg, br, pos = batch.segment, batch.branch, batch.position_ids
    w = seg.shape[1]
    idx = torch.arange(w, device=seg.device)
    ok = (seg[:, :, None] == seg[:, None, :]) & (idx[None, None, :] <= idx[None, :, None])
    ok &= (br[:, None, :] == 0) | (br[:, None, :] == br[:, :, None])
    if window is not None:
        ok &= (pos[:, :, None] - pos[:, None, :]) < window
    return ok


def _additive_mask(batch: TokenBatch, window: int | None, dtype: torch.dtype) -> torch.Tensor:
    ok = _allowed(batch, window)
    mask = torch.zeros(ok.shape, dtype=dtype, device=ok.device)
    mask.masked_fill_(~ok, torch.finfo(dtype).min)
    return mask[:, None]


def _block_mask(batch: TokenBatch, window: int | None):
    from torch.nn.attention.flex_attention import create_block_mask

    seg, br, pos = batch.segment, batch.branch, batch.position_ids

    def mask_mod(b, h, q, k):
        ok = (seg[b, q] == seg[b, k]) & (k <= q) & ((br[b, k] == 0) | (br[b, k] == br[b, q]))
        if window is not None:
            ok = ok & ((pos[b, q] - pos[b, k]) < window)
        return ok

    b, w = seg.shape
    return create_block_mask(mask_mod, b, None, w, w, device=seg.device)


# -- planning ---------------------------------------------------------------------------------

# a segment: (prompt, [(sequence id, response), ...]); shared when it holds several responses
Segment = tuple[Sequence[int], list[tuple[int, Sequence[int]]]]


def dense_cost(tokens: int, hidden: int) -> float:
    """Relative forward cost of `tokens` in one dense-attention row: per token, the projections
    and MLP (~12 h^2 multiply-adds a layer) plus scores and values against every key of the row
    (~2 h x tokens), i.e. tokens x (1 + tokens / 6h)."""
    return tokens * (1.0 + tokens / (6.0 * hidden))


def segments_of(groups: Sequence[Group], layout: Layout) -> list[Segment]:
    """Cut groups into segments: one per (prompt, response) unless prompts are shared. A shared
    segment stops growing at the token budget, and, with dense attention, when adding a response
    to it would cost more than running that response with its own copy of the prompt (a
    segment of K responses computes all (p + sum r)^2 scores, most of them masked)."""
    segs: list[Segment] = []
    seq = 0
    h = layout.dense_hidden
    for prompt, responses in groups:
        cur: list[tuple[int, Sequence[int]]] = []
        p = len(prompt)
        used = p
        for r in responses:
            n = len(r)
            too_dear = bool(h) and cur and (dense_cost(used + n, h) - dense_cost(used, h) > dense_cost(p + n, h))
            if cur and (not layout.shares or used + n > layout.max_tokens or too_dear):
                segs.append((prompt, cur))
                cur, used = [], len(prompt)
            cur.append((seq, r))
            used += n
            seq += 1
        if cur:
            segs.append((prompt, cur))
    return segs


def segment_length(seg: Segment) -> int:
    return len(seg[0]) + sum(len(r) for _, r in seg[1])


def plan_rows(lengths: Sequence[int], max_tokens: int, max_rows: int | None, pack: bool,
              varlen: bool = False) -> list[list[list[int]]]:
    """Batches of rows of segment indices. Longest first; a batch's rows are as wide as its
    longest segment and at most `max_tokens // width` (at least one) of them; with `pack`, a row
    takes segments first-fit while they fit its width; `varlen`: one row per batch, as wide as
    the budget. Deterministic for given lengths."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[list[int]]] = []
    while order:
        width = max(lengths[order[0]], max_tokens) if varlen else lengths[order[0]]
        cap = 1 if varlen else max(1, max_tokens // max(width, 1))
        if max_rows is not None:
            cap = min(cap, max_rows)
        rows: list[list[int]] = []
        room: list[int] = []
        left: list[int] = []
        for i in order:
            n = lengths[i]
            slot = next((r for r, free in enumerate(room) if free >= n), None) if pack else None
            if slot is not None:
                rows[slot].append(i)
                room[slot] -= n
            elif len(rows) < cap:
                rows.append([i])
                room.append(width - n)
            else:
                left.append(i)
        batches.append(rows)
        order = left
    return batches


def plan_token_batches(lengths: Sequence[int], max_tokens: int, max_batch_size: int | None = None) -> list[list[int]]:
    """Sequence indices per padded batch (one sequence per row): the padded plan, for callers
    that build their own tensors (generation)."""
    return [[row[0] for row in rows] for rows in plan_rows(lengths, max_tokens, max_batch_size, pack=False)]


def padded_two_pass_slots(lengths: Sequence[int], max_tokens: int, max_rows: int | None) -> int:
    """Slots a padded layout (one sequence per row) uses for these sequence lengths."""
    return sum(len(rows) * lengths[rows[0][0]] for rows in plan_rows(lengths, max_tokens, max_rows, pack=False))


def build_batch(segs: Sequence[Segment], rows: Sequence[Sequence[int]], pad_token_id: int, layout: Layout,
                device: torch.device | str | None = None) -> TokenBatch:
    """The tensors of one forward: `rows` lists indices into `segs`.

    Built as flat Python lists and converted once through numpy: per-piece torch.tensor calls
    cost about 0.3 µs per token, which a GPU scoring a 1B model at full speed would notice."""
    width = max(sum(segment_length(segs[i]) for i in row) for row in rows)
    b = len(rows)
    left = layout.padding_side == "left"
    ids: list[int] = []
    pos: list[int] = []
    seg_t: list[int] = []
    br: list[int] = []
    t_index: list[int] = []
    t_ids: list[int] = []
    t_seq: list[int] = []
    last: list[int] = []
    seq_ids: list[int] = []
    seg_no = 0
    tokens = 0

    def pad(n: int) -> None:
        ids.extend([pad_token_id] * n)
        pos.extend([0] * n)
        seg_t.extend([-1] * n)
        br.extend([0] * n)

    for r, row in enumerate(rows):
        used = sum(segment_length(segs[i]) for i in row)
        tokens += used
        pads = width - used
        if left:
            pad(pads)
        off = pads if left else 0
        base = r * width
        for i in row:
            prompt, responses = segs[i]
            p = len(prompt)
            start = off
            ids += prompt
            pos += range(p)
            seg_t += [seg_no] * p
            br += [0] * p
            off += p
            shared = len(responses) > 1
            for k, (sid, resp) in enumerate(responses):
                n = len(resp)
                local = len(seq_ids)
                seq_ids.append(sid)
                ids += resp
                pos += range(p, p + n)
                seg_t += [seg_no] * n
                br += [k + 1 if shared else 0] * n
                # token j is predicted from the state before it: the previous response token, or
                # for j = 0 the prompt's last token (in a shared segment not the slot before it)
                if n and p:
                    t_index.append(base + start + p - 1)
                    t_ids += resp
                    t_seq += [local] * n
                elif n:  # no prompt: a sequence's first token has no prefix to be predicted from
                    t_ids += resp[1:]
                    t_seq += [local] * (n - 1)
                t_index += range(base + off, base + off + n - 1)
                last_slot = (off + n - 1) if n else (start + p - 1)
                last.append(base + max(last_slot, start))
                off += n
            seg_no += 1
        if not left:
            pad(pads)
    stats = ForwardStats(sequences=len(seq_ids), tokens=tokens, slots=b * width, forwards=1)

    dev = torch.device(device) if device is not None else torch.device("cpu")
    # on CUDA from pinned memory: the copies are asynchronous, so the host goes on to build the next
    # batch while the GPU runs this one (a pageable copy waits for the GPU work queued before it)
    pin = dev.type == "cuda"

    def t(x: list[int], shape: tuple[int, ...] | None = None) -> torch.Tensor:
        out = torch.from_numpy(np.fromiter(x, dtype=np.int64, count=len(x)))
        out = out.view(shape) if shape else out
        return out.pin_memory().to(dev, non_blocking=True) if pin else out.to(dev)

    return TokenBatch(
        input_ids=t(ids, (b, width)), position_ids=t(pos, (b, width)), segment=t(seg_t, (b, width)),
        branch=t(br, (b, width)), padded=not layout.packing,
        target_index=t(t_index), target_ids=t(t_ids), target_seq=t(t_seq), last_index=t(last),
        sequence_ids=seq_ids, stats=stats,
    )


def plan_batches(groups: Sequence[Group], pad_token_id: int, layout: Layout,
                 device: torch.device | str | None = None):
    """Yield the TokenBatches covering every sequence of `groups` (sequence ids number the
    (group, response) pairs in order). The first batch's stats also carry `padded_two_pass`
    for all of them."""
    segs = segments_of(groups, layout)
    lengths = [segment_length(s) for s in segs]
    seq_lengths = [len(p) + len(r) for p, rs in groups for r in rs]
    two_pass = padded_two_pass_slots(seq_lengths, layout.max_tokens, layout.max_rows)
    for n, rows in enumerate(plan_rows(lengths, layout.max_tokens, layout.max_rows, layout.packing, layout.varlen)):
        batch = build_batch(segs, rows, pad_token_id, layout, device)
        if n == 0:
            batch.stats.padded_two_pass = two_pass
        yield batch


def one_batch(groups: Sequence[Group], pad_token_id: int, layout: Layout,
              device: torch.device | str | None = None) -> TokenBatch:
    """All sequences of `groups` in one forward (a training micro-batch): the layout without a
    token budget, rows as wide as the longest segment."""
    total = sum(len(p) + sum(len(r) for r in rs) for p, rs in groups)
    whole = replace(layout, max_tokens=max(total, 1) if layout.varlen else 2**62, max_rows=None)
    (batch,) = plan_batches(groups, pad_token_id, whole, device)
    return batch
