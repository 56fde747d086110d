"""Ray nodes of our own on this machine for integration tests, bound to 127.0.0.1: a head (`ray start --head
--block`) and, when a test wants several nodes, workers that join it (tests/worker_node.py, what Ray's own
multi-node test tooling does: `ray start --address` would rewrite the loopback address to the machine's
external one). Each node runs in its own session (process group) with its own free ports, so it never touches
another cluster on the machine, and stops through that group only (SIGTERM, Ray's orderly shutdown, then
SIGKILL), never `ray stop`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from perfusion_ray.runtime import LOOPBACK, worker_env_vars
from tests.conftest import free_port

RAY = Path(sys.executable).with_name("ray")


def node_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a node of ours starts with: no RAY_* of the caller, our worker hygiene, loopback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(worker_env_vars())
    env.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # loopback (docs/stack-notes.md)
        RAY_AUTH_MODE="disabled",  # no token in the user's ~/.ray; loopback only
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{RAY.parent}{os.pathsep}{env.get('PATH', '')}",  # `python` in a job's entrypoint = this venv
    )
    env.update(extra or {})
    return env


def stop_process_group(process: subprocess.Popen, term_timeout_s: float) -> None:
    """Stop a process started with start_new_session and everything in its group: SIGTERM (Ray's orderly
    shutdown of a node), then SIGKILL for whatever that left behind."""
    pgid = process.pid  # start_new_session: the group id is the leader's pid
    try:
        os.killpg(pgid, signal.SIGTERM)
        process.wait(timeout=term_timeout_s)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=10)


class RayNode:
    """One node. A head (head_of=None) is `ray start --head --block` with a GCS port, a dashboard and a job
    agent; a worker (tests/worker_node.py) joins the head it is given."""

    def __init__(self, num_cpus: int, head_of: "RayNode | None" = None, env: dict[str, str] | None = None,
                 resources: dict[str, float] | None = None):
        self.head = head_of is None
        self.env = node_env(env)
        if self.head:
            # Short path: Ray's unix sockets live under the temp dir (107-byte limit).
            self.temp_dir = tempfile.mkdtemp(prefix="pfn", dir="/tmp")
            self.gcs_port, self.dashboard_port = free_port(), free_port()
            command = [str(RAY), "start", "--block", "--head", f"--node-ip-address={LOOPBACK}", f"--num-cpus={num_cpus}",
                       f"--temp-dir={self.temp_dir}", "--disable-usage-stats", f"--port={self.gcs_port}",
                       f"--dashboard-host={LOOPBACK}", f"--dashboard-port={self.dashboard_port}",
                       "--include-dashboard=true", f"--ray-client-server-port={free_port()}",
                       # Ports with fixed defaults another cluster on this machine may already hold.
                       f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}"]
            if resources:
                command.append(f"--resources={json.dumps(resources)}")
            cwd = self.temp_dir
        else:
            if resources:
                raise ValueError("custom resources are for the head node")
            self.temp_dir, self.gcs_port, self.dashboard_port = head_of.temp_dir, head_of.gcs_port, head_of.dashboard_port
            command = [sys.executable, "-m", "tests.worker_node", self.address, str(num_cpus), "0"]
            cwd = str(Path(__file__).resolve().parents[1])
        self.log = open(Path(tempfile.mkdtemp(prefix="pfl")) / "ray_node.log", "w")
        self.process = subprocess.Popen(command, env=self.env, cwd=cwd, start_new_session=True,
                                        stdout=self.log, stderr=subprocess.STDOUT)

    @property
    def address(self) -> str:
        """The GCS address drivers join by (RAY_ADDRESS)."""
        return f"{LOOPBACK}:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        """The dashboard's HTTP address (job submission, the state API)."""
        return f"http://{LOOPBACK}:{self.dashboard_port}"

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        stop_process_group(self.process, term_timeout_s=20)
        self.log.close()
        if self.head:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def wait_for_nodes(head: RayNode, count: int, timeout_s: float = 120.0) -> list[dict]:
    """The cluster's alive nodes once there are `count` of them (the state API over the dashboard's HTTP)."""
    from ray.util.state import list_nodes

    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        try:
            nodes = [n for n in list_nodes(address=head.dashboard, raise_on_missing_output=False)
                     if n.state == "ALIVE"]
            if len(nodes) >= count:
                return nodes
            last = f"{len(nodes)} alive"
        except Exception as exc:  # noqa: BLE001 - not up yet
            last = repr(exc)
        if not head.running():
            raise RuntimeError(f"ray start exited ({head.process.returncode}); see {head.log.name}")
        time.sleep(1.0)
    raise TimeoutError(f"the cluster at {head.address} has no {count} alive nodes after {timeout_s:.0f}s: {last}")
