"""The local Ray that prefsel starts (prefsel.jobs.init_ray): it listens on 127.0.0.1 only, and a
driver killed with SIGKILL leaves no Ray process behind for long.

The Ray under test runs in a subprocess of its own (this test session's Ray, and any other Ray on
the machine, are left alone): only the process tree of that subprocess is inspected and killed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

CHILD = r"""
import json, os, sys, time
import psutil
from prefsel.jobs import init_ray
init_ray(num_cpus=1)
import ray

@ray.remote
def pid():
    return os.getpid()

ray.get(pid.remote())  # a worker process, with its own gRPC server
time.sleep(2)  # the agents' servers are up
me = psutil.Process()
procs = {p.pid: p.name() for p in me.children(recursive=True)}
procs[me.pid] = "driver"
listening = []
for c in psutil.net_connections(kind="inet"):
    if c.status == psutil.CONN_LISTEN and c.pid in procs:
        listening.append([c.laddr.ip, c.laddr.port, procs[c.pid]])
print(json.dumps({"procs": procs, "listening": listening, "node_ip": ray.util.get_node_ip_address()}), flush=True)
time.sleep(600)
"""

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
# After the driver is SIGKILLed: the GCS, the raylet, the workers and the dashboard go within
# about 2 s (they share the driver's fate); the dashboard agent and the runtime-env agent notice
# the raylet's death as fast, then try for 60 s to report it to the dead GCS (a timeout fixed in
# Ray 2.60: ray._private.utils.publish_error_to_driver) before they exit.
FAST_S = 20
AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent", "ray::DashboardAg", "ray::RuntimeEnv")


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def killed_local_ray():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    p = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         text=True, env=env)
    procs: dict[int, str] = {}
    try:
        line = p.stdout.readline()
        assert line, "the child Ray did not start"
        info = json.loads(line)
        procs = {int(k): v for k, v in info["procs"].items() if v != "driver"}
        t0 = time.time()
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        gone_at: dict[int, float] = {}
        others = [pid for pid, name in procs.items() if not name.startswith(AGENTS)]
        while time.time() - t0 < FAST_S and not all(pid in gone_at for pid in others):
            for pid in procs:
                if pid not in gone_at and not _alive(pid):
                    gone_at[pid] = time.time() - t0
            time.sleep(0.1)
        info["procs"], info["gone_at"] = procs, gone_at
        yield info
    finally:
        if p.poll() is None:
            p.kill()
        for pid in procs:
            if _alive(pid):  # the two agents still waiting on the dead GCS: ours, end them now
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def test_local_ray_listens_on_loopback_only(killed_local_ray):
    info = killed_local_ray
    assert info["node_ip"] == "127.0.0.1"
    listening = info["listening"]
    names = {name for _, _, name in listening}
    assert {"gcs_server", "raylet"} <= names, listening  # the control ports are among those checked
    assert any(name.startswith("ray::") for name in names), listening  # a worker / agent too
    assert all(ip in LOOPBACK for ip, _, _ in listening), [x for x in listening if x[0] not in LOOPBACK]


def test_killed_driver_leaves_only_the_agents_for_a_while(killed_local_ray):
    procs, gone_at = killed_local_ray["procs"], killed_local_ray["gone_at"]
    left = {pid: name for pid, name in procs.items() if pid not in gone_at}
    assert all(name.startswith(AGENTS) for name in left.values()), left
    core = [pid for pid, name in procs.items() if name in ("gcs_server", "raylet")]
    assert core and all(pid in gone_at for pid in core)
    print("gone after SIGKILL of the driver (s):",
          sorted((round(t, 2), procs[pid]) for pid, t in gone_at.items()), "still there:", sorted(left.values()))
