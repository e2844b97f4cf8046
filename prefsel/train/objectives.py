"""The training objectives on one micro-batch: collation + the loss functions of prefsel.losses.

Pure torch (no Ray, no DeepSpeed). Policy log-probs come from prefsel.logprobs.batch_logprobs
(THE log-prob function) through :class:`LogpModule`, rewards from prefsel.logprobs.batch_rewards
through :class:`RewardModule`, so DeepSpeed / DDP wrap a module whose forward is exactly the
scorer's (or the annotator's) computation. A micro-batch is one TokenBatch (prefsel.packing):
each row's responses are one group, by default packed with the prompt run once, and gradients
flow through the packed forward. The formulas live in prefsel.losses only.

Each objective returns (loss, stats): `loss` is the mean over the micro-batch (a scalar with
gradient); `stats` holds SUMS (and counts) so micro-batches and ranks can be aggregated exactly:

    n         examples (pairs / prompts)
    loss      sum of per-example losses (SFT: of per-token NLLs)
    loss_n    what `loss` sums over: examples (SFT: response tokens); logged loss = loss / loss_n
    acc, acc_n  correct comparisons and number of comparisons (reward accuracy = acc / acc_n)
    chosen, rejected, margin   sums of chosen reward, rejected reward, chosen - rejected
    tokens    non-pad tokens forwarded through the policy
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from prefsel.logprobs import batch_logprobs, batch_rewards
from prefsel.packing import Layout, TokenBatch, one_batch
from prefsel.losses import (
    bt_loss,
    dpo_loss,
    hps_multi_negative_loss,
    hps_sample_negative,
    hps_sample_negatives_mc,
    hps_select_chosen,
    reward_accuracy,
)

STAT_KEYS = ("n", "loss", "loss_n", "acc", "acc_n", "chosen", "rejected", "margin", "tokens")


class LogpModule(torch.nn.Module):
    """forward(batch: TokenBatch) -> summed response log-probs [S] (float64, differentiable)."""

    def __init__(self, model: torch.nn.Module, chunk_tokens: int = 1024) -> None:
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens

    def forward(self, batch: TokenBatch):
        return batch_logprobs(self.model, batch, chunk_tokens=self.chunk_tokens)


class RewardModule(torch.nn.Module):
    """forward(batch: TokenBatch) -> the sequence classifier's reward [S] (float32, differentiable).

    prefsel.logprobs.batch_rewards (THE reward read, shared with `prefsel annotate`): the head at
    each sequence's last real token, so the reward never depends on which id pads, the padding
    side or the layout; any head name, peft unwrapped.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: TokenBatch):
        return batch_rewards(self.model, batch)


def _stats(**kw) -> dict:
    kw.setdefault("loss_n", kw.get("n", 0.0))  # a mean over examples unless the objective says otherwise
    return {k: float(kw.get(k, 0.0)) for k in STAT_KEYS}


def _batch(rows, slots, pad_id: int, layout: Layout, device) -> TokenBatch:
    """One TokenBatch: row i's responses `slots[i]` (indices into its response_ids), one group per row."""
    groups = [(rows[i]["prompt_ids"], [rows[i]["response_ids"][j] for j in s]) for i, s in enumerate(slots)]
    return one_batch(groups, pad_id, layout, device)


def _ref_logps(rows, slots, ref_model, batch: TokenBatch) -> torch.Tensor:
    """Reference log-probs of the slotted responses, in batch order: precomputed, or online on
    the policy's own batch."""
    if ref_model is None:
        vals = [rows[i]["ref_logps"][j] for i, s in enumerate(slots) for j in s]
        return torch.tensor(vals, dtype=torch.float64, device=batch.input_ids.device)
    with torch.no_grad():
        return batch.in_order(batch_logprobs(ref_model, batch)).detach()


