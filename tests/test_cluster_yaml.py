"""cluster.yaml is a valid Ray cluster launcher config, checked offline with Ray's own code.

`ray up` loads the YAML, calls `prepare_config` (merge with the provider's defaults.yaml,
merge setup commands, per-type min/max workers) and then `validate_config` (the JSON schema
ray/autoscaler/ray-schema.json plus cross-field checks); see `_bootstrap_config` in
ray/autoscaler/_private/commands.py. Its remaining steps (instance-type resource
autodetection and the AWS bootstrap of IAM role, key pair, subnets, security group) call AWS,
so these tests stop before them and never touch the network or need credentials.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
pytest.importorskip("jsonschema")  # validate_config needs it (part of ray[default])
util = pytest.importorskip("ray.autoscaler._private.util")

import jsonschema  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
MOUNT = "/home/ubuntu/prefsel"
INSTALL = 'pip install -e "/home/ubuntu/prefsel[train,s3]"'


@pytest.fixture(autouse=True)
def _no_aws(monkeypatch):
    """Fail loudly if anything under test tries to reach AWS through boto3."""
    try:
        import boto3
        import boto3.session
    except ImportError:  # the validation path does not need boto3 at all
        return

    def refuse(*args, **kwargs):
        raise AssertionError("cluster.yaml tests must not call AWS")

    monkeypatch.setattr(boto3, "client", refuse)
    monkeypatch.setattr(boto3, "resource", refuse)
    monkeypatch.setattr(boto3.session.Session, "client", refuse)
    monkeypatch.setattr(boto3.session.Session, "resource", refuse)


@pytest.fixture
def raw() -> dict:
    """cluster.yaml exactly as `ray up` reads it (yaml.safe_load)."""
    with open(CLUSTER_YAML) as f:
        return yaml.safe_load(f)


@pytest.fixture
def prepared(raw) -> dict:
    """What `ray up` validates: prepare_config(config), then validate_config."""
    config = util.prepare_config(copy.deepcopy(raw))
    util.validate_config(config)
    return config


def _gpu_types(config: dict) -> dict:
    head = config["head_node_type"]
    return {
        name: t for name, t in config["available_node_types"].items() if name != head
    }


# --- Ray's own validation ---------------------------------------------------------------


def test_ray_has_the_validation_functions_ray_up_uses():
    import ray
    from ray.autoscaler._private import commands

    assert ray.__version__.split(".")[0] == "2"
    # _bootstrap_config (the `ray up` path) uses exactly these two functions.
    assert commands.prepare_config is util.prepare_config
    assert commands.validate_config is util.validate_config


def test_raw_file_passes_schema_validation(raw):
    util.validate_config(copy.deepcopy(raw))


def test_prepared_config_passes_validation(prepared):
    # Defaults were merged, not our values overwritten.
    assert prepared["cluster_name"] == "prefsel"
    assert prepared["head_node_type"] == "head"
    assert set(prepared["available_node_types"]) == {
        "head",
        "gpu-1x",
        "gpu-1x-spot",
        "gpu-8x",
    }


def test_prepare_config_does_not_mutate_its_input(raw):
    before = copy.deepcopy(raw)
    util.prepare_config(raw)
    assert raw == before


# --- what the file must say ---------------------------------------------------------------


def test_provider(raw):
    provider = raw["provider"]
    assert provider["type"] == "aws"
    assert provider["region"] == "us-west-2"
    assert provider["cache_stopped_nodes"] is False


def test_head_takes_no_work(prepared):
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert "GPU" not in head["resources"]
    assert head["max_workers"] == 0  # filled in by prepare_config
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))


def test_gpu_worker_types_scale_from_zero(prepared):
    workers = _gpu_types(prepared)
    assert workers, "no worker node types"
    for name, t in workers.items():
        assert t["min_workers"] == 0, name
        assert t["resources"].get("GPU", 0) > 0, name
        assert 1 <= t["max_workers"] <= prepared["max_workers"], name
        assert t["node_config"]["InstanceType"], name


def test_one_gpu_and_eight_gpu_types(prepared):
    workers = _gpu_types(prepared)
    gpus = {name: t["resources"]["GPU"] for name, t in workers.items()}
    assert gpus["gpu-1x"] == 1
    assert gpus["gpu-8x"] == 8
    assert 1 in gpus.values() and 8 in gpus.values()


def test_spot_only_where_named(raw):
    types = raw["available_node_types"]
    spot = types["gpu-1x-spot"]["node_config"]["InstanceMarketOptions"]
    assert spot["MarketType"] == "spot"
    assert types["gpu-1x-spot"]["resources"]["GPU"] == 1
    for name in ("head", "gpu-1x", "gpu-8x"):
        assert "InstanceMarketOptions" not in types[name]["node_config"], name


def test_autoscaling_knobs(raw):
    assert raw["idle_timeout_minutes"] > 0
    assert raw["upscaling_speed"] > 0
    assert raw["max_workers"] >= max(
        t.get("max_workers", 0) for t in raw["available_node_types"].values()
    )


def test_every_node_type_names_an_ami(raw):
    for name, t in raw["available_node_types"].items():
        assert re.fullmatch(r"ami-[0-9a-f]{8,17}", t["node_config"]["ImageId"]), name
    text = CLUSTER_YAML.read_text()
    assert "replace for your region" in text


def test_file_mounts_mount_the_repo(raw):
    assert raw["file_mounts"] == {MOUNT: "."}
    # "." is the directory `ray up` runs in: the repository root, next to this file.
    assert (CLUSTER_YAML.parent / "pyproject.toml").is_file()


def test_setup_installs_prefsel_from_the_mount(raw, prepared):
    assert INSTALL in raw["setup_commands"]
    # prepare_config prepends setup_commands to the head's and the workers' lists.
    assert INSTALL in prepared["head_setup_commands"]
    assert INSTALL in prepared["worker_setup_commands"]
    # The extras it asks for exist in pyproject.toml.
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    with open(REPO / "pyproject.toml", "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    assert {"train", "s3"} <= set(extras)


def test_start_commands(raw):
    head = " ".join(raw["head_start_ray_commands"])
    assert (
        "ray start --head --port=6379 --object-manager-port=8076 "
        "--autoscaling-config=~/ray_bootstrap_config.yaml --dashboard-host=0.0.0.0" in head
    )
    worker = " ".join(raw["worker_start_ray_commands"])
    assert "ray start --address=$RAY_HEAD_IP:6379 --object-manager-port=8076" in worker


def test_header_documents_the_workflow():
    text = CLUSTER_YAML.read_text()
    for command in (
        "ray up cluster.yaml",
        "ray dashboard cluster.yaml",
        "ray job submit --address http://127.0.0.1:8265 --working-dir .",
        "ray_jobs/select.py",
        "ray down cluster.yaml",
    ):
        assert command in text, command


# --- the validator is real: broken copies are rejected -------------------------------------


def test_misspelled_top_level_key_fails(raw):
    bad = copy.deepcopy(raw)
    bad["max_worker"] = bad.pop("max_workers")
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        util.validate_config(bad)
    # Also on the `ray up` path: defaults restore max_workers, but the stray key stays.
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        util.validate_config(util.prepare_config(copy.deepcopy(bad)))


def test_misspelled_node_type_key_fails(raw):
    bad = copy.deepcopy(raw)
    gpu = bad["available_node_types"]["gpu-8x"]
    gpu["min_worker"] = gpu.pop("min_workers")
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        util.validate_config(util.prepare_config(bad))


def test_fractional_gpu_resource_fails(raw):
    bad = copy.deepcopy(raw)
    bad["available_node_types"]["gpu-1x"]["resources"]["GPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        util.validate_config(util.prepare_config(bad))


def test_unknown_head_node_type_fails(raw):
    bad = copy.deepcopy(raw)
    bad["head_node_type"] = "ray.head.default"
    with pytest.raises(ValueError, match="head_node_type"):
        util.validate_config(util.prepare_config(bad))
