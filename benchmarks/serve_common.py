"""What the Serve endpoint benchmarks share: a results tee, a free loopback port, Ray workers at this process's
priority, the bounded load generator (at most N requests and T seconds; HTTP to 127.0.0.1 only), CPU
seconds per role read from the Serve processes, and the reward model they serve.

Used by benchmarks/serve_reward.py and benchmarks/design_endpoint.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from urllib.parse import urlparse

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class Tee:
    """print() to the terminal and to the results file."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "w")

    def __call__(self, *parts) -> None:
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()


def free_port() -> int:
    """A TCP port nobody listens on at 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ray_workers_at_our_priority(env: Sequence[str] = ()) -> None:
    """Before Ray starts: its workers (Serve's proxy and replicas) at this process's niceness, not Ray's default
    15, so on cores shared with other jobs the endpoint does not lose CPU that the load generator (or an
    in-process reference) wins. Then the KEY=VALUE items of `env` (they may override it)."""
    os.environ.setdefault("RAY_worker_niceness", str(os.nice(0)))
    for item in env:
        key, value = item.split("=", 1)
        os.environ[key] = value


async def bounded_load(send: Callable[[int], Awaitable[None]], concurrency: int, max_requests: int,
                       max_seconds: float, count: int) -> tuple[list[float], list[str], float]:
    """`concurrency` workers each awaiting send(index) in turn, index cycling over range(count), until
    max_requests were issued or max_seconds passed (requests in flight then finish). Returns (latencies of the
    successful requests in s, errors, wall seconds)."""
    latencies, errors = [], []
    issued = 0
    deadline = time.monotonic() + max_seconds

    async def worker():
        nonlocal issued
        while issued < max_requests and time.monotonic() < deadline:
            index = issued % count
            issued += 1
            started = time.perf_counter()
            try:
                await send(index)
                latencies.append(time.perf_counter() - started)
            except Exception as exc:  # noqa: BLE001 - counted, shown
                errors.append(repr(exc)[:200])

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors, time.monotonic() - started


def http_load(url: str, bodies: Sequence[bytes], check: Callable[[int, dict], None], concurrency: int,
              max_requests: int, max_seconds: float, timeout_s: float = 60.0, token: str | None = None):
    """bounded_load of JSON POSTs of bodies[index] to `url` (loopback only, with the bearer token when
    given); an answer other than 200, or one check(index, answer) raises on, is a failure. Returns what
    bounded_load returns."""
    import aiohttp

    if urlparse(url).hostname not in LOOPBACK:
        raise ValueError(f"the load generator targets 127.0.0.1 only, not {url}")

    async def main():
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector,
                                         timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
            headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}

            async def send(index: int):
                async with session.post(url, data=bodies[index], headers=headers) as response:
                    body = await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"HTTP {response.status}: {body[:200]!r}")
                    check(index, json.loads(body))

            return await bounded_load(send, concurrency, max_requests, max_seconds, len(bodies))

    return asyncio.run(main())


def cpu_seconds(replicas: dict[str, str]) -> dict[int, tuple[str, float]]:
    """CPU seconds so far of this process ("load generator"), Serve's proxy or HAProxy ("proxy") and the Serve replicas
    whose command line holds replicas[role] (role -> marker, e.g. {"replicas": "RewardModel"}):
    pid -> (role, user + system)."""
    import psutil

    me = os.getpid()
    out = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if proc.pid == me:
            role = "load generator"
        elif "ray::ProxyActor" in cmd or os.path.basename((proc.info["cmdline"] or [""])[0]) == "haproxy":
            role = "proxy"  # Serve's Python proxy, or HAProxy under cluster.serve_ingress=haproxy
        elif "ray::ServeReplica" in cmd:
            role = next((name for name, marker in replicas.items() if marker in cmd), None)
            if role is None:
                continue
        else:
            continue
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        out[proc.pid] = (role, times.user + times.system)
    return out


def cpu_used(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds by role between two cpu_seconds() readings, over processes alive at both ends (a replica
    started in between is left out: its start-up would swamp the per-request cost)."""
    total: dict[str, float] = {}
    for pid, (role, seconds) in after.items():
        if pid in before:
            total[role] = total.get(role, 0.0) + seconds - before[pid][1]
    return total


def cpu_per_request(before: dict, after: dict, requests: int) -> dict[str, float]:
    """ms of CPU per request by role (cpu_used over `requests`)."""
    return {role: 1000 * seconds / max(requests, 1) for role, seconds in cpu_used(before, after).items()}


def header(log: Tee, module: str, env: Sequence[str] = ()) -> None:
    """The lines every endpoint benchmark starts with: machine, load, priorities, environment, command."""
    import sys

    from perfusion_ray.runtime import machine

    log(f"machine: {machine()}, torch threads per process: 1")
    log(f"load average (1 min) at start: {os.getloadavg()[0]:.2f} (other jobs share these cores); niceness: this "
        f"process {os.nice(0)}, Ray workers (proxy, replicas) {os.environ['RAY_worker_niceness']}")
    if env:
        log(f"environment: {' '.join(env)}")
    log(f"command: {' '.join(['.venv/bin/python', '-m', module, *sys.argv[1:]])}")


def model_dir(given: Path | None, trained: str, marker: str, build: Callable[[], Path]) -> Path:
    """`given`, else the project's trained directory `trained` when it holds `marker`, else build() (an untrained
    model of the same shape: serving it costs the same)."""
    if given:
        return given
    if (Path(trained) / marker).is_file():
        return Path(trained)
    return build()


def reward_model_dir(given: Path | None, out: Path) -> Path:
    """`given`, else the trained RM in out/rm/model, else an untrained RM saved under `out`/model."""

    def build() -> Path:
        import torch

        from perfusion_ray.models.clip_towers import load_clip
        from perfusion_ray.models.reward_model import PerFusionRM, RewardModelConfig, save_reward_model

        torch.manual_seed(0)
        return save_reward_model(PerFusionRM(load_clip(), RewardModelConfig(version="bench", towers="frozen")),
                                 out / "model")

    return model_dir(given, "out/rm/model", "model.safetensors", build)
