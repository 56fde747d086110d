"""Runtime hygiene: local Ray stays on loopback, hub calls are off, DeepSpeed compiles nothing on CPU."""

from __future__ import annotations

import importlib
import os

import pytest


def test_package_import_sets_offline_and_loopback_defaults():
    import perfusion_ray  # noqa: F401  (the import is what sets them)

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    if not os.environ.get("RAY_ADDRESS"):
        assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"


@pytest.mark.ray
def test_local_cluster_binds_loopback_only(ray_cluster):
    import ray

    assert ray_cluster.startswith("127.0.0.1:")
    assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}


def test_deepspeed_shm_op_build_is_switched_off():
    from perfusion_ray.runtime import disable_deepspeed_shm_op

    disable_deepspeed_shm_op()
    module = importlib.import_module("deepspeed.comm.torch")
    assert module.build_shm_op() is None  # would otherwise run g++ for a minute


def test_a_submitted_jobs_own_env_vars_are_left_to_it(monkeypatch):
    import json

    from perfusion_ray.runtime import _job_env_keys

    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"env_vars": {"HF_HUB_OFFLINE": "1"}}}))
    assert _job_env_keys() == {"HF_HUB_OFFLINE"}  # init_ray leaves these out: Ray refuses a key set twice
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "not json")
    assert _job_env_keys() == set()
