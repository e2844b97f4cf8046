"""CPU benchmark: prefsel's pair scoring vs a re-creation of the selection paper's published loop.

What it measures, in one run, on ONE tiny Llama policy/reference pair (built into a temp dir with
`prefsel.tiny.build_tiny_pair`, locally trained byte-level BPE tokenizer, fp32 on CPU) and the
same arithmetic preference pairs (`prefsel.demo_data.make_demo_pairs`):

  (a) prefsel: rows -> `to_example` -> `PairTokenizer.encode` -> `PairScorer.score`
      (token-budget batches, attention mask, pads masked, prompt and response tokenized
      separately and joined as ids, EOS appended to each response).
  (b) "published loop (re-created)": the loop of the released script of Qi, Xu, Jin 2025
      (arXiv 2508.04149, src/data_select.py, `compute_log_probs`): batches of 8 rows in data
      order, the tokenizer's right padding, NO attention mask passed to the model, the
      prompt/response boundary taken from tokenizing the prompt alone, the full text
      tokenizer(prompt + response) as one string, log_softmax over the full logits, gather,
      and a sum over every position after the prompt, pads included (equivalently: labels =
      input_ids with prompt positions set to -100 and pads NOT masked). One pass per column
      (chosen, rejected) and per model (policy, reference): 4 forward passes per batch.
      The original ran fp16 on GPU (`device_map="auto"`); here it runs fp32 on CPU so that both
      methods do the same arithmetic on the same machine.

Both are timed end to end (tokenization included, model loading excluded) with the same
torch thread count, `--repeats` times alternately; the table shows the best run (and the median
wall time: CPU work of other processes on a shared machine only ever adds time, a lot of it to
multi-threaded torch; the load average is printed).
Throughput: pairs/s, and tokens/s where tokens = real (non-pad) tokens of every
prompt+response sequence forwarded, prompt counted once per sequence, counted once per
model (both models forward the same tokens, so the total work is twice that).

Correctness: every pair is re-scored independently in float64 (model.double(), one sequence
at a time, no batching, no padding; prompt tokenized with BOS, response tokenized alone and
joined as ids). Two exact targets come out of the same forward pass:
  - "exact (+EOS)": response tokens plus EOS, the quantity prefsel defines;
  - "exact (no EOS)": the response tokens only, the quantity the published script means to
    compute (it never appends EOS), so its error there is due to its faults alone.
Reported per method: max |gap error|, pairs with |gap error| > 1e-4, median |gap error|, and the
overlap of its top-`ratio` selection (smallest gaps) with the exact one. Also the baseline's
fault counts: pairs whose boundary is off (len(tok(prompt)) differs from where the response's
tokens really begin in tok(prompt + response), i.e. BPE merged across the join) and pairs hit by
padding (not the longest row of their batch of 8 in the chosen or the rejected pass). On the
bundled arithmetic data the boundary fault does not occur (prompts end in "Answer:", responses
start with " <number>", and the byte-level pre-tokenizer splits there), so the count is 0; the
padding fault is the one that shows.

Layouts (`--layouts`, a separate run): prefsel's own forward in its three layouts (padded
two-pass, packed, packed + shared prompt, prefsel.packing) on a realistic length mix (prompt
uniform in [50, 450) tokens, responses in [100, 600)), a model big enough that the forward
dominates (hidden 256, 4 layers, 1024-token vocabulary), policy + reference; and the HPS case
for the annotation reward model: one prompt, 16 responses. One run, so the ratios compare.

    python bench/score_cpu.py --layouts              # about 3 minutes on 2 idle cores

Run (defaults take about 1-2 minutes on 2 otherwise idle CPU cores; with other CPU-heavy
processes on the machine it can take many times longer, and the timings mean little):

    . /work/venv/bin/activate
    python bench/score_cpu.py                        # 2048 pairs, hidden 64, 2 layers, 2 threads
    python bench/score_cpu.py --pairs 512 --repeats 3 --json /tmp/score_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from prefsel.demo_data import make_demo_pairs
from prefsel.formats import to_example
from prefsel.models import load_causal_lm, load_tokenizer
from prefsel.scoring import PairScorer, ScoreConfig
from prefsel.tiny import build_tiny_pair
from prefsel.tokenization import PairTokenizer

# --------------------------------------------------------------------------------------------
# (b) the published loop, re-created
# --------------------------------------------------------------------------------------------


def published_log_probs(model, tokenizer, prompts, responses, batch_size=8, stats=None):
    """Summed response log-probs as the released script computes them (faults included).

    Mirrors `DPODifficultySelector.compute_log_probs`: right padding from the tokenizer, no
    attention mask, boundary from the prompt tokenized alone, and every position after the
    boundary summed, the right-padding pads of shorter rows included.
    """
    log_probs = []
    for i in range(0, len(prompts), batch_size):
        batch_prompts = prompts[i : i + batch_size]
        batch_responses = responses[i : i + batch_size]
        prompt_tokens = tokenizer(batch_prompts, return_tensors="pt", padding=True, truncation=True)
        full_sequences = [p + r for p, r in zip(batch_prompts, batch_responses)]
        full_tokens = tokenizer(full_sequences, return_tensors="pt", padding=True, truncation=True)
        prompt_lengths = prompt_tokens["attention_mask"].sum(dim=1)
        if stats is not None:
            stats["tokens"] += int(full_tokens["attention_mask"].sum())
        with torch.no_grad():
            logits = model(full_tokens["input_ids"]).logits  # no attention_mask: the fault
            for j in range(len(batch_prompts)):
                prompt_len = prompt_lengths[j].item()
                response_tokens = full_tokens["input_ids"][j][prompt_len:]  # pads included
                response_logits = logits[j][prompt_len - 1 : -1]
                log_probs_seq = torch.log_softmax(response_logits, dim=-1)
                token_log_probs = log_probs_seq.gather(1, response_tokens.unsqueeze(1)).squeeze()
                log_probs.append(token_log_probs.sum().item())
    return torch.tensor(log_probs)


def run_published(policy, reference, tokenizer, rows, beta, batch_size=8):
    """Gaps the published way: chosen then rejected column, policy then reference model."""
    prompts = [r["prompt"] for r in rows]
    stats = {"tokens": 0}
    rewards = {}
    for column in ("chosen", "rejected"):
        responses = [r[column] for r in rows]
        pol = published_log_probs(policy, tokenizer, prompts, responses, batch_size, stats)
        ref = published_log_probs(reference, tokenizer, prompts, responses, batch_size, None)
        rewards[column] = beta * (pol - ref)
    gaps = (rewards["chosen"] - rewards["rejected"]).double().numpy()
    return gaps, stats["tokens"]


# --------------------------------------------------------------------------------------------
# (a) prefsel
# --------------------------------------------------------------------------------------------


def run_prefsel(policy, reference, tokenizer, rows, beta, max_tokens):
    """Gaps with prefsel: PairTokenizer then PairScorer (fp32, token-budget batches)."""
    ptok = PairTokenizer(tokenizer)
    encoded = [ptok.encode(to_example(r, "pairs")) for r in rows]
    scorer = PairScorer(
        policy,
        reference,
        tokenizer.pad_token_id,
        ScoreConfig(beta=beta, max_tokens_per_batch=max_tokens, padding_side="right"),
    )
    scores = scorer.score(encoded)
    tokens = sum(2 * len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in encoded)
    return np.array([s["gap"] for s in scores], dtype=np.float64), tokens


# --------------------------------------------------------------------------------------------
# exact float64 reference, written independently of prefsel
# --------------------------------------------------------------------------------------------


@torch.inference_mode()
def exact_logps(model64, tokenizer, prompt, response):
    """(sum over response tokens + EOS, sum over response tokens only), float64, one sequence."""
    p_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]  # BOS + prompt
    r_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([p_ids + r_ids])
    logits = model64(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
    logp = torch.log_softmax(logits[:-1].double(), dim=-1)
    token_lp = logp.gather(1, ids[0, 1:, None]).squeeze(1)[len(p_ids) - 1 :]  # the response's
    with_eos = float(token_lp.sum())
    return with_eos, with_eos - float(token_lp[-1])  # causal: dropping EOS changes nothing before


def run_exact(policy, reference, tokenizer, rows, beta):
    pol64 = copy.deepcopy(policy).double().eval()
    ref64 = copy.deepcopy(reference).double().eval()
    gaps = {"eos": [], "noeos": []}
    for r in rows:
        rew = {}
        for column in ("chosen", "rejected"):
            pe, pn = exact_logps(pol64, tokenizer, r["prompt"], r[column])
            re, rn = exact_logps(ref64, tokenizer, r["prompt"], r[column])
            rew[column] = (beta * (pe - re), beta * (pn - rn))
        gaps["eos"].append(rew["chosen"][0] - rew["rejected"][0])
        gaps["noeos"].append(rew["chosen"][1] - rew["rejected"][1])
    return {k: np.array(v, dtype=np.float64) for k, v in gaps.items()}


# --------------------------------------------------------------------------------------------
# fault counts and comparison helpers
# --------------------------------------------------------------------------------------------


def boundary_off(tokenizer, prompt, response):
    """True when len(tok(prompt)) is not where the response's tokens begin in tok(prompt+response)."""
    n_prompt = len(tokenizer(prompt)["input_ids"])
    enc = tokenizer(prompt + response, return_offsets_mapping=True)
    cut = len(prompt)
    special = set(tokenizer.all_special_ids)
    for k, (tid, (start, end)) in enumerate(zip(enc["input_ids"], enc["offset_mapping"])):
        if tid in special:
            continue
        if end > cut:  # first token that reaches into the response
            return start < cut or k != n_prompt  # merged across the join, or count mismatch
    return True  # response produced no token of its own


