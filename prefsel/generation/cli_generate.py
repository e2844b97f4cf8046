"""`prefsel generate`: K sampled responses per prompt (vLLM on GPUs via ray.data.llm, or HF)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = p.add_argument_group("data")
    g.add_argument("--prompts", "--data", dest="prompts", required=True,
                   help="prompt file/folder/glob/dataset (JSON lines, Parquet...): `prompt` as text or messages; "
                        "an existing `responses` list is kept and extended")
    g.add_argument("--split", default="train", help="split of a hub / save_to_disk dataset")
    g.add_argument("--chat-template", default="auto", help="auto, none, or a Jinja template file")
    g.add_argument("--max-prompt-length", type=int, default=None, help="reject prompts longer than this (tokens)")
    g.add_argument("--chunk-rows", type=int, default=1024, help="prompts per read chunk / output shard")
    m = p.add_argument_group("model")
    m.add_argument("--model", "--policy", dest="model", required=True, help="policy: local folder or hub name")
    m.add_argument("--tokenizer", default=None, help="tokenizer (default: the model's)")
    m.add_argument("--dtype", default="auto", help="auto, bf16, fp16, fp32")
    m.add_argument("--trust-remote-code", action="store_true")
    s = p.add_argument_group("sampling")
    s.add_argument("--num-samples", "-n", type=int, default=4, help="responses per prompt (HPS: 100)")
    s.add_argument("--temperature", type=float, default=0.9, help="0 = greedy (HPS: 0.9)")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--max-tokens", type=int, default=256, help="max new tokens per response (HPS: 2048)")
    s.add_argument("--seed", type=int, default=0, help="sample k of row r uses a seed derived from (seed, r, k)")
    b = p.add_argument_group("backend")
    b.add_argument("--backend", default="vllm", choices=["vllm", "hf"],
                   help="vllm (GPU, pip install 'prefsel[vllm]') or hf (transformers; CPU or GPU)")
    b.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm: GPUs per engine")
    b.add_argument("--num-replicas", type=int, default=1, help="vllm: engine replicas (data parallel)")
    b.add_argument("--vllm-batch-size", type=int, default=64, help="vllm: requests per Ray Data batch")
    b.add_argument("--max-model-len", type=int, default=None, help="vllm: engine context length")
    b.add_argument("--gpu-memory-utilization", type=float, default=None, help="vllm: fraction of GPU memory")
    b.add_argument("--accelerator-type", default=None, help="vllm: e.g. H100")
    b.add_argument("--num-actors", type=int, default=1, help="hf: generation actors (model replicas)")
    b.add_argument("--gpus-per-actor", type=float, default=0.0, help="hf: GPUs per actor")
    b.add_argument("--cpus-per-actor", type=float, default=1.0, help="hf: CPUs per actor")
    b.add_argument("--max-tokens-per-batch", type=int, default=16384,
                   help="hf: padded tokens (prompt + max_tokens) per generate call")
    b.add_argument("--max-batch-size", type=int, default=64, help="hf: sequences per generate call")
    b.add_argument("--rows-per-actor-call", type=int, default=16, help="hf: prompts handed to an actor at once")
    p.add_argument("--output", required=True, help="output folder or s3:// URI")
    p.add_argument("--overwrite", action="store_true")
    return p


def config(args: argparse.Namespace):
    from prefsel.generation.generate_job import GenerateConfig
    from prefsel.generation.hf_backend import SamplingConfig

    return GenerateConfig(
        prompts=args.prompts, model=args.model, output=args.output, backend=args.backend,
        sampling=SamplingConfig(num_samples=args.num_samples, temperature=args.temperature, top_p=args.top_p,
                                max_tokens=args.max_tokens, seed=args.seed),
        tokenizer=args.tokenizer, chat_template=args.chat_template, max_prompt_length=args.max_prompt_length,
        split=args.split, chunk_rows=args.chunk_rows, num_actors=args.num_actors, gpus_per_actor=args.gpus_per_actor,
        cpus_per_actor=args.cpus_per_actor, dtype=args.dtype, max_tokens_per_batch=args.max_tokens_per_batch,
        max_batch_size=args.max_batch_size, rows_per_actor_call=args.rows_per_actor_call,
        tensor_parallel_size=args.tensor_parallel_size, num_replicas=args.num_replicas,
        vllm_batch_size=args.vllm_batch_size, max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization, accelerator_type=args.accelerator_type,
        trust_remote_code=args.trust_remote_code, overwrite=args.overwrite,
    )


def run(args: argparse.Namespace) -> dict:
    from prefsel.generation.generate_job import run_generate
    from prefsel.summary import print_summary

    try:
        summary = run_generate(config(args))
    except ImportError as e:  # vllm missing: say how to install it
        raise SystemExit(f"prefsel generate: error: {e}")
    print_summary("prefsel generate", summary)
    return summary
