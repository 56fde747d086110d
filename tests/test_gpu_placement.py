"""GPU placement on a machine without GPUs: a second Ray node with two logical GPUs joins the session's cluster
on 127.0.0.1 (tests/worker_node.py). A config that gives replicas GPUs (serve.replica_gpus,
design.replica_gpus) deploys there from the shipped Serve config files, each replica names the device it chose
(the CPU: torch sees no CUDA behind a logical GPU) in its log and through placement(), and it serves what the CPU
config serves: the same scores and images in float32, close ones in bfloat16. A Ray worker on that node decides
its DeepSpeed accelerator itself, from nothing the driver shipped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from perfusion_ray.config import REPO_ROOT, load_config
from perfusion_ray.records import Merchant
from tests.conftest import free_port
from tests.ray_nodes import stop_process_group

pytestmark = pytest.mark.ray

GPUS = 2
MERCHANT = Merchant("m0", {"region": "south"}, {"price_level": 1.5})
PROMPT = "a striped dark red dress"
STEPS = 2


class LogicalGpuNode:
    """tests/worker_node.py joining `address` with logical GPUs, in its own process group: SIGTERM is Ray's
    own orderly shutdown of that node, then SIGKILL to that group only. Its environment has no DS_ACCELERATOR,
    so whatever a worker there sees of it was decided on this node."""

    def __init__(self, address: str, log_dir: Path):
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "DS_ACCELERATOR")}
        env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
        self.log = open(log_dir / "logical_gpu_node.log", "w")
        self.process = subprocess.Popen([sys.executable, "-m", "tests.worker_node", address, "4", str(GPUS)],
                                        env=env, cwd=REPO_ROOT, start_new_session=True, stdout=self.log,
                                        stderr=subprocess.STDOUT)

    def wait(self, timeout_s: float = 120.0) -> str:
        """The node id once the cluster lists an alive node with GPUs."""
        import ray

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for node in ray.nodes():
                if node["Alive"] and node["Resources"].get("GPU", 0) >= GPUS:
                    assert node["NodeManagerAddress"] == "127.0.0.1", node["NodeManagerAddress"]
                    return node["NodeID"]
            if self.process.poll() is not None:
                raise RuntimeError(f"the GPU node exited ({self.process.returncode}); see {self.log.name}")
            time.sleep(0.5)
        raise TimeoutError(f"no GPU node after {timeout_s:.0f}s; see {self.log.name}")

    def stop(self) -> None:
        stop_process_group(self.process, term_timeout_s=30)
        self.log.close()


@pytest.fixture(scope="module")
def gpu_node(ray_cluster, tmp_path_factory):
    # Ray's raylet gives its agent a fixed 30 s to start: on a saturated machine a node can die starting up, so
    # a second attempt (new ports) is made before the test counts it as broken.
    for attempt in range(2):
        node = LogicalGpuNode(ray_cluster, tmp_path_factory.mktemp("gpu-node"))
        try:
            node_id = node.wait()
            break
        except RuntimeError:
            node.stop()
            if attempt:
                raise
    try:
        yield node_id
    finally:
        node.stop()


def _make_rm(folder: Path) -> Path:
    from perfusion_ray.models.clip_towers import load_clip
    from perfusion_ray.models.reward_model import PerFusionRM, RewardModelConfig, save_reward_model

    torch.manual_seed(0)
    rm = PerFusionRM(load_clip(), RewardModelConfig(version="gpu-test", towers="frozen", stat_names=["price_level"],
                                                    known_ids=["m0"]))
    for plugin in (rm.text_plugin, rm.image_plugin):  # as if trained: the merchant moves scores
        torch.nn.init.normal_(plugin.projection.weight, std=0.1)
    return save_reward_model(rm, folder)


def _entry(shipped: str, name: str, overrides: list[str], user_config: dict) -> dict:
    """The shipped Serve config file's application, renamed, with these overrides and this model."""
    entry = json.loads(json.dumps(yaml.safe_load((REPO_ROOT / "cluster" / shipped).read_text())["applications"][0]))
    entry.update(name=name, route_prefix=f"/{name}", args={"config": entry["args"]["config"], "set": overrides})
    entry["deployments"][0]["user_config"] = user_config
    return entry


# Before the Serve apps below take the node's GPUs.
def test_a_worker_on_another_node_decides_its_deepspeed_accelerator_there(gpu_node):
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_gpus=0.5, num_cpus=0.1)
    def probe() -> dict:
        import os

        import perfusion_ray.runtime as runtime  # what a train worker imports before deepspeed

        context = ray.get_runtime_context()
        return {"shipped": sorted((context.runtime_env.get("env_vars") or {})), "node": context.get_node_id(),
                "accelerator": os.environ.get("DS_ACCELERATOR"), "node_has_gpu": runtime._has_cuda()}

    seen = ray.get(probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(gpu_node, soft=False)).remote(),
                   timeout=120)
    assert seen["node"] == gpu_node
    assert "DS_ACCELERATOR" not in seen["shipped"] and "HF_HUB_OFFLINE" in seen["shipped"]
    assert seen["accelerator"] == (None if seen["node_has_gpu"] else "cpu")


