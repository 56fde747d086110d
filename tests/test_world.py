"""FashionWorld: real images found or a clear install hint, an oracle that reads what was drawn,
merchants from any taste YAML, and a simulator that is deterministic by seed."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from perfusion_ray.config import load_config
from perfusion_ray.data.store import StoreLayout, list_partition_files
from perfusion_ray.errors import PerfusionError
from perfusion_ray.world import fashion_mnist
from perfusion_ray.world.attributes import COLOURS, PATTERNS, SHADES, Attributes, render
from perfusion_ray.world.catalogue import prompt_text
from perfusion_ray.world.merchants import build_population, load_taste_family
from perfusion_ray.world.oracle import attribute_profile, utility
from perfusion_ray.world.simulator import build_world, simulate


@pytest.fixture
def no_dataset_anywhere(tmp_path, monkeypatch):
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path / "empty"))
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "no-debian")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    fashion_mnist.load.cache_clear()
    yield
    fashion_mnist.load.cache_clear()


def test_missing_dataset_fails_with_the_install_command(no_dataset_anywhere):
    with pytest.raises(PerfusionError) as error:
        fashion_mnist.locate()
    assert "apt-get install -y dataset-fashion-mnist" in error.value.hint
    assert "FASHION_MNIST_DIR" in error.value.hint


def test_torchvision_layout_folder_is_found(no_dataset_anywhere, tmp_path, monkeypatch):
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in Path("/usr/share/datasets/fashion-mnist").glob("*.gz"):
        shutil.copy(name, raw / name.name)
    assert fashion_mnist.locate() == Path("data/FashionMNIST/raw")
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path / "data"))  # a torchvision root given directly
    assert fashion_mnist.locate() == tmp_path / "data" / "FashionMNIST" / "raw"
    assert fashion_mnist.load("test").images.shape == (10000, 28, 28)


def test_oracle_reads_back_the_drawn_attributes():
    dataset = fashion_mnist.load("train")
    rng = np.random.default_rng(0)
    truths, images = [], []
    for i in range(320):
        attributes = Attributes(COLOURS[i % 8], SHADES[(i // 8) % 2], PATTERNS[(i // 16) % 2])
        truths.append(attributes)
        images.append(render(dataset.images[rng.integers(len(dataset.labels))], attributes, 32))
    profile = attribute_profile(np.stack(images))
    colour_ok = np.mean([COLOURS[c] == t.colour for c, t in zip(profile[:, :8].argmax(1), truths)])
    shade_ok = np.mean([(p > 0.5) == (t.shade == "light") for p, t in zip(profile[:, 8], truths)])
    stripe_ok = np.mean([(p > 0.5) == (t.pattern == "striped") for p, t in zip(profile[:, 11], truths)])
    assert colour_ok == 1.0 and shade_ok == 1.0 and stripe_ok >= 0.88
    assert np.allclose(attribute_profile(np.stack(images)), profile)  # deterministic


def test_utility_is_taste_times_profile():
    tastes = np.eye(12)[:2]
    profiles = np.random.default_rng(1).random((5, 12))
    assert np.allclose(utility(tastes, profiles), profiles[:, :2].T)


def test_prompts_leave_attributes_out():
    assert prompt_text(3, 0, 1, 1) == "a striped dark red dress"
    assert prompt_text(3) == "a dress"
    assert prompt_text(1, None, 0, None) == "light trousers"
    assert prompt_text(9, 1) == "an orange ankle boot"


def test_side_features_correlate_with_segment_and_cold_start_is_held_out():
    config = load_config()
    family = load_taste_family(config.resolve_input(config.world.taste_family))
    population = build_population(family, 400, 0.25, seed=3)
    main_region = {s.name: max(s.side_features["region"], key=s.side_features["region"].get) for s in family.segments}
    agreement = np.mean([f["region"] == main_region[s] for f, s in zip(population.features, population.segments)])
    assert agreement > 0.4  # segments put 0.5-0.6 on their main region; chance is 0.25
    assert population.cold_start.sum() == 100
    assert set(population.features[0]) == {"category_focus", "region", "tier"}


def test_train_stream_has_no_cold_start_merchant_and_holdout_has_both(tiny_config):
    world = build_world(tiny_config)
    simulate(tiny_config, "train", world, progress=False)
    simulate(tiny_config, "holdout", world, progress=False)
    cold = {m for m, c in zip(world.merchants.ids, world.merchants.cold_start) if c}
    merchants = {}
    for split in ("train", "holdout"):
        layout = StoreLayout(tiny_config.data.root, split)
        merchants[split] = {m for name in list_partition_files(layout)
                            for m in pq.read_table(f"{layout.feedback}/{name}")["merchant_id"].to_pylist()}
    assert not merchants["train"] & cold
    assert cold <= merchants["holdout"] and merchants["holdout"] - cold


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    from tests.conftest import TINY_OVERRIDES

    def run(name: str, seed: int) -> dict[str, bytes]:
        config = load_config(None, TINY_OVERRIDES + [f"data.root={tmp_path / name}", f"world.seed={seed}"])
        report = simulate(config, "train", progress=False)
        layout = StoreLayout(config.data.root, "train")
        files = list_partition_files(layout)
        assert len(files) == config.world.hours and report.events > 0
        return {Path(f).parent.name: (Path(layout.feedback) / f).read_bytes() for f in files}

    first, again, other = run("a", 7), run("b", 7), run("c", 8)
    assert first == again
    assert first.keys() == other.keys() and all(first[k] != other[k] for k in first)


def test_simulator_reports_a_meaningful_oracle_ceiling(tiny_config):
    report = simulate(tiny_config, "train", progress=False)
    assert 0.6 < report.oracle_gauc < 1.0  # informative, yet selection is noisy (temperature)
    assert report.groups_with_preference > 0.9 * report.requests


SECOND_FAMILY = """
name: streetwear
perturbation: 0.1
feature_noise: 0.0
segments:
  - name: monochrome
    share: 1
    taste: {colour: {blue: 2.0}, pattern: {plain: 1.0}}
    category_focus: {sneaker: 5.0}
    side_features: {channel: {online: 1.0}}
    stats: {followers_k: [50, 5]}
  - name: loud
    share: 1
    taste: {colour: {yellow: 2.0}, pattern: {striped: 1.0}}
    side_features: {channel: {market: 0.8, online: 0.2}}
    stats: {followers_k: [5, 1]}
