"""`prefsel to-pairs`: annotated multi-response rows -> preference pairs (for DPO and `prefsel select`)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--data", required=True, help="a `prefsel annotate` output, or rows with prompt/responses/rewards")
    p.add_argument("--output", required=True, help="output folder or s3:// URI")
    p.add_argument("--strategy", default="hps", choices=["hps", "best-worst"],
                   help="hps: best vs a negative drawn with P ∝ exp(gamma*r); best-worst: best vs worst")
    p.add_argument("--gamma", type=float, default=1.0, help="hps hardness: > 0 hard negatives, 0 uniform, < 0 easy")
    p.add_argument("--seed", type=int, default=0, help="the draw of row r uses default_rng([seed, r])")
    p.add_argument("--min-reward-gap", type=float, default=None, help="reject pairs whose reward gap is smaller")
    p.add_argument("--split", default="train")
    p.add_argument("--chunk-rows", type=int, default=4096, help="rows per output shard")
    p.add_argument("--overwrite", action="store_true")
    return p


def run(args: argparse.Namespace) -> dict:
    from prefsel.generation.pairs import ToPairsConfig, run_to_pairs
    from prefsel.summary import print_summary

    summary = run_to_pairs(ToPairsConfig(
        data=args.data, output=args.output, strategy=args.strategy, gamma=args.gamma, seed=args.seed,
        min_reward_gap=args.min_reward_gap, split=args.split, chunk_rows=args.chunk_rows, overwrite=args.overwrite,
    ))
    print_summary("prefsel to-pairs", summary)
    return summary
