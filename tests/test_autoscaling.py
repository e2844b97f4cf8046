"""Autoscaling on GPUs, rehearsed on a simulated cluster (prefsel/cluster_sim.py).

Ray's real autoscaler runs against the fake multi-node provider: a CPU head that takes no work
(cluster.yaml's head, `CPU: 0`) and cluster.yaml's single-GPU worker types, from 0 to 2 nodes of
1 CPU and 1 (simulated) GPU each, idle timeout 6 s. prefsel's actors ask for a GPU, are placed on
a simulated GPU node, find no CUDA and run on the CPU. Node counts come from Ray's state API
(`ray.util.state.list_nodes`), never from logs. The head runs on 127.0.0.1 with its own ports
and --temp-dir and is stopped by pid (never `ray stop`).

The default run does one scale-up / scale-down (a scoring job submitted with `ray job submit`).
The rest is slow and runs with PREFSEL_SLOW_TESTS=1: a simulated GPU node killed mid-job.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import read_scores, write_jsonl

from prefsel.cluster_sim import (
    SIM_CPUS_PER_WORKER,
    SIM_HEAD_TYPE,
    SimulatedCluster,
    job_runtime_env,
    load_cluster_yaml,
    simulated_config,
    single_gpu_worker_types,
)
from prefsel.demo_data import make_demo_pairs

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
SLOW = os.environ.get("PREFSEL_SLOW_TESTS", "") not in ("", "0")
slow = pytest.mark.skipif(not SLOW, reason="slow: set PREFSEL_SLOW_TESTS=1 to run")
MAX_WORKERS = 2
IDLE_TIMEOUT_MIN = 0.1  # 6 s


# ---- one source for the node-type numbers ------------------------------------------------------


def test_simulated_config_takes_its_numbers_from_cluster_yaml():
    raw = load_cluster_yaml()
    cfg = simulated_config(raw, gcs_address="127.0.0.1:1", max_workers=MAX_WORKERS,
                           idle_timeout_minutes=IDLE_TIMEOUT_MIN)
    types = cfg["available_node_types"]
    # the head: cluster.yaml's, takes no work
    assert cfg["head_node_type"] == SIM_HEAD_TYPE
    assert types[SIM_HEAD_TYPE]["resources"] == raw["available_node_types"][raw["head_node_type"]]["resources"]
    assert types[SIM_HEAD_TYPE]["resources"] == {"CPU": 0}
    # the single-GPU worker types, by name, with cluster.yaml's GPUs and min_workers
    assert single_gpu_worker_types(raw) == ["gpu-1x", "gpu-1x-spot"]
    assert set(types) == {SIM_HEAD_TYPE, "gpu-1x", "gpu-1x-spot"}
    for name in ("gpu-1x", "gpu-1x-spot"):
        real = raw["available_node_types"][name]
        assert types[name]["resources"]["GPU"] == real["resources"]["GPU"] == 1
        assert types[name]["min_workers"] == real["min_workers"] == 0
        assert types[name]["max_workers"] == min(real["max_workers"], MAX_WORKERS)
        # what the simulation changes, and only that: the CPUs of a node (2-core CI)
        assert types[name]["resources"]["CPU"] == SIM_CPUS_PER_WORKER
        assert set(types[name]["resources"]) == set(real["resources"]) | {"object_store_memory"}
    assert cfg["upscaling_speed"] == raw["upscaling_speed"]
    assert cfg["max_workers"] == MAX_WORKERS <= raw["max_workers"]
    assert cfg["idle_timeout_minutes"] == IDLE_TIMEOUT_MIN < raw["idle_timeout_minutes"]
    # Ray's fake multi-node provider, which also reports a killed node as terminated
    from ray.autoscaler._private.fake_multi_node.node_provider import (
        FakeMultiNodeProvider,
    )
    from ray.autoscaler._private.providers import _get_node_provider_cls

    assert cfg["provider"]["type"] == "external"
    assert issubclass(_get_node_provider_cls(cfg["provider"]), FakeMultiNodeProvider)

    # derived, not copied: a change in cluster.yaml shows in the simulated config
    edited = copy.deepcopy(raw)
    edited["available_node_types"]["gpu-1x"]["min_workers"] = 1
    edited["available_node_types"]["gpu-1x-spot"]["resources"]["GPU"] = 2
    edited["upscaling_speed"] = 2.0
    cfg2 = simulated_config(edited, gcs_address="127.0.0.1:1")
    assert cfg2["available_node_types"]["gpu-1x"]["min_workers"] == 1
    assert "gpu-1x-spot" not in cfg2["available_node_types"]  # no longer a single-GPU type
    assert cfg2["upscaling_speed"] == 2.0


def test_simulated_config_passes_rays_validation():
    util = pytest.importorskip("ray.autoscaler._private.util")
    cfg = simulated_config(gcs_address="127.0.0.1:1")
    util.validate_config(copy.deepcopy(cfg))  # the autoscaler validates its config the same way


# ---- the simulated cluster ------------------------------------------------------------------


@pytest.fixture(scope="module")
def sim():
    cluster = SimulatedCluster(max_workers=MAX_WORKERS, idle_timeout_minutes=IDLE_TIMEOUT_MIN)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
    assert not cluster.processes(), "processes of the simulated cluster outlived it"


def _rows(n: int, seed: int = 5) -> list[dict]:
    return [{"id": r["id"], "prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
            for r in make_demo_pairs(n, seed=seed)]


def _submit(sim, job_id: str, argv: list[str]) -> None:
    """`ray job submit --no-wait` from the repository root, with ray_jobs/runtime_env.yaml's settings
    and the checkout as a `local://` working dir (see cluster_sim.job_runtime_env)."""
    res = subprocess.run(
        [RAY, "job", "submit", "--address", sim.dashboard_url, "--submission-id", job_id, "--no-wait",
         "--runtime-env-json", json.dumps(job_runtime_env(REPO)), "--", "python", *argv],
        cwd=REPO, env=sim.env(), capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}"


def _watch(sim, job_id: str, *, timeout: float = 420, on_poll=None):
    """Poll the job and the state API until the job ends: (status, [GPU workers alive per poll])."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(sim.dashboard_url)
    counts = []
    deadline = time.time() + timeout
    while True:
        status = client.get_job_status(job_id)
        counts.append(len(sim.gpu_workers()))
        if on_poll is not None:
            on_poll(status, counts)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status, counts
        if time.time() > deadline:
            raise TimeoutError(f"job {job_id} still {status} after {timeout} s:\n"
                               f"{client.get_job_logs(job_id)}\n{sim.status()}")
        time.sleep(1)


