"""DPO implicit rewards and the reward gap (Qi, Xu, Jin 2025): the one definition of both."""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")

DEFAULT_BETA = 0.1


def implicit_reward(policy_logp: T, ref_logp: T, beta: float = DEFAULT_BETA) -> T:
    """r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)), log-probs summed over response tokens."""
    return beta * (policy_logp - ref_logp)  # type: ignore[operator]


def reward_gap(
    chosen_logp: T, rejected_logp: T, chosen_ref_logp: T, rejected_ref_logp: T, beta: float = DEFAULT_BETA
) -> tuple[T, T, T]:
    """(chosen_reward, rejected_reward, gap = chosen_reward - rejected_reward).

    Works on floats, numpy arrays and tensors alike. Small or negative gaps are hard pairs.
    """
    cr = implicit_reward(chosen_logp, chosen_ref_logp, beta)
    rr = implicit_reward(rejected_logp, rejected_ref_logp, beta)
    return cr, rr, cr - rr  # type: ignore[operator]
