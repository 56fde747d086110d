"""A driver-side handle on SPMD Ray Train workers that stay alive: typed method calls with declared dispatch.

The training function of a TorchTrainer (`serve_commands`) builds a worker object on every rank and then
executes the commands the driver sends through a `CommandChannel` actor, until told to stop. The driver's
`WorkerGroup` calls a method on every rank and combines the answers as the method's `@dispatch` mode says:
  SPLIT          the first argument (a GroupBatch or a list) is cut into one consecutive share per rank,
                 and the ranks' results are joined back in rank order;
  SPLIT_REDUCED  the first argument is split the same way; the ranks reduce among themselves (collectives)
                 and rank 0's result is returned;
  BROADCAST      every rank gets the same arguments; rank 0's result is returned.
Ray Train keeps what it is good at: the process group, DeepSpeed's collectives, checkpoints through
ray.train.report and restarts on a worker failure (FailureConfig). When it restarts the workers, they
register again; the driver sees a new incarnation and `WorkerGroupRestarted` tells it to resume from the
state the workers restored from the last checkpoint.
"""

from __future__ import annotations

import asyncio
import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from perfusion_ray.errors import PerfusionError


class Dispatch(enum.Enum):
    SPLIT = "split"
    SPLIT_REDUCED = "split_reduced"
    BROADCAST = "broadcast"


def dispatch(mode: Dispatch) -> Callable:
    """Declare how the driver spreads a worker method's input over the ranks and combines their results."""

    def mark(method: Callable) -> Callable:
        method.dispatch_mode = mode
        return method

    return mark


def dispatch_mode(worker_type: type, method: str) -> Dispatch:
    mode = getattr(getattr(worker_type, method, None), "dispatch_mode", None)
    if mode is None:
        raise AttributeError(f"{worker_type.__name__}.{method} is not a worker-group method (no @dispatch)")
    return mode


def split(value, parts: int) -> list:
    if hasattr(value, "chunk"):
        return value.chunk(parts)
    size = len(value)
    bounds = [round(i * size / parts) for i in range(parts + 1)]
    return [value[bounds[i]:bounds[i + 1]] for i in range(parts)]


def join(results: list):
    first = results[0]
    if hasattr(first, "concat"):
        return type(first).concat(results)
    if isinstance(first, list):
        return [item for result in results for item in result]
    import numpy as np

    return np.concatenate(results)


class WorkerGroupRestarted(Exception):
    """Ray Train replaced the workers (a worker failed): resume from the state they restored."""

    def __init__(self, restored: Any):
        super().__init__("the worker group restarted from its last checkpoint")
        self.restored = restored


@dataclass
class _Call:
    seq: int
    incarnation: int
    method: str
    arguments: list  # per rank: (args, kwargs)
    results: dict = field(default_factory=dict)  # rank -> ("ok", value) | ("error", text)


class CommandChannel:
    """An async Ray actor between the driver and the workers (runs with no CPU of its own)."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.incarnation = 0
        self.registered: dict[int, Any] = {}  # rank -> what it restored, for the current incarnation
        self.calls: dict[int, _Call] = {}
        self.next_seq = 0
        self.changed = asyncio.Condition()

    async def register(self, rank: int, restored: Any) -> int:
        """A worker is ready; a rank registering twice means Ray Train started a new worker group."""
        async with self.changed:
            if rank in self.registered:
                self.incarnation += 1
                self.registered = {}
                for call in self.calls.values():
                    for r in range(self.world_size):
                        call.results.setdefault(r, ("restarted", None))
            self.registered[rank] = restored
            self.changed.notify_all()
            return self.incarnation

    async def ready(self, timeout_s: float) -> tuple[int, Any] | None:
        """(incarnation, rank 0's restored state) once every rank registered; None after timeout_s."""
        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(lambda: len(self.registered) == self.world_size),
                                       timeout_s)
            except asyncio.TimeoutError:
                return None
            return self.incarnation, self.registered[0]

    async def submit(self, incarnation: int, method: str, arguments: list) -> int:
        async with self.changed:
            if incarnation != self.incarnation:
                return -1
            seq, self.next_seq = self.next_seq, self.next_seq + 1
            self.calls[seq] = _Call(seq, incarnation, method, arguments)
            self.changed.notify_all()
            return seq

    async def next_command(self, rank: int, incarnation: int, after: int) -> tuple[int, str, tuple] | None:
        """The first call after `after` for this rank (blocks); None when the incarnation is over."""
        async with self.changed:
            def pending():
                if incarnation != self.incarnation:
                    return True
                return any(seq > after and rank not in call.results for seq, call in self.calls.items())

            await self.changed.wait_for(pending)
            if incarnation != self.incarnation:
                return None
            seq = min(seq for seq, call in self.calls.items() if seq > after and rank not in call.results)
            call = self.calls[seq]
            return seq, call.method, call.arguments[rank]

    async def put_result(self, rank: int, seq: int, outcome: tuple) -> None:
        async with self.changed:
            if seq in self.calls:
                self.calls[seq].results[rank] = outcome
                self.changed.notify_all()

    async def results(self, seq: int, timeout_s: float) -> list[tuple] | None:
        """Every rank's outcome of a call; None when none arrived within timeout_s (the driver then checks
        that the trainer still runs and asks again)."""
        async with self.changed:
            call = self.calls[seq]
            try:
                await asyncio.wait_for(self.changed.wait_for(lambda: len(call.results) == self.world_size), timeout_s)
            except asyncio.TimeoutError:
                return None
            del self.calls[seq]
            return [call.results[r] for r in range(self.world_size)]


