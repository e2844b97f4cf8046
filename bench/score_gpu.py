"""GPU benchmark of pair scoring: the published loop re-created vs prefsel's layouts (issue: GPU).

Random-initialised Llama-architecture policy and reference shaped like Llama-3.2-1B (hidden
2048, 16 layers, FFN 8192, 32 heads, 8 KV heads) or Llama-3.1-8B (4096, 32, 14336, 32, 8),
vocabulary 128256, no downloads, both on one GPU, bf16 weights, float32 log-softmax. Synthetic
pairs with random ids: prompt uniform in [50, 450), chosen and rejected each in [100, 600).

Rows:
  - published loop (re-created): fp16, batches of 8 pairs in data order, right padding, NO
    attention mask, full-vocabulary log-softmax, one pass per column (chosen, rejected) and
    per model: 4 forwards per batch (Qi, Xu, Jin 2025, src/data_select.py);
  - prefsel padded (two-pass), packed, packed + shared prompt (prefsel.packing), for each
    attention backend given (sdpa; flex_attention, compiled by transformers).
Columns: pairs/s, tokens/s (logical tokens of the 4 sequences a pair costs the published loop,
the same numerator for every row), MFU = 2 x non-embedding parameters x tokens (prompt counted
once per pair, per model) / seconds / the card's bf16 matmul rate measured in the same run,
peak GiB, and max |gap - gap of the padded bf16 row|; the compute limit in pairs/s at the measured
rate. `--exactness`: the bf16 engine against the same weights in float32 (TF32 off): max and
median gap error, overlap of the two smallest-10% selections (`--exactness-pairs N`: over the
first N pairs). `--profile TXT`: torch.profiler's operator table of one packed + shared call
(where the time goes when a target is missed).

    python bench/score_gpu.py --shape 1b --pairs 512 --exactness --exactness-pairs 256 --profile prof.txt  # GPU
    python bench/score_gpu.py --shape 8b --pairs 192 --attn sdpa flex_attention
    python bench/score_gpu.py --tiny                             # CPU smoke run (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _layouts import LAYOUTS, make_groups, sync  # noqa: E402
from _shapes import SHAPES, build_shape, lengths_for, non_embedding_params  # noqa: E402

from prefsel.logprobs import batch_logprobs, map_groups  # noqa: E402
from prefsel.packing import ForwardStats, Layout, layout_for  # noqa: E402

def matmul_rate(device: str, dtype: torch.dtype, n: int = 8192) -> float:
    """Measured dense matmul FLOP/s of this device and dtype (the MFU denominator)."""
    if torch.device(device).type != "cuda":
        n = 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 20 if torch.device(device).type == "cuda" else 3
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


@torch.inference_mode()
def published_loop(models, groups, device, dtype, batch_size: int = 8) -> list[float]:
    """The published script's arithmetic: per batch, per column, per model, one padded forward
    without an attention mask; the sum runs over every position after the prompt, pads included."""
    gaps = []
    for i in range(0, len(groups), batch_size):
        batch = groups[i : i + batch_size]
        col_logps = []
        for col in (0, 1):
            seqs = [p + rs[col] for p, rs in batch]
            width = max(len(s) for s in seqs)
            ids = torch.zeros(len(seqs), width, dtype=torch.long)
            for k, s in enumerate(seqs):
                ids[k, : len(s)] = torch.tensor(s)
            ids = ids.to(device)
            per_model = []
            for m in models:
                logp = m(input_ids=ids).logits.to(dtype).log_softmax(-1)
                tok = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
                mask = torch.zeros_like(tok)
                for k, (p, _) in enumerate(batch):
                    mask[k, len(p) - 1 :] = 1
                per_model.append((tok * mask).sum(-1).float().tolist())
            col_logps.append(per_model)
        (pc, rc), (pr, rr) = col_logps
        gaps += [0.1 * ((a - b) - (c - d)) for a, b, c, d in zip(pc, rc, pr, rr)]
    return gaps


def gaps_of(values, n) -> list[float]:
    pol, ref = values
    return [0.1 * ((pol[2 * k] - ref[2 * k]) - (pol[2 * k + 1] - ref[2 * k + 1])) for k in range(n)]


def run_engine(models, groups, layout: Layout, device: str) -> list[float]:
    """Gaps (beta 0.1) of prefsel's engine: map_groups over policy and reference, one layout."""
    with torch.inference_mode():
        values = map_groups([lambda b, m=m: batch_logprobs(m, b) for m in models], groups, 0,
                            layout_for(models, layout), device=device, stats=ForwardStats())
    return gaps_of(values, len(groups))