def _gpu_actors(sim, job_id: str) -> list[dict]:
    """The job's actors that asked for a GPU (state API), with the node each ran on."""
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors

    ray_job_id = JobSubmissionClient(sim.dashboard_url).get_job_info(job_id).job_id
    actors = [a if isinstance(a, dict) else a.__dict__
              for a in list_actors(address=sim.dashboard_url, filters=[("job_id", "=", ray_job_id)],
                                   detail=True, limit=1000, raise_on_missing_output=False)]
    return [a for a in actors if (a.get("required_resources") or {}).get("GPU", 0) > 0]


def _score_args(tiny_models, data: Path, *extra: str) -> list[str]:
    return ["--policy", tiny_models[0], "--reference", tiny_models[1], "--data", str(data), "--chunk-rows", "8",
            *extra]


def _same_scores(job_out: Path, cli_out: Path) -> None:
    job, cli = read_scores(job_out), read_scores(cli_out)
    drop = [c for c in ("actor",) if c in job.column_names]
    assert job.drop_columns(drop).to_pylist() == cli.drop_columns(drop).to_pylist()


def _idle_nodes_removed(sim, since: float) -> float:
    """Wait for the GPU workers to go after the idle timeout; seconds from `since` to zero."""
    sim.wait_for_workers(0, timeout=IDLE_TIMEOUT_MIN * 60 + 90)
    return time.time() - since


