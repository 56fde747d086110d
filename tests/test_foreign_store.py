"""The foreign-store generator (tests/foreign_store.py): a store another program wrote ingests with every
row accounted for, its cold-start merchants appear only in the holdout split, and its ceiling is far above
chance (utility drives the labels)."""

from __future__ import annotations

import ast
from pathlib import Path

from perfusion_ray.config import load_config
from perfusion_ray.data.group_examples import read_group_table
from perfusion_ray.data.ingest import ingest
from perfusion_ray.data.store import StoreLayout
from tests.foreign_store import generate


def test_foreign_store_ingests_every_row_and_has_a_high_ceiling(tmp_path):
    report = generate(str(tmp_path / "data"), "tiny", seed=0, side_features=False)
    config = load_config(None, [f"data.root={tmp_path / 'data'}", "data.shuffle_blocks=2"])
    merchants = {}
    for split in ("train", "holdout"):
        counts = ingest(config, split, engine="local").counts
        assert counts.rows_read == report.events[split]
        assert counts.rows_grouped == report.events[split] and counts.rows_quarantined == 0
        assert counts.groups == report.groups[split]
        merchants[split] = set(read_group_table(StoreLayout(config.data.root, split))["merchant_id"].to_pylist())
    assert merchants["train"] == set(report.seen_ids)
    assert merchants["holdout"] == set(report.seen_ids) | set(report.cold_ids) and report.cold_ids
    assert all(m.startswith("shop-") for m in merchants["holdout"])
    assert report.ceiling["seen"] > 0.75 and report.ceiling["cold"] > 0.75


def test_same_seed_same_bytes(tmp_path):
    for name in ("a", "b"):
        generate(str(tmp_path / name), "tiny", seed=3, side_features=False)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files and all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)


def test_generator_is_not_the_simulator():
    """It may read the Fashion-MNIST images through world/, and nothing else of FashionWorld."""
    tree = ast.parse((Path(__file__).parent / "foreign_store.py").read_text())
    imported = {node.module + "." + alias.name if isinstance(node, ast.ImportFrom) else alias.name
                for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names}
    assert {name for name in imported if name.startswith("perfusion_ray.world")} == {"perfusion_ray.world.fashion_mnist"}
