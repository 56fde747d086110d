"""The chain as a cluster runs it: every shared path on an S3-compatible server (moto's, on 127.0.0.1) and a
Ray cluster of two nodes started with `ray start` (tests/ray_nodes.py). The head has no CPUs, so Ray Data
tasks, Train workers and Serve replicas all run on the other node: whatever they exchange with the driver
goes through the object store, not through a local folder the driver wrote.

simulate -> ingest on Ray Data (killed once between commit and watermark, then resumed) -> rm train with
checkpoints and export on S3 -> the reward app serving from S3 -> two online rounds -> the pipeline exported
to S3 -> the design app loading it. Each command runs as a user runs it: `perfusion ...` in its own process
with RAY_ADDRESS set, in a working directory that must stay empty."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from perfusion_ray.config import REPO_ROOT
from perfusion_ray.faults import FAULT_ENV, FAULT_EXIT_CODE
from perfusion_ray.storage import MANIFEST
from tests.conftest import TINY_OVERRIDES, free_port
from tests.ray_nodes import RayNode, node_env, wait_for_nodes
from tests.s3_server import S3Server

pytestmark = [pytest.mark.ray, pytest.mark.timeout(1800)]

PERFUSION = Path(sys.executable).with_name("perfusion")
BUCKET = "perfusion"


@pytest.fixture(scope="module")
def s3():
    server = S3Server()
    server.create_bucket(BUCKET)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster(s3, tmp_path_factory):
    """A head without CPUs and a worker node with 4, both reading S3 credentials from their environment."""
    cache = tmp_path_factory.mktemp("node-cache")  # local copies of URI directories (storage.local_directory)
    env = {**s3.env, "PERFUSION_CACHE_DIR": str(cache)}
    head = RayNode(num_cpus=0, env=env)
    worker = None
    try:
        worker = RayNode(num_cpus=4, head_of=head, env=env)
        nodes = wait_for_nodes(head, 2)
        yield head, {n.node_id for n in nodes if n.is_head_node}
    finally:
        for node in (worker, head):
            if node is not None:
                node.stop()


def _config(s3: S3Server, folder: Path) -> Path:
    raw: dict = {}
    for item in TINY_OVERRIDES:
        key, value = item.split("=", 1)
        *sections, field = key.split(".")
        target = raw
        for section in sections:
            target = target.setdefault(section, {})
        target[field] = yaml.safe_load(value)
    raw["world"]["taste_family"] = str(REPO_ROOT / "configs" / "tastes" / "boutique.yaml")
    raw["data"]["root"] = s3.uri(BUCKET, "store")
    raw["rm"] = {"epochs": 2, "batch_groups": 4, "out": s3.uri(BUCKET, "runs/rm")}
    raw["policy"] = {"num_inference_steps": 3}
    raw["online"].update(rounds=2, requests_per_round=2, steps_per_round=1, partitions_per_round=1,
                         rm_refresh_every=2, out=s3.uri(BUCKET, "runs/online"))
    raw["align"]["out"] = s3.uri(BUCKET, "runs/align")
    raw["serve"] = {"port": free_port(), "app_name": "s3-reward", "route_prefix": "/s3-reward"}
    raw["design"] = {"app_name": "s3-design", "route_prefix": "/s3-design"}
    path = folder / "cluster.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _perfusion(cluster, s3: S3Server, workdir: Path, config: Path, *command: str, fault: str | None = None,
               timeout_s: float = 900) -> subprocess.CompletedProcess:
    head, _ = cluster
    env = node_env({**s3.env, "RAY_ADDRESS": head.address, "PERFUSION_CACHE_DIR": str(workdir.parent / "cache")})
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.run([str(PERFUSION), *command, "--config", str(config)], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=timeout_s)


def _ok(run: subprocess.CompletedProcess) -> str:
    assert run.returncode == 0, f"{run.args}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return run.stdout


def _actors_by_class(head: RayNode, prefix: str) -> list:
    from ray.util.state import list_actors

    return [a for a in list_actors(address=head.dashboard, limit=10_000, raise_on_missing_output=False, detail=True)
            if a.class_name.startswith(prefix)]


def test_the_chain_runs_on_s3_across_two_nodes(s3, cluster, tmp_path):
    from perfusion_ray.records import Merchant
    from perfusion_ray.serve.client import RewardClient
    from perfusion_ray.serve.design_client import DesignClient

    head, head_ids = cluster
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    config = _config(s3, tmp_path)
    settings = yaml.safe_load(config.read_text())
    run = lambda *command, **kw: _perfusion(cluster, s3, workdir, config, *command, **kw)  # noqa: E731

    _ok(run("world", "simulate"))
    assert any(k.startswith(f"{BUCKET}/store/train/feedback/") for k in s3.keys(BUCKET, "store"))

    # Ingest dies after committing its run and before advancing the watermark; the rerun recovers that run
    # (it does not ingest the partitions again): every request ends in exactly one group.
    crashed = run("data", "ingest", fault="ingest:committed")
    assert crashed.returncode == FAULT_EXIT_CODE, crashed.stderr[-3000:]
    assert "recovered 1 committed run(s)" in _ok(run("data", "ingest"))
    assert _ok(run("data", "ingest")).count("no new partitions past the watermark") == 2
    groups = _train_groups(s3)
    assert groups.num_rows and len(set(groups["request_id"].to_pylist())) == groups.num_rows

    _ok(run("rm", "train"))
    rm_keys = s3.keys(BUCKET, "runs/rm")
    assert f"{BUCKET}/runs/rm/model/{MANIFEST}" in rm_keys  # published whole, manifest last
    assert any("/checkpoint_" in k for k in rm_keys), rm_keys[:20]  # Ray Train's storage_path on S3

    _ok(run("serve", "--detach", "--model", s3.uri(BUCKET, "runs/rm/model")))
    url = f"http://127.0.0.1:{settings['serve']['port']}"
    merchant = Merchant(groups["merchant_id"][0].as_py(), {}, {})
    images = (np.random.default_rng(0).random((4, 32, 32, 3)) * 255).astype(np.uint8)
    score = RewardClient(url + "/s3-reward").score("a dress", images, merchant)
    assert len(score.scores) == 4 and score.merchant_path == "known"

    _ok(run("align"))
    assert f"{BUCKET}/runs/online/pipeline/{MANIFEST}" in s3.keys(BUCKET, "runs/online")
    with s3.filesystem().open_input_stream(f"{BUCKET}/runs/online/rounds.jsonl") as stream:
        assert len(stream.read().decode().splitlines()) == 2

    _ok(run("serve", "--app", "design", "--detach", "--model", s3.uri(BUCKET, "runs/online/pipeline")))
    design = DesignClient(url + "/s3-design").design(merchant, "a dress", seed=3)
    assert len(design.images) == 4

    # Placement: Train workers and Serve replicas ran on the node without the driver.
    for prefix in ("RayTrainWorker", "ServeReplica"):
        actors = _actors_by_class(head, prefix)
        assert actors and all(a.node_id not in head_ids for a in actors), (prefix, actors)
    assert not any(workdir.iterdir()), sorted(workdir.rglob("*"))[:20]  # nothing written beside the user


def _train_groups(s3: S3Server):
    import pyarrow as pa
    import pyarrow.parquet as pq

    keys = [k for k in s3.keys(BUCKET, "store/train/ingest") if "/groups/" in k and k.endswith(".parquet")]
    tables = []
    for key in keys:
        with s3.filesystem().open_input_file(key) as handle:
            tables.append(pq.read_table(handle, columns=["request_id", "merchant_id"]))
    return pa.concat_tables(tables)