def test_scoring_job_scales_gpu_workers_up_and_down(sim, ray_local, tiny_models, tmp_path):
    """`ray job submit ... --num-actors 2 --gpus-per-actor 1` on a cluster with no GPU worker:
    the autoscaler adds two, the job succeeds with the local run's scores, the idle workers go."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from prefsel.cli import main

    sim.wait_for_workers(0, timeout=IDLE_TIMEOUT_MIN * 60 + 90)  # starts with no GPU worker
    assert [n["is_head_node"] for n in sim.nodes()] == [True]
    data = write_jsonl(tmp_path / "pairs.jsonl", _rows(24))
    args = _score_args(tiny_models, data)
    t0 = time.time()
    _submit(sim, "score-autoscale", ["ray_jobs/score.py", *args, "--output", str(tmp_path / "job"),
                                     "--num-actors", "2", "--gpus-per-actor", "1", "--cpus-per-actor", "1"])
    status, counts = _watch(sim, "score-autoscale")
    t_job = time.time() - t0
    logs = JobSubmissionClient(sim.dashboard_url).get_job_logs("score-autoscale")
    assert status == JobStatus.SUCCEEDED, f"{logs}\n{sim.status()}"
    assert counts[0] == 0 and max(counts) == 2, counts  # 0 at submission, the autoscaler added two

    # the two scoring actors asked for a GPU and ran on the two simulated GPU nodes
    actors = _gpu_actors(sim, "score-autoscale")
    assert len(actors) == 2, actors
    assert all(a["required_resources"]["GPU"] == 1 for a in actors)
    head = [n["node_id"] for n in sim.nodes() if n["is_head_node"]]
    assert len({a["node_id"] for a in actors}) == 2 and not set(head) & {a["node_id"] for a in actors}
    summary = json.loads((tmp_path / "job" / "summary.json").read_text())
    # (the first actor up may score all 24 rows before the second node has started)
    assert summary["rows_scored"] == sum(summary["rows_per_actor"].values()) == 24

    # scale-down: both GPU workers go after the idle timeout
    t_down = _idle_nodes_removed(sim, time.time())
    assert sim.gpu_workers() == [] and [n["is_head_node"] for n in sim.nodes()] == [True]

    # the same scoring as a local run (the session's local Ray, CPU actors)
    assert main(["score", *args, "--output", str(tmp_path / "cli"), "--num-actors", "2"]) == 0
    _same_scores(tmp_path / "job", tmp_path / "cli")
    print(f"scoring job {t_job:.0f} s (GPU workers per poll: {counts}); scale-down {t_down:.0f} s")


@slow
def test_scoring_job_survives_a_gpu_node_taken_away(sim, ray_local, tiny_models, tmp_path):
    """A spot node reclaimed mid-job: one simulated GPU node is killed while the job scores; the
    job still succeeds, every row is scored exactly once, with the local run's scores."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from prefsel.cli import main

    sim.wait_for_workers(0, timeout=IDLE_TIMEOUT_MIN * 60 + 90)
    n_rows = 160
    data = write_jsonl(tmp_path / "pairs.jsonl", _rows(n_rows, seed=7))
    args = _score_args(tiny_models, data, "--rows-per-actor-call", "4")
    out = tmp_path / "job"
    _submit(sim, "score-spot", ["ray_jobs/score.py", *args, "--output", str(out),
                                "--num-actors", "2", "--gpus-per-actor", "1", "--cpus-per-actor", "1"])
    killed = {}

    def kill_one_when_scoring(status, counts):
        if killed or status != "RUNNING" or counts[-1] < 2:
            return
        shards = list((out.parent / (out.name + ".partial") / "scores").glob("part-*.parquet"))
        if shards:  # the job is scoring: both actors up, a first shard written
            victim = sim.gpu_workers()[0]["node_id"]
            killed.update(node=victim, shards=len(shards), processes=sim.kill_worker(victim))

    status, counts = _watch(sim, "score-spot", on_poll=kill_one_when_scoring)
    logs = JobSubmissionClient(sim.dashboard_url).get_job_logs("score-spot")
    assert killed, f"the job ended before a node could be killed ({counts})\n{logs}"
    assert killed["processes"] >= 1 and killed["shards"] < n_rows // 8, killed
    assert status == JobStatus.SUCCEEDED, f"{logs}\n{sim.status()}"
    dead = [n for n in sim.nodes(alive=False) if n["node_id"] == killed["node"]]
    assert dead and dead[0]["state"] == "DEAD", dead
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows_in"] == summary["rows_scored"] == n_rows
    ids = read_scores(out)["row_id"].to_pylist()
    assert ids == list(range(n_rows))  # every row exactly once
    sim.wait_for_workers(0, timeout=IDLE_TIMEOUT_MIN * 60 + 120)
    assert main(["score", *args, "--output", str(tmp_path / "cli"), "--num-actors", "2"]) == 0
    _same_scores(out, tmp_path / "cli")