class WorkerGroup:
    """The driver's view of the workers: `group.call("generate", requests)` runs the method on every rank."""

    def __init__(self, worker_type: type, channel, world_size: int, fit_thread: threading.Thread,
                 fit_error: Callable[[], BaseException | None], ready_timeout_s: float = 900.0):
        self.worker_type, self.channel, self.world_size = worker_type, channel, world_size
        self.fit_thread, self.fit_error = fit_thread, fit_error
        self.ready_timeout_s = ready_timeout_s
        self.incarnation = -1

    def wait_ready(self) -> Any:
        """Block until every rank registered; returns what rank 0 restored (None on a fresh start)."""
        import ray

        deadline = time.monotonic() + self.ready_timeout_s
        while (ready := ray.get(self.channel.ready.remote(5.0))) is None:
            self._check_alive()
            if time.monotonic() > deadline:
                raise PerfusionError(f"the training workers did not start within {self.ready_timeout_s:.0f}s",
                                     hint="check the cluster's free CPUs (cluster.cpus_per_worker) and the logs")
        self.incarnation, restored = ready
        return restored

    def _check_alive(self) -> None:
        error = self.fit_error()
        if error is not None:
            raise error
        if not self.fit_thread.is_alive():
            raise PerfusionError("the training workers stopped before the controller was done")

    def call(self, method: str, *args, **kwargs):
        """Run `method` on every rank under its declared dispatch; raises WorkerGroupRestarted when Ray Train
        replaced the workers meanwhile."""
        import ray

        mode = dispatch_mode(self.worker_type, method)
        if mode is Dispatch.BROADCAST:
            arguments = [(args, kwargs)] * self.world_size
        else:
            arguments = [((share, *args[1:]), kwargs) for share in split(args[0], self.world_size)]
        seq = ray.get(self.channel.submit.remote(self.incarnation, method, arguments))
        if seq < 0:
            raise WorkerGroupRestarted(self._restart())
        while (outcomes := ray.get(self.channel.results.remote(seq, 5.0))) is None:
            self._check_alive()
        if any(kind == "restarted" for kind, _ in outcomes):
            raise WorkerGroupRestarted(self._restart())
        errors = [value for kind, value in outcomes if kind == "error"]
        if errors:
            raise errors[0]
        values = [value for _, value in outcomes]
        return join(values) if mode is Dispatch.SPLIT else values[0]

    def _restart(self):
        return self.wait_ready()

    def stop(self) -> None:
        """Let the training function return (the trainer's fit() then finishes)."""
        import ray

        arguments = [((), {})] * self.world_size
        ray.get(self.channel.submit.remote(self.incarnation, "stop", arguments))


def serve_commands(worker, channel, rank: int) -> None:
    """The training function's loop on every rank: register, then run the driver's calls until "stop".

    A method that raises reports the error to the driver and re-raises, so Ray Train sees the failure too."""
    import ray

    incarnation = ray.get(channel.register.remote(rank, worker.restored_state()))
    last = -1
    while True:
        command = ray.get(channel.next_command.remote(rank, incarnation, last))
        if command is None:
            return  # a newer worker group took over
        seq, method, (args, kwargs) = command
        last = seq
        if method == "stop":
            ray.get(channel.put_result.remote(rank, seq, ("ok", None)))
            return
        try:
            value = getattr(worker, method)(*args, **kwargs)
        except Exception as exc:
            ray.get(channel.put_result.remote(rank, seq, ("error", exc)))
            raise
        ray.get(channel.put_result.remote(rank, seq, ("ok", value)))
