"""Fault figures: what hostile HTTP and a replica loss do to the served apps, measured on a local cluster.

    .venv/bin/python -m benchmarks.faults [--examples 200] [--kill-seconds 30] [--concurrency 8] [--quick]

One function per figure group, each printing its lines (and adding them to benchmarks/results/faults.txt):
  http_figures          requests sent to both apps (schemathesis cases from each app's own OpenAPI, hypothesis-
                        made hostile bodies, the hand cases), how many answered 5xx, how many hung (no answer
                        within --timeout), and how many valid requests failed when sent together with a bad one;
  replica_kill_figures  one of two reward replicas SIGKILLed under bounded load (the project's HTTP client,
                        --concurrency workers for --kill-seconds): requests sent, failed, answers by status,
                        seconds until serve.status() showed the loss and until the deployment recovered;
  listening_sockets     every TCP socket the local cluster's processes listen on, by process and address
                        (the table of docs/serving.md).
Needs the test extra (hypothesis, schemathesis): the hostile requests are the test suite's (tests/hostile_requests.py).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import requests

from benchmarks.design_endpoint import pipeline_dir
from benchmarks.serve_common import Tee, free_port, header, ray_workers_at_our_priority, reward_model_dir

RESULTS = Path("benchmarks/results/faults.txt")
TOKEN = "faults-benchmark-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
REWARD, DESIGN = "freward", "fdesign"


@dataclass
class Tally:
    """Answers to hostile requests: every status seen, and the requests that got no answer in time."""

    statuses: Counter = field(default_factory=Counter)
    hangs: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, call) -> None:
        try:
            status = call().status_code
        except requests.Timeout:
            with self.lock:
                self.hangs += 1
            return
        with self.lock:
            self.statuses[status] += 1

    @property
    def sent(self) -> int:
        return sum(self.statuses.values()) + self.hangs

    @property
    def server_errors(self) -> int:
        return sum(count for status, count in self.statuses.items() if status >= 500)


def _post(url: str, body: bytes | dict, headers: dict, timeout_s: float) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(url, data=data, headers={"Content-Type": "application/json", **headers}, timeout=timeout_s)


def _run_examples(strategy, send, examples: int) -> None:
    """send(example) for `examples` examples of a hypothesis strategy (deterministic)."""
    from hypothesis import HealthCheck, Phase, given, settings

    @given(strategy)
    @settings(max_examples=examples, deadline=None, derandomize=True, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), database=None)
    def run(example):
        send(example)

    run()


def _sent_together(url: str, good: list[bytes], bad: bytes, headers: dict, timeout_s: float) -> tuple[int, int]:
    """POST every good body and the bad one at once; (good requests that did not answer 200, the bad one's status)."""
    bodies = good[: len(good) // 2] + [bad] + good[len(good) // 2:]
    with ThreadPoolExecutor(min(32, len(bodies))) as pool:
        statuses = list(pool.map(lambda body: _post(url, body, headers, timeout_s).status_code, bodies))
    bad_status = statuses.pop(len(good) // 2)
    return sum(status != 200 for status in statuses), bad_status


def http_figures(log: Tee, urls: dict[str, str], examples: int, timeout_s: float) -> None:
    from tests.hostile_requests import (DESIGN_PATHS, HAND_CASES, SCORE_PATHS, SURROGATE_DESIGN, SURROGATE_SCORE,
                                        design_body, hostile_bodies, schemathesis_cases, score_body)

    headers = {"reward": AUTH, "design": {}}
    tallies = {}
    for app in ("reward", "design"):
        tally = tallies[f"{app}: schemathesis"] = Tally()
        _run_examples(schemathesis_cases(urls[app], headers[app]),
                      lambda case: tally.send(lambda: case.call(base_url=urls[app], headers=headers[app],
                                                                timeout=timeout_s)), examples)
    for app, route, base, paths in (("reward", "/v1/score", score_body(), SCORE_PATHS),
                                    ("design", "/v1/designs", design_body(), DESIGN_PATHS)):
        tally = tallies[f"{app}: hostile values"] = Tally()
        _run_examples(hostile_bodies(base, paths),
                      lambda body: tally.send(lambda: _post(urls[app] + route, body, headers[app], timeout_s)), examples)
    tally = tallies["both: hand cases"] = Tally()
    for app, route, body in HAND_CASES:
        tally.send(lambda: _post(urls[app] + route, body, headers[app], timeout_s))
    for name, t in tallies.items():
        log(f"http {name}: {t.sent} requests, {t.server_errors} answered 5xx, {t.hangs} hung; answers "
            f"{dict(sorted(t.statuses.items()))}")
    total = sum(t.sent for t in tallies.values())
    log(f"http total: {total} requests, {sum(t.server_errors for t in tallies.values())} 5xx, "
        f"{sum(t.hangs for t in tallies.values())} hung")
    for app, route, good, bad in (
            ("reward", "/v1/score", [json.dumps(score_body()).encode()] * 160, SURROGATE_SCORE),
            ("design", "/v1/designs", [json.dumps(design_body(seed=i)).encode() for i in range(18)], SURROGATE_DESIGN)):
        failed, bad_status = _sent_together(urls[app] + route, good, bad, headers[app], timeout_s)
        log(f"http {app}: {len(good)} valid requests sent together with a bad one: {failed} failed (the bad one: "
            f"{bad_status})")


def replica_kill_figures(log: Tee, url: str, concurrency: int, seconds: float) -> None:
    import numpy as np

    from perfusion_ray.records import Merchant
    from perfusion_ray.serve.client import RewardClient
    from perfusion_ray.serve.replica_drill import drill

    statuses, lock = Counter(), threading.Lock()

    def seen(status: int) -> None:
        with lock:
            statuses[status] += 1

    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    merchant = Merchant("m0", {"region": "south"}, {"price_level": 1.5})
    clients = [RewardClient(url, token=TOKEN, observe=seen) for _ in range(concurrency)]
    report = drill(REWARD, "RewardModel", lambda worker: clients[worker].score("a dark red dress", images, merchant),
                   concurrency=concurrency, duration_s=seconds, kill_after_s=min(5.0, seconds / 4))
    for client in clients:
        client.close()

    def seconds_or_never(value: float | None) -> str:
        return "never" if value is None else f"{value:.1f} s"

    log(f"replica kill: 1 of {report.replicas_before} reward replicas SIGKILLed under {concurrency} RewardClient "
        f"workers for {report.load_s:.0f} s: {report.requests} requests, {len(report.failed)} failed; answers the "
        f"clients received (retries included) {dict(sorted(statuses.items()))}")
    log(f"replica kill: serve.status() showed the loss after {seconds_or_never(report.unhealthy_after_s)}, HEALTHY "
        f"with {report.replicas_before} replicas again after {seconds_or_never(report.recovered_after_s)}")
    for failure in report.failed[:5]:
        log(f"replica kill: failed: {failure}")


# Ray's processes, by what their command line holds (first match).
PROCESS_NAMES = ("gcs_server", "raylet", "dashboard/dashboard.py", "dashboard/agent.py", "runtime_env/agent",
                 "ray::ProxyActor", "ray::HAProxyManager", "ray::ServeController", "ray::ServeReplica", "haproxy",
                 "ray::DashboardAgent", "ray::RuntimeEnvAgent", "ray::IDLE", "ray::")


def listening_sockets(log: Tee) -> None:
    import os
    from collections import defaultdict

    import psutil

    me = psutil.Process()
    processes = {p.pid: p for p in [me, *me.children(recursive=True)]}  # a local cluster: our descendants
    found: dict[str, set[str]] = defaultdict(set)
    for connection in psutil.net_connections(kind="inet"):
        process = processes.get(connection.pid)
        if connection.status != psutil.CONN_LISTEN or process is None:
            continue
        try:
            command = " ".join(process.cmdline())
        except psutil.Error:
            continue
        name = "driver (this process)" if process.pid == os.getpid() else next(
            (n for n in PROCESS_NAMES if n in command), command[:40])
        found[name].add(f"{connection.laddr.ip}:{connection.laddr.port}")
    for name, addresses in sorted(found.items()):
        log(f"listening: {name:28s} {' '.join(sorted(addresses))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200, help="examples per fuzzing strategy and app")
    parser.add_argument("--kill-seconds", type=float, default=30.0, help="load duration around the replica kill")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=60.0, help="a request without an answer by then hung")
    parser.add_argument("--out", type=Path, default=Path("out/bench-faults"))
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 examples, 12 s of load")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.examples, args.kill_seconds = min(args.examples, 20), min(args.kill_seconds, 12.0)
    ray_workers_at_our_priority()

    import torch

    from perfusion_ray.config import load_config
    from perfusion_ray.runtime import init_ray
    from perfusion_ray.serve import apps, design_app, reward_app

    torch.set_num_threads(1)
    log = Tee(args.results)
    header(log, "benchmarks.faults")
    store = Path(tempfile.mkdtemp(prefix="bench-faults-store-"))
    common = [f"serve.port={free_port()}", f"serve.app_name={REWARD}", f"serve.route_prefix=/{REWARD}",
              "policy.num_inference_steps=2"]
    reward = common + [f"serve.bearer_token={TOKEN}", "serve.min_replicas=2", "serve.max_replicas=2",
                       "serve.max_body_bytes=1048576"]
    design = common + [f"design.app_name={DESIGN}", f"design.route_prefix=/{DESIGN}", "design.rate_limit_per_minute=0",
                       f"design.store_root={store}", "design.max_body_bytes=1048576", "serve.max_replicas=1"]
    config = load_config(None, design)
    ray = init_ray(config.cluster)
    from ray import serve

    base = f"http://127.0.0.1:{config.serve.port}"
    try:
        started = time.monotonic()
        apps.start_serve(config)
        apps.deploy(reward_app.application_entry(load_config(None, reward), None, reward,
                                                 model_dir=str(reward_model_dir(None, args.out))), timeout_s=300)
        apps.deploy(design_app.application_entry(config, None, design,
                                                 pipeline_dir=str(pipeline_dir(None, config, args.out))), timeout_s=300)
        log(f"apps up in {time.monotonic() - started:.0f} s: {REWARD} (2 replicas, bearer token), {DESIGN} (1 replica, "
            f"{config.policy.num_inference_steps} sampling steps); bodies up to 1 MiB")
        http_figures(log, {"reward": f"{base}/{REWARD}", "design": f"{base}/{DESIGN}"}, args.examples, args.timeout)
        listening_sockets(log)
        replica_kill_figures(log, f"{base}/{REWARD}", args.concurrency, args.kill_seconds)
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