def pair_objective(
    rows: Sequence[dict],
    pairs: Sequence[tuple[int, int]],
    policy: Callable,
    ref_model: torch.nn.Module | None,
    pad_id: int,
    *,
    beta: float,
    loss_type: str,
    label_smoothing: float,
    layout: Layout = Layout(),
    device=None,
):
    """DPO-family loss on (chosen, rejected) response indices per row (DPO, HPS sample mode).

    One forward: each row's chosen and rejected as one group (prompt shared by default).
    """
    b = len(rows)
    slots = [list(p) for p in pairs]
    batch = _batch(rows, slots, pad_id, layout, device)
    pol = batch.in_order(policy(batch)).view(b, 2)
    ref = _ref_logps(rows, slots, ref_model, batch).to(pol.device).view(b, 2)
    tokens = batch.stats.tokens
    out = dpo_loss(
        pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1],  # float64 sums: dpo_loss subtracts them in float64
        beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
    )
    loss = out.losses.mean().float()  # the loop and DeepSpeed get float32, as from every objective
    cr, rr = out.chosen_rewards, out.rejected_rewards
    stats = _stats(
        n=b, loss=out.losses.detach().sum(), acc=reward_accuracy(cr, rr) * b, acc_n=b,
        chosen=cr.sum(), rejected=rr.sum(), margin=(cr - rr).sum(), tokens=tokens,
    )
    return loss, stats


def dpo_objective(rows, policy, ref_model, pad_id, *, beta, loss_type, label_smoothing, layout: Layout = Layout(),
                  device=None):
    return pair_objective(rows, [(0, 1)] * len(rows), policy, ref_model, pad_id, beta=beta,
                          loss_type=loss_type, label_smoothing=label_smoothing, layout=layout, device=device)


def hps_sample_pairs(rows: Sequence[dict], gamma: float, rngs: Sequence[np.random.Generator]) -> list[tuple[int, int]]:
    """HPS public-code sampler per row: chosen = argmax reward, rejected ~ exp(gamma * r)."""
    return [hps_sample_negative(r["rewards"], gamma, rng) for r, rng in zip(rows, rngs)]


def hps_multi_objective(
    rows: Sequence[dict],
    policy: Callable,
    ref_model: torch.nn.Module | None,
    pad_id: int,
    *,
    beta: float,
    gamma: float,
    loss_type: str,
    label_smoothing: float,
    scale_by_n_minus_1: bool = True,
    negatives: int | None = None,
    rngs: Sequence[np.random.Generator] | None = None,
    layout: Layout = Layout(),
    device=None,
):
    """HPS paper loss over all n-1 negatives (or a Monte Carlo subset of `negatives` of them).

    Per row, slot 0 is the chosen (argmax reward) response and slots 1.. its negatives; rows
    with fewer responses are masked. With the MC subset, the (n-1) factor uses the row's full
    negative count (hps_sample_negatives_mc's documented estimator).
    """
    slots, counts = [], []
    for k, r in enumerate(rows):
        c = hps_select_chosen(r["rewards"])
        n = len(r["rewards"])
        if negatives is not None and negatives < n - 1:
            negs = hps_sample_negatives_mc(r["rewards"], c, negatives, rngs[k])
        else:
            negs = [j for j in range(n) if j != c]
        slots.append([c, *negs])
        counts.append(n - 1)
    width = max(len(s) for s in slots)
    batch = _batch(rows, slots, pad_id, layout, device)
    pol = batch.in_order(policy(batch))
    ref = _ref_logps(rows, slots, ref_model, batch).to(pol.device)
    tokens = batch.stats.tokens
    b = len(rows)
    dev = pol.device
    pol_m = torch.zeros(b, width, dtype=torch.float64, device=dev)
    ref_m = torch.zeros(b, width, dtype=torch.float64, device=dev)
    rm_m = torch.zeros(b, width, dtype=torch.float64, device=dev)
    mask = torch.zeros(b, width, dtype=torch.bool, device=dev)
    rows_idx, cols_idx = [], []
    for i, s in enumerate(slots):
        for k, j in enumerate(s):
            rows_idx.append(i)
            cols_idx.append(k)
            rm_m[i, k] = float(rows[i]["rewards"][j])
    ri = torch.tensor(rows_idx, device=dev)
    ci = torch.tensor(cols_idx, device=dev)
    pol_m = pol_m.index_put((ri, ci), pol.double())  # log-ratios of long sums in float64, as dpo_loss
    ref_m = ref_m.index_put((ri, ci), ref.double())
    mask[ri, ci] = True
    losses = hps_multi_negative_loss(
        pol_m, ref_m, rm_m, torch.zeros(b, dtype=torch.long, device=dev), beta=beta, gamma=gamma,
        scale_by_n_minus_1=scale_by_n_minus_1, mask=mask, loss_type=loss_type,
        label_smoothing=label_smoothing,
        num_negatives=torch.tensor(counts, device=dev) if negatives is not None else None,
    )
    with torch.no_grad():
        r = beta * (pol_m - ref_m)
        r_w = r[:, 0]
        neg = mask.clone()
        neg[:, 0] = False
        n_neg = neg.sum(-1)
        rej_mean = torch.where(neg, r, torch.zeros_like(r)).sum(-1) / n_neg
        correct = ((r_w[:, None] > r) & neg).sum()
    stats = _stats(
        n=b, loss=losses.detach().sum(), acc=correct, acc_n=n_neg.sum(), chosen=r_w.sum(),
        rejected=rej_mean.sum(), margin=(r_w - rej_mean).sum(), tokens=tokens,
    )
    return losses.mean().float(), stats


