"""jobs/: each entrypoint is the CLI command it names; as real `ray job submit` jobs on a head started here with
`ray start --head` on 127.0.0.1 (tests/ray_nodes.py), ingest succeeds and a relative output folder is refused."""

from __future__ import annotations

import os
import runpy
import sys
import time
from pathlib import Path

import pytest

import perfusion_ray.cli
from perfusion_ray.config import load_config
from perfusion_ray.data.store import StoreLayout
from perfusion_ray.runtime import LOOPBACK
from tests.conftest import TINY_OVERRIDES
from tests.ray_nodes import RayNode

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
def _submit(head: RayNode, deadline: float, **kwargs) -> tuple:
    """Submit once the head's job agent answers (tens of seconds on 2 busy cores). A fixed submission id
    makes a retry after a dropped connection safe."""
    from ray.job_submission import JobSubmissionClient

    submission_id = f"pfj-{os.getpid()}-{time.time_ns()}"
    last = None
    while time.monotonic() < deadline:
        try:
            client = JobSubmissionClient(head.dashboard)
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
    raise TimeoutError(f"could not submit to {head.dashboard} in time: {last!r}")


@pytest.fixture(scope="module")
def local_head():
    head = RayNode(num_cpus=2)
    yield head
    head.stop()


def _finished(client, job_id: str, deadline: float):
    """The job's terminal status (or its last one at the deadline) and its logs."""
    status = client.get_job_status(job_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(1.0)
        status = client.get_job_status(job_id)
    return status, client.get_job_logs(job_id)


# The README's command: ray job submit --working-dir . -- python jobs/<job>.py --config ... No env_vars here:
# the package's ray.init adds worker_env_vars() itself, and Ray refuses a job whose runtime_env sets the same
# variables as the driver's ray.init (docs/decisions.md). Neither job needs the model files.
WORKING_DIR = {"working_dir": str(REPO), "excludes": ["assets/"]}


def test_ingest_job_submitted_to_a_local_head_succeeds(local_head, tmp_path):
    from ray.job_submission import JobStatus

    started = time.monotonic()
    deadline = started + 240
    # A tiny simulated store (absolute root: the job runs in its own working dir).
    overrides = TINY_OVERRIDES + [f"data.root={tmp_path / 'data'}"]
    assert perfusion_ray.cli.main(["world", "simulate", *sum((["--set", o] for o in overrides), [])]) == 0
    args = " ".join(f"--set {o}" for o in overrides)
    client, job_id = _submit(local_head, deadline, runtime_env=WORKING_DIR,
                             entrypoint=f"python jobs/ingest.py --config configs/fashionworld.yaml {args}")
    status, logs = _finished(client, job_id, deadline)
    assert status == JobStatus.SUCCEEDED, f"job {job_id} {status} after {time.monotonic() - started:.0f}s:\n{logs[-3000:]}"
    for split in ("train", "holdout"):
        assert f"ingest {split} run" in logs
    driver = client.get_job_info(job_id).driver_agent_http_address or ""
    assert driver.startswith(f"http://{LOOPBACK}:"), driver  # the job ran on the loopback node
    config = load_config(None, overrides)
    for split in ("train", "holdout"):  # the job committed its ingest runs and advanced the watermarks
        layout = StoreLayout(config.data.root, split)
        assert layout.committed_runs() and Path(layout.watermark).is_file()


def test_a_job_with_a_relative_output_folder_is_refused_in_one_line(local_head, tmp_path):
    """The default rm.out (out/rm) would land inside the job's unpacked working_dir package, which Ray deletes
    with the session: the job fails before training, with one line naming the field."""
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + 240
    client, job_id = _submit(local_head, deadline, runtime_env=WORKING_DIR,
                             entrypoint=f"python jobs/train_rm.py --config configs/fashionworld.yaml "
                                        f"--set data.root={tmp_path / 'data'}")
    status, logs = _finished(client, job_id, deadline)
    assert status == JobStatus.FAILED, logs[-3000:]
    refusal = [line for line in logs.splitlines() if "relative output path(s)" in line]
    assert len(refusal) == 1 and "rm.out=out/rm" in refusal[0], logs[-3000:]
    assert "Traceback" not in logs
    assert not (tmp_path / "data").exists()  # nothing ran