# name -> (shipped file, overrides beyond the common ones)
APPS = {
    "rcpu": ("serve_reward.yaml", []),
    "rgpu": ("serve_reward.yaml", ["serve.replica_gpus=0.25"]),
    "rgpu16": ("serve_reward.yaml", ["serve.replica_gpus=0.25", "serve.replica_dtype=bfloat16"]),
    "dcpu": ("serve_design.yaml", []),
    "dgpu": ("serve_design.yaml", ["design.replica_gpus=0.5"]),
    "dgpu16": ("serve_design.yaml", ["design.replica_gpus=0.5", "design.replica_dtype=bfloat16"]),
}


@pytest.fixture(scope="module")
def served(gpu_node, tmp_path_factory, tiny_pipelines):
    from ray import serve

    from perfusion_ray.serve import apps

    root = tmp_path_factory.mktemp("gpu-serve")
    port = free_port()
    common = [f"serve.port={port}", "serve.min_replicas=1", "serve.max_replicas=1", "design.max_replicas=1",
              f"policy.num_inference_steps={STEPS}", "design.rate_limit_per_minute=0", f"data.root={root / 'store'}"]
    folders = {"serve_reward.yaml": {"model_dir": str(_make_rm(root / "rm"))},
               "serve_design.yaml": {"pipeline_dir": str(tiny_pipelines["v2"])}}
    entries = []
    for name, (shipped, overrides) in APPS.items():
        section = "serve" if shipped == "serve_reward.yaml" else "design"
        entries.append(_entry(shipped, name, common + overrides + [f"{section}.app_name={name}",
                                                                   f"{section}.route_prefix=/{name}"],
                              folders[shipped]))
    apps.start_serve(load_config(None, common))
    apps._apply({**apps.live_declarative_apps(), **{e["name"]: e for e in entries}})
    for entry in entries:
        apps.wait_running(entry["name"], timeout_s=300)
    yield f"http://127.0.0.1:{port}"
    for name in APPS:
        serve.delete(name)


def _placement(app: str) -> dict:
    from ray import serve

    deployment = "RewardModel" if app.startswith("r") else "DesignModel"
    return serve.get_deployment_handle(deployment, app).placement.remote().result(timeout_s=60)


def _replica_log_lines(app: str, needle: str) -> list[str]:
    import ray

    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path()) / "serve"
    return [line for path in logs.glob(f"replica_{app}_*.log") for line in path.read_text().splitlines()
            if needle in line]


def test_gpu_replica_configs_deploy_on_logical_gpus_and_serve_what_the_cpu_config_serves(served, gpu_node):
    from perfusion_ray.serve.client import RewardClient
    from perfusion_ray.serve.design_client import DesignClient

    for app in ("rgpu", "rgpu16", "dgpu", "dgpu16"):
        placement = _placement(app)
        assert placement["node_id"] == gpu_node and len(placement["gpu_ids"]) == 1, (app, placement)
        assert placement["device"] == "cpu" and "torch sees no CUDA device" in placement["reason"]
    for app in ("rcpu", "dcpu"):
        assert _placement(app)["gpu_ids"] == [] and _placement(app)["device"] == "cpu"
    assert _placement("rgpu16")["dtype"] == _placement("dgpu16")["dtype"] == "bfloat16"
    assert _replica_log_lines("rgpu16", "reward model replica runs on cpu in bfloat16: Ray assigned GPU")
    assert _replica_log_lines("dgpu", "design policy replica runs on cpu in float32: Ray assigned GPU")

    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    scores = {}
    for app in ("rcpu", "rgpu", "rgpu16"):
        with RewardClient(f"{served}/{app}") as client:
            scores[app] = client.score(PROMPT, images, MERCHANT).scores
    np.testing.assert_allclose(scores["rgpu"], scores["rcpu"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(scores["rgpu16"], scores["rcpu"], rtol=0.05, atol=0.1)
    assert not np.allclose(scores["rgpu16"], scores["rcpu"], rtol=1e-6, atol=1e-6)  # it did run in bfloat16

    designed = {}
    for app in ("dcpu", "dgpu", "dgpu16"):
        with DesignClient(f"{served}/{app}") as client:
            designed[app] = client.design(MERCHANT, PROMPT, seed=7).images.astype(np.int16)
    np.testing.assert_array_equal(designed["dgpu"], designed["dcpu"])
    assert np.abs(designed["dgpu16"] - designed["dcpu"]).mean() < 8.0  # of 255, bfloat16 sampling