# ---- training on GPU-resourced workers that find no CUDA: device and backend -----------------


def test_train_device_and_backend_follow_cuda_in_the_worker(monkeypatch):
    """--use-gpu workers pick CUDA + nccl where they see CUDA (a real GPU node, as before), and
    the CPU + gloo where they hold a GPU resource but find no CUDA (a simulated GPU node)."""
    import torch

    from prefsel.train import strategy

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert strategy.worker_device(True) == strategy.worker_device(False) == torch.device("cpu")
    assert strategy.dist_backend() == "gloo" == strategy.process_group_backend(torch.device("cpu"))

    import ray.train.torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cuda:0"))
    assert strategy.worker_device(True) == torch.device("cuda:0")  # Ray Train's device, as before
    assert strategy.worker_device(False) == torch.device("cpu")
    assert strategy.dist_backend() == "nccl" == strategy.process_group_backend(torch.device("cuda:0"))

    assert strategy.backend_for_workers([True, True]) == "nccl"
    assert strategy.backend_for_workers([False, False]) == "gloo"
    with pytest.raises(RuntimeError, match="1 of 2 training workers see CUDA"):
        strategy.backend_for_workers([True, False])


def test_train_process_group_backend_is_asked_of_the_workers(monkeypatch):
    """The TorchConfig of a --use-gpu run: TorchTrainer leaves its backend alone (it would turn
    None into nccl from the GPU resources), and the backend started is what the workers see."""
    import ray.train.torch.config as tc
    from ray.train.torch import TorchTrainer

    from prefsel.train.job import WORKER_CHOSEN_BACKEND, _worker_backend_torch_config

    started = []
    monkeypatch.setattr(tc._TorchBackend, "on_start", lambda self, wg, bc: started.append(bc.backend))

    class Group:  # the two calls on_start makes of a worker group
        def __init__(self, cuda):
            self.cuda = cuda

        def execute(self, fn):
            assert fn() in (True, False)  # runs here: CPU torch, no CUDA
            return list(self.cuda)

    config = _worker_backend_torch_config()
    assert isinstance(config, tc.TorchConfig) and config.backend == WORKER_CHOSEN_BACKEND
    from ray.train import ScalingConfig

    trainer = TorchTrainer(lambda: None, torch_config=config, scaling_config=ScalingConfig(num_workers=2, use_gpu=True))
    assert trainer.backend_config.backend == WORKER_CHOSEN_BACKEND  # not replaced by nccl
    for cuda in ([False, False], [True, True]):
        config.backend_cls().on_start(Group(cuda), config)
    assert started == ["gloo", "nccl"]
    assert config.backend == WORKER_CHOSEN_BACKEND  # decided per start (a restart asks again)


# ---- training: `ray_jobs/train.py dpo --num-workers 2 --use-gpu` -------------------------------


def _train_argv(tiny_models, data: Path, out: Path, *extra: str, gpu: bool = True) -> list[str]:
    return ["dpo", "--model", tiny_models[0], "--ref-model", tiny_models[1], "--data", str(data),
            "--output", str(out), "--num-workers", "2", "--cpus-per-worker", "1", "--strategy", "ddp",
            "--train-batch-size", "8", "--micro-train-batch-size", "4", "--no-progress",
            *(["--use-gpu"] if gpu else []), *extra]


