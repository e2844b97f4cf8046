"""`prefsel generate`: K sampled responses per prompt (vLLM on GPUs via ray.data.llm, or HF)."""

from __future__ import annotations

import argparse

from prefsel.flags import (
    add_actor_flags,
    add_data_flags,
    add_model_flags,
    add_output_flags,
    config_from_args,
    default_of,
)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from prefsel.generation.generate_job import BACKENDS, GenerateConfig

    add_data_flags(p, GenerateConfig, data_dest="prompts", data_flags=("--prompts", "--data"), formats=None,
                   data_help="prompt file/folder/glob/dataset (JSON lines, Parquet...): `prompt` as text or messages; "
                             "an existing `responses` list is kept and extended")
    p.add_argument("--max-prompt-length", type=int, default=None, help="reject prompts longer than this (tokens)")
    add_model_flags(p, GenerateConfig, roles=("model",))
    s = p.add_argument_group("sampling")
    d = lambda name: default_of(GenerateConfig, f"sampling.{name}")  # noqa: E731
    s.add_argument("--num-samples", "-n", type=int, default=d("num_samples"), help="responses per prompt (HPS: 100)")
    s.add_argument("--temperature", type=float, default=d("temperature"), help="0 = greedy (HPS: 0.9)")
    s.add_argument("--top-p", type=float, default=d("top_p"))
    s.add_argument("--max-tokens", type=int, default=d("max_tokens"), help="max new tokens per response (HPS: 2048)")
    s.add_argument("--seed", type=int, default=d("seed"), help="sample k of row r uses a seed derived from (seed, r, k)")
    b = p.add_argument_group("backend")
    g = lambda name: default_of(GenerateConfig, name)  # noqa: E731
    b.add_argument("--backend", default=g("backend"), choices=list(BACKENDS),
                   help="vllm (GPU, pip install 'prefsel[vllm]') or hf (transformers; CPU or GPU)")
    b.add_argument("--tensor-parallel-size", type=int, default=g("tensor_parallel_size"), help="vllm: GPUs per engine")
    b.add_argument("--num-replicas", type=int, default=g("num_replicas"), help="vllm: engine replicas (data parallel)")
    b.add_argument("--vllm-batch-size", type=int, default=g("vllm_batch_size"), help="vllm: requests per Ray Data batch")
    b.add_argument("--max-model-len", type=int, default=None, help="vllm: engine context length")
    b.add_argument("--gpu-memory-utilization", type=float, default=None, help="vllm: fraction of GPU memory")
    b.add_argument("--accelerator-type", default=None, help="vllm: e.g. H100")
    b.add_argument("--max-tokens-per-batch", type=int, default=g("max_tokens_per_batch"),
                   help="hf: padded tokens (prompt + max_tokens) per generate call")
    b.add_argument("--max-batch-size", type=int, default=g("max_batch_size"), help="hf: sequences per generate call")
    add_actor_flags(p, GenerateConfig)  # hf backend: the generation actors
    add_output_flags(p)
    return p


def config(args: argparse.Namespace):
    from prefsel.generation.generate_job import GenerateConfig

    return config_from_args(GenerateConfig, args)


def run(args: argparse.Namespace) -> dict:
    from prefsel.generation.generate_job import run_generate
    from prefsel.summary import print_summary

    try:
        summary = run_generate(config(args))
    except ImportError as e:  # vllm missing: say how to install it
        raise SystemExit(f"prefsel generate: error: {e}")
    print_summary("prefsel generate", summary)
    return summary
