"""ray_jobs/ entry points on a real `ray start --head` cluster, through `ray job submit`.

The head runs on 127.0.0.1 with its own ports and its own --temp-dir, so the session's local Ray
(tests/conftest.py, `ray.init(num_cpus=2)`) neither sees it nor is touched by it: `ray.init()`
without an address looks for a running cluster only under the default temp dir. The head's
processes are ended by their pids at module teardown (`ray stop` would stop every Ray of the
machine, the session's included).
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from helpers import write_jsonl
from prefsel.cluster_sim import end_processes, free_ports, processes_under
from prefsel.demo_data import make_demo_pairs

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def _env() -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `python` in jobs
    for k in ("RAY_ADDRESS", "AWS_ENDPOINT_URL"):
        env.pop(k, None)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def _stop_head(temp_dir: str) -> None:
    end_processes(processes_under(temp_dir), timeout=5)


@pytest.fixture(scope="module")
def ray_head():
    """Dashboard address (http://127.0.0.1:PORT) of a one-node `ray start --head` cluster."""
    gcs, dash, client, agent_http, agent_grpc, metrics = free_ports(6)
    temp_dir = tempfile.mkdtemp(prefix="rjh", dir="/tmp")  # short: Ray's socket paths are limited
    default_current = Path("/tmp/ray/ray_current_cluster")
    before = default_current.read_text() if default_current.exists() else None
    cmd = [
        RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--include-dashboard", "true",
        "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent_http),
        "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
        "--num-cpus", "2", "--num-gpus", "0", "--temp-dir", temp_dir, "--disable-usage-stats",
    ]
    address = f"http://127.0.0.1:{dash}"
    try:
        res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=180)
        assert res.returncode == 0, f"ray start failed:\n{res.stdout}\n{res.stderr}"
        from ray.job_submission import JobSubmissionClient

        deadline = time.time() + 60
        while True:
            try:
                JobSubmissionClient(address).list_jobs()
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(1)
        # the session's `ray.init()` must not find this cluster
        after = default_current.read_text() if default_current.exists() else None
        assert after == before, "the test head registered itself as the machine's default cluster"
        yield address
    finally:
        _stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not processes_under(temp_dir)


def _wait(client, job_id: str, timeout: float = 300):
    from ray.job_submission import JobStatus

    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status
        time.sleep(1)
    raise TimeoutError(f"job {job_id} still {status} after {timeout} s:\n{client.get_job_logs(job_id)}")


def _rows() -> list[dict]:
    return [{"id": r["id"], "prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
            for r in make_demo_pairs(24, seed=5)]


# ---- entry points without a cluster ------------------------------------------------------------


def test_entry_points_reuse_the_cli(tmp_path):
    env = _env()
    runs = {  # name: (argv, expected exit code), run side by side
        **{f"{job}-help": ([f"ray_jobs/{job}.py", "--help"], 0) for job in ("score", "select", "serve")},
        # bad input: a clear message and exit code 2, no traceback
        "missing": (["ray_jobs/select.py", "--scores", str(tmp_path / "nope"), "--output", str(tmp_path / "x")], 2),
        # flags that do not parse: argparse's usage error, exit code 2
        "flags": (["ray_jobs/score.py", "--no-such-flag"], 2),
        # the serve entry resolves its settings with the same parser as `prefsel serve`
        "serve": (["ray_jobs/serve.py", "--policy", "P", "--reference", "R", "--port", "8123", "--print-config"], 0),
    }
    procs = {name: subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, (argv, _) in runs.items()}
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=180)
        out[name] = (p.returncode, stdout, stderr)
    for name, (code, stdout, stderr) in out.items():
        assert code == runs[name][1], f"{name}: exit {code}\n{stderr}"
    for job in ("score", "select", "serve"):
        assert f"prefsel {job}" in out[f"{job}-help"][1]
    assert "prefsel select: error:" in out["missing"][2] and "Traceback" not in out["missing"][2]
    assert "prefsel score: error:" in out["flags"][2] and "Traceback" not in out["flags"][2]
    assert json.loads(out["serve"][1])["http"]["port"] == 8123