"""


def test_a_new_taste_yaml_runs_with_no_code_change(tmp_path):
    from tests.conftest import TINY_OVERRIDES

    (tmp_path / "streetwear.yaml").write_text(SECOND_FAMILY)
    config_file = tmp_path / "world.yaml"
    config_file.write_text("world:\n  taste_family: streetwear.yaml\n")
    config = load_config(config_file, TINY_OVERRIDES + [f"data.root={tmp_path / 'data'}"])
    report = simulate(config, "train", progress=False)
    layout = StoreLayout(config.data.root, "train")
    table = pq.read_table(f"{layout.feedback}/{list_partition_files(layout)[0]}")
    features = dict(table["merchant_features"][0].as_py())
    assert set(features) == {"category_focus", "channel"}
    assert dict(table["merchant_stats"][0].as_py()).keys() == {"followers_k"}
    assert report.oracle_gauc > 0.6


def test_taste_yaml_mistakes_are_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nsegments:\n  - name: a\n    share: 1\n    taste: {colour: {mauve: 1}}\n")
    with pytest.raises(PerfusionError, match="mauve"):
        load_taste_family(path)


def test_parse_prompt_inverts_prompt_text_for_every_request_shape():
    import itertools

    from perfusion_ray.world.catalogue import parse_prompt, prompt_text

    for cls, colour, shade, pattern in itertools.product(range(10), (None, 0, 7), (None, 0, 1), (None, 0, 1)):
        parsed = parse_prompt(prompt_text(cls, colour, shade, pattern))
        assert (parsed.cls, parsed.colour, parsed.shade, parsed.pattern) == (cls, colour, shade, pattern)
    with pytest.raises(ValueError, match="names no FashionWorld item"):
        parse_prompt("a hat")
