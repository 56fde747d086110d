"""Shared fixtures: one local Ray cluster per session (on 127.0.0.1), tiny FashionWorld configs."""

from __future__ import annotations

import os
import socket

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
    "online.live_hours=1",
    "align.eval.requests_per_split=null",  # one request per merchant (align.eval.requests_per_merchant) instead
]


@pytest.fixture
def tiny_config(tmp_path) -> PerfusionConfig:
    return load_config(None, TINY_OVERRIDES + [f"data.root={tmp_path / 'data'}"])


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster shared by every test that asks for it; yields its GCS address."""
    from perfusion_ray.config import ClusterConfig
    from perfusion_ray.runtime import init_ray

    # 4 logical CPUs as configs/fashionworld.yaml: the online rounds' ingest needs room beside the workers.
    ray = init_ray(ClusterConfig(num_cpus=4))
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture
def subprocess_env(ray_cluster) -> dict[str, str]:
    """Environment for a `perfusion` subprocess that joins the session's cluster instead of starting one."""
    env = dict(os.environ)
    env["RAY_ADDRESS"] = ray_cluster
    return env


def free_port() -> int:
    """A TCP port nobody listens on at 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_pipelines(tmp_path_factory) -> dict[str, "os.PathLike"]:
    """Two saved PerFusionPipeline versions of the shipped base model: v1 (adapter at init: the base model) and
    v2 (adapter joins perturbed: merchants move its images)."""
    import torch

    from perfusion_ray.config import PolicyConfig
    from perfusion_ray.models.base import load_base
    from perfusion_ray.records import Merchant
    from perfusion_ray.models.policy import build_policy, policy_pipeline

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("pipelines")
    base = load_base("embedded")
    merchants = [Merchant(f"m{i}", {"region": "east"}, {"price_level": 1.0}) for i in range(4)]
    folders = {}
    for name, perturb in (("v1", False), ("v2", True)):
        torch.manual_seed(0)
        policy = build_policy(base.unet, PolicyConfig(), stat_names=("price_level",), merchants=merchants)
        if perturb:
            with torch.no_grad():  # stand-ins for trained joins, so the branch moves outputs
                controlnet = policy.adapter.controlnet
                for block in [*controlnet.controlnet_down_blocks, controlnet.controlnet_cond_embedding.conv_out]:
                    torch.nn.init.normal_(block.weight, std=0.05)
        folders[name] = root / name
        policy_pipeline(base, policy).save_pretrained(str(folders[name]))
    return folders


class LoadRun:
    """What `under_load` saw: the action's result, (time, version) of every answer, the failures, and when the
    action started and finished."""

    def __init__(self):
        self.result = None
        self.seen: list[tuple[float, str]] = []
        self.failures: list[str] = []
        self.started = self.finished = 0.0

    def versions(self, margin_s: float = 0.1) -> tuple[set[str], set[str]]:
        """The versions that answered before the action started, and after it finished (+ margin)."""
        return ({v for t, v in self.seen if t < self.started},
                {v for t, v in self.seen if t > self.finished + margin_s})


def under_load(request, action, workers: int = 4, settle_s: float = 1.0, join_s: float = 120.0) -> LoadRun:
    """Run `action()` (e.g. a roll-out) while `workers` threads loop on `request(worker)`, which returns the
    version that answered; any exception it raises is a failure."""
    import threading
    import time

    run, stop = LoadRun(), threading.Event()

    def loop(worker: int) -> None:
        while not stop.is_set():
            try:
                run.seen.append((time.monotonic(), request(worker)))
            except Exception as exc:  # noqa: BLE001 - every failure counts
                run.failures.append(repr(exc))

    threads = [threading.Thread(target=loop, args=(w,)) for w in range(workers)]
    for thread in threads:
        thread.start()
    time.sleep(settle_s)
    run.started = time.monotonic()
    try:
        run.result = action()
    finally:
        run.finished = time.monotonic()
        time.sleep(settle_s)
        stop.set()
        for thread in threads:
            thread.join(timeout=join_s)
    return run
