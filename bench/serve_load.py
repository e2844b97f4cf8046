"""Bounded load test of the gap endpoint on loopback: dynamic batching on vs off.

    python bench/serve_load.py                       # tiny local models, CPU
    python bench/serve_load.py --policy P --reference R --levels 1 4 16 --num-gpus 0.5
    python bench/serve_load.py --shape 1b --levels 1 16 --json OUT.json   # GPU mode (issue item 5)
    python bench/serve_load.py --shape tiny --levels 1 16                 # its CPU smoke run

The server (local Ray + Serve, two apps: batching on at /on, max_batch_size=1 at /off) runs in
this process; the load comes from a second process (this file with --client) posting to
127.0.0.1 only. Each (app, concurrency) cell is bounded by --requests-per-worker and --max-seconds.
Prints one table: pairs/s, p50/p99 latency per mode, and the on/off throughput ratio; then the
replicas' batching counters and memory (from /v1/stats). Both apps are on the machine at once:
with one GPU, give each replica half of it (--num-gpus 0.5).

GPU mode (`--shape 1b|8b|tiny`): a random-initialised Llama-shaped policy/reference of that shape
(bench/_shapes.py; tiny is the CPU smoke run) saved with save_pretrained, and requests drawn from
a pool of the shape's synthetic text pairs (prompt 50-450 tokens, responses 100-600) instead of
the demo pairs. Before Serve starts, a separate process (it saves the models, then exits, so the
GPU holds only the replicas afterwards) builds the endpoint's own engine (`serve.app.load_scorer`:
the same pair tokenizer, PairScorer and scoring config as a replica) and times, after
--warmup calls, --bare-requests one-request scorings `PairScorer.logprobs` of the very rows that
the concurrency-1 cells then send (the "bare forward"; tokenizing timed apart), and calls of
--max-batch-size pairs (the engine's own pairs/s for comparison with concurrency 16). Reported:
p50 of a one-pair request at concurrency 1, batching on and off, against the bare forward's p50
(target <= 1.5x), and pairs/s at concurrency 16. With CUDA, each replica gets 0.5 GPU unless
--num-gpus says otherwise; models load with --dtype (auto: bf16 on CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_shapes.py


def _quantile(values: list[float], p: float) -> float:
    """The p-quantile of sorted `values` in ms (the same rule for the client and the bare engine)."""
    return values[min(len(values) - 1, int(p * len(values)))] * 1000 if values else float("nan")


# ---- client (second process) ---------------------------------------------------------------------


def _client(url: str, level: int, n_requests: int, max_seconds: float, pairs_per_request: int,
            pool_file: str | None = None) -> dict:
    import httpx

    if pool_file:  # --shape: the rows the bare engine was timed on
        with open(pool_file) as f:
            pool = json.load(f)
    else:
        from prefsel.demo_data import make_demo_pairs

        pool = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in make_demo_pairs(256, seed=11)]
    lat: list[float] = []
    errors = 0
    lock = threading.Lock()
    counter = iter(range(n_requests))
    deadline = time.perf_counter() + max_seconds

    def worker():
        nonlocal errors
        with httpx.Client(timeout=60) as c:
            while time.perf_counter() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                body = {"pairs": [pool[(i * pairs_per_request + j) % len(pool)] for j in range(pairs_per_request)]}
                t = time.perf_counter()
                r = c.post(url, json=body)
                dt = time.perf_counter() - t
                with lock:
                    if r.status_code == 200:
                        lat.append(dt)
                    else:
                        errors += 1

    with httpx.Client(timeout=60) as c:  # warm-up
        for i in range(3):
            c.post(url, json={"pairs": pool[i : i + pairs_per_request]})
    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(level)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat.sort()
    return {"level": level, "requests": len(lat), "errors": errors, "wall_s": wall,
            "pairs_per_s": len(lat) * pairs_per_request / wall if wall else 0.0, "p50_ms": _quantile(lat, 0.5),
            "p99_ms": _quantile(lat, 0.99)}


# ---- bare engine (a separate process, before Serve starts; --shape) -------------------------------


def _bare(a) -> dict:
    """Save the shape's models (unless --policy), write the request pool, and time the endpoint's
    own engine on it: one-request calls on the rows the concurrency-1 cells send, then calls of
    max_batch_size pairs. Runs in its own process, so its GPU memory is gone when Serve starts."""
    import torch

    from _shapes import save_shape_pair, shape_rows
    from prefsel.formats import to_example
    from prefsel.models import resolve_device, resolve_dtype
    from serve.app import load_scorer
    from serve.run import ScorerArgs

    work = Path(a.bare)
    device = resolve_device("cpu" if a.num_gpus == 0 else None)  # what a replica picks: its GPU, else the CPU
    dtype = resolve_dtype(a.dtype, device)
    t0 = time.perf_counter()
    policy, reference = a.policy, a.reference
    if not policy:
        policy, reference = save_shape_pair(a.shape, work / f"models-{a.shape}-{str(dtype).replace('torch.', '')}",
                                            dtype=dtype, device=str(device))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    save_s = time.perf_counter() - t0
    reference = reference or policy
    pool = shape_rows(a.pool, shape=a.shape, seed=11)
    pool_file = work / f"pool-{a.shape}-{a.pool}.json"
    pool_file.write_text(json.dumps(pool))
    if device.type == "cpu" and a.num_cpus >= 1:
        torch.set_num_threads(int(a.num_cpus))  # a replica's torch threads: Ray sets OMP_NUM_THREADS=num_cpus
    t0 = time.perf_counter()
    pair_tokenizer, scorer, _ = load_scorer(ScorerArgs(policy=policy, reference=reference, dtype=a.dtype,
                                                               device=str(device)))
    load_s = time.perf_counter() - t0
    if device.type == "cuda":  # the peak from the loaded models on: not that of building them in this process
        torch.cuda.reset_peak_memory_stats()
    ppr = a.pairs_per_request

    def request(i: int) -> list:  # request i's pairs, as the client picks them
        return [pair_tokenizer.encode(to_example(pool[(i * ppr + j) % len(pool)], "pairs")) for j in range(ppr)]

    for i in range(a.warmup):
        scorer.logprobs(request(i))
    fwd, full = [], []
    for i in range(a.bare_requests):  # logprobs returns floats: the device has finished
        t0 = time.perf_counter()
        pairs = request(i)
        t1 = time.perf_counter()
        scorer.logprobs(pairs)
        t2 = time.perf_counter()
        fwd.append(t2 - t1)
        full.append(t2 - t0)
    k = a.max_batch_size
    batch = [p for i in range(min(a.max_requests, len(pool) // ppr)) for p in request(i)]
    scorer.logprobs(batch[:k])
    t0 = time.perf_counter()
    for s in range(0, len(batch), k):
        scorer.logprobs(batch[s : s + k])
    batch_s = time.perf_counter() - t0
    fwd.sort()
    full.sort()
    return {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
            "dtype": str(next(scorer.policy.parameters()).dtype).replace("torch.", ""), "policy": policy,
            "reference": reference, "pool_file": str(pool_file), "pool": len(pool), "save_models_s": round(save_s, 2),
            "load_s": round(load_s, 2), "warmup": a.warmup, "requests": a.bare_requests, "pairs_per_request": ppr,
            "forward_p50_ms": _quantile(fwd, 0.5), "forward_p99_ms": _quantile(fwd, 0.99),
            "tokenize_forward_p50_ms": _quantile(full, 0.5), "batch_pairs": k, "batch_calls_pairs": len(batch),
            "batch_pairs_per_s": len(batch) / batch_s if batch_s else float("nan"),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None}


# ---- server + driver ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy")
    p.add_argument("--reference")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests-per-worker", type=int, default=12)
    p.add_argument("--max-requests", type=int, default=192)
    p.add_argument("--max-seconds", type=float, default=15.0, help="time bound per cell")
    p.add_argument("--pairs-per-request", type=int, default=1)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--batch-wait-timeout-s", type=float, default=0.01)
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica")
    p.add_argument("--num-gpus", type=float, default=None,
                   help="GPUs per replica (default 0; --shape with CUDA: 0.5, the two apps share one GPU)")
    p.add_argument("--json", help="also write the results here")
    g = p.add_argument_group("GPU mode (--shape): the endpoint against a bare forward of its engine")
    g.add_argument("--shape", choices=["1b", "8b", "tiny"],
                   help="random Llama-shaped models (bench/_shapes.py) and the shape's synthetic pairs; "
                        "tiny: the CPU smoke run")
    g.add_argument("--dtype", default="auto", help="model weights: auto (bf16 on CUDA, fp32 on CPU), bf16, fp32")
    g.add_argument("--pool", type=int, default=256, help="rows in the request pool")
    g.add_argument("--bare-requests", type=int, default=30,
                   help="timed one-request calls of the bare engine, and requests of the concurrency-1 cells")
    g.add_argument("--warmup", type=int, default=5, help="untimed bare-engine calls first")
    g.add_argument("--workdir", help="where the models and the pool go (default: a new temp folder); models reused")
    # client mode (the second process)
    p.add_argument("--client", help=argparse.SUPPRESS)
    p.add_argument("--level", type=int, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--pool-file", help=argparse.SUPPRESS)
    p.add_argument("--bare", help=argparse.SUPPRESS)  # bare-engine mode (a separate process): its work folder
    a = p.parse_args(argv)

    if a.client:
        print(json.dumps(_client(a.client, a.level, a.n, a.max_seconds, a.pairs_per_request, a.pool_file)))
        return 0
    if a.bare:
        sys.path.insert(0, str(ROOT))
        print("BARE" + json.dumps(_bare(a)))
        return 0

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    import httpx
    import ray
    from ray import serve

    from serve.app import build_app

    policy, reference = a.policy, a.reference
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    bare = None
    if a.shape:  # models, pool and the bare engine's numbers, from a process of their own
        work = Path(a.workdir or tempfile.mkdtemp(prefix="serve_load_"))
        work.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, __file__, "--bare", str(work), "--shape", a.shape, "--dtype", a.dtype, "--pool",
               str(a.pool), "--bare-requests", str(a.bare_requests), "--warmup", str(a.warmup), "--pairs-per-request",
               str(a.pairs_per_request), "--max-batch-size", str(a.max_batch_size), "--max-requests",
               str(a.max_requests), "--num-cpus", str(a.num_cpus)]
        cmd += ["--policy", policy] if policy else []
        cmd += ["--num-gpus", str(a.num_gpus)] if a.num_gpus is not None else []
        cmd += ["--reference", reference] if reference else []
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((x for x in out.stdout.splitlines() if x.startswith("BARE")), None)
        if line is None:
            raise RuntimeError("bare engine failed:\n" + out.stdout[-3000:] + out.stderr[-3000:])
        bare = json.loads(line[len("BARE"):])
        policy, reference = bare["policy"], bare["reference"]
        if a.num_gpus is None:
            a.num_gpus = 0.5 if bare["device"].startswith("cuda") else 0.0
        print(f"bare engine on {bare['device_name']} ({bare['dtype']}; models saved in {bare['save_models_s']} s, "
              f"loaded in {bare['load_s']} s): forward p50 {bare['forward_p50_ms']:.1f} ms over "
              f"{bare['requests']} one-request calls; {bare['batch_pairs_per_s']:.1f} pairs/s in calls of "
              f"{bare['batch_pairs']} pairs", flush=True)
    a.num_gpus = a.num_gpus or 0.0
    if not policy:
        from prefsel.tiny import build_tiny_pair

        policy, reference = build_tiny_pair(Path(tempfile.mkdtemp(prefix="serve_load_")))
    reference = reference or policy
    ncpu = max(2, int(2 * a.num_cpus + 0.999))
    from prefsel.jobs import local_ray_loopback

    with local_ray_loopback():  # every Ray socket on 127.0.0.1, like prefsel's own local Ray
        # the replicas import prefsel from ROOT and whatever else this process has on PYTHONPATH
        # (the GPU machine's carried wheels): an env var here replaces the workers' own
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        ray.init(num_cpus=ncpu, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": path}})
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    common = dict(policy=policy, reference=reference, dtype=a.dtype, num_cpus=a.num_cpus, num_gpus=a.num_gpus or None,
                  batch_wait_timeout_s=a.batch_wait_timeout_s, max_ongoing_requests=max(64, 2 * max(a.levels)))
    serve.run(build_app({**common, "max_batch_size": a.max_batch_size}), name="on", route_prefix="/on")
    serve.run(build_app({**common, "max_batch_size": 1}), name="off", route_prefix="/off")
    base = f"http://127.0.0.1:{port}"
    rows = []
    try:
        for level in a.levels:
            cell = {}
            for mode in ("on", "off"):
                n = min(a.max_requests, a.requests_per_worker * level)
                if bare and level == 1:
                    n = a.bare_requests  # the rows the bare forward was timed on
                pool = ["--pool-file", bare["pool_file"]] if bare else []
                out = subprocess.run(
                    [sys.executable, __file__, "--client", f"{base}/{mode}/v1/gap", "--level", str(level),
                     "--n", str(n), "--max-seconds", str(a.max_seconds), "--pairs-per-request",
                     str(a.pairs_per_request), *pool],
                    capture_output=True, text=True, env=env, timeout=a.max_seconds + 120, check=True,
                )
                cell[mode] = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(cell)
        stats = {m: httpx.get(f"{base}/{m}/v1/stats").json() for m in ("on", "off")}
        info = httpx.get(f"{base}/on/v1/models").json()
    finally:
        serve.shutdown()
        ray.shutdown()

    print(f"\nserve_load: device={info['device']} dtype={info['dtype']} pairs/request={a.pairs_per_request} "
          f"max_batch_size on={a.max_batch_size} off=1 wait={a.batch_wait_timeout_s}s "
          f"replica num_cpus={a.num_cpus} num_gpus={a.num_gpus}")
    head = (f"{'conc':>4} | {'on pairs/s':>10} {'p50 ms':>8} {'p99 ms':>8} | {'off pairs/s':>11} {'p50 ms':>8} "
            f"{'p99 ms':>8} | {'on/off thr':>10} {'p50 off/on':>10} | {'req on/off':>10} {'err':>3}")
    print(head)
    print("-" * len(head))
    for c in rows:
        on, off = c["on"], c["off"]
        thr = on["pairs_per_s"] / off["pairs_per_s"] if off["pairs_per_s"] else float("nan")
        lat = off["p50_ms"] / on["p50_ms"] if on["p50_ms"] else float("nan")
        print(f"{on['level']:>4} | {on['pairs_per_s']:>10.1f} {on['p50_ms']:>8.1f} {on['p99_ms']:>8.1f} | "
              f"{off['pairs_per_s']:>11.1f} {off['p50_ms']:>8.1f} {off['p99_ms']:>8.1f} | {thr:>10.2f} {lat:>10.2f} | "
              f"{str(on['requests']) + '/' + str(off['requests']):>10} {on['errors'] + off['errors']:>3}")
    print(f"batching on: {stats['on']['batches']} scorer calls for {stats['on']['requests']} requests "
          f"(mean {stats['on']['mean_batch_requests']:.2f}, max {stats['on']['max_batch_requests']}); "
          f"off: {stats['off']['batches']} calls for {stats['off']['requests']} requests")
    print("replica memory (rss now / peak): " + ", ".join(
        f"{m} {stats[m]['rss_bytes'] / 2**20:.0f} / {stats[m]['peak_rss_bytes'] / 2**20:.0f} MiB" for m in ("on", "off")))
    result = {"rows": rows, "stats": stats, "args": vars(a)}
    if bare:
        result.update(device=bare["device_name"], shape=a.shape, bare=bare, summary=_shape_summary(rows, bare, a))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    return 0


def _shape_summary(rows: list[dict], bare: dict, a) -> dict:
    """Issue item 5's numbers: one-request p50 at concurrency 1 against the bare forward, pairs/s at 16."""
    by_level = {c["on"]["level"]: c for c in rows}
    fwd = bare["forward_p50_ms"]
    out = {"device": bare["device_name"], "bare_forward_p50_ms": fwd,
           "bare_tokenize_forward_p50_ms": bare["tokenize_forward_p50_ms"],
           "bare_pairs_per_s": bare["batch_pairs_per_s"], "target_p50_ratio": 1.5}
    print(f"\n{a.shape} on {bare['device_name']}: bare forward p50 {fwd:.1f} ms ({bare['pairs_per_request']} pair(s), "
          f"{bare['requests']} calls after {bare['warmup']} warm-up; tokenize + forward "
          f"{bare['tokenize_forward_p50_ms']:.1f} ms)")
    if 1 in by_level:
        for mode in ("on", "off"):
            p50 = by_level[1][mode]["p50_ms"]
            out[f"c1_{mode}_p50_ms"] = p50
            out[f"c1_{mode}_p50_vs_bare"] = p50 / fwd
            verdict = "met" if p50 / fwd <= 1.5 else "NOT met"
            print(f"  concurrency 1, batching {mode:<3}: p50 {p50:7.1f} ms = {p50 / fwd:.2f}x the bare forward "
                  f"(target <= 1.5x: {verdict}; {by_level[1][mode]['requests']} requests, the same rows)")
    if 16 in by_level:
        for mode in ("on", "off"):
            pps = by_level[16][mode]["pairs_per_s"]
            out[f"c16_{mode}_pairs_per_s"] = pps
            print(f"  concurrency 16, batching {mode:<3}: {pps:7.1f} pairs/s")
        print(f"  bare engine, calls of {bare['batch_pairs']} pairs: {bare['batch_pairs_per_s']:7.1f} pairs/s")
    return out


if __name__ == "__main__":
    sys.exit(main())
