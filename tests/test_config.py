"""Config: defaults load, overrides apply, and every mistake names the field and where it came from."""

from __future__ import annotations

import pytest

from perfusion_ray.config import DEFAULT_CONFIG, load_config
from perfusion_ray.errors import PerfusionError


def test_default_config_is_the_fashionworld_file():
    config = load_config()
    assert config.source == str(DEFAULT_CONFIG)
    assert config.data.group_size == 4
    assert config.resolve_input(config.world.taste_family).is_file()


def test_dotted_override_changes_one_field_with_yaml_typing():
    config = load_config(None, ["rm.lr=1e-4", "world.omit.colour=0.25", "cluster.address=null"])
    assert config.rm.lr == pytest.approx(1e-4)
    assert config.world.omit.colour == 0.25
    assert config.cluster.address is None


def _write(tmp_path, text: str):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


def test_unknown_key_in_file_names_field_and_file(tmp_path):
    path = _write(tmp_path, "rm:\n  learning_rate: 0.1\n")
    with pytest.raises(PerfusionError) as error:
        load_config(path)
    assert str(path) in error.value.message and "rm.learning_rate: unknown field" in error.value.message


def test_wrong_type_names_field_and_value(tmp_path):
    path = _write(tmp_path, "world:\n  hours: many\n")
    with pytest.raises(PerfusionError) as error:
        load_config(path)
    assert "world.hours" in error.value.message and "'many'" in error.value.message


def test_bad_value_fails_at_load(tmp_path):
    path = _write(tmp_path, "world:\n  min_selected: 3\n  max_selected: 1\n")
    with pytest.raises(PerfusionError, match="max_selected"):
        load_config(path)
    with pytest.raises(PerfusionError, match="data.group_size"):
        load_config(None, ["data.group_size=1"])


def test_override_errors_name_the_override():
    with pytest.raises(PerfusionError) as error:
        load_config(None, ["rm.lr=fast"])
    assert error.value.message.count("--set: rm.lr") == 1
    with pytest.raises(PerfusionError, match="unknown field 'lrr' in rm"):
        load_config(None, ["rm.lrr=1"])
    with pytest.raises(PerfusionError, match="expected section.field=value"):
        load_config(None, ["rm.lr"])


def test_missing_file_and_bad_yaml_are_clear(tmp_path):
    with pytest.raises(PerfusionError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(PerfusionError, match="not valid YAML"):
        load_config(_write(tmp_path, "world: [unclosed\n"))


def test_every_shipped_config_loads():
    from perfusion_ray.config import REPO_ROOT

    for path in sorted((REPO_ROOT / "configs").glob("*.yaml")):
        config = load_config(path)
        assert config.source == str(path)
    gpu = load_config(REPO_ROOT / "configs" / "sd15.yaml")
    assert gpu.align.use_gpu and gpu.align.bf16 and gpu.align.zero_stage == 3  # the path test_alignment runs small


def test_the_checked_in_configuration_reference_is_the_generated_one():
    """docs/configuration.md is `perfusion config docs` output: regenerate it when a field changes."""
    from perfusion_ray.config import REPO_ROOT
    from perfusion_ray.config_docs import generate, undocumented

    assert undocumented() == []  # every field says what it sets
    assert (REPO_ROOT / "docs" / "configuration.md").read_text() == generate(), \
        "run `perfusion config docs --out docs/configuration.md`"
