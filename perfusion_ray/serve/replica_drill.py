"""A replica-loss drill: kill one replica of a running deployment under bounded load and measure what the
clients saw and how soon Serve noticed and recovered.

    report = drill("reward", "RewardModel", call, concurrency=8, duration_s=30)

`call(worker)` makes one request the way a client of the project does (its retries included) and raises if
that request failed for good. The drill keeps `concurrency` workers calling for `duration_s`, kills one
replica's process with SIGKILL after `kill_after_s` (the hardest way to lose one: no drain, no goodbye),
and polls serve.status() until the deployment is HEALTHY again with as many running replicas as before.
Run it on a cluster you may disturb: the replica really dies.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from perfusion_ray.records import Merchant

POLL_S = 0.1


class StatusTally:
    """The HTTP statuses the clients received, retries included: pass it as a client's `observe` hook (it
    counts from every worker thread)."""

    def __init__(self):
        self.counts: Counter = Counter()
        self._lock = threading.Lock()

    def __call__(self, status: int) -> None:
        with self._lock:
            self.counts[status] += 1


def score_request() -> tuple[str, np.ndarray, Merchant]:
    """The (prompt, 2 images, merchant) every drill worker scores: small, so the load is the requests."""
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    return "a dark red dress", images, Merchant("m0", {"region": "south"}, {"price_level": 1.5})


@dataclass
class DrillReport:
    """What one drill measured. Times are seconds from the kill."""

    requests: int = 0  # calls that returned
    failed: list[str] = field(default_factory=list)  # calls that raised: failures the clients saw
    killed_pid: int = 0
    replicas_before: int = 0
    unhealthy_after_s: float | None = None  # serve.status() first showed the loss (None: never seen)
    recovered_after_s: float | None = None  # HEALTHY with replicas_before running again (None: not in time)
    load_s: float = 0.0


def _status(app: str, deployment: str) -> tuple[str, int]:
    """(deployment status name, running replicas) as serve.status() says."""
    from ray import serve

    overview = serve.status().applications[app].deployments[deployment]
    running = sum(count for state, count in overview.replica_states.items() if str(state).endswith("RUNNING"))
    return str(overview.status).rsplit(".", 1)[-1], running


def replica_processes(app: str, deployment: str) -> list[tuple[int, str]]:
    """(pid, node id) of every live replica actor of the deployment."""
    import ray
    from ray.util.state import list_actors

    # This cluster's, by its address: other clusters may run on the same machine.
    actors = list_actors(address=ray.get_runtime_context().gcs_address,
                         filters=[("class_name", "=", f"ServeReplica:{app}:{deployment}"), ("state", "=", "ALIVE")])
    return [(actor.pid, actor.node_id) for actor in actors]


def kill_process(pid: int, node_id: str) -> None:
    """SIGKILL `pid` on the node that runs it (a one-off task pinned there)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
    def kill(target: int) -> None:
        os.kill(target, signal.SIGKILL)

    ray.get(kill.remote(pid), timeout=60)


def drill(app: str, deployment: str, call: Callable[[int], object], concurrency: int = 8, duration_s: float = 30.0,
          kill_after_s: float = 5.0, recovery_timeout_s: float = 180.0) -> DrillReport:
    report, lock, stop = DrillReport(), threading.Lock(), threading.Event()

    def worker(index: int) -> None:
        while not stop.is_set():
            try:
                call(index)
            except Exception as exc:  # noqa: BLE001 - every failure the client could not mend counts
                with lock:
                    report.failed.append(repr(exc)[:300])
                continue
            with lock:
                report.requests += 1

    replicas = replica_processes(app, deployment)
    report.replicas_before = len(replicas)
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    time.sleep(kill_after_s)
    report.killed_pid = replicas[0][0]
    kill_process(*replicas[0])
    killed = time.monotonic()
    while time.monotonic() - killed < recovery_timeout_s:
        status, running = _status(app, deployment)
        since = time.monotonic() - killed
        if report.unhealthy_after_s is None and (status != "HEALTHY" or running < report.replicas_before):
            report.unhealthy_after_s = since
        if report.unhealthy_after_s is not None and status == "HEALTHY" and running >= report.replicas_before:
            report.recovered_after_s = since
            break
        time.sleep(POLL_S)
    time.sleep(max(0.0, started + duration_s - time.monotonic()))
    stop.set()
    for thread in threads:
        thread.join(timeout=120)
    report.load_s = time.monotonic() - started
    return report
