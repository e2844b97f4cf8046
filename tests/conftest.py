"""Shared fixtures: one local Ray per test session, tiny models built locally."""

from __future__ import annotations

import os

# Ray 2.60 turns token auth on for local clusters by default; tests say what they use.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """The local Ray every command starts when RAY_ADDRESS is unset (prefsel.jobs.init_ray: on
    127.0.0.1 only, with the dashboard whose State API Ray Train's cleaner polls), on 2 CPUs."""
    import ray

    from prefsel.jobs import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """(policy_dir, reference_dir) of tiny Llama models with a locally trained BPE tokenizer."""
    from prefsel.tiny import build_tiny_pair

    return build_tiny_pair(tmp_path_factory.mktemp("tiny"))
