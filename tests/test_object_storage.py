"""Object storage: score and select with --data / --output on s3:// against a local moto server.

pyarrow's S3 file system is pointed at moto the way a user points it at MinIO: environment
variables (AWS_ENDPOINT_URL with an http:// URL, dummy keys, a region). Ray workers read the
input chunks, so they need those variables too: the session's Ray was started before this
module set them, so the module restarts it (a local Ray's workers inherit the driver's
environment at `ray.init`), and restores the session's Ray at the end. On a cluster, pass the
variables in the job's runtime_env `env_vars` instead (README.md, "Object storage").
Nothing here talks to AWS: every request goes to 127.0.0.1.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import write_jsonl
from prefsel.demo_data import make_demo_pairs

BUCKET = "prefsel-test"
ENV_KEYS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
            "AWS_EC2_METADATA_DISABLED", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_ray(ray) -> None:
    """A local Ray like the session's (tests/conftest.py `ray_local`), started from this environment."""
    from prefsel.jobs import init_ray

    if ray.is_initialized():
        ray.shutdown()
    init_ray(num_cpus=2)


@pytest.fixture(scope="module")
def s3():
    """(boto3 client, endpoint URL) of a fresh moto S3 with one bucket; Ray workers see it."""
    import ray

    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = {k: os.environ.get(k) for k in ENV_KEYS}
    for k in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(k, None)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
    )
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    had_ray = ray.is_initialized()  # the session's Ray, started before these variables were set
    _start_ray(ray)  # its workers inherit the AWS_* variables
    try:
        yield client, endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        ray.shutdown()
        if had_ray:
            _start_ray(ray)  # the session's Ray again, without the variables
        server.stop()