def _gpus_asked(actor: dict) -> float:
    """GPUs an actor asked for: its own, or its placement-group bundle's (`GPU_group_<i>_<pg>`,
    as Ray Train's workers ask)."""
    req = actor.get("required_resources") or {}
    return req.get("GPU", 0) + sum(v for k, v in req.items() if re.match(r"GPU_group_\d+_", k))


def _train_workers(sim, job_id: str) -> list[dict]:
    """The job's Ray Train workers (state API), with the node each ran on."""
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors

    ray_job_id = JobSubmissionClient(sim.dashboard_url).get_job_info(job_id).job_id
    return [a if isinstance(a, dict) else a.__dict__
            for a in list_actors(address=sim.dashboard_url, filters=[("job_id", "=", ray_job_id)],
                                 detail=True, limit=1000, raise_on_missing_output=False)
            if a.class_name == "RayTrainWorker"]


def _same_training(job_out: Path, cli_out: Path) -> None:
    job = json.loads((job_out / "summary.json").read_text())
    cli = json.loads((cli_out / "summary.json").read_text())
    assert job["steps"] == cli["steps"]
    for k in ("loss", "reward_accuracy", "chosen_reward", "rejected_reward"):
        assert job["final_metrics"][k] == pytest.approx(cli["final_metrics"][k], rel=1e-4, abs=1e-6), k


