"""jobs/: each entrypoint is the CLI command it names, and one of them runs as a real `ray job submit` job
on a head started here with `ray start --head` on 127.0.0.1 (its own ports and --temp-dir, so it never
touches another cluster on the machine; stopped through its own process group, never `ray stop`)."""

from __future__ import annotations

import os
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import perfusion_ray.cli
from perfusion_ray.config import load_config
from perfusion_ray.data.store import StoreLayout
from perfusion_ray.runtime import LOOPBACK, worker_env_vars
from tests.conftest import TINY_OVERRIDES, free_port

REPO = Path(__file__).resolve().parents[1]
JOBS = {  # entrypoint -> the CLI command(s) it must run, in order
    "ingest": [["data", "ingest"]],
    "train_rm": [["rm", "train"]],
    "serve_rm": [["serve", "--detach"]],
    "align": [["align"]],
    "evaluate": [["rm", "eval"], ["align", "eval"]],
    "demo": [["demo"]],
}


@pytest.mark.parametrize("job", sorted(JOBS))
def test_job_entrypoint_is_its_cli_command(job, monkeypatch):
    calls = []

    def fake_main(argv):
        calls.append(list(argv))
        return 0

    monkeypatch.setattr(perfusion_ray.cli, "main", fake_main)
    argv = ["--config", "configs/sd15.yaml", "--set", "rm.epochs=1"]
    monkeypatch.setattr(sys, "argv", [f"jobs/{job}.py", *argv])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(REPO / "jobs" / f"{job}.py"), run_name="__main__")
    assert exit_.value.code == 0
    assert calls == [[*command, *argv] for command in JOBS[job]]


def test_every_job_file_is_tested_and_in_the_readme():
    assert {p.stem for p in (REPO / "jobs").glob("*.py")} == set(JOBS)
    readme = (REPO / "README.md").read_text()
    for job in JOBS:
        assert f"python jobs/{job}.py --config configs/" in readme, job


def test_evaluate_stops_at_the_first_failure(monkeypatch):
    calls = []
    monkeypatch.setattr(perfusion_ray.cli, "main", lambda argv: calls.append(argv) or 2)
    monkeypatch.setattr(sys, "argv", ["jobs/evaluate.py"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(REPO / "jobs" / "evaluate.py"), run_name="__main__")
    assert exit_.value.code == 2 and calls == [["rm", "eval"]]


# ---------------------------------------------------------------- a real `ray job submit`
class LocalHead:
    """`ray start --head --block` in its own session: every process it starts shares its process group,
    so stopping it is SIGTERM (Ray's own orderly shutdown of that node) then SIGKILL to that group only."""

    def __init__(self):
        # Short path: Ray's unix sockets live under the temp dir (107-byte limit).
        self.temp_dir = tempfile.mkdtemp(prefix="pfj", dir="/tmp")
        self.dashboard_port = free_port()
        bin_dir = Path(sys.executable).parent
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(worker_env_vars())
        env.update(
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # loopback (docs/stack-notes.md)
            RAY_AUTH_MODE="disabled",  # no token in the user's ~/.ray; loopback only
            RAY_USAGE_STATS_ENABLED="0",
            PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",  # `python` in the entrypoint = this venv
        )
        self.env = env
        command = [
            str(bin_dir / "ray"), "start", "--head", "--block", f"--node-ip-address={LOOPBACK}",
            f"--port={free_port()}", "--num-cpus=2", f"--dashboard-host={LOOPBACK}",
            f"--dashboard-port={self.dashboard_port}", "--include-dashboard=true", f"--temp-dir={self.temp_dir}",
            # Ports with fixed defaults another cluster on this machine may already hold.
            f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
            "--disable-usage-stats",
        ]
        self.log = open(Path(self.temp_dir) / "ray_start.log", "w")
        self.process = subprocess.Popen(command, env=env, cwd=self.temp_dir, start_new_session=True,
                                        stdout=self.log, stderr=subprocess.STDOUT)

    @property
    def address(self) -> str:
        return f"http://{LOOPBACK}:{self.dashboard_port}"

    def stop(self) -> None:
        pgid = self.process.pid  # start_new_session: the group id is the leader's pid
        try:
            os.killpg(pgid, signal.SIGTERM)
            self.process.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(pgid, signal.SIGKILL)  # whatever the orderly shutdown left behind
        except ProcessLookupError:
            pass
        self.process.wait(timeout=10)
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _submit(head: LocalHead, deadline: float, **kwargs) -> str:
    """Submit once the head's job agent answers (tens of seconds on 2 busy cores). A fixed submission id
    makes a retry after a dropped connection safe."""
    from ray.job_submission import JobSubmissionClient

    submission_id = f"pfj-{os.getpid()}-{time.time_ns()}"
    last = None
    while time.monotonic() < deadline:
        try:
            client = JobSubmissionClient(head.address)
            try:
                return client, client.submit_job(submission_id=submission_id, **kwargs)
            except RuntimeError as exc:
                if "already exists" in str(exc):
                    return client, submission_id
                raise
        except Exception as exc:  # not up yet: connection refused, no agent yet, dropped connection
            last = exc
            if head.process.poll() is not None:
                raise RuntimeError(f"ray start exited ({head.process.returncode}); see {head.log.name}") from exc
            time.sleep(1.0)
    raise TimeoutError(f"could not submit to {head.address} in time: {last!r}")


def test_ingest_job_submitted_to_a_local_head_succeeds(tmp_path):
    from ray.job_submission import JobStatus

    started = time.monotonic()
    deadline = started + 240
    head = LocalHead()
    try:
        # While the head starts: a tiny simulated store (absolute root: the job runs in its own working dir).
        overrides = TINY_OVERRIDES + [f"data.root={tmp_path / 'data'}"]
        assert perfusion_ray.cli.main(["world", "simulate", *sum((["--set", o] for o in overrides), [])]) == 0
        args = " ".join(f"--set {o}" for o in overrides)
        client, job_id = _submit(
            head, deadline,
            # The README's command: ray job submit --working-dir . -- python jobs/ingest.py --config ...
            entrypoint=f"python jobs/ingest.py --config configs/fashionworld.yaml {args}",
            # No env_vars here: the package's ray.init adds worker_env_vars() itself, and Ray refuses a job
            # whose runtime_env sets the same variables as the driver's ray.init (docs/decisions.md).
            runtime_env={"working_dir": str(REPO), "excludes": ["assets/"]},  # ingest needs no model files
        )
        status = client.get_job_status(job_id)
        while not status.is_terminal() and time.monotonic() < deadline:
            time.sleep(1.0)
            status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        assert status == JobStatus.SUCCEEDED, f"job {job_id} {status} after {time.monotonic() - started:.0f}s:\n{logs[-3000:]}"
        for split in ("train", "holdout"):
            assert f"ingest {split} run" in logs
        driver = client.get_job_info(job_id).driver_agent_http_address or ""
        assert driver.startswith(f"http://{LOOPBACK}:"), driver  # the job ran on the loopback node
    finally:
        head.stop()
    config = load_config(None, overrides)
    for split in ("train", "holdout"):  # the job committed its ingest runs and advanced the watermarks
        layout = StoreLayout(config.data.root, split)
        assert layout.committed_runs() and Path(layout.watermark).is_file()