def _rows() -> list:
    rows = []
    for r in make_demo_pairs(20, seed=11):
        rows.append({"id": r["id"], "prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]})
    rows.insert(3, {"id": "bad-1", "prompt": "Q?", "rejected": "no"})  # no chosen
    rows.insert(9, '{"id": "bad-2", "prompt": ')  # a line that is not JSON
    return rows


def _put(client, key: str, body: str) -> None:
    client.put_object(Bucket=BUCKET, Key=key, Body=body.encode("utf-8"))


def _get(client, key: str) -> bytes:
    return client.get_object(Bucket=BUCKET, Key=key)["Body"].read()


def _keys(client, prefix: str) -> list[str]:
    out, token = [], None
    while True:
        kw = {"ContinuationToken": token} if token else {}
        page = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix, **kw)
        out += [o["Key"] for o in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return sorted(out)
        token = page["NextContinuationToken"]


def _lines(rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def _s3_scores(client, prefix: str):
    import io

    import pyarrow as pa

    shards = [k for k in _keys(client, f"{prefix}/scores/") if k.endswith(".parquet")]
    return pa.concat_tables([pq.read_table(io.BytesIO(_get(client, k))) for k in shards]).sort_by("row_id")


def _s3_rejects(client, prefix: str) -> list[dict]:
    rows = []
    for k in _keys(client, f"{prefix}/rejects/"):
        if k.endswith(".jsonl"):
            rows += [json.loads(x) for x in _get(client, k).decode().splitlines() if x.strip()]
    return sorted(rows, key=lambda r: r["row_id"])


def test_filesystem_for_uses_the_endpoint_from_the_environment(s3):
    from pyarrow import fs as pafs

    from prefsel.sources import filesystem_for

    client, _ = s3
    _put(client, "probe/hello.txt", "hi\n")
    fs, path = filesystem_for(f"s3://{BUCKET}/probe/hello.txt")
    assert isinstance(fs, pafs.S3FileSystem) and path == f"{BUCKET}/probe/hello.txt"
    with fs.open_input_stream(path) as f:
        assert f.read() == b"hi\n"


def test_score_and_select_on_s3_equal_the_local_run(tiny_models, s3, tmp_path):
    from prefsel.cli import main

    client, _ = s3
    rows = _rows()
    half = len(rows) // 2
    # the same two input files on S3 and on local disk
    _put(client, "pairs/part-0.jsonl", _lines(rows[:half]))
    _put(client, "pairs/part-1.jsonl", _lines(rows[half:]))
    (tmp_path / "pairs").mkdir()
    write_jsonl(tmp_path / "pairs" / "part-0.jsonl", rows[:half])
    write_jsonl(tmp_path / "pairs" / "part-1.jsonl", rows[half:])
    models = ["--policy", tiny_models[0], "--reference", tiny_models[1], "--chunk-rows", "6"]

    # one job, as in `ray job submit ... python ray_jobs/select.py --data s3://... --output s3://...`
    assert main(["select", *models, "--data", f"s3://{BUCKET}/pairs/", "--ratio", "0.25",
                 "--output", f"s3://{BUCKET}/runs/sel-01"]) == 0
    assert main(["select", *models, "--data", str(tmp_path / "pairs"), "--ratio", "0.25",
                 "--output", str(tmp_path / "sel-01")]) == 0

    # scores: complete manifest, identical rows and gaps
    manifest = json.loads(_get(client, "runs/sel-01-scores/manifest.json"))
    assert manifest["kind"] == "scores" and manifest["complete"] is True
    assert list(manifest["fingerprint"]["data"]) == [f"s3://{BUCKET}/pairs/part-0.jsonl",
                                                     f"s3://{BUCKET}/pairs/part-1.jsonl"]
    remote = _s3_scores(client, "runs/sel-01-scores")
    local = pq.read_table(tmp_path / "sel-01-scores" / "scores").sort_by("row_id")
    assert remote.num_rows == local.num_rows == len(rows) - 2
    assert remote["row_id"].to_pylist() == local["row_id"].to_pylist()
    np.testing.assert_array_equal(remote["gap"].to_numpy(), local["gap"].to_numpy())
    assert remote.drop_columns(["gap"]).equals(local.drop_columns(["gap"]))

    # rejects and summary on S3, with the row accounting
    rejects = _s3_rejects(client, "runs/sel-01-scores")
    assert [r["row_id"] for r in rejects] == [3, 9]
    assert "chosen" in rejects[0]["reason"] and "invalid JSON" in rejects[1]["reason"]
    summary = json.loads(_get(client, "runs/sel-01-scores/summary.json"))
    assert summary["rows_in"] == len(rows) and summary["rows_rejected"] == 2
    assert summary["rows_in"] == summary["rows_scored"] + summary["rows_rejected"]
    local_summary = json.loads((tmp_path / "sel-01-scores" / "summary.json").read_text())
    assert summary["reject_reasons"] == local_summary["reject_reasons"]

    # the selection: same rows, same gaps, same order; summary, histogram, complete manifest
    sel_remote = [json.loads(x) for x in _get(client, "runs/sel-01/selected.jsonl").decode().splitlines()]
    sel_local = [json.loads(x) for x in (tmp_path / "sel-01" / "selected.jsonl").read_text().splitlines()]
    assert sel_remote == sel_local and len(sel_remote) == int((len(rows) - 2) * 0.25)
    sel_manifest = json.loads(_get(client, "runs/sel-01/manifest.json"))
    assert sel_manifest["kind"] == "selection" and sel_manifest["complete"] is True
    sel_summary = json.loads(_get(client, "runs/sel-01/summary.json"))
    assert sel_summary["rows_selected"] == len(sel_remote)
    assert sel_summary["outputs"]["selected"] == f"s3://{BUCKET}/runs/sel-01/selected.jsonl"
    assert len(_get(client, "runs/sel-01/gap_histogram.png")) > 1000
    assert not [k for k in _keys(client, "runs/") if ".tmp-" in k], "temporary files left behind"

    # selecting again from the S3 scores (select --scores s3://...) gives the same rows
    assert main(["select", "--scores", f"s3://{BUCKET}/runs/sel-01-scores", "--ratio", "0.25",
                 "--output", f"s3://{BUCKET}/runs/sel-02"]) == 0
    assert _get(client, "runs/sel-02/selected.jsonl") == _get(client, "runs/sel-01/selected.jsonl")
    # a finished output is not overwritten without --overwrite
    assert main(["select", "--scores", f"s3://{BUCKET}/runs/sel-01-scores",
                 "--output", f"s3://{BUCKET}/runs/sel-02"]) == 2


def test_unfinished_or_foreign_s3_output_is_refused(tiny_models, s3, tmp_path):
    from prefsel.score_job import ScoreJobConfig, run_score
    from prefsel.selection import SelectConfig, run_select

    client, _ = s3
    _put(client, "small/in.jsonl", _lines(_rows()[:4]))
    # an unfinished output (manifest not complete): select refuses it
    _put(client, "runs/partial/manifest.json", json.dumps({"kind": "scores", "complete": False, "fingerprint": {}}))
    _put(client, "runs/partial/scores/part-000000.parquet", "not read")
    with pytest.raises(ValueError, match="unfinished"):
        run_select(SelectConfig(scores=f"s3://{BUCKET}/runs/partial", output=f"s3://{BUCKET}/runs/x"))
    # nor is its scores/ folder, a shard of it, or a glob into it read as data (before: its
    # finished shards passed as a whole corpus; nothing in an object's name marks it partial)
    from prefsel.sources import data_files

    for inside in ("runs/partial/scores", "runs/partial/scores/", "runs/partial/scores/part-000000.parquet",
                   "runs/partial/scores/*.parquet"):
        with pytest.raises(ValueError, match=rf"lies in the unfinished prefsel run '{BUCKET}/runs/partial'"):
            data_files(f"s3://{BUCKET}/{inside}")
    assert data_files(f"s3://{BUCKET}/small/in.jsonl") == [f"s3://{BUCKET}/small/in.jsonl"]
    # another tool's manifest.json beside the data (no prefsel kind and fingerprint) is no run
    _put(client, "other/manifest.json", json.dumps({"kind": "Deployment", "complete": False}))
    _put(client, "other/train/a.jsonl", _lines(_rows()[:2]))
    for name in ("other/train", "other/train/a.jsonl", "other/*/a.jsonl"):
        assert data_files(f"s3://{BUCKET}/{name}") == [f"s3://{BUCKET}/other/train/a.jsonl"]
    # an unfinished run of other settings at the same place: refused, not mixed
    with pytest.raises(FileExistsError, match="different input"):
        run_score(ScoreJobConfig(policy=tiny_models[0], reference=tiny_models[1],
                                 data=f"s3://{BUCKET}/small/in.jsonl", output=f"s3://{BUCKET}/runs/partial"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_score(ScoreJobConfig(policy=tiny_models[0], reference=tiny_models[1],
                                 data=f"s3://{BUCKET}/nothing-here/", output=f"s3://{BUCKET}/runs/y"))


def test_killed_s3_run_is_unfinished_and_resumes(tiny_models, s3, tmp_path):
    """Kill a scoring run midway: no complete manifest; the rerun resumes, no row lost or twice."""
    from prefsel.cli import main

    client, _ = s3
    rows = _rows()[:2] + [r for r in _rows() if isinstance(r, dict) and "chosen" in r] * 3
    _put(client, "crash/in.jsonl", _lines(rows))
    out = f"s3://{BUCKET}/runs/crash"
    args = ["score", "--policy", tiny_models[0], "--reference", tiny_models[1], "--data", f"s3://{BUCKET}/crash/in.jsonl",
            "--output", out, "--chunk-rows", "4", "--rows-per-actor-call", "4"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "prefsel.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if len([k for k in _keys(client, "runs/crash/scores/") if k.endswith(".parquet")]) >= 2:
            break
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    manifest = json.loads(_get(client, "runs/crash/manifest.json"))
    if manifest["complete"]:
        pytest.fail("the run finished before it could be killed; make the input larger")
    done_before = len([k for k in _keys(client, "runs/crash/scores/") if k.endswith(".parquet")])
    assert done_before >= 1
    # select refuses the unfinished output with a clear message (exit code 2)
    assert main(["select", "--scores", out, "--output", f"s3://{BUCKET}/runs/crash-sel"]) == 2
    # the same command again resumes
    assert main(args) == 0
    manifest = json.loads(_get(client, "runs/crash/manifest.json"))
    assert manifest["complete"] is True
    summary = json.loads(_get(client, "runs/crash/summary.json"))
    assert summary["resumed_chunks"] >= 1
    assert summary["rows_in"] == summary["rows_scored"] + summary["rows_rejected"] == len(rows)
    t = _s3_scores(client, "runs/crash")
    rejected = [r["row_id"] for r in _s3_rejects(client, "runs/crash")]
    assert sorted(t["row_id"].to_pylist() + rejected) == list(range(len(rows)))  # nothing lost, nothing twice


def test_training_checkpoints_go_to_s3(tiny_models, s3, tmp_path):
    """Ray Train's RunConfig(storage_path="s3://...") through `prefsel train --storage-path`."""
    from prefsel.cli import main

    client, _ = s3
    data = write_jsonl(tmp_path / "pairs.jsonl", [r for r in _rows() if isinstance(r, dict) and "chosen" in r])
    args = ["train", "dpo", "--model", tiny_models[0], "--data", str(data), "--output", str(tmp_path / "dpo"),
            "--storage-path", f"s3://{BUCKET}/ckpt", "--run-name", "run1", "--strategy", "ddp",
            "--train-batch-size", "4", "--save-steps", "2", "--max-steps", "4", "--learning-rate", "1e-4",
            "--no-progress", "--no-tensorboard"]
    assert main(args) == 0
    keys = _keys(client, "ckpt/run1/")
    # checkpoint folders (Ray Train also keeps a checkpoint_manager_snapshot.json beside them)
    ckpts = {k.split("/")[2] for k in keys if len(k.split("/")) > 3 and k.split("/")[2].startswith("checkpoint_")}
    assert len(ckpts) == 2, keys  # --save-steps 2 with --max-steps 4: steps 2 and 4
    assert (tmp_path / "dpo" / "final" / "config.json").exists()


def test_s3_input_edited_between_kill_and_rerun_is_refused(tiny_models, s3):
    """A resume never mixes inputs: an object rewritten after the unfinished run started is named."""
    from prefsel.run_output import RunOutput
    from prefsel.score_job import ScoreJobConfig, fingerprint, run_score
    from prefsel.sources import plan_source

    client, _ = s3
    rows = [r for r in _rows() if isinstance(r, dict) and "chosen" in r][:6]
    _put(client, "edit/in.jsonl", _lines(rows))
    cfg = ScoreJobConfig(policy=tiny_models[0], reference=tiny_models[1], data=f"s3://{BUCKET}/edit/in.jsonl",
                         output=f"s3://{BUCKET}/runs/edit", chunk_rows=2)
    RunOutput(cfg.output, fingerprint(cfg, plan_source(cfg.data, 2).files, "pairs"), kind="scores")  # unfinished
    time.sleep(1.1)  # S3 LastModified has one-second resolution
    _put(client, "edit/in.jsonl", _lines(rows[::-1] + rows[:1]))
    with pytest.raises(FileExistsError, match=r"input file changed.*edit/in.jsonl"):
        run_score(cfg)


def test_s3_keys_with_escapes_and_a_foreign_prefix(s3):
    """Keys with a space or a literal % (given %-escaped, as URIs spell them) are read, listed
    and stamped, and the chunk URIs keep the escapes (pyarrow decodes them once). An output
    prefix that holds objects but no prefsel manifest is refused, not written into: its
    part-NNNNNN files would be taken for finished chunks; --overwrite replaces it."""
    from prefsel.jobs import input_stamps
    from prefsel.run_output import RunOutput
    from prefsel.sources import plan_source, read_chunk

    client, _ = s3
    rows = [r for r in _rows() if isinstance(r, dict) and "chosen" in r][:3]
    _put(client, "esc/my dir/in.jsonl", _lines(rows))
    _put(client, "esc/pct/a%41.jsonl", _lines(rows))
    for uri, want in [(f"s3://{BUCKET}/esc/my%20dir/in.jsonl", f"s3://{BUCKET}/esc/my%20dir/in.jsonl"),
                      (f"s3://{BUCKET}/esc/my%20dir/", f"s3://{BUCKET}/esc/my%20dir/in.jsonl"),
                      (f"s3://{BUCKET}/esc/pct/a%2541.jsonl", f"s3://{BUCKET}/esc/pct/a%2541.jsonl")]:
        plan = plan_source(uri, 2)
        assert plan.files == [want]
        assert [r.record for c in plan.chunks for r in read_chunk(c)] == rows
        assert input_stamps(plan.files)[want].startswith("size=")  # stat-able: an edit is caught, not "name"

    _put(client, "foreign/scores/part-000000.parquet", "someone else's data")
    with pytest.raises(FileExistsError, match="holds objects but no manifest.json: not a prefsel output"):
        RunOutput(f"s3://{BUCKET}/foreign", {"fp": 1}, kind="scores")
    assert _keys(client, "foreign/") == ["foreign/scores/part-000000.parquet"]
    out = RunOutput(f"s3://{BUCKET}/foreign", {"fp": 1}, kind="scores", overwrite=True)
    assert out.done_chunks() == set()


def test_datasets_save_to_disk_folder_on_s3_is_read(s3):
    """A `datasets` save_to_disk folder (a DatasetDict, --split choosing) on s3:// is recognised
    by its files and read through s3fs, every row once, in order."""
    import datasets

    from prefsel.sources import plan_source, read_chunk

    rows = [r for r in _rows() if isinstance(r, dict) and "chosen" in r][:7]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows[:2])}).save_to_disk(f"s3://{BUCKET}/hf")
    plan = plan_source(f"s3://{BUCKET}/hf", 3, split="train")
    assert plan.kind == "hf_disk" and plan.num_rows == 7 and len(plan.chunks) == 3
    assert [{k: r.record[k] for k in rows[0]} for c in plan.chunks for r in read_chunk(c)] == rows
    with pytest.raises(ValueError, match=r"has splits \['train', 'test'\]; choose one with --split"):
        plan_source(f"s3://{BUCKET}/hf", 3, split="validation")