def selection_agreement(gaps: list[float], exact: list[float], ratio: float = 0.1) -> dict:
    """max / median |gap - exact| and the overlap of the two smallest-`ratio` selections."""
    err = sorted(abs(a - b) for a, b in zip(gaps, exact))
    k = max(1, int(len(gaps) * ratio))
    pick = set(sorted(range(len(gaps)), key=gaps.__getitem__)[:k])
    want = set(sorted(range(len(exact)), key=exact.__getitem__)[:k])
    return {"max_err": err[-1], "median_err": err[len(err) // 2], "k": k, "overlap": len(pick & want),
            "gap_spread": max(exact) - min(exact)}


def profile_table(models, groups, layout: Layout, device: str, rows: int = 25, trace: str | None = None) -> str:
    """torch.profiler over one engine call: the operators that take the time, device time first."""
    from torch.profiler import ProfilerActivity, profile

    run_engine(models, groups[:8], layout, device)  # warm (compilation, autotuning) outside the trace
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        run_engine(models, groups, layout, device)
        sync(device)
    if trace:
        prof.export_chrome_trace(trace)
    averages = prof.key_averages()
    for key in (("self_device_time_total", "self_cuda_time_total") if device == "cuda" else ("self_cpu_time_total",)):
        try:
            return averages.table(sort_by=key, row_limit=rows)
        except (AttributeError, KeyError, ValueError):
            continue
    return averages.table(row_limit=rows)


def peak_gib(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=["1b", "8b"], default="1b")
    ap.add_argument("--pairs", type=int, default=512)
    ap.add_argument("--attn", nargs="+", default=["sdpa", "flex_attention"], choices=["sdpa", "eager", "flex_attention"])
    ap.add_argument("--max-tokens", type=int, default=32768, help="prefsel token slots per forward")
    ap.add_argument("--repeats", type=int, default=1,
                    help="timed calls per row (the best counts), after one untimed warm-up call")
    ap.add_argument("--no-published", action="store_true", help="skip the published loop row")
    ap.add_argument("--exactness", action="store_true",
                    help="also score with the same weights in float32 (TF32 off): gap errors of the bf16 "
                         "engine and the overlap of the two smallest-10%% selections")
    ap.add_argument("--exactness-pairs", type=int, default=None, metavar="N",
                    help="score only the first N pairs in float32 for --exactness (default: all; float32 "
                         "without TF32 runs on the GPU's non-tensor-core units, far below the bf16 rate)")
    ap.add_argument("--profile", metavar="TXT", help="write a torch.profiler table of one packed + shared "
                                                      "call (first --attn) here")
    ap.add_argument("--trace", metavar="JSON", help="with --profile: also a Chrome trace")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: a 2-layer model, 8 pairs, fp32")
    ap.add_argument("--json", metavar="OUT")
    args = ap.parse_args(argv)
    shape = "tiny" if args.tiny else args.shape
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    n = 16 if args.tiny else args.pairs
    vocab = SHAPES[shape][-1]
    prompt_len, response_len = lengths_for(shape)
    groups = make_groups(n, 2, prompt_len, response_len, vocab, seed=0)
    prompt_tokens = sum(len(p) for p, _ in groups)
    response_tokens = sum(len(r) for _, rs in groups for r in rs)
    logical = 2 * sum(len(p) + len(r) for p, rs in groups for r in rs)  # both models, prompt per sequence
    flops_tokens = 2 * (prompt_tokens + response_tokens)  # both models, prompt once per pair
    rate = matmul_rate(device, dtype)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"device {name}, torch {torch.__version__}, shape {shape} {SHAPES[shape]}, {n} pairs, "
          f"dtype {dtype}, measured matmul rate {rate / 1e12:.1f} TFLOP/s", flush=True)
    rows, base, result = [], None, {"device": name, "shape": shape, "pairs": n, "matmul_flops": rate,
                                    "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
    params = 0
    bf16_gaps = None

    def save(complete: bool) -> None:
        """The table so far, into --json after every row: a run cut short by its time limit keeps
        what it measured (`complete` says whether it ran to the end)."""
        limit = rate * n / (2 * params * flops_tokens)
        lines = [f"{name}, {time.strftime('%Y-%m-%d')}, shape {shape}, {n} pairs, {dtype}; compute limit at the "
                 f"measured {rate / 1e12:.3g} TFLOP/s: {limit:.1f} pairs/s"
                 + ("" if complete else " (cut short: the rows measured before the time limit)"), "",
                 "| row | pairs/s | tokens/s | MFU | peak GiB | max gap diff vs first row |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['row']} | {r['pairs_per_s']} | {r['tokens_per_s']} | {r['mfu']:.1%} | {r['peak_gib']} | "
                  f"{r['max_gap_diff']:.2e} |" for r in rows]
        if "exactness" in result:
            e = result["exactness"]
            lines += ["", f"bf16 engine vs float32 (same weights, TF32 off), {e['engine']}, {e['pairs']} pairs: "
                          f"max |gap error| "
                          f"{e['max_err']:.2e}, median {e['median_err']:.2e} (gap spread {e['gap_spread']:.2f}); "
                          f"smallest-10% selections overlap {e['overlap']}/{e['k']}"]
        result.update(rows=rows, compute_limit_pairs_per_s=limit, complete=complete, table="\n".join(lines))
        if complete:
            print("\n" + result["table"])
        if args.json:
            with open(args.json + ".tmp", "w") as f:
                json.dump(result, f, indent=1)
            os.replace(args.json + ".tmp", args.json)

    def record(label, seconds, gaps, peak):
        nonlocal base
        base = base or gaps
        err = max(abs(a - b) for a, b in zip(gaps, base))
        mfu = 2 * params * flops_tokens / seconds / rate
        rows.append({"row": label, "pairs_per_s": round(n / seconds, 2), "tokens_per_s": round(logical / seconds),
                     "mfu": round(mfu, 3), "peak_gib": round(peak, 2), "max_gap_diff": err, "seconds": round(seconds, 3)})
        print(rows[-1], flush=True)
        save(complete=False)

    for attn in args.attn:
        models = [build_shape(shape, s, dtype, device, attn) for s in (1, 2)]
        params = non_embedding_params(models[0])
        for label, layout in LAYOUTS.items():
            lay = Layout(packing=layout.packing, share_prompt=layout.share_prompt, max_tokens=args.max_tokens)
            # untimed: flex_attention compiles for the shapes it meets (and recompiles with dynamic
            # ones), so it warms up on the timed call's own batches; sdpa only needs its kernels
            # and allocator warm, on a subset (a second full call would eat the 8B step's time limit)
            run_engine(models, groups if attn == "flex_attention" else groups[: max(1, n // 16)], lay, device)
            best, gaps = None, None
            for _ in range(args.repeats):
                reset_peak(device)
                sync(device)
                t0 = time.perf_counter()
                gaps = run_engine(models, groups, lay, device)
                sync(device)
                dt = time.perf_counter() - t0
                best = dt if best is None else min(best, dt)
            record(f"prefsel {label}, {attn}", best, gaps, peak_gib(device))
            if attn == args.attn[0] and lay.shares:  # packed + shared (a padded layout keeps share_prompt set)
                bf16_gaps = gaps
        if args.profile and attn == args.attn[0]:
            table = profile_table(models, groups, Layout(max_tokens=args.max_tokens), device, trace=args.trace)
            with open(args.profile, "w") as f:
                f.write(f"{name}, shape {shape}, {n} pairs, prefsel packed + shared prompt, {attn}\n{table}\n")
            print(table, flush=True)
        if args.exactness and attn == args.attn[0]:
            prev = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = False  # a true float32 reference
            models32 = [m.float() for m in models]  # the same (bf16-valued) weights, float32 compute
            m = min(n, args.exactness_pairs or n)
            gaps32 = run_engine(models32, groups[:m], Layout(max_tokens=args.max_tokens // 2), device)
            torch.backends.cuda.matmul.allow_tf32 = prev
            result["exactness"] = {"engine": f"packed + shared prompt, {attn}", "dtype": str(dtype), "pairs": m,
                                   **selection_agreement(bf16_gaps[:m], gaps32)}
            print("exactness:", result["exactness"], flush=True)
            save(complete=False)
            models = models32  # Module.float() converted them in place: the same modules
            del models32
        if not args.no_published and attn == args.attn[0]:
            models16 = [m.to(torch.float16 if device == "cuda" else dtype) for m in models]
            reset_peak(device)
            sync(device)
            t0 = time.perf_counter()
            gaps = published_loop(models16, groups, device, torch.float16 if device == "cuda" else dtype)
            sync(device)
            record("published loop (re-created), fp16, batch 8", time.perf_counter() - t0, gaps, peak_gib(device))
            del models16
        del models
        if device == "cuda":
            torch.cuda.empty_cache()
    save(complete=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
