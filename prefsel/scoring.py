"""Pair scoring with a policy and a reference model: token-budget batches, both models, gaps.

Pure torch (no Ray): the Ray Data actor, the Serve deployment and the benchmarks call this.
A pair's score depends only on its own tokens: each pair is one group (prompt, [chosen,
rejected]) laid out by prefsel.packing (by default packed, the prompt run once for both
responses), groups pooled, sorted by length and cut into forwards by a token budget; attention
never crosses sequences and pads are never summed, so batch-mates, batch size, layout and
padding side change nothing (up to float rounding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch

from prefsel.gap import DEFAULT_BETA, reward_gap
from prefsel.logprobs import DEFAULT_CHUNK_TOKENS, batch_logprobs, map_groups
from prefsel.packing import DEFAULT_MAX_TOKENS_PER_BATCH, ForwardStats, Group, Layout, layout_for
from prefsel.tokenization import TokenizedExample

SCORE_COLUMNS = (
    "chosen_logp",
    "rejected_logp",
    "chosen_ref_logp",
    "rejected_ref_logp",
    "chosen_reward",
    "rejected_reward",
    "gap",
    "chosen_tokens",
    "rejected_tokens",
    "prompt_tokens",
)


@dataclass(frozen=True)
class ScoreConfig:
    """How pairs are scored. Defaults follow the selection paper (beta 0.1); sequences packed,
    each pair's prompt run once for both responses (prefsel.packing)."""

    beta: float = DEFAULT_BETA
    max_tokens_per_batch: int = DEFAULT_MAX_TOKENS_PER_BATCH
    max_batch_size: int | None = None
    padding_side: str = "right"
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    packing: bool = True
    share_prompt: bool = True

    def __post_init__(self) -> None:
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise ValueError(f"beta: must be a positive number, got {self.beta}")
        self.layout  # validates the layout fields

    @property
    def layout(self) -> Layout:
        return Layout(packing=self.packing, share_prompt=self.share_prompt, padding_side=self.padding_side,
                      max_tokens=self.max_tokens_per_batch, max_rows=self.max_batch_size)


@torch.inference_mode()
def groups_logprobs(
    models: Sequence[torch.nn.Module],
    groups: Sequence[Group],
    pad_token_id: int,
    config: ScoreConfig,
    device: torch.device | str | None = None,
    stats: ForwardStats | None = None,
) -> list[list[float]]:
    """Summed response log-probs of every (prompt, response) of `groups` under each model, in
    (group, response) order. Every model forwards the same batches. One list per model."""
    fns = [partial(batch_logprobs, m, chunk_tokens=config.chunk_tokens) for m in models]
    return map_groups(fns, groups, pad_token_id, layout_for(models, config.layout), device=device, stats=stats)


# (chosen_logp, rejected_logp, chosen_ref_logp, rejected_ref_logp) of one pair
PairLogprobs = tuple[float, float, float, float]


def score_columns(pair: TokenizedExample, logps: PairLogprobs, beta: float) -> dict:
    """The SCORE_COLUMNS dict of one pair from its four summed log-probs: the one place it is built."""
    chosen, rejected, chosen_ref, rejected_ref = logps
    cr, rr, gap = reward_gap(chosen, rejected, chosen_ref, rejected_ref, beta)
    return {
        "chosen_logp": chosen,
        "rejected_logp": rejected,
        "chosen_ref_logp": chosen_ref,
        "rejected_ref_logp": rejected_ref,
        "chosen_reward": cr,
        "rejected_reward": rr,
        "gap": gap,
        "chosen_tokens": len(pair.chosen_ids),
        "rejected_tokens": len(pair.rejected_ids),
        "prompt_tokens": len(pair.prompt_ids),
    }


class PairScorer:
    """Holds a policy and a reference model and scores tokenized pairs by their reward gap."""

    def __init__(
        self,
        policy: torch.nn.Module,
        reference: torch.nn.Module,
        pad_token_id: int,
        config: ScoreConfig | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.policy = policy.eval()
        self.reference = reference.eval()
        self.pad_token_id = pad_token_id
        self.config = config or ScoreConfig()
        self.device = device
        self.stats = ForwardStats()  # token accounting, per model, since construction

    def logprobs(self, pairs: Sequence[TokenizedExample]) -> list[PairLogprobs]:
        """(chosen_logp, rejected_logp, chosen_ref_logp, rejected_ref_logp) per pair, in input order.

        Independent of beta: callers holding pairs with different betas (the Serve endpoint's
        merged requests) compute these once and build each pair's columns with `score_columns`.
        """
        if not pairs:
            return []
        groups = [(p.prompt_ids, (p.chosen_ids, p.rejected_ids)) for p in pairs]
        pol, ref = groups_logprobs([self.policy, self.reference], groups, self.pad_token_id, self.config,
                                   self.device, self.stats)
        return [(pol[2 * k], pol[2 * k + 1], ref[2 * k], ref[2 * k + 1]) for k in range(len(pairs))]

    def score(self, pairs: Sequence[TokenizedExample], beta: float | None = None) -> list[dict]:
        """One dict of SCORE_COLUMNS per pair, in input order."""
        beta = self.config.beta if beta is None else beta
        return [score_columns(p, lp, beta) for p, lp in zip(pairs, self.logprobs(pairs))]
