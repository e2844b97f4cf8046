"""A simulated autoscaling cluster on one machine: cluster.yaml's node types, Ray's real autoscaler.

Ray's fake multi-node provider (`ray.autoscaler._private.fake_multi_node`, provider type
`fake_multinode`) runs the real autoscaler (the monitor process of `ray start --head
--autoscaling-config=...` with `RAY_FAKE_CLUSTER=1`) and "launches" a node by starting another
raylet on this machine with the node type's resources. A node type can advertise `GPU: 1`:
actors that ask for a GPU are scheduled there, find no CUDA, and prefsel runs them on the CPU.

`simulated_config` builds that autoscaling config from cluster.yaml, so the two share their
node-type numbers (one source): the head's resources, each single-GPU worker type's GPUs and
min_workers, upscaling_speed. What cannot be the same on a 2-core machine is overridden and
said so: 1 CPU per worker instead of the instance's vCPUs, at most `max_workers` nodes, a short
idle timeout, a small object store.

`SimulatedCluster` starts its own head (its own --temp-dir, its own ports, every address
127.0.0.1) and stops only its own processes: never `ray stop`, which would stop every Ray on the
machine (`ray.cluster_utils.AutoscalingCluster.start()` runs `ray stop --force`).

    with SimulatedCluster(max_workers=2) as cluster:
        print(cluster.dashboard_url)          # ray job submit --address ...
        cluster.wait_for_workers(2)           # counted by the state API
        print(cluster.status())               # `ray status`
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Self

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"

# The fake provider tags the head it finds with this type name (FAKE_HEAD_NODE_TYPE); the
# simulated config names cluster.yaml's head type so.
SIM_HEAD_TYPE = "ray.head.default"
SIM_CPUS_PER_WORKER = 1  # cluster.yaml's g6e.xlarge has 4 vCPUs; CI has 2 cores in all
SIM_OBJECT_STORE_BYTES = 100 * 1024 * 1024  # per node (Ray's minimum is 75 MiB)
DEFAULT_IDLE_TIMEOUT_MINUTES = 0.1  # 6 s (cluster.yaml: 10 minutes)


def _ray_bin() -> str:
    here = Path(sys.executable).with_name("ray")
    return str(here) if here.exists() else (shutil.which("ray") or "ray")


def load_cluster_yaml(path: str | os.PathLike = CLUSTER_YAML) -> dict:
    import yaml

    with open(path) as f:
        return yaml.safe_load(f)


def single_gpu_worker_types(cluster: dict) -> list[str]:
    """cluster.yaml's worker types with exactly one GPU (gpu-1x, gpu-1x-spot), in file order."""
    head = cluster["head_node_type"]
    return [name for name, t in cluster["available_node_types"].items()
            if name != head and t.get("resources", {}).get("GPU") == 1]