def rm_objective(rows, reward_fn: Callable, pad_id: int, *, center_coef: float = 0.0,
                 use_margin: bool = False, layout: Layout = Layout(), device=None):
    """Bradley-Terry loss: -logsigmoid(r_w - r_l - margin) (+ centering); rows are pairs."""
    b = len(rows)
    batch = _batch(rows, [[0, 1]] * b, pad_id, layout, device)
    rewards = batch.in_order(reward_fn(batch)).view(b, 2)
    rc, rr = rewards[:, 0], rewards[:, 1]
    margin = None
    if use_margin:
        margin = torch.tensor([r["margin"] for r in rows], dtype=rc.dtype, device=rc.device)
    losses = bt_loss(rc, rr, margin=margin, center_coef=center_coef)
    rcd, rrd = rc.detach(), rr.detach()
    stats = _stats(
        n=b, loss=losses.detach().sum(), acc=reward_accuracy(rcd, rrd) * b, acc_n=b,
        chosen=rcd.sum(), rejected=rrd.sum(), margin=(rcd - rrd).sum(), tokens=batch.stats.tokens,
    )
    return losses.mean(), stats


def chosen_tokens(rows: Sequence[dict]) -> int:
    """The response tokens the SFT loss averages over: those of each row's chosen response."""
    return sum(len(r["response_ids"][0]) for r in rows)


def sft_objective(rows, policy: Callable, pad_id: int, *, tokens: float | None = None,
                  layout: Layout = Layout(), device=None):
    """Supervised fine-tuning on the chosen response (response_ids[0]) of each row.

    loss = -(sum of the chosen-response token log-probs of `rows`) / tokens. `tokens` defaults
    to the micro-batch's own chosen-response tokens (its token-weighted mean NLL); the trainer
    passes its step's share instead (loop.Objective.sft_tokens), so that a step trains on the
    token-weighted mean NLL of its whole global batch whatever the micro-batch size and the
    number of workers. Stats: `loss` sums the token NLLs over `loss_n` tokens (the logged loss
    is the token-weighted mean); `chosen` sums each row's mean log-prob per token; acc/acc_n stay 0.
    """
    b = len(rows)
    batch = _batch(rows, [[0]] * b, pad_id, layout, device)
    logp = batch.in_order(policy(batch))  # [B] summed response log-probs
    own = chosen_tokens(rows)
    loss = -(logp.sum() / (max(own, 1) if tokens is None else tokens))
    ntok = torch.tensor([len(r["response_ids"][0]) for r in rows], dtype=logp.dtype, device=logp.device).clamp(min=1)
    per_tok = (logp.detach() / ntok).float()
    stats = _stats(n=b, loss=-logp.detach().sum(), loss_n=own, acc=0.0, acc_n=0.0, chosen=per_tok.sum(),
                   tokens=batch.stats.tokens)
    return loss.float(), stats


def finish_stats(total: dict) -> dict:
    """Sums -> the logged means."""
    n = max(total.get("n", 0.0), 1.0)
    return {
        "loss": total["loss"] / max(total["loss_n"], 1.0),
        "reward_accuracy": total["acc"] / max(total["acc_n"], 1.0),
        "chosen_reward": total["chosen"] / n,
        "rejected_reward": total["rejected"] / n,
        "margin": total["margin"] / n,
        "examples": total["n"],
        "tokens": total["tokens"],
    }
