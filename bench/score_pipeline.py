"""CPU benchmark of the scoring pipeline (prefsel.jobs on Ray Data) against the bare scorer.

Rows, on the same tiny Llama policy/reference pair and the bundled-style arithmetic pairs
(`prefsel.demo_data.make_demo_pairs`, cycled to the size asked):

  bare scorer, 1 thread   `PairTokenizer.encode` + `PairScorer.score` in this process, one torch
                          thread (what one actor does, without Ray)
  pipeline, 1 actor       `run_score` on a local Ray: read tasks -> 1 actor x 1 CPU -> shards
  pipeline, 2 actors      the same with 2 actors x 1 CPU (target on 2 cores: >= 85% of twice
                          the bare scorer's single-thread pairs/s)

and the driver's peak RSS (ru_maxrss of the process that runs `run_score`, each size in a fresh
subprocess) at two corpus sizes with the same chunk size: it must not grow with the corpus.
The pipeline's pairs/s are given for the whole call (Ray start-up, worker processes, model
loading and the first chunk included: a fixed cost of 15-30 s on this machine) and steady (from
the first written shard to the last, the summary's `steady_rows_per_s`); the bare row excludes
loading. The target is on the steady rate.

    python bench/score_pipeline.py                       # 16k pairs, hidden 128 x 4 layers; RSS at 50k and 200k
    python bench/score_pipeline.py --pairs 4000 --rss-sizes 5000 20000   # quicker
    python bench/score_pipeline.py --hidden 32 --layers 2   # the tests' tiny model: tokenizing costs
                                                           # as much as the forward there

GPU mode (`--shape`, issue item 3: the pipeline's overhead on the GPU, target >= 0.90 of the bare
engine): a random-initialised policy/reference of the shape (bench/_shapes.py: 1b, 8b, or tiny
for a CPU smoke run) saved with save_pretrained, `--pairs` synthetic text pairs of the issue's
lengths (prompt 50-450 tokens, responses 100-600) as JSON lines, then

  bare engine             `PairScorer.score` on the actor's device (cuda when present) with the
                          models loaded as `ScoreActor` loads them and the pipeline's scoring
                          config (layout, token budget, dtype, attention), in calls of
                          --rows-per-actor-call rows in data order, as the actor gets them; rows
                          tokenized beforehand (tokenizing runs in the pipeline's read tasks),
                          model loading and the first call (warm-up) excluded
  pipeline, 1 actor       `run_score` (what `prefsel score --gpus-per-actor 1` runs) in a fresh
                          process: 1 actor x --gpus-per-actor GPUs; pairs/s for the whole call
                          and steady (the summary's steady_rows_per_s)

and the ratio pipeline steady / bare engine, the forwards of both (the same batches: slots and
forward counts must match) and the largest |gap difference| between them.

    python bench/score_pipeline.py --shape 1b --json OUT.json   # on the GPU: 4096 pairs, bf16
    python bench/score_pipeline.py --shape tiny --pairs 256      # CPU smoke run of the same path
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/_shapes.py


def write_pairs(path: Path, n: int) -> Path:
    from prefsel.demo_data import make_demo_pairs

    base = make_demo_pairs(512, seed=0)
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps(base[i % len(base)] | {"i": i}) + "\n")
    return path


def bare(models: tuple[str, str], data: Path, chunk_rows: int) -> dict:
    import torch

    from prefsel.formats import to_example
    from prefsel.models import load_causal_lm, load_tokenizer
    from prefsel.scoring import PairScorer
    from prefsel.tokenization import PairTokenizer

    torch.set_num_threads(1)
    tok = load_tokenizer(models[0])
    scorer = PairScorer(load_causal_lm(models[0], dtype="fp32", device="cpu"),
                        load_causal_lm(models[1], dtype="fp32", device="cpu"), tok.pad_token_id)
    ptok = PairTokenizer(tok)
    rows = [json.loads(line) for line in open(data)]
    t0 = time.perf_counter()
    for s in range(0, len(rows), chunk_rows):
        scorer.score([ptok.encode(to_example(r, "pairs")) for r in rows[s : s + chunk_rows]])
    return {"pairs": len(rows), "wall_s": time.perf_counter() - t0}


def pipeline(models: tuple[str, str], data: Path, out: Path, actors: int, chunk_rows: int,
             job: dict | None = None, scoring: dict | None = None, resources: dict | None = None) -> dict:
    """One run_score in a fresh subprocess (its own local Ray); returns its summary + peak RSS.
    `job`, `scoring`, `resources`: further ScoreJobConfig, ScoreConfig and ActorResources fields."""
    extra = json.dumps({"job": job or {}, "scoring": scoring or {}, "resources": resources or {}})
    code = f"""