@slow
def test_training_job_scales_gpu_workers_up_and_down(sim, ray_local, tiny_models, tmp_path):
    """`ray job submit ... -- python ray_jobs/train.py dpo --num-workers 2 --use-gpu` on a
    cluster with no GPU worker: the autoscaler adds two GPU nodes, the two Ray Train workers run
    there (no CUDA: CPU + gloo), the run equals a local CPU run, the idle workers go."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from prefsel.cli import main

    sim.wait_for_workers(0, timeout=IDLE_TIMEOUT_MIN * 60 + 90)
    data = write_jsonl(tmp_path / "pairs.jsonl", _rows(32))
    extra = ["--max-steps", "3", "--ref-actors", "2"]
    t0 = time.time()
    _submit(sim, "train-autoscale", ["ray_jobs/train.py", *_train_argv(tiny_models, data, tmp_path / "job", *extra)])
    status, counts = _watch(sim, "train-autoscale")
    t_job = time.time() - t0
    logs = JobSubmissionClient(sim.dashboard_url).get_job_logs("train-autoscale")
    assert status == JobStatus.SUCCEEDED, f"{logs}\n{sim.status()}"
    assert counts[0] == 0 and max(counts) == 2, counts

    workers = _train_workers(sim, "train-autoscale")
    assert len(workers) == 2 and all(_gpus_asked(a) == 1 for a in workers), workers
    head = {n["node_id"] for n in sim.nodes() if n["is_head_node"]}
    assert len({a["node_id"] for a in workers}) == 2 and not head & {a["node_id"] for a in workers}
    summary = json.loads((tmp_path / "job" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["config"]["use_gpu"] is True
    assert sum(summary["reference_rows_per_actor"].values()) == 32

    t_down = _idle_nodes_removed(sim, time.time())
    assert sim.gpu_workers() == []

    # the same training, locally on CPU workers
    assert main(["train", *_train_argv(tiny_models, data, tmp_path / "cli", *extra, gpu=False)]) == 0
    _same_training(tmp_path / "job", tmp_path / "cli")
    print(f"training job {t_job:.0f} s (GPU workers per poll: {counts}); scale-down {t_down:.0f} s")


@slow
def test_training_job_restarts_from_its_checkpoint_when_a_node_is_lost(sim, ray_local, tiny_models, tmp_path):
    """A GPU node killed mid-training: Ray Train's FailureConfig (--max-failures) restarts the
    worker group, the autoscaler replaces the node, and the run continues from its last
    checkpoint to the same final step and loss as an uninterrupted run."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from prefsel.cli import main

    sim.wait_for_workers(0, timeout=IDLE_TIMEOUT_MIN * 60 + 90)
    data = write_jsonl(tmp_path / "pairs.jsonl", _rows(160, seed=7))
    total = 40  # 2 epochs of 20 steps: long enough (about a second a step) to lose a node midway
    # (the reference log-probs precomputed by the driver's Ray Data job, as by default: Ray Data's
    # detached helper actors then live on the head. With --ref-mode online the first Ray Data
    # user is a training worker, and they would keep its GPU node from ever being removed.)
    extra = ["--epochs", "2", "--save-steps", "4", "--keep-checkpoints", "2", "--max-failures", "2",
             "--ref-actors", "2"]
    out = tmp_path / "job"
    _submit(sim, "train-spot", ["ray_jobs/train.py", *_train_argv(tiny_models, data, out, *extra)])
    killed = {}

    def kill_one_after_a_checkpoint(status, counts):
        if killed or status != "RUNNING" or counts[-1] < 2:
            return
        snapshot = out / "train" / "checkpoint_manager_snapshot.json"  # Ray Train's registered checkpoints
        try:
            latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]["metrics"]["step"]
        except (OSError, ValueError, KeyError, TypeError):
            return
        if latest <= total // 2:  # a checkpoint registered, training not over: take a node away
            victim = sim.gpu_workers()[0]["node_id"]
            killed.update(node=victim, checkpoint_step=latest, processes=sim.kill_worker(victim))

    status, counts = _watch(sim, "train-spot", on_poll=kill_one_after_a_checkpoint)
    logs = JobSubmissionClient(sim.dashboard_url).get_job_logs("train-spot")
    assert killed, f"the job ended before a node could be killed ({counts})\n{logs}"
    assert status == JobStatus.SUCCEEDED, f"{logs}\n{sim.status()}"
    assert killed["processes"] >= 1, killed
    dead = [n for n in sim.nodes(alive=False) if n["node_id"] == killed["node"]]
    assert dead and dead[0]["state"] == "DEAD", dead
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == summary["total_steps"] == total, summary
    # restarted from the checkpoint registered before the kill (or a later one), not from scratch
    assert (summary["resumed_from_step"] or 0) >= killed["checkpoint_step"] >= 4, (killed, counts, logs[-3000:])
    sim.wait_for_workers(0, timeout=IDLE_TIMEOUT_MIN * 60 + 120)
    assert main(["train", *_train_argv(tiny_models, data, tmp_path / "cli", *extra, gpu=False)]) == 0
    _same_training(out, tmp_path / "cli")
    print(f"killed {killed}; resumed from step {summary['resumed_from_step']}; GPU workers per poll: {counts}")


# ---- Serve: serve/config.yaml's autoscaling under a bounded load from a second process -------