def padded_pairs(tokenizer, rows, batch_size=8):
    """Pairs not the longest row of their batch in the chosen or the rejected pass."""
    hit = np.zeros(len(rows), dtype=bool)
    for column in ("chosen", "rejected"):
        lengths = [len(tokenizer(r["prompt"] + r[column])["input_ids"]) for r in rows]
        for i in range(0, len(rows), batch_size):
            width = max(lengths[i : i + batch_size])
            for j in range(i, min(i + batch_size, len(rows))):
                hit[j] |= lengths[j] < width
    return hit


def select_smallest(gaps, k, stable=True):
    """Indices of the k smallest gaps; the published script used np.argsort (not stable)."""
    if stable:
        order = sorted(range(len(gaps)), key=lambda i: (gaps[i], i))
    else:
        order = np.argsort(gaps).tolist()
    return set(order[:k])


def error_stats(gaps, exact, exact_sel, k, tol, stable):
    err = np.abs(gaps - exact)
    return {
        "max_abs_err": float(err.max()),
        "n_err_gt_tol": int((err > tol).sum()),
        "median_abs_err": float(np.median(err)),
        "topk_overlap": len(select_smallest(gaps, k, stable) & exact_sel),
    }


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=2048, help="number of demo pairs (default 2048)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of each method (best shown)")
    ap.add_argument("--hidden", type=int, default=64, help="model hidden size (default 64)")
    ap.add_argument("--layers", type=int, default=2, help="model layers (default 2)")
    ap.add_argument("--intermediate", type=int, default=None, help="MLP size (default 2 x hidden)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for both methods (default 2)")
    ap.add_argument("--max-tokens", type=int, default=16384, help="prefsel token budget per batch")
    ap.add_argument("--batch-size", type=int, default=8, help="published loop batch size (its default 8)")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--ratio", type=float, default=0.1, help="selection fraction (default 0.1)")
    ap.add_argument("--tol", type=float, default=1e-4, help="gap error counted as a difference")
    ap.add_argument("--seed", type=int, default=0, help="seed of the data and the models")
    ap.add_argument("--json", metavar="OUT", help="also write all numbers to this JSON file")
    ap.add_argument("--layouts", action="store_true", help="compare prefsel's forward layouts instead (see above)")
    ap.add_argument("--layout-pairs", type=int, default=48, help="--layouts: pairs (default 48)")
    ap.add_argument("--hps-prompts", type=int, default=6, help="--layouts: HPS prompts of 16 responses (default 6)")
    ap.add_argument("--layout-hidden", type=int, default=256, help="--layouts: hidden size (default 256)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    if args.layouts:
        return run_layouts(args)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    load_start = os.getloadavg()[0]  # other work on the machine makes the timings noisy
    rows = make_demo_pairs(args.pairs, seed=args.seed)
    n = len(rows)
    k = max(1, int(n * args.ratio))

    with tempfile.TemporaryDirectory() as tmp:
        pol_dir, ref_dir = build_tiny_pair(
            tmp,
            seed=args.seed,
            hidden_size=args.hidden,
            num_layers=args.layers,
            intermediate_size=args.intermediate or 2 * args.hidden,
        )
        tokenizer = load_tokenizer(pol_dir)
        policy = load_causal_lm(pol_dir, dtype="float32", device="cpu")
        reference = load_causal_lm(ref_dir, dtype="float32", device="cpu")
    n_params = sum(p.numel() for p in policy.parameters())

    def base():
        return run_published(policy, reference, tokenizer, rows, args.beta, args.batch_size)

    def ours():
        return run_prefsel(policy, reference, tokenizer, rows, args.beta, args.max_tokens)

    # Warm-up on a few rows (allocator, first-call costs), then alternate the timed runs.
    run_published(policy, reference, tokenizer, rows[:16], args.beta, args.batch_size)
    run_prefsel(policy, reference, tokenizer, rows[:16], args.beta, args.max_tokens)
    walls = {"published": [], "prefsel": []}
    results = {}
    for _ in range(args.repeats):
        for name, fn in (("published", base), ("prefsel", ours)):
            t0 = time.perf_counter()
            results[name] = fn()
            walls[name].append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    exact = run_exact(policy, reference, tokenizer, rows, args.beta)
    exact_wall = time.perf_counter() - t0

    # ---- throughput table ----
    perf = {}
    for name in ("published", "prefsel"):
        wall = min(walls[name])  # best run: other work on a shared machine only adds time
        tokens = results[name][1]
        med = statistics.median(walls[name])
        perf[name] = {"wall_s": wall, "median_wall_s": med, "pairs_per_s": n / wall,
                      "tokens_per_s": tokens / wall, "tokens": tokens, "walls": walls[name]}
    b, p = perf["published"], perf["prefsel"]
    print(
        f"prefsel scoring benchmark: {n} demo pairs, tiny Llama (hidden {args.hidden}, {args.layers} layers, "
        f"{n_params / 1e3:.0f}k params, vocab {len(tokenizer)}), fp32 on CPU, {torch.get_num_threads()} "
        f"threads, best of {args.repeats} runs"
    )
    print(
        f"torch {torch.__version__}, python {platform.python_version()}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average {load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end"
    )
    print()
    print(f"{'method':<30} {'pairs/s':>9} {'tokens/s':>10} {'wall s':>8} {'median wall s':>14}")
    for label, m in (("published loop (re-created)", b), ("prefsel", p)):
        print(f"{label:<30} {m['pairs_per_s']:>9.1f} {m['tokens_per_s']:>10.0f} {m['wall_s']:>8.2f} "
              f"{m['median_wall_s']:>14.2f}")
    print(
        f"{'ratio prefsel/baseline':<30} {p['pairs_per_s'] / b['pairs_per_s']:>8.2f}x "
        f"{p['tokens_per_s'] / b['tokens_per_s']:>9.2f}x {p['wall_s'] / b['wall_s']:>7.2f}x "
        f"{p['median_wall_s'] / b['median_wall_s']:>13.2f}x"
    )
    print(
        f"tokens = real (non-pad) prompt+response tokens per model ({b['tokens']} published, "
        f"{p['tokens']} prefsel: +1 EOS per response); published batch {args.batch_size}, "
        f"prefsel budget {args.max_tokens} tokens; the original ran fp16 on GPU"
    )

    # ---- correctness ----
    sel_eos = select_smallest(exact["eos"], k)
    sel_noeos = select_smallest(exact["noeos"], k)
    base_gaps, our_gaps = results["published"][0], results["prefsel"][0]
    corr = {  # the published script ranks with np.argsort (unstable); prefsel by (gap, row)
        "published_vs_exact_noeos": error_stats(base_gaps, exact["noeos"], sel_noeos, k, args.tol, False),
        "published_vs_exact_eos": error_stats(base_gaps, exact["eos"], sel_eos, k, args.tol, False),
        "prefsel_vs_exact_eos": error_stats(our_gaps, exact["eos"], sel_eos, k, args.tol, True),
    }
    print()
    print(f"correctness: gap (beta {args.beta}) vs exact float64 per-pair scores ({exact_wall:.1f} s), "
          f"top {args.ratio:.0%} = {k} smallest gaps")
    print(f"{'method':<30} {'vs exact':<10} {'max|err|':>9} {f'n>{args.tol:g}':>9} {'median|err|':>11} "
          f"{'top-k overlap':>14}")
    labels = {
        "published_vs_exact_noeos": ("published loop (re-created)", "no EOS"),
        "published_vs_exact_eos": ("published loop (re-created)", "+EOS"),
        "prefsel_vs_exact_eos": ("prefsel", "+EOS"),
    }
    for key, (method, target) in labels.items():
        c = corr[key]
        print(f"{method:<30} {target:<10} {c['max_abs_err']:>9.2e} {c['n_err_gt_tol']:>5}/{n:<3} "
              f"{c['median_abs_err']:>11.2e} {c['topk_overlap']:>6}/{k} ({c['topk_overlap'] / k:.0%})")

    off = np.array([boundary_off(tokenizer, r["prompt"], r["chosen"])
                    or boundary_off(tokenizer, r["prompt"], r["rejected"]) for r in rows])
    padded = padded_pairs(tokenizer, rows, args.batch_size)
    print(f"published loop faults: boundary off in {int(off.sum())}/{n} pairs (BPE merge across the "
          f"prompt/response join); padded (pads summed into the score) in {int(padded.sum())}/{n} pairs")
    noeos_err = np.abs(results["published"][0] - exact["noeos"])
    if padded.any() and (~padded).any():
        print(f"  vs exact (no EOS): pairs never padded max |gap error| {noeos_err[~padded].max():.2e}; "
              f"padded pairs median |gap error| {np.median(noeos_err[padded]):.2e}")

    if args.json:
        out = {
            "config": vars(args) | {"n_pairs": n, "k": k, "params": n_params, "vocab": len(tokenizer),
                                    "torch": torch.__version__, "threads": torch.get_num_threads()},
            "throughput": perf,
            "correctness": corr,
            "published_faults": {"boundary_off_pairs": int(off.sum()), "padded_pairs": int(padded.sum())},
            "exact_wall_s": exact_wall,
        }
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def run_layouts(args) -> int:
    """The --layouts tables: pairs under policy + reference, HPS rows under a reward model."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _layouts import make_groups, print_table, time_layouts

    from prefsel.tiny import build_tiny_family

    hidden, layers, vocab = args.layout_hidden, 4, 1024
    load = os.getloadavg()[0]
    kw = dict(hidden_size=hidden, num_layers=layers, init_std=0.02)
    policy = build_tiny_family("llama", vocab, seed=1, **kw)
    reference = build_tiny_family("llama", vocab, seed=2, **kw)
    pairs = make_groups(args.layout_pairs, 2, (50, 450), (100, 600), vocab, seed=args.seed)
    pair_rows = time_layouts([policy, reference], pairs, max_tokens=args.max_tokens, repeats=2)
    rm = build_tiny_family("llama", vocab, seed=3, num_labels=1, **kw)
    hps = make_groups(args.hps_prompts, 16, (50, 450), (100, 600), vocab, seed=args.seed + 1)
    hps_rows = time_layouts([rm], hps, kind="rewards", max_tokens=args.max_tokens, repeats=2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"Llama hidden {hidden} x {layers} layers, vocab {vocab}, fp32, sdpa; token budget {args.max_tokens}; "
          f"load average at start {load:.2f}")
    print_table(f"Pairs: policy + reference, {len(pairs)} pairs, prompt [50, 450), responses [100, 600) tokens", pair_rows)
    print_table(f"HPS: reward model, {len(hps)} prompts x 16 responses", hps_rows, unit="prompts")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"pairs": pair_rows, "hps": hps_rows, "load_average": load}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