import json, resource, time
from prefsel.jobs import ActorResources
from prefsel.scoring import ScoreConfig
from prefsel.score_job import ScoreJobConfig, run_score
x = json.loads({extra!r})
t0 = time.perf_counter()
s = run_score(ScoreJobConfig(policy={models[0]!r}, reference={models[1]!r}, data={str(data)!r}, output={str(out)!r},
                             chunk_rows={chunk_rows}, overwrite=True, scoring=ScoreConfig(**x["scoring"]),
                             resources=ActorResources(**{{"num_actors": {actors}, "cpus_per_actor": 1,
                                                         **x["resources"]}}), **x["job"]))
s["call_s"] = time.perf_counter() - t0
s["driver_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("RESULT" + json.dumps(s))
"""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    line = next((x for x in res.stdout.splitlines() if x.startswith("RESULT")), None)
    if line is None:
        raise RuntimeError(res.stdout[-3000:] + res.stderr[-3000:])
    return json.loads(line[len("RESULT"):])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=None,
                    help="pairs for the throughput rows (default 16000; --shape: 4096, tiny 256)")
    ap.add_argument("--rss-sizes", type=int, nargs=2, default=(50000, 200000), help="corpus sizes for driver RSS")
    ap.add_argument("--chunk-rows", type=int, default=None,
                    help="rows per read chunk / shard (default 1024; --shape: pairs / 8, at most 512)")
    ap.add_argument("--hidden", type=int, default=128, help="model hidden size (the forward should dominate)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--json", metavar="OUT", help="also write the numbers to this JSON file")
    g = ap.add_argument_group("GPU mode (--shape): bare engine vs the pipeline with one GPU actor")
    g.add_argument("--shape", choices=["1b", "8b", "tiny"],
                   help="random Llama-shaped policy/reference (bench/_shapes.py) and the issue's synthetic pairs; "
                        "tiny: the CPU smoke run of this mode")
    g.add_argument("--gpus-per-actor", type=float, default=None, help="default 1 when CUDA is present, else 0")
    g.add_argument("--dtype", default="auto", help="model weights: auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32")
    g.add_argument("--max-tokens-per-batch", type=int, default=None,
                   help="token slots per forward (default: prefsel score's, ScoreConfig)")
    g.add_argument("--rows-per-actor-call", type=int, default=None,
                   help="rows per actor call and per bare call (default: prefsel score's 256, at most chunk rows / 2)")
    g.add_argument("--attn", default="auto", help="attention backend (prefsel score's --attn)")
    g.add_argument("--workdir", help="where models and data go (default: a new temp folder); saved models are reused")
    args = ap.parse_args(argv)
    if args.shape:
        return shape_main(args)
    args.pairs = args.pairs or 16000
    args.chunk_rows = args.chunk_rows or 1024

    from prefsel.tiny import build_tiny_pair

    tmp = Path(tempfile.mkdtemp(prefix="prefsel-bench-pipe-"))
    models = build_tiny_pair(tmp / "models", hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                             num_layers=args.layers)
    data = write_pairs(tmp / "pairs.jsonl", args.pairs)
    print(f"load average at start: {os.getloadavg()[0]:.2f}; {os.cpu_count()} cores; "
          f"model hidden {args.hidden}, {args.layers} layers; {args.pairs} pairs, chunk rows {args.chunk_rows}")
    b = bare(models, data, args.chunk_rows)
    rows = {"bare scorer, 1 thread": (b["pairs"] / b["wall_s"], None, None, None)}
    results = {"bare": b}
    for n in (1, 2):
        s = pipeline(models, data, tmp / f"out{n}", n, args.chunk_rows)
        results[f"pipeline_{n}"] = s
        rows[f"pipeline, {n} actor{'s' if n > 1 else ''}"] = (
            s["rows_scored"] / s["call_s"], s["steady_rows_per_s"], s["startup_s"], s["rows_per_actor"])
    bare_pps = rows["bare scorer, 1 thread"][0]
    print(f"\n{'path':<24}{'pairs/s (whole call)':>21}{'pairs/s (steady)':>18}{'start-up s':>12}"
          f"{'steady vs 2x bare':>19}  rows per actor")
    for name, (call_pps, steady, startup, per_actor) in rows.items():
        ratio = f"{steady / (2 * bare_pps):.2f}" if steady else "-"
        counts = "-" if per_actor is None else " / ".join(str(v) for v in sorted(per_actor.values()))
        print(f"{name:<24}{call_pps:>21.1f}{steady or call_pps:>18.1f}{startup if startup is not None else '-':>12}"
              f"{ratio:>19}  {counts}")
    # Driver memory does not depend on the model: the smallest one keeps these runs short.
    tiny = build_tiny_pair(tmp / "tiny-models")
    print(f"\ndriver peak RSS (chunk rows {args.chunk_rows}, 2 actors, tiny model hidden 32):")
    rss = {}
    for n in args.rss_sizes:
        d = write_pairs(tmp / f"rss{n}.jsonl", n)
        s = pipeline(tiny, d, tmp / f"rss-out{n}", 2, args.chunk_rows)
        rss[n] = s["driver_peak_rss_mb"]
        print(f"  {n:>7} pairs: {rss[n]:7.0f} MB   ({s['steady_rows_per_s']:.0f} pairs/s steady, "
              f"first shard at {s['startup_s']} s of {s['wall_s']:.0f} s)")
    lo, hi = args.rss_sizes
    print(f"  growth {hi} vs {lo}: {100 * (rss[hi] / rss[lo] - 1):+.1f}%")
    print(f"load average at end: {os.getloadavg()[0]:.2f}; peak RSS of this process "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "rss_mb": rss}, indent=2, default=str))
    return 0


# ---- GPU mode (--shape) -----------------------------------------------------------------------------


def bare_engine(cfg) -> tuple[dict, list[float]]:
    """The engine one actor runs, without Ray: models loaded as ScoreActor loads them, on the
    device ModelActor picks, `PairScorer.score` on calls of rows_per_actor_call rows in data
    order. Tokenizing, loading and the first call (warm-up) are timed apart from the rate."""
    from dataclasses import replace

    import torch

    from prefsel.formats import to_example
    from prefsel.models import load_causal_lm, load_tokenizer, resolve_device, resolve_max_length
    from prefsel.scoring import PairScorer

    res = cfg.resources
    device = resolve_device("auto" if res.gpus_per_actor > 0 else "cpu")
    if res.cpus_per_actor >= 1 and res.gpus_per_actor == 0:
        torch.set_num_threads(int(res.cpus_per_actor))
    tok = load_tokenizer(cfg.tokenizer_path)
    max_length = resolve_max_length(cfg.max_length, tok, [cfg.policy, cfg.reference])
    ptok = replace(cfg, max_length=max_length).tokenizer_spec.load(tok)
    with open(cfg.data) as f:
        rows = [json.loads(line) for line in f]
    t0 = time.perf_counter()
    pairs = [ptok.encode(to_example(r, "pairs")) for r in rows]
    tokenize_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    kw = dict(dtype=cfg.dtype, device=str(device), attn_implementation=cfg.attn_implementation)
    policy, reference = load_causal_lm(cfg.policy, **kw), load_causal_lm(cfg.reference, **kw)
    scorer = PairScorer(policy, reference, tok.pad_token_id, cfg.scoring, device)
    load_s = time.perf_counter() - t0
    step = res.rows_per_actor_call
    calls = [pairs[i : i + step] for i in range(0, len(pairs), step)]
    if len(calls) < 2:
        raise SystemExit(f"--pairs {len(pairs)}: needs more than one call of {step} rows (one is the warm-up)")
    cuda = device.type == "cuda"
    t0 = time.perf_counter()
    gaps = [r["gap"] for r in scorer.score(calls[0])]  # warm-up (floats back: the device is done)
    warmup_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for c in calls[1:]:
        gaps += [r["gap"] for r in scorer.score(c)]
    wall = time.perf_counter() - t0
    timed = len(pairs) - len(calls[0])
    out = {"pairs": len(pairs), "timed_pairs": timed, "wall_s": round(wall, 3), "pairs_per_s": round(timed / wall, 2),
           "warmup_s": round(warmup_s, 3), "tokenize_s": round(tokenize_s, 3), "load_s": round(load_s, 2),
           "calls": len(calls), "device": str(device), "dtype": str(next(policy.parameters()).dtype),
           "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
           "forward": scorer.stats.as_dict()}
    del scorer, policy, reference
    if cuda:
        torch.cuda.empty_cache()  # the pipeline's actor gets the GPU to itself
    return out, gaps


def pipeline_gaps(out: Path) -> dict[int, float]:
    import pyarrow.parquet as pq

    gaps = {}
    for f in sorted((out / "scores").rglob("*.parquet")):
        t = pq.read_table(f, columns=["row_id", "gap"])
        gaps.update(zip(t["row_id"].to_pylist(), t["gap"].to_pylist()))
    return gaps


def shape_main(args) -> int:
    import torch

    from _shapes import SHAPES, save_shape_pair, shape_rows
    from prefsel.jobs import ActorResources
    from prefsel.models import resolve_device, resolve_dtype
    from prefsel.score_job import ScoreJobConfig
    from prefsel.scoring import ScoreConfig

    gpus = args.gpus_per_actor if args.gpus_per_actor is not None else (1.0 if torch.cuda.is_available() else 0.0)
    device = resolve_device("auto" if gpus > 0 else "cpu")  # as ModelActor picks it
    dtype = resolve_dtype(args.dtype, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    n = args.pairs or (256 if args.shape == "tiny" else 4096)
    chunk_rows = args.chunk_rows or max(2, min(512, n // 8))
    per_call = args.rows_per_actor_call or max(1, min(ActorResources.rows_per_actor_call, chunk_rows // 2))
    tmp = Path(args.workdir or tempfile.mkdtemp(prefix="prefsel-bench-pipe-"))
    tmp.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    models = save_shape_pair(args.shape, tmp / f"models-{args.shape}-{str(dtype).replace('torch.', '')}", dtype=dtype,
                             device=str(device))
    save_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.empty_cache()
    data = tmp / f"pairs-{args.shape}-{n}.jsonl"
    with open(data, "w") as f:
        for row in shape_rows(n, shape=args.shape):
            f.write(json.dumps(row) + "\n")

    job = {"dtype": args.dtype, "attn_implementation": args.attn}
    scoring = {} if args.max_tokens_per_batch is None else {"max_tokens_per_batch": args.max_tokens_per_batch}
    resources = {"gpus_per_actor": gpus, "rows_per_actor_call": per_call}
    out = tmp / "out"
    cfg = ScoreJobConfig(policy=models[0], reference=models[1], data=str(data), output=str(out), chunk_rows=chunk_rows,
                         scoring=ScoreConfig(**scoring),
                         resources=ActorResources(num_actors=1, cpus_per_actor=1, **resources), **job)
    h, layers, ffn, heads, kv, vocab = SHAPES[args.shape]
    print(f"device {name}; torch {torch.__version__}; shape {args.shape} (hidden {h}, {layers} layers, FFN {ffn}, "
          f"{heads} heads, {kv} KV heads, vocab {vocab}), {str(dtype).replace('torch.', '')}; {n} pairs, chunk rows "
          f"{chunk_rows}, rows per actor call {per_call}, token budget {cfg.scoring.max_tokens_per_batch}, attn "
          f"{args.attn}; 1 actor x {gpus:g} GPU; models saved in {save_s:.1f} s to {tmp}", flush=True)

    b, bare_gaps = bare_engine(cfg)
    print(f"bare engine: {b['pairs_per_s']:.1f} pairs/s over {b['timed_pairs']} pairs ({b['wall_s']:.1f} s)", flush=True)
    s = pipeline(models, data, out, 1, chunk_rows, job=job, scoring=scoring, resources=resources)
    got = pipeline_gaps(out)
    gap_diff = max((abs(got[i] - g) for i, g in enumerate(bare_gaps) if i in got), default=float("nan"))

    call_pps = s["rows_scored"] / s["call_s"]
    steady = s["steady_rows_per_s"]
    ratio = steady / b["pairs_per_s"] if steady else None
    bare_name, pipe_name = "bare engine (PairScorer)", f"pipeline, 1 actor x {gpus:g} GPU"
    print(f"\n{'path':<28}{'pairs/s (whole call)':>21}{'pairs/s (steady)':>18}{'start-up s':>12}{'steady vs bare':>16}")
    print(f"{bare_name:<28}{'-':>21}{b['pairs_per_s']:>18.1f}{'-':>12}{1.0:>16.2f}")
    print(f"{pipe_name:<28}{call_pps:>21.1f}{steady if steady else float('nan'):>18.1f}"
          f"{s['startup_s'] if s['startup_s'] is not None else '-':>12}{ratio if ratio else float('nan'):>16.2f}")
    verdict = "-" if ratio is None else ("met" if ratio >= 0.90 else "NOT met")
    print(f"\npipeline steady / bare engine: {ratio if ratio else float('nan'):.3f} (target >= 0.90: {verdict}); "
          f"whole call / bare: {call_pps / b['pairs_per_s']:.3f} (Ray start-up, model loading and the first chunk in)")
    bf, pf = b["forward"], s.get("forward") or {}
    same = bf.get("slots_forwarded") == pf.get("slots_forwarded") and bf.get("forwards") == pf.get("forwards")
    print(f"forwards per model: bare {bf['forwards']} forwards, {bf['slots_forwarded']} slots; pipeline "
          f"{pf.get('forwards')} forwards, {pf.get('slots_forwarded')} slots (same batches: {'yes' if same else 'NO'}); "
          f"max |gap pipeline - gap bare| {gap_diff:.2e} over {len(got)} rows")
    print(f"bare engine apart from its rate: tokenizing {b['tokenize_s']:.1f} s (the pipeline's read tasks do it), "
          f"loading {b['load_s']:.1f} s, warm-up call {b['warmup_s']:.2f} s"
          + (f", peak GPU memory {b['peak_gib']} GiB" if b["peak_gib"] is not None else ""))
    print(f"pipeline: rows per actor {s['rows_per_actor']}, wall {s['wall_s']} s, call {s['call_s']:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": name, "shape": args.shape, "dtype": str(dtype).replace("torch.", ""), "pairs": n,
            "chunk_rows": chunk_rows, "rows_per_actor_call": per_call, "gpus_per_actor": gpus,
            "max_tokens_per_batch": cfg.scoring.max_tokens_per_batch, "attn": args.attn, "save_models_s": round(save_s, 2),
            "bare": b, "pipeline": s, "pipeline_whole_call_pairs_per_s": round(call_pps, 2),
            "steady_vs_bare": ratio, "whole_call_vs_bare": call_pps / b["pairs_per_s"], "target_steady_vs_bare": 0.90,
            "same_batches": same, "max_gap_diff": gap_diff}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
