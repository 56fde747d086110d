"""The command line: the main job produces a feedback log, its quarantine and group examples; user
errors are one line plus a hint, not a traceback."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from ray import serve

from perfusion_ray.cli import main
from perfusion_ray.data.store import StoreLayout
from tests.conftest import TINY_OVERRIDES, free_port

PERFUSION = Path(sys.executable).with_name("perfusion")


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
def test_demo_runs_end_to_end_with_a_console_a_person_can_follow(tmp_path, subprocess_env):
    """`perfusion demo --quick` as a user runs it: stage lines, the rounds' progress bar and the summary on the
    terminal (no Ray INFO lines), the libraries' output in the log file; report, metrics and pipeline written."""
    out = tmp_path / "out"
    smaller = ["world.faulty_event_rate=0.02", f"rm.out={out / 'rm'}", f"online.out={out / 'online'}",
               "rm.epochs=1", "online.steps_per_round=2", "policy.num_inference_steps=4", "online.probe_requests=4",
               "serve.app_name=demo-reward", "serve.route_prefix=/demo-reward", f"serve.port={free_port()}"]
    command = [str(PERFUSION), "demo", "--quick", "--out", str(out)] + _args(tmp_path)
    for item in smaller:
        command += ["--set", item]
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=1500, env=subprocess_env)
    finally:
        serve.shutdown()  # the demo leaves its endpoint up on the session's cluster; later tests pick their own port
    console = (run.stdout + run.stderr).replace("\r", "\n")
    assert run.returncode == 0, console[-4000:]
    lines = [line for line in console.splitlines() if line.strip()]
    assert len(lines) < 80, "\n".join(lines)
    assert all(f"[{n}/7]" in console for n in range(1, 8))
    assert "win rate (oracle)" in console and "report:" in console
    library_lines = re.compile(r" (INFO|WARNING) |Reporting training result|^[IWE]\d{4} ")  # Ray's and glog's formats
    assert not [line for line in lines if library_lines.search(line)], "\n".join(lines)
    log = out / "logs" / "demo.log"
    assert f"log: {log}" in console and "INFO" in log.read_text()
    for split in ("train", "holdout"):  # broken events are quarantined with their reason, not dropped
        layout = StoreLayout(str(tmp_path / "data"), split)
        assert layout.output_files("groups")
        reasons = " ".join(pq.read_table(f).column("reason").to_pylist()[0] for f in layout.output_files("quarantine")
                           if pq.read_metadata(f).num_rows)
        assert "event_type" in reasons or "duplicate event_id" in reasons
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("rm.gauc.seen", "rm.gauc.cold", "rm.gauc.oracle", "align.oracle.utility.base.seen",
                "align.oracle.utility.aligned.cold", "align.oracle.win_rate.seen", "align.judge.win_rate.seen",
                "align.agreement.rank_correlation", "align.fidelity.class_acc", "online.rounds", "demo.seconds"):
        assert key in metrics, key
    report = (out / "report.md").read_text()
    assert "Reward model on held-out groups" in report and "report_files/rounds.png" in report
    assert "probe" in report
    assert (out / "report.html").is_file() and (out / "report_files" / "grid-0.png").is_file()
    assert (out / "pipeline" / "model_index.json").is_file()
