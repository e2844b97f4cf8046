"""Bounded load test of the gap endpoint on loopback: dynamic batching on vs off.

    python bench/serve_load.py                       # tiny local models, CPU
    python bench/serve_load.py --policy P --reference R --levels 1 4 16 --num-gpus 1

The server (local Ray + Serve, two apps: batching on at /on, max_batch_size=1 at /off) runs in
this process; the load comes from a second process (this file with --client) posting to
127.0.0.1 only. Each (app, concurrency) cell is bounded by --requests-per-worker and --max-seconds.
Prints one table: pairs/s, p50/p99 latency per mode, and the on/off throughput ratio; then the
replicas' batching counters and memory (from /v1/stats).
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


# ---- client (second process) ---------------------------------------------------------------------


def _client(url: str, level: int, n_requests: int, max_seconds: float, pairs_per_request: int) -> dict:
    import httpx

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

    def q(p):
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")

    return {"level": level, "requests": len(lat), "errors": errors, "wall_s": wall,
            "pairs_per_s": len(lat) * pairs_per_request / wall if wall else 0.0, "p50_ms": q(0.5), "p99_ms": q(0.99)}


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
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica")
    p.add_argument("--json", help="also write the results here")
    # client mode (the second process)
    p.add_argument("--client", help=argparse.SUPPRESS)
    p.add_argument("--level", type=int, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.client:
        print(json.dumps(_client(a.client, a.level, a.n, a.max_seconds, a.pairs_per_request)))
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
    if not policy:
        from prefsel.tiny import build_tiny_pair

        policy, reference = build_tiny_pair(Path(tempfile.mkdtemp(prefix="serve_load_")))
    reference = reference or policy
    ncpu = max(2, int(2 * a.num_cpus + 0.999))
    ray.init(num_cpus=ncpu, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    common = dict(policy=policy, reference=reference, num_cpus=a.num_cpus, num_gpus=a.num_gpus or None,
                  batch_wait_timeout_s=a.batch_wait_timeout_s, max_ongoing_requests=max(64, 2 * max(a.levels)))
    serve.run(build_app({**common, "max_batch_size": a.max_batch_size}), name="on", route_prefix="/on")
    serve.run(build_app({**common, "max_batch_size": 1}), name="off", route_prefix="/off")
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    rows = []
    try:
        for level in a.levels:
            cell = {}
            for mode in ("on", "off"):
                n = min(a.max_requests, a.requests_per_worker * level)
                out = subprocess.run(
                    [sys.executable, __file__, "--client", f"{base}/{mode}/v1/gap", "--level", str(level),
                     "--n", str(n), "--max-seconds", str(a.max_seconds), "--pairs-per-request",
                     str(a.pairs_per_request)],
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
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "stats": stats, "args": vars(a)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