def test_unexpected_errors_propagate_to_a_nonzero_exit(monkeypatch):
    """Errors other than bad input are not swallowed: the script ends with a traceback (exit 1)."""
    import prefsel.cli

    def boom(args):
        raise RuntimeError("boom")

    monkeypatch.setitem(prefsel.cli.COMMANDS, "score", (prefsel.cli.score_parser, boom, "x"))
    monkeypatch.setattr(sys, "argv", ["ray_jobs/score.py", "--policy", "p", "--reference", "r",
                                      "--data", "d", "--output", "o"])
    with pytest.raises(RuntimeError, match="boom"):
        runpy.run_path(str(REPO / "ray_jobs" / "score.py"), run_name="__main__")

    def bad(args):
        raise ValueError("bad value")

    monkeypatch.setitem(prefsel.cli.COMMANDS, "score", (prefsel.cli.score_parser, bad, "x"))
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(REPO / "ray_jobs" / "score.py"), run_name="__main__")
    assert e.value.code == 2


def test_runtime_env_example_is_valid():
    from ray.runtime_env import RuntimeEnv

    text = (REPO / "ray_jobs" / "runtime_env.yaml").read_text()
    assert "ray job submit" in text and "--runtime-env ray_jobs/runtime_env.yaml" in text
    env = yaml.safe_load(text)
    assert env["working_dir"] == "." and "pip:" in text and "py_modules:" in text
    assert all(isinstance(v, str) for v in env["env_vars"].values())
    RuntimeEnv(**env)  # Ray's own validation of the fields


# ---- on a `ray start --head` cluster ----------------------------------------------------------


def test_select_job_succeeds_and_equals_the_cli_run(ray_head, ray_local, tiny_models, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    from prefsel.cli import main

    data = write_jsonl(tmp_path / "pairs.jsonl", _rows())
    args = ["--policy", tiny_models[0], "--reference", tiny_models[1], "--data", str(data), "--ratio", "0.25",
            "--chunk-rows", "8"]
    # the way a user submits: `ray job submit` with the runtime_env example, run from the repo root
    submit = [RAY, "job", "submit", "--address", ray_head, "--submission-id", "prefsel-select-ok",
              "--runtime-env", "ray_jobs/runtime_env.yaml", "--",
              "python", "ray_jobs/select.py", *args, "--output", str(tmp_path / "job-sel")]
    res = subprocess.run(submit, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=420)
    client = JobSubmissionClient(ray_head)
    logs = client.get_job_logs("prefsel-select-ok")
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}\n{logs}"
    assert client.get_job_status("prefsel-select-ok") == JobStatus.SUCCEEDED
    assert "prefsel select" in logs and "rows_selected" in logs  # the job prints its summary
    info = client.get_job_info("prefsel-select-ok")
    assert info.runtime_env["env_vars"]["PYTHONUNBUFFERED"] == "1"

    # the same command directly through the CLI (the session's local Ray)
    assert main(["select", *args, "--output", str(tmp_path / "cli-sel")]) == 0
    job = (tmp_path / "job-sel" / "selected.jsonl").read_text()
    cli = (tmp_path / "cli-sel" / "selected.jsonl").read_text()
    assert job == cli and len(job.splitlines()) == int(len(_rows()) * 0.25)
    job_summary = json.loads((tmp_path / "job-sel" / "summary.json").read_text())
    cli_summary = json.loads((tmp_path / "cli-sel" / "summary.json").read_text())
    for k in ("rows_scored", "rows_selected", "cutoff_gap", "gap_quantiles"):
        assert job_summary[k] == cli_summary[k]


def test_job_with_bad_arguments_fails_with_a_clear_message(ray_head, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(ray_head)
    # submitted without waiting; watched through the job submission HTTP API
    res = subprocess.run(
        [RAY, "job", "submit", "--address", ray_head, "--submission-id", "prefsel-select-bad", "--no-wait",
         "--working-dir", ".", "--", "python", "ray_jobs/select.py", "--scores", str(tmp_path / "missing"),
         "--ratio", "0.1", "--output", str(tmp_path / "never")],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert _wait(client, "prefsel-select-bad") == JobStatus.FAILED
    logs = subprocess.run([RAY, "job", "logs", "--address", ray_head, "prefsel-select-bad"], env=_env(),
                          capture_output=True, text=True, timeout=60).stdout
    assert "prefsel select: error:" in logs and "not a prefsel output" in logs
    info = client.get_job_info("prefsel-select-bad")
    assert "exit code 2" in (info.message or "") or info.driver_exit_code == 2
    assert not (tmp_path / "never").exists()

    # a job whose arguments do not parse fails too, with argparse's message
    job_id = client.submit_job(entrypoint="python ray_jobs/score.py --ratio 0.1", runtime_env={"working_dir": str(REPO)})
    assert _wait(client, job_id) == JobStatus.FAILED
    assert "the following arguments are required" in client.get_job_logs(job_id)
