"""The command line: the main job produces a feedback log, its quarantine and group examples; user
errors are one line plus a hint, not a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from perfusion_ray.cli import main
from perfusion_ray.data.store import StoreLayout
from tests.conftest import TINY_OVERRIDES


def _args(tmp_path) -> list[str]:
    args = []
    for item in TINY_OVERRIDES + [f"data.root={tmp_path / 'data'}"]:
        args += ["--set", item]
    return args


def test_bad_config_is_one_line_and_a_hint(tmp_path):
    result = subprocess.run([sys.executable, "-m", "perfusion_ray.cli", "data", "inspect", "--set", "rm.lrr=1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.splitlines()[0] == "error: --set rm.lrr=1: unknown field 'lrr' in rm"
    assert result.stderr.splitlines()[1].startswith("hint: known fields:")
    assert "Traceback" not in result.stderr


def test_inspect_on_an_empty_store_reports_zeros(tmp_path, capsys):
    assert main(["data", "inspect", "--split", "train"] + _args(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "group examples" in out and "pending" in out


def test_simulate_then_inspect_shows_pending_partitions(tmp_path, capsys):
    assert main(["world", "simulate", "--split", "train"] + _args(tmp_path)) == 0
    assert main(["data", "inspect", "--split", "train"] + _args(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "oracle GAUC ceiling" in out
    assert [line.split()[-1] for line in out.splitlines() if line.startswith("pending")] == ["3"]


@pytest.mark.ray
def test_demo_produces_feedback_quarantine_and_groups(tmp_path, capsys, ray_cluster):
    assert main(["demo", "--quick"] + _args(tmp_path) + ["--set", "world.faulty_event_rate=0.02"]) == 0
    out = capsys.readouterr().out
    for split in ("train", "holdout"):
        layout = StoreLayout(str(tmp_path / "data"), split)
        assert layout.output_files("groups") and layout.output_files("quarantine")
        assert f"== {split} ==" in out
    assert "unknown event_type" in out and "duplicate event_id" in out  # the broken events, quarantined
    assert "oracle GAUC ceiling" in out
