"""Rehearse cluster.yaml's autoscaling on this machine: a simulated cluster, a GPU scoring job.

    RAY_AUTH_MODE=disabled .venv/bin/python scripts/rehearse_autoscaling.py

1. builds tiny models and 48 preference pairs in a temporary folder (nothing is downloaded);
2. starts a simulated cluster (prefsel/cluster_sim.py): Ray's real autoscaler with the fake
   multi-node provider, cluster.yaml's CPU head (takes no work) and its single-GPU worker types,
   0 to 2 workers of 1 CPU and 1 simulated GPU, idle timeout 6 s, all on 127.0.0.1 with its own
   ports and temp dir;
3. submits `ray job submit ... -- python ray_jobs/score.py ... --num-actors 2 --gpus-per-actor 1`
   (with --job train: `ray_jobs/train.py dpo ... --num-workers 2 --use-gpu`, whose workers find
   no CUDA on the simulated GPU nodes and train on the CPU over gloo);
4. prints `ray status` whenever the number of GPU workers (Ray's state API) changes: 0, then the
   autoscaler adds 2, the job succeeds, the idle workers are removed, 0 again;
5. stops its own cluster by pid (never `ray stop`, which would stop every Ray on the machine).

--keep-output DIR keeps the models, data and scores there. Takes 2-4 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def say(msg: str) -> None:
    print(f"[rehearsal {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keep-output", help="keep models, data and scores in this folder")
    p.add_argument("--rows", type=int, default=48)
    p.add_argument("--timeout", type=float, default=600, help="seconds for the job and the scale-down")
    p.add_argument("--job", choices=("score", "train"), default="score",
                   help="score: ray_jobs/score.py --num-actors 2 --gpus-per-actor 1; "
                        "train: ray_jobs/train.py dpo --num-workers 2 --use-gpu")
    args = p.parse_args(argv)

    from prefsel.cluster_sim import SimulatedCluster, job_runtime_env
    from prefsel.demo_data import make_demo_pairs
    from prefsel.tiny import build_tiny_pair

    work = Path(args.keep_output or tempfile.mkdtemp(prefix="prefsel-rehearsal-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    say(f"tiny models and {args.rows} pairs in {work}")
    policy, reference = build_tiny_pair(work / "models")
    data = work / "pairs.jsonl"
    with open(data, "w") as f:
        f.writelines(json.dumps({k: r[k] for k in ("id", "prompt", "chosen", "rejected")}) + "\n" for r in make_demo_pairs(args.rows, seed=5))
    out = work / ("scores" if args.job == "score" else "train")

    cluster = SimulatedCluster(max_workers=2, idle_timeout_minutes=0.1, log=say)
    ray = str(Path(sys.executable).with_name("ray"))
    try:
        cluster.start()
        say(f"simulated cluster up: dashboard {cluster.dashboard_url}, GCS {cluster.gcs_address}")
        say("autoscaling config (from cluster.yaml): " + json.dumps(
            {k: v["resources"] | {kk: v[kk] for kk in ("min_workers", "max_workers") if kk in v}
             for k, v in cluster.config["available_node_types"].items()}))
        print(cluster.status(), flush=True)
        if args.job == "score":
            entry = ["ray_jobs/score.py", "--policy", policy, "--reference", reference,
                     "--data", str(data), "--output", str(out), "--chunk-rows", "8", "--overwrite",
                     "--num-actors", "2", "--gpus-per-actor", "1", "--cpus-per-actor", "1"]
            say("$ ray job submit ... -- python ray_jobs/score.py ... --num-actors 2 --gpus-per-actor 1")
        else:
            entry = ["ray_jobs/train.py", "dpo", "--model", policy, "--ref-model", reference,
                     "--data", str(data), "--output", str(out), "--overwrite", "--strategy", "ddp",
                     "--num-workers", "2", "--use-gpu", "--cpus-per-worker", "1", "--ref-actors", "2",
                     "--train-batch-size", "8", "--micro-train-batch-size", "4", "--no-progress"]
            say("$ ray job submit ... -- python ray_jobs/train.py dpo ... --num-workers 2 --use-gpu")
        submit = [ray, "job", "submit", "--address", cluster.dashboard_url, "--submission-id", "rehearsal",
                  "--no-wait", "--runtime-env-json", json.dumps(job_runtime_env(REPO)), "--", "python", *entry]
        subprocess.run(submit, cwd=REPO, env=cluster.env(), check=True, timeout=120)

        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(cluster.dashboard_url)
        last, status, ended = None, None, None
        deadline = time.time() + args.timeout
        while time.time() < deadline:
            status = str(client.get_job_status("rehearsal"))
            workers = len(cluster.gpu_workers())
            if workers != last:
                say(f"GPU workers alive (state API): {workers}; job {status}")
                print(cluster.status(), flush=True)
                last = workers
            if ended is None and status in ("SUCCEEDED", "FAILED", "STOPPED"):
                ended = time.time()
                say(f"job {status}")
                if status != "SUCCEEDED":
                    print(client.get_job_logs("rehearsal")[-4000:], flush=True)
                    return 1
                summary = json.loads((out / "summary.json").read_text())
                if args.job == "score":
                    say(f"scored {summary['rows_scored']} of {summary['rows_in']} rows into {out}; "
                        "waiting for the idle GPU workers to be removed")
                else:
                    say(f"trained {summary['steps']} steps on {summary['rows_used']} pairs into {out} "
                        f"(final loss {summary['final_metrics'].get('loss')}); "
                        "waiting for the idle GPU workers to be removed")
            if ended is not None and workers == 0:
                say(f"all GPU workers removed {time.time() - ended:.0f} s after the job ended")
                print(cluster.status(), flush=True)
                return 0
            time.sleep(1)
        say(f"timed out: job {status}, {last} GPU workers")
        return 1
    finally:
        say("stopping the simulated cluster (its own processes only)")
        cluster.stop()
        if not args.keep_output:
            import shutil

            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
