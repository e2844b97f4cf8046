"""Preference losses: the DPO family, Bradley-Terry reward loss and HPS (Hard Preference Sampling).

Pure torch/numpy; no Ray. Every loss returns per-example values (shape ``[B]``) so callers choose
the reduction (mean, weighted mean, sum across data-parallel ranks) themselves.

Conventions
-----------
* Log-probs are per-sequence SUMS of the response tokens' log-probabilities.
* Implicit reward: ``r(y) = beta * (log pi(y|x) - log pi_ref(y|x))`` ("reward units").
* ``h = (pc - rc) - (pr - rr)`` is the DPO "logits"; ``beta * h`` is the reward margin.

One implementation per formula: :func:`dpo_family_from_margin` holds every DPO-family objective,
written in reward units, and both :func:`dpo_loss` and :func:`hps_multi_negative_loss` call it.

Deviations from TRL 1.16 ``DPOTrainer`` (on purpose, per the project's spec):

* ``"sigmoid"`` applies cDPO label smoothing (``label_smoothing`` > 0), as TRL < 1.0 did;
  TRL 1.16 ignores ``label_smoothing`` for ``"sigmoid"`` (it moved to ``"robust"``).
  With ``label_smoothing=0`` the two agree.
* ``"ipo"`` uses ``h`` built from whatever log-probs are passed in. TRL 1.16 divides each
  log-ratio by its completion's token count before the IPO square; to reproduce that, pass
  per-token-averaged log-probs.
* ``"exo_pair"`` with ``label_smoothing == 0`` uses eps = 1e-3 (the EXO paper's value, TRL < 1.0
  behaviour); TRL 1.16 raises instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from prefsel.gap import DEFAULT_BETA

__all__ = [
    "DPO_LOSS_TYPES",
    "DPOOutput",
    "dpo_family_from_margin",
    "dpo_loss",
    "bt_loss",
    "reward_accuracy",
    "hps_select_chosen",
    "hps_negative_probs",
    "hps_sample_negative",
    "hps_sample_negatives_mc",
    "gamma_schedule",
    "hps_aggregate_negative",
    "hps_multi_negative_loss",
]

DPO_LOSS_TYPES: tuple[str, ...] = ("sigmoid", "ipo", "hinge", "exo_pair", "nca_pair", "sppo_hard")

# EXO paper's recommended eps; used when label_smoothing is 0 (log(0) would be -inf).
_EXO_DEFAULT_EPS = 1e-3


def _check_loss_type(loss_type: str) -> None:
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(DPO_LOSS_TYPES)}")


def _check_gamma(gamma: float) -> None:
    # a non-finite gamma makes every hardness weight NaN: the sampler would pick by position
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma)):
        raise ValueError(f"gamma must be a finite number, got {gamma!r}")


def _check_beta(beta: float) -> None:
    # ipo / sppo_hard divide by beta, and beta <= 0 flips or kills the objective.
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


# --------------------------------------------------------------------------------------------
# DPO family
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DPOOutput:
    """Result of :func:`dpo_loss`.

    Attributes:
        losses: per-pair loss, shape ``[B]`` (differentiable).
        chosen_rewards: ``beta * (pc - rc)``, detached.
        rejected_rewards: ``beta * (pr - rr)``, detached.
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def dpo_family_from_margin(
    margin: torch.Tensor,
    loss_type: str,
    beta: float,
    label_smoothing: float,
    chosen_reward: torch.Tensor,
    rejected_reward: torch.Tensor,
) -> torch.Tensor:
    """The DPO-family objectives written in reward units; the single home of every formula.

    Args:
        margin: ``m = chosen_reward - rejected_reward`` in reward units (for plain DPO
            ``m = beta * h``). Passed separately so callers can compute it in the most accurate way.
        loss_type: one of :data:`DPO_LOSS_TYPES`.
        beta: KL coefficient (> 0). Only the losses defined on un-scaled log-ratios use it.
        label_smoothing: cDPO flip probability for ``"sigmoid"``; eps for ``"exo_pair"``
            (0 means 1e-3). Ignored by the others.
        chosen_reward: ``r_w = beta * a`` with ``a = pc - rc`` (used by nca_pair, sppo_hard).
        rejected_reward: ``r_l = beta * b`` with ``b = pr - rr`` (used by nca_pair, sppo_hard).

    Returns:
        Per-example loss, same shape as ``margin``:

        ========== =====================================================================
        sigmoid    ``-(1-ls) logsigmoid(m) - ls logsigmoid(-m)``
        hinge      ``relu(1 - m)``
        ipo        ``(m/beta - 1/(2 beta))**2``      (= ``(h - 1/(2 beta))**2``)
        exo_pair   ``sigmoid(m)(logsigmoid(m) - log(1-eps)) + sigmoid(-m)(logsigmoid(-m) - log eps)``
        nca_pair   ``-logsigmoid(r_w) - 0.5 logsigmoid(-r_w) - 0.5 logsigmoid(-r_l)``
        sppo_hard  ``(r_w/beta - 0.5/beta)**2 + (r_l/beta + 0.5/beta)**2``
                   (= ``(a - 0.5/beta)**2 + (b + 0.5/beta)**2``)
        ========== =====================================================================
    """
    _check_loss_type(loss_type)
    _check_beta(beta)
    m = margin
    if loss_type == "sigmoid":
        ls = float(label_smoothing)
        return -F.logsigmoid(m) * (1.0 - ls) - F.logsigmoid(-m) * ls
    if loss_type == "hinge":
        return torch.relu(1.0 - m)
    if loss_type == "ipo":
        # IPO is stated on the raw log-ratio difference h, not on beta*h: undo the scaling.
        return (m / beta - 1.0 / (2.0 * beta)) ** 2
    if loss_type == "exo_pair":
        eps = float(label_smoothing) if label_smoothing != 0 else _EXO_DEFAULT_EPS
        if not 0.0 < eps < 1.0:
            raise ValueError(f"exo_pair needs 0 < label_smoothing < 1, got {label_smoothing!r}")
        return torch.sigmoid(m) * (F.logsigmoid(m) - math.log1p(-eps)) + torch.sigmoid(-m) * (
            F.logsigmoid(-m) - math.log(eps)
        )
    if loss_type == "nca_pair":
        return (
            -F.logsigmoid(chosen_reward)
            - 0.5 * F.logsigmoid(-chosen_reward)
            - 0.5 * F.logsigmoid(-rejected_reward)
        )
    # sppo_hard: squared errors on the raw log-ratios a, b (reward / beta).
    return (chosen_reward / beta - 0.5 / beta) ** 2 + (rejected_reward / beta + 0.5 / beta) ** 2


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = DEFAULT_BETA,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> DPOOutput:
    """Per-pair DPO-family loss from per-sequence summed log-probs (each of shape ``[B]``).

    ``h = (pc - rc) - (pr - rr)``; the objectives are those of :func:`dpo_family_from_margin`
    with margin ``beta * h``, i.e. TRL ``DPOTrainer`` semantics (see module doc for the three
    documented deviations from TRL 1.16).
    """
    _check_loss_type(loss_type)
    _check_beta(beta)
    # log-ratios of sums of ~1000 log-probs cancel most digits: never subtract below float32
    pc, rc, pr, rr = (_at_least_float32(t) for t in
                      (policy_chosen_logps, ref_chosen_logps, policy_rejected_logps, ref_rejected_logps))
    chosen_logratios = pc - rc
    rejected_logratios = pr - rr
    chosen_rewards = beta * chosen_logratios
    rejected_rewards = beta * rejected_logratios
    margin = beta * (chosen_logratios - rejected_logratios)
    losses = dpo_family_from_margin(
        margin, loss_type, beta, label_smoothing, chosen_rewards, rejected_rewards
    )
    return DPOOutput(losses, chosen_rewards.detach(), rejected_rewards.detach())