def simulated_config(
    cluster: dict | None = None,
    *,
    gcs_address: str,
    worker_types: list[str] | None = None,
    max_workers: int = 2,
    idle_timeout_minutes: float = DEFAULT_IDLE_TIMEOUT_MINUTES,
    cpus_per_worker: int = SIM_CPUS_PER_WORKER,
    object_store_bytes: int = SIM_OBJECT_STORE_BYTES,
) -> dict:
    """The fake_multinode autoscaling config for cluster.yaml's head and single-GPU worker types.

    From cluster.yaml: the head's resources, each worker type's name, GPUs, min_workers and
    max_workers (capped at `max_workers`), upscaling_speed. Simulation only: `cpus_per_worker`
    CPUs per worker, at most `max_workers` workers in all, `idle_timeout_minutes`.
    """
    cluster = load_cluster_yaml() if cluster is None else cluster
    names = single_gpu_worker_types(cluster) if worker_types is None else list(worker_types)
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    nodes = {SIM_HEAD_TYPE: {"resources": dict(head.get("resources", {})), "node_config": {},
                             "max_workers": 0}}
    for name in names:
        t = types[name]
        resources = {"CPU": cpus_per_worker, **{k: v for k, v in t["resources"].items() if k != "CPU"},
                     "object_store_memory": object_store_bytes}
        nodes[name] = {"resources": resources, "node_config": {},
                       "min_workers": t.get("min_workers", 0),
                       "max_workers": min(t.get("max_workers", max_workers), max_workers)}
    return {
        "cluster_name": f"{cluster['cluster_name']}-sim",
        "max_workers": max_workers,
        "upscaling_speed": cluster.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {
            # Ray's fake multi-node provider (type fake_multinode), plus: a node whose raylet died
            # is reported terminated (see SimulatedNodeProvider).
            "type": "external",
            "module": SIM_PROVIDER,
            "gcs_address": gcs_address,
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": nodes,
        "head_node_type": SIM_HEAD_TYPE,
        # Not used by the fake provider, but read by the autoscaler: present and empty.
        "auth": {}, "docker": {}, "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
    }


SIM_PROVIDER = "prefsel.cluster_sim.SimulatedNodeProvider"


def _simulated_node_provider_cls():
    from ray.autoscaler._private.fake_multi_node.node_provider import (
        FakeMultiNodeProvider,
    )

    class SimulatedNodeProvider(FakeMultiNodeProvider):
        """Ray's FakeMultiNodeProvider, which tells the autoscaler when a node was lost.

        A cloud provider reports a reclaimed spot instance as terminated; the fake provider keeps
        a node whose raylet was killed in its list forever (and the autoscaler, which never hears
        of it again, counts it as pending), so no replacement is ever launched. This one forgets
        such a node (ending what is left of it), and the autoscaler launches another one if the
        work still asks for it.
        """

        def non_terminated_nodes(self, tag_filters):
            with self.lock:
                for node_id, entry in list(self._nodes.items()):
                    node = entry.get("node")  # absent for the head
                    if node is not None and any(kind == "raylet" for kind, _ in node.dead_processes()):
                        self._nodes.pop(node_id, None)
                        node.kill_all_processes(check_alive=False, allow_graceful=False)
            return super().non_terminated_nodes(tag_filters)

    SimulatedNodeProvider.__module__ = __name__
    return SimulatedNodeProvider


def __getattr__(name: str):
    # `SimulatedNodeProvider` on first use (by the autoscaler: provider.module), so that importing
    # this module does not import the autoscaler.
    if name == "SimulatedNodeProvider":
        cls = globals()[name] = _simulated_node_provider_cls()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def job_runtime_env(repo: str | os.PathLike = REPO) -> dict:
    """ray_jobs/runtime_env.yaml for a simulated cluster: the same env_vars, the checkout in place.

    Simulated nodes share this machine's disk and their head's session dir, so Ray's uploaded
    working_dir would be unpacked by every node into one path, and a node that starts later (a
    replacement for a lost one) unpacks it again over the directory the running workers are in.
    `local://` names a directory that exists on every node, as the repository does here (and as
    cluster.yaml's file mount /home/ubuntu/prefsel does on a real cluster): nothing is unpacked.
    """
    import yaml

    with open(Path(repo) / "ray_jobs" / "runtime_env.yaml") as f:
        env = yaml.safe_load(f)
    env.pop("excludes", None)
    env["working_dir"] = f"local://{Path(repo).resolve()}"
    return env


def free_ports(n: int) -> list[int]:
    """`n` TCP ports free on 127.0.0.1 now (for a head's GCS, dashboard, agents...)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def cluster_env(base: dict | None = None) -> dict:
    """Environment for the head and for `ray` commands against it."""
    env = dict(os.environ if base is None else base)
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `python` in jobs
    for k in ("RAY_ADDRESS", "AWS_ENDPOINT_URL"):
        env.pop(k, None)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Ray's "node IP" of this machine: 127.0.0.1 instead of the interface's address. Without it
    # the autoscaler's simulated nodes would bind to the interface, and `ray status --address
    # 127.0.0.1:PORT` would look for the GCS there. On Linux it changes nothing else (it only
    # refuses `ray start --address`, which a simulated cluster never runs).
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    return env


def processes_under(temp_dir: str):
    """Every process whose command line names temp_dir, and all their children."""
    import psutil

    found = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp_dir in part for part in (p.info["cmdline"] or [])):
                found[p.pid] = p
                for c in p.children(recursive=True):
                    found[c.pid] = c
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    found.pop(os.getpid(), None)
    return list(found.values())


def end_processes(procs, timeout: float = 10) -> None:
    import psutil

    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout)


class SimulatedCluster:
    """A `ray start --head` with the fake multi-node autoscaler, on 127.0.0.1, stopped by pid."""

    def __init__(self, *, max_workers: int = 2, idle_timeout_minutes: float = DEFAULT_IDLE_TIMEOUT_MINUTES,
                 worker_types: list[str] | None = None, cluster_yaml: str | os.PathLike = CLUSTER_YAML,
                 log=None) -> None:
        self.max_workers = max_workers
        self.idle_timeout_minutes = idle_timeout_minutes
        self.worker_types = worker_types
        self.cluster_yaml = cluster_yaml
        self.temp_dir: str | None = None
        self.gcs_address = self.dashboard_url = None
        self.config: dict | None = None
        self._log = log or (lambda msg: None)

    # -- start / stop ------------------------------------------------------------------------

    def start(self, timeout: float = 180) -> SimulatedCluster:
        gcs, dash, client, agent_http, agent_grpc, metrics = free_ports(6)
        # Short: Ray's socket paths under the temp dir are limited in length.
        self.temp_dir = tempfile.mkdtemp(prefix="psim", dir="/tmp")
        self.gcs_address = f"127.0.0.1:{gcs}"
        self.dashboard_url = f"http://127.0.0.1:{dash}"
        self.config = simulated_config(
            load_cluster_yaml(self.cluster_yaml), gcs_address=self.gcs_address,
            worker_types=self.worker_types, max_workers=self.max_workers,
            idle_timeout_minutes=self.idle_timeout_minutes)
        config_path = os.path.join(self.temp_dir, "autoscaling.json")
        with open(config_path, "w") as f:
            json.dump(self.config, f, indent=1)
        head = self.config["available_node_types"][SIM_HEAD_TYPE]["resources"]
        env = self.env()
        env.update({
            "RAY_FAKE_CLUSTER": "1",             # the fake provider refuses to run without it
            # the autoscaler (monitor process) imports SIM_PROVIDER from this checkout
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p),
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",  # the autoscaler's loop period (default 5 s)
        })
        cmd = [
            _ray_bin(), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
            f"--autoscaling-config={config_path}",
            "--num-cpus", str(int(head.get("CPU", 0))), "--num-gpus", str(int(head.get("GPU", 0))),
            "--object-store-memory", str(SIM_OBJECT_STORE_BYTES),
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--include-dashboard", "true",
            "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent_http),
            "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
            "--temp-dir", self.temp_dir, "--disable-usage-stats",
        ]
        self._log(f"starting the simulated head: {' '.join(cmd[1:])}")
        try:
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
            if res.returncode != 0:
                raise RuntimeError(f"ray start failed:\n{res.stdout}\n{res.stderr}")
            self._wait_for_dashboard(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_for_dashboard(self, timeout: float) -> None:
        from ray.job_submission import JobSubmissionClient

        deadline = time.time() + timeout
        while True:
            try:
                JobSubmissionClient(self.dashboard_url).list_jobs()
                self.nodes()
                return
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(1)

    def stop(self) -> None:
        """End this cluster's processes (head, autoscaler, simulated nodes, jobs) by pid."""
        if not self.temp_dir:
            return
        end_processes(processes_under(self.temp_dir))
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def processes(self):
        return processes_under(self.temp_dir) if self.temp_dir else []

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def env(self) -> dict:
        """Environment for `ray job submit`, `ray status` and jobs against this cluster."""
        return cluster_env()

    # -- what Ray says ----------------------------------------------------------------------

    def nodes(self, *, alive: bool = True) -> list[dict]:
        """Ray's state API (`ray list nodes`): the nodes of this cluster, as dicts."""
        from ray.util.state import list_nodes

        filters = [("state", "=", "ALIVE")] if alive else None
        return [n if isinstance(n, dict) else n.__dict__
                for n in list_nodes(address=self.dashboard_url, filters=filters, limit=1000,
                                    raise_on_missing_output=False)]

    def gpu_workers(self) -> list[dict]:
        """The alive nodes with a GPU (the head has none)."""
        return [n for n in self.nodes() if (n.get("resources_total") or {}).get("GPU", 0) > 0]

    def wait_for_workers(self, count: int, *, timeout: float = 240, at_least: bool = False,
                         poll: float = 1.0, on_poll=None) -> list[dict]:
        """Wait until exactly `count` (or at least, with at_least) GPU workers are alive."""
        deadline = time.time() + timeout
        while True:
            workers = self.gpu_workers()
            if (len(workers) >= count) if at_least else (len(workers) == count):
                return workers
            if on_poll is not None:
                on_poll(workers)
            if time.time() > deadline:
                raise TimeoutError(f"{len(workers)} GPU workers alive after {timeout} s, "
                                   f"waiting for {count}:\n{self.status()}")
            time.sleep(poll)

    def status(self) -> str:
        """`ray status` of this cluster: nodes, pending demands, autoscaler activity."""
        res = subprocess.run([_ray_bin(), "status", "--address", self.gcs_address], env=self.env(),
                             capture_output=True, text=True, timeout=60, check=False)
        return res.stdout + res.stderr

    def kill_worker(self, node_id: str) -> int:
        """Take a simulated node away, as a cloud reclaims a spot instance: kill its raylet and,
        at the same moment, the processes it started (the node's workers and actors), as an
        instance that disappears takes them all. Returns how many processes were killed."""
        import psutil

        victims = []
        for p in self.processes():
            try:
                cmd = p.cmdline()
                if cmd and os.path.basename(cmd[0]) == "raylet" and any(node_id in c for c in cmd):
                    victims += [p, *p.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
        killed = 0
        for p in victims:
            try:
                p.kill()
                killed += 1
            except psutil.NoSuchProcess:
                pass
        return killed


# ---- Ray Serve on the simulated cluster --------------------------------------------------------

SERVE_CONFIG_YAML = REPO / "serve" / "config.yaml"
SERVE_APP_NAME = "prefsel-gap"
SERVE_DEPLOYMENT = "GapScorer"


def simulated_serve_config(
    *,
    policy: str,
    reference: str,
    http_port: int,
    runtime_env: dict | None = None,
    config_yaml: str | os.PathLike = SERVE_CONFIG_YAML,
    max_replicas: int | None = 3,
    cpus_per_replica: float = SIM_CPUS_PER_WORKER / 2,
    upscale_delay_s: float = 2.0,
    downscale_delay_s: float = 8.0,
    look_back_period_s: float = 5.0,
    metrics_interval_s: float = 1.0,
    extra_args: dict | None = None,
) -> dict:
    """serve/config.yaml for a simulated cluster, to `serve deploy` there (one source again).

    Kept from the file: the application (name, route, import path, args), the GapScorer
    deployment's max_ongoing_requests, min_replicas, target_ongoing_requests and num_gpus
    (0.5: two replicas share a GPU node). Changed for the simulation, and only that: the models
    (`policy`, `reference`), the HTTP port (127.0.0.1 kept), `max_replicas` (the issue's bound, 3;
    None keeps the file's), num_cpus per replica (half a simulated node's 1 CPU, so that the
    0.5 GPU still puts two replicas on a node), Serve's autoscaling delays and windows (seconds
    instead of Serve's 30 s up / 600 s down), and the application's runtime_env (the checkout in
    place: job_runtime_env).
    """
    import yaml

    with open(config_yaml) as f:
        cfg = yaml.safe_load(f)
    cfg["http_options"] = {**(cfg.get("http_options") or {}), "host": "127.0.0.1", "port": int(http_port)}
    app = next(a for a in cfg["applications"] if a["name"] == SERVE_APP_NAME)
    cfg["applications"] = [app]
    app["args"] = {**(app.get("args") or {}), "policy": policy, "reference": reference, **(extra_args or {})}
    app["runtime_env"] = job_runtime_env() if runtime_env is None else runtime_env
    dep = next(d for d in app["deployments"] if d["name"] == SERVE_DEPLOYMENT)
    auto = dep["autoscaling_config"]
    if max_replicas is not None:
        auto["max_replicas"] = max_replicas
    auto.update(upscale_delay_s=upscale_delay_s, downscale_delay_s=downscale_delay_s,
                look_back_period_s=look_back_period_s, metrics_interval_s=metrics_interval_s)
    dep["ray_actor_options"] = {**(dep.get("ray_actor_options") or {}), "num_cpus": cpus_per_replica}
    return cfg


def load_client(url: str, *, concurrency: int, stop_file: str | None = None, max_seconds: float = 600,
                pairs_per_request: int = 1, timeout_s: float = 120) -> dict:
    """POST pairs to `url` from `concurrency` threads until `stop_file` exists (or max_seconds).

    Every request is counted: by HTTP status, and connection errors / timeouts apart; nothing
    is retried, so one failure shows. Returns the counts, latencies and the first errors."""
    import threading

    import httpx

    from prefsel.demo_data import make_demo_pairs

    pool = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in make_demo_pairs(64, seed=11)]
    status: dict[str, int] = {}
    errors: list[str] = []
    lat: list[float] = []
    lock = threading.Lock()
    t0 = time.time()
    deadline = t0 + max_seconds

    def stop() -> bool:
        return time.time() > deadline or (stop_file is not None and os.path.exists(stop_file))

    def worker(k: int) -> None:
        i = k
        with httpx.Client(timeout=timeout_s) as c:
            while not stop():
                body = {"pairs": [pool[(i + j) % len(pool)] for j in range(pairs_per_request)]}
                i += concurrency
                t = time.time()
                try:
                    r = c.post(url, json=body)
                    key, err = str(r.status_code), (None if r.status_code == 200 else r.text[:300])
                except Exception as e:  # noqa: BLE001 - a failed request, as much as a non-2xx one
                    key, err = "exception", f"{type(e).__name__}: {e}"
                with lock:
                    status[key] = status.get(key, 0) + 1
                    if key == "200":
                        lat.append(time.time() - t)
                    elif len(errors) < 10:
                        errors.append(f"{key}: {err}")

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lat.sort()
    n = sum(status.values())
    return {"url": url, "concurrency": concurrency, "requests": n, "ok": status.get("200", 0),
            "failed": n - status.get("200", 0), "status": status, "errors": errors,
            "wall_s": round(time.time() - t0, 1),
            "p50_ms": round(lat[len(lat) // 2] * 1000, 1) if lat else None,
            "max_ms": round(lat[-1] * 1000, 1) if lat else None}


def start_load(url: str, *, concurrency: int, stop_file: str, max_seconds: float = 600,
               out: str | os.PathLike) -> subprocess.Popen:
    """load_client in a second process (`python -m prefsel.cluster_sim load ...`), its JSON to `out`."""
    cmd = [sys.executable, "-m", "prefsel.cluster_sim", "load", url, "--concurrency", str(concurrency),
           "--stop-file", str(stop_file), "--max-seconds", str(max_seconds), "--out", str(out)]
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


def serve_replicas(dashboard_url: str, app: str = SERVE_APP_NAME, deployment: str = SERVE_DEPLOYMENT,
                   ) -> list[dict]:
    """The deployment's replica actors alive now (Ray's state API), with the node of each."""
    from ray.util.state import list_actors

    name = f"ServeReplica:{app}:{deployment}"
    return [a if isinstance(a, dict) else a.__dict__
            for a in list_actors(address=dashboard_url, filters=[("class_name", "=", name), ("state", "=", "ALIVE")],
                                 detail=True, limit=1000, raise_on_missing_output=False)]


def _main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m prefsel.cluster_sim")
    sub = p.add_subparsers(dest="cmd", required=True)
    ld = sub.add_parser("load", help="bounded HTTP load on the gap endpoint (the second process)")
    ld.add_argument("url")
    ld.add_argument("--concurrency", type=int, default=4)
    ld.add_argument("--stop-file", help="stop when this file exists")
    ld.add_argument("--max-seconds", type=float, default=600)
    ld.add_argument("--pairs-per-request", type=int, default=1)
    ld.add_argument("--out", help="write the JSON result here (and print it)")
    a = p.parse_args(argv)
    res = load_client(a.url, concurrency=a.concurrency, stop_file=a.stop_file, max_seconds=a.max_seconds,
                      pairs_per_request=a.pairs_per_request)
    text = json.dumps(res)
    if a.out:
        tmp = f"{a.out}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, a.out)
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
