"""The over-optimization guard against a deliberately hacked reward model: an RM trained to like what the
merchants' true taste dislikes. Optimizing it raises the proxy (its reward of the probe set) while the gold
(the oracle's utility of the probe set) falls; the guard stops the rounds within a few rounds of the gold
turning down and ships the best probe policy, and the run says so."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from perfusion_ray.config import load_config
from perfusion_ray.data.ingest import ingest
from perfusion_ray.data.store import StoreLayout
from tests.conftest import TINY_OVERRIDES, free_port

pytestmark = pytest.mark.ray


def _invert_labels(config, world) -> None:
    """Relabel the committed train groups: the candidate the merchant's taste likes least ranks first."""
    from perfusion_ray.world.oracle import attribute_profile

    layout = StoreLayout(config.data.root, "train")
    from perfusion_ray.data.image_store import ImageStore

    images = ImageStore(layout.images_uri)
    for path in layout.output_files("groups"):
        table = pq.read_table(path)
        labels = []
        for merchant, refs in zip(table["merchant_id"].to_pylist(), table["image_refs"].to_pylist()):
            taste = world.merchants.tastes[world.merchants.index(merchant)]
            utility = attribute_profile(np.stack([images.load(ref) for ref in refs])) @ taste
            labels.append(np.argsort(np.argsort(-utility)).astype(np.float32).tolist())
        column = table.schema.get_field_index("labels")
        pq.write_table(table.set_column(column, "labels", pa.array(labels, pa.list_(pa.float32()))), path)


def test_the_guard_stops_a_policy_that_games_a_hacked_reward_model(tmp_path, ray_cluster):
    from ray import serve

    from perfusion_ray.coordinator import run_online
    from perfusion_ray.train.reward_model import train_reward_model
    from perfusion_ray.world.simulator import build_world, simulate

    config = load_config(None, TINY_OVERRIDES + [
        "world.hours=6", f"data.root={tmp_path / 'data'}", f"rm.out={tmp_path / 'rm'}", f"online.out={tmp_path / 'online'}",
        "rm.epochs=3", "rm.batch_groups=4", "online.rounds=16", "online.requests_per_round=4", "online.steps_per_round=4",
        "online.partitions_per_round=1", "online.rm_refresh_every=0", "online.logged_fraction=0",
        "online.policy_average_decay=0", "online.probe_requests=4", "online.guard_rounds=2", "align.batch_groups=2",
        "align.lr=3e-3", "align.warmup_steps=0", "policy.num_inference_steps=4", f"serve.port={free_port()}",
        # pl on the top-1 split games this RM within a few rounds on the tiny world; dgpo's gold drifts too
        # slowly here (0.44 -> 0.36 -> 0.43 over 16 rounds) for a curve that turns down.
        "align.variant=pl", "online.split=top_m", "online.num_inference_steps=4",
        "serve.app_name=guard-reward", "serve.route_prefix=/guard-reward"])
    world = build_world(config)
    simulate(config, "train", world, progress=False, hours=range(3))
    simulate(config, "holdout", world, progress=False)
    for split in ("train", "holdout"):
        ingest(config, split, engine="local")
    simulate(config, "train", world, progress=False, hours=range(3, 6))
    _invert_labels(config, world)
    hacked = train_reward_model(config).model_dir
    try:
        report = run_online(config, rm_dir=hacked, progress=False)
    finally:
        serve.shutdown()
    gold = [m["probe_utility"] for m in report.history]
    proxy = [m["probe_proxy"] for m in report.history]
    assert "over-optimization guard" in report.stopped, (gold, proxy)
    assert report.rounds < config.online.rounds, (gold, proxy)
    # The gold turns down for good after its best round (earlier dips it recovered from are noise): the guard
    # must stop within 3 rounds of that turn.
    turned = int(np.argmax(gold))
    assert report.rounds - 1 - turned <= 3, (gold, proxy)
    assert report.best_probe_round == int(np.argmax(gold))
    assert f"shipping round {report.best_probe_round}" in report.stopped