def _serve(sim, *args: str) -> str:
    res = subprocess.run([str(Path(sys.executable).with_name("serve")), *args, "--address", sim.dashboard_url],
                         cwd=REPO, env=sim.env(), capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, f"serve {' '.join(args)}:\n{res.stdout}\n{res.stderr}"
    return res.stdout


@slow
def test_serve_replicas_and_gpu_nodes_follow_the_load(sim, tiny_models, tmp_path):
    """`serve deploy` of serve/config.yaml (min 1, max 3 replicas, 0.5 GPU each) on the simulated
    cluster: one replica on one GPU node; a bounded load from a second process on 127.0.0.1 makes
    Serve add replicas and the autoscaler a GPU node for them; after the load, back to one
    replica and one node. A light load runs the whole time: not one request fails, during the
    scale-up nor the scale-down."""
    import httpx
    import yaml

    from prefsel.cluster_sim import (
        free_ports,
        serve_replicas,
        simulated_serve_config,
        start_load,
    )

    sim.wait_for_workers(0, timeout=IDLE_TIMEOUT_MIN * 60 + 90)
    (port,) = free_ports(1)
    cfg = simulated_serve_config(policy=tiny_models[0], reference=tiny_models[1], http_port=port,
                                 runtime_env=job_runtime_env(REPO))
    auto = cfg["applications"][0]["deployments"][0]["autoscaling_config"]
    assert (auto["min_replicas"], auto["max_replicas"]) == (1, 3)
    target = auto["target_ongoing_requests"]
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(cfg))
    base = f"http://127.0.0.1:{port}"
    timeline = []

    def observe():
        reps, gpus = serve_replicas(sim.dashboard_url), sim.gpu_workers()
        timeline.append((round(time.time() - t0), len(reps), len(gpus)))
        return reps, gpus

    def wait_until(cond, what: str, timeout: float):
        deadline = time.time() + timeout
        while True:
            reps, gpus = observe()
            if cond(reps, gpus):
                return reps, gpus
            if time.time() > deadline:
                raise TimeoutError(f"{what}: (s, replicas, GPU nodes) {timeline}\n{sim.status()}")
            time.sleep(1)

    t0 = time.time()
    _serve(sim, "deploy", str(config))
    try:
        # deployed: min_replicas 1 on a GPU node the autoscaler added for it
        reps, gpus = wait_until(lambda r, g: len(r) == 1 and len(g) == 1, "one replica", 240)
        deadline = time.time() + 180
        while True:  # the replica is up when it answers
            try:
                if httpx.get(f"{base}/healthz", timeout=10).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, f"no /healthz: {timeline}"
            time.sleep(1)
        assert reps[0]["node_id"] == gpus[0]["node_id"]
        t_up = time.time()

        stop_light, stop_heavy = tmp_path / "stop-light", tmp_path / "stop-heavy"
        light = start_load(f"{base}/v1/gap", concurrency=1, stop_file=str(stop_light), out=tmp_path / "light.json")
        heavy_n = int(3 * target)  # enough ongoing requests for max_replicas at the target
        heavy = start_load(f"{base}/v1/gap", concurrency=heavy_n, stop_file=str(stop_heavy),
                           out=tmp_path / "heavy.json")
        try:
            # scale-up: Serve adds replicas (two per GPU node: 0.5 GPU each), the autoscaler a node
            reps, gpus = wait_until(lambda r, g: len(r) == 3 and len(g) == 2, "scale-up to 3 replicas", 300)
            t_scaled = time.time() - t_up
            assert {r["node_id"] for r in reps} <= {g["node_id"] for g in gpus}
            time.sleep(5)  # a few seconds at max under load: stays bounded
            stop_heavy.touch()
            assert heavy.wait(timeout=180) == 0
            t_down0 = time.time()
            # scale-down with the light load still on: back to min_replicas, the idle node goes
            wait_until(lambda r, g: len(r) == 1 and len(g) == 1, "scale-down to 1 replica, 1 node",
                       auto["downscale_delay_s"] + IDLE_TIMEOUT_MIN * 60 + 240)
            t_down = time.time() - t_down0
            time.sleep(3)
        finally:
            stop_light.touch()
            stop_heavy.touch()
            light.wait(timeout=180)
            heavy.wait(timeout=180)
        results = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in ("light", "heavy")}
        for name, res in results.items():
            assert res["requests"] > 0 and res["failed"] == 0 and res["ok"] == res["requests"], (name, res)
        assert max(n for _, n, _ in timeline) == 3 and max(g for _, _, g in timeline) == 2, timeline
        print(f"serve: 1 -> 3 replicas in {t_scaled:.0f} s, back to 1 replica / 1 node in {t_down:.0f} s; "
              f"requests ok: light {results['light']['ok']}, heavy {results['heavy']['ok']} "
              f"(p50 {results['heavy']['p50_ms']} ms); timeline (s, replicas, GPU nodes): {timeline}")
    finally:
        subprocess.run([str(Path(sys.executable).with_name("serve")), "shutdown", "-y", "--address",
                        sim.dashboard_url], env=sim.env(), capture_output=True, timeout=120, check=False)
    sim.wait_for_workers(0, timeout=IDLE_TIMEOUT_MIN * 60 + 120)
