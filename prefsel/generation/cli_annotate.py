"""`prefsel annotate`: score every response of multi-response rows with a reward model."""

from __future__ import annotations

import argparse

from prefsel.flags import (
    add_actor_flags,
    add_data_flags,
    add_layout_flags,
    add_model_flags,
    add_output_flags,
    config_from_args,
)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from prefsel.generation.annotate_job import AnnotateConfig

    add_data_flags(p, AnnotateConfig, data_help="a `prefsel generate` output, or files with `prompt` and `responses`",
                   formats=None)
    add_model_flags(p, AnnotateConfig, roles=("reward_model",))
    add_actor_flags(p, AnnotateConfig)
    add_layout_flags(p.add_argument_group("forward layout"), AnnotateConfig, "", "max_tokens_per_batch")
    add_output_flags(p)
    return p


def config(args: argparse.Namespace):
    from prefsel.generation.annotate_job import AnnotateConfig

    return config_from_args(AnnotateConfig, args)


def run(args: argparse.Namespace) -> dict:
    from prefsel.generation.annotate_job import run_annotate
    from prefsel.summary import print_summary

    summary = run_annotate(config(args))
    print_summary("prefsel annotate", summary)
    return summary
