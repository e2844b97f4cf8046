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


def pipeline(models: tuple[str, str], data: Path, out: Path, actors: int, chunk_rows: int) -> dict:
    """One run_score in a fresh subprocess (its own local Ray); returns its summary + peak RSS."""
    code = f"""
import json, resource, time
from prefsel.jobs import ActorResources
from prefsel.score_job import ScoreJobConfig, run_score
t0 = time.perf_counter()
s = run_score(ScoreJobConfig(policy={models[0]!r}, reference={models[1]!r}, data={str(data)!r}, output={str(out)!r},
                             chunk_rows={chunk_rows}, overwrite=True,
                             resources=ActorResources(num_actors={actors}, cpus_per_actor=1)))
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
    ap.add_argument("--pairs", type=int, default=16000, help="pairs for the throughput rows")
    ap.add_argument("--rss-sizes", type=int, nargs=2, default=(50000, 200000), help="corpus sizes for driver RSS")
    ap.add_argument("--chunk-rows", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=128, help="model hidden size (the forward should dominate)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--json", metavar="OUT", help="also write the numbers to this JSON file")
    args = ap.parse_args(argv)

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


if __name__ == "__main__":
    sys.exit(main())
