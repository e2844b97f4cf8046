"""`prefsel annotate`: score every response of multi-response rows with a reward model."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True,
                   help="a `prefsel generate` output, or files with `prompt` and `responses`")
    g.add_argument("--split", default="train")
    g.add_argument("--chat-template", default="auto", help="the RM's template: auto, none, or a Jinja file")
    g.add_argument("--max-length", type=int, default=None,
                   help="max tokens of prompt + response; longer rows are rejected")
    g.add_argument("--chunk-rows", type=int, default=1024, help="rows per read chunk / output shard")
    m = p.add_argument_group("reward model")
    m.add_argument("--reward-model", "--rm", dest="reward_model", required=True,
                   help="AutoModelForSequenceClassification with one output (e.g. from `prefsel train rm`)")
    m.add_argument("--tokenizer", default=None, help="tokenizer (default: the reward model's)")
    m.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32")
    m.add_argument("--attn-implementation", default=None)
    m.add_argument("--trust-remote-code", action="store_true")
    a = p.add_argument_group("actors")
    a.add_argument("--num-actors", type=int, default=1)
    a.add_argument("--gpus-per-actor", type=float, default=0.0)
    a.add_argument("--cpus-per-actor", type=float, default=1.0)
    a.add_argument("--max-tokens-per-batch", type=int, default=16384, help="padded tokens per forward")
    a.add_argument("--rows-per-actor-call", type=int, default=64)
    p.add_argument("--output", required=True, help="output folder or s3:// URI")
    p.add_argument("--overwrite", action="store_true")
    return p


def config(args: argparse.Namespace):
    from prefsel.generation.annotate_job import AnnotateConfig

    return AnnotateConfig(
        data=args.data, reward_model=args.reward_model, output=args.output, tokenizer=args.tokenizer,
        chat_template=args.chat_template, max_length=args.max_length, split=args.split, chunk_rows=args.chunk_rows,
        num_actors=args.num_actors, gpus_per_actor=args.gpus_per_actor, cpus_per_actor=args.cpus_per_actor,
        dtype=args.dtype, max_tokens_per_batch=args.max_tokens_per_batch,
        rows_per_actor_call=args.rows_per_actor_call, attn_implementation=args.attn_implementation,
        trust_remote_code=args.trust_remote_code, overwrite=args.overwrite,
    )


def run(args: argparse.Namespace) -> dict:
    from prefsel.generation.annotate_job import run_annotate
    from prefsel.summary import print_summary

    summary = run_annotate(config(args))
    print_summary("prefsel annotate", summary)
    return summary