# --------------------------------------------------------------------------------------------
# Bradley-Terry reward model
# --------------------------------------------------------------------------------------------


def _as_1d(x: torch.Tensor) -> torch.Tensor:
    # Sequence classifiers with one label return [B, 1]; accept it as [B].
    return x.squeeze(-1) if x.ndim == 2 and x.shape[-1] == 1 else x


def bt_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: torch.Tensor | float | None = None,
    center_coef: float = 0.0,
) -> torch.Tensor:
    """Bradley-Terry reward-model loss per pair, shape ``[B]`` (``[B, 1]`` inputs accepted).

    ``-logsigmoid(r_w - r_l - margin) + center_coef * (r_w + r_l)**2``.
    Its mean equals TRL ``RewardTrainer``'s loss with ``center_rewards_coefficient=center_coef``.
    The centering term pins the (otherwise free) reward offset near 0.
    """
    rw, rl = _as_1d(chosen_rewards), _as_1d(rejected_rewards)
    diff = rw - rl
    if margin is not None:
        diff = diff - (_as_1d(margin) if isinstance(margin, torch.Tensor) else margin)
    loss = -F.logsigmoid(diff)
    if center_coef:
        loss = loss + center_coef * (rw + rl) ** 2
    return loss


def reward_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs with ``chosen > rejected`` (ties count as wrong), a 0-dim float tensor."""
    c, r = _as_1d(chosen), _as_1d(rejected)
    return (c > r).to(torch.float32 if not c.is_floating_point() else c.dtype).mean()


# --------------------------------------------------------------------------------------------
# HPS: Hard Preference Sampling (Zou et al., ICML 2025, arXiv 2502.14400)
# --------------------------------------------------------------------------------------------


def _rewards_array(rewards: Sequence[float] | np.ndarray) -> np.ndarray:
    r = np.asarray(rewards, dtype=np.float64).reshape(-1)
    if r.size < 2:
        raise ValueError(f"HPS needs at least 2 responses per prompt, got {r.size}")
    if not np.all(np.isfinite(r)):
        raise ValueError("HPS rewards must all be finite")
    return r


def hps_select_chosen(rewards: Sequence[float] | np.ndarray) -> int:
    """Index of the best response (highest reward); ties go to the lowest index."""
    r = np.asarray(rewards, dtype=np.float64).reshape(-1)
    if r.size == 0:
        raise ValueError("rewards is empty")
    if not np.all(np.isfinite(r)):
        raise ValueError("rewards must all be finite")
    return int(np.argmax(r))  # np.argmax returns the first maximum


def hps_negative_probs(
    rewards: Sequence[float] | np.ndarray, chosen_index: int, gamma: float
) -> np.ndarray:
    """Hardness distribution over negatives: ``P(j) ∝ exp(gamma * r_j)`` for ``j != chosen``.

    Returns float64 probabilities of length n with ``P(chosen) = 0``. gamma > 0 favours hard
    negatives (reward close to the best), gamma < 0 easy ones, gamma = 0 is uniform.
    """
    r = _rewards_array(rewards)
    n = r.size
    if not 0 <= chosen_index < n:
        raise IndexError(f"chosen_index {chosen_index} out of range for {n} responses")
    _check_gamma(gamma)
    with np.errstate(over="ignore"):  # an overflow is the error raised below
        logits = gamma * r
    if not np.all(np.isfinite(logits)):
        raise ValueError(f"gamma * reward overflows (gamma {gamma!r}, largest |reward| {np.abs(r).max():.3g})")
    neg = np.ones(n, dtype=bool)
    neg[chosen_index] = False
    # Subtract the max over the negatives only so exp never overflows and at least one term is 1.
    z = np.where(neg, logits - logits[neg].max(), -np.inf)
    w = np.exp(z)
    return w / w.sum()


def hps_sample_negative(
    rewards: Sequence[float] | np.ndarray, gamma: float, rng: np.random.Generator
) -> tuple[int, int]:
    """HPS public-code sampler: (chosen, rejected) with chosen = argmax and rejected ~ P(j).

    Deterministic given ``rng``'s state (one draw consumed per call).
    """
    r = _rewards_array(rewards)
    chosen = hps_select_chosen(r)
    p = hps_negative_probs(r, chosen, gamma)
    # Inverse-CDF with one uniform draw: stable across numpy versions, unlike rng.choice(p=...).
    u = rng.random()
    rejected = int(np.searchsorted(np.cumsum(p), u * p.sum(), side="right"))
    rejected = min(rejected, r.size - 1)
    if rejected == chosen:  # only reachable through float round-off at the CDF's end
        rejected = int(np.flatnonzero(p > 0)[-1])
    return chosen, rejected


def hps_sample_negatives_mc(
    rewards: Sequence[float] | np.ndarray, chosen_index: int, m: int, rng: np.random.Generator
) -> list[int]:
    """Monte Carlo subset: ``m`` negatives drawn uniformly WITHOUT replacement (sorted indices).

    For K large (the paper's K=100) scoring every response with the policy is costly; score only
    the chosen plus this subset S and give :func:`hps_multi_negative_loss` a mask that keeps
    them. The hardness weights are then ``q`` restricted to S and renormalised,
    ``q_S(j) = exp(gamma r_j) / sum_{k in S} exp(gamma r_k)``, so
    ``sum_{j in S} q_S(j) e^{r_theta(j)}`` is the self-normalised importance-sampling estimate
    of ``E_q[e^{r_theta}]`` (uniform proposal; consistent, biased for finite m). Pass
    ``num_negatives = n - 1`` to keep the paper's (n-1) factor for the full set.
    ``m >= n - 1`` returns every negative.
    """
    r = _rewards_array(rewards)
    n = r.size
    if not 0 <= chosen_index < n:
        raise IndexError(f"chosen_index {chosen_index} out of range for {n} responses")
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    negatives = np.array([j for j in range(n) if j != chosen_index])
    if m >= negatives.size:
        return negatives.tolist()
    picked = rng.choice(negatives, size=m, replace=False)
    return sorted(int(j) for j in picked)


def gamma_schedule(
    step: int, total_steps: int, gamma_start: float = -5.0, gamma_end: float = 5.0
) -> float:
    """Easy-to-hard curriculum: gamma linear in the TRAINING step (not the data position).

    ``step = 0`` gives ``gamma_start``, ``step = total_steps - 1`` gives ``gamma_end``; steps
    outside ``[0, total_steps - 1]`` are clamped; ``total_steps <= 1`` returns ``gamma_end``.
    """
    if total_steps <= 1:
        return float(gamma_end)
    frac = min(max(step / (total_steps - 1), 0.0), 1.0)
    return float(gamma_start + (gamma_end - gamma_start) * frac)


def hps_aggregate_negative(
    rewards_theta: torch.Tensor,
    rm_rewards: torch.Tensor,
    neg_mask: torch.Tensor,
    *,
    gamma: float,
    scale_by_n_minus_1: bool = True,
    num_negatives: torch.Tensor | None = None,
) -> torch.Tensor:
    """``r_neg = log(c * sum_j q_j exp(r_theta_j))`` per row, over ``j`` with ``neg_mask`` True.

    ``q = softmax(gamma * rm_rewards)`` over the row's negatives (no gradient through the RM);
    ``c = num_negatives`` (default: the row's count of negatives) if ``scale_by_n_minus_1`` else 1.
    Computed as ``log c + logsumexp(log q_j + r_theta_j)`` so no exp overflows.
    """
    _check_gamma(gamma)
    if bool((neg_mask.sum(dim=-1) == 0).any()):
        raise ValueError("every row needs at least one valid negative response")
    dt = rewards_theta.dtype
    neg_inf = torch.tensor(float("-inf"), dtype=dt, device=rewards_theta.device)
    # where() (not multiplication) so NaN/inf in padded slots can neither leak nor give NaN grads.
    log_q = torch.log_softmax(
        torch.where(neg_mask, gamma * rm_rewards.detach().to(dt), neg_inf), dim=-1
    )
    r_safe = torch.where(neg_mask, rewards_theta, torch.zeros((), dtype=dt, device=rewards_theta.device))
    r_neg = torch.logsumexp(torch.where(neg_mask, log_q + r_safe, neg_inf), dim=-1)
    if scale_by_n_minus_1:
        c = neg_mask.sum(dim=-1) if num_negatives is None else torch.as_tensor(num_negatives)
        r_neg = r_neg + torch.log(c.to(device=r_neg.device, dtype=dt))
    return r_neg


def hps_multi_negative_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    rm_rewards: torch.Tensor,
    chosen_index: torch.Tensor | Sequence[int],
    *,
    beta: float = 0.25,
    gamma: float = 5.0,
    scale_by_n_minus_1: bool = True,
    mask: torch.Tensor | None = None,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    num_negatives: torch.Tensor | None = None,
) -> torch.Tensor:
    """HPS multi-negative loss per prompt, shape ``[B]``.

    Inputs are ``[B, n]`` (summed log-probs of n responses per prompt, and their RM scores);
    ``chosen_index`` ``[B]`` names the preferred response; ``mask`` ``[B, n]`` (True = present)
    drops padded/absent responses. With ``r_j = beta * (logpi_j - logpi_ref_j)``, negatives
    ``N = {j valid, j != chosen}``, ``q = softmax_{j in N}(gamma * rm_j)`` and
    ``c = |N|`` (= n-1; or ``num_negatives``) if ``scale_by_n_minus_1`` else 1:

        r_neg = log(c * sum_{j in N} q_j e^{r_j})       (logsumexp(log q_j + r_j) + log c)
        L     = dpo_family_from_margin(r_w - r_neg, loss_type, beta, label_smoothing,
                                       chosen_reward=r_w, rejected_reward=r_neg)

    For ``loss_type="sigmoid"`` (and ``label_smoothing=0``) this is exactly the paper's loss
        L = -log( e^{r_w} / (e^{r_w} + (n-1) E_{y~q}[e^{r_theta(y)}]) ) = softplus(r_neg - r_w).
    For the other objectives the aggregated negative ``r_neg`` stands in for the single
    rejected response's reward ``beta*(pr - rr)``: ``beta*h -> r_w - r_neg`` (sigmoid, hinge,
    exo_pair), ``h -> (r_w - r_neg)/beta`` (ipo), ``a -> r_w/beta, b -> r_neg/beta`` (sppo_hard),
    ``rejected_reward -> r_neg`` (nca_pair). With one negative (n=2, q=1, c=1) every type reduces
    to :func:`dpo_loss` on that pair. Differentiable in ``policy_logps``; ``rm_rewards`` is
    treated as constant.
    """
    _check_loss_type(loss_type)
    _check_beta(beta)
    if policy_logps.ndim != 2 or policy_logps.shape != ref_logps.shape or rm_rewards.shape != policy_logps.shape:
        raise ValueError(
            "policy_logps, ref_logps, rm_rewards must share a [B, n] shape; got "
            f"{tuple(policy_logps.shape)}, {tuple(ref_logps.shape)}, {tuple(rm_rewards.shape)}"
        )
    bsz, n = policy_logps.shape
    dev = policy_logps.device
    idx = torch.as_tensor(chosen_index, dtype=torch.long, device=dev).reshape(-1)
    if idx.numel() != bsz:
        raise ValueError(f"chosen_index must have {bsz} entries, got {idx.numel()}")
    if bool(((idx < 0) | (idx >= n)).any()):
        raise IndexError(f"chosen_index out of range for n={n}")
    valid = torch.ones(bsz, n, dtype=torch.bool, device=dev) if mask is None else mask.to(dev, torch.bool)
    if valid.shape != (bsz, n):
        raise ValueError(f"mask must be [B, n] = {(bsz, n)}, got {tuple(valid.shape)}")
    is_chosen = torch.zeros(bsz, n, dtype=torch.bool, device=dev).scatter_(1, idx[:, None], True)
    if not bool(valid[is_chosen].all()):
        raise ValueError("a chosen response is masked out")

    policy_logps = _at_least_float32(policy_logps)
    rewards_theta = beta * (policy_logps - ref_logps.to(policy_logps.dtype))
    r_w = rewards_theta.gather(1, idx[:, None]).squeeze(1)
    r_neg = hps_aggregate_negative(
        rewards_theta,
        rm_rewards,
        valid & ~is_chosen,
        gamma=gamma,
        scale_by_n_minus_1=scale_by_n_minus_1,
        num_negatives=num_negatives,
    )
    return dpo_family_from_margin(r_w - r_neg, loss_type, beta, label_smoothing, r_w, r_neg)
