"""Shared fixtures: one local Ray cluster per session (on 127.0.0.1), tiny FashionWorld configs."""

from __future__ import annotations

import os

import pytest

from perfusion_ray.config import PerfusionConfig, load_config

# Small enough for seconds, large enough for every request shape (FuxiCTR-style tiny-data config).
TINY_OVERRIDES = [
    "world.hours=3",
    "world.requests_per_hour=20",
    "world.num_merchants=12",
    "world.holdout_requests_per_merchant=3",
    "world.items_per_combination=4",
    "data.shuffle_blocks=2",
    "world.faulty_event_rate=0",  # tests that want broken rows make them precisely
]


@pytest.fixture
def tiny_config(tmp_path) -> PerfusionConfig:
    return load_config(None, TINY_OVERRIDES + [f"data.root={tmp_path / 'data'}"])


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster shared by every test that asks for it; yields its GCS address."""
    from perfusion_ray.config import ClusterConfig
    from perfusion_ray.runtime import init_ray

    ray = init_ray(ClusterConfig(num_cpus=2))
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture
def subprocess_env(ray_cluster) -> dict[str, str]:
    """Environment for a `perfusion` subprocess that joins the session's cluster instead of starting one."""
    env = dict(os.environ)
    env["RAY_ADDRESS"] = ray_cluster
    return env
