"""Fault figures: what hostile HTTP and a replica loss do to the served apps, measured on a local cluster.

    .venv/bin/python -m benchmarks.faults [--examples 200] [--kill-seconds 30] [--concurrency 8] [--quick]
        [--groups http,replica,resume] [--resume-seeds 3]

One function per figure group, each printing its lines (and adding them to benchmarks/results/faults.txt):
  http_figures          requests sent to both apps (schemathesis cases from each app's own OpenAPI, hypothesis-
                        made hostile bodies, the hand cases), how many answered 5xx, how many hung (no answer
                        within --timeout), and how many valid requests failed when sent together with a bad one;
  replica_kill_figures  one of two reward replicas SIGKILLed under bounded load (the project's HTTP client,
                        --concurrency workers for --kill-seconds): requests sent, failed, answers by status,
                        seconds until serve.status() showed the loss and until the deployment recovered;
  listening_sockets     every TCP socket the local cluster's processes listen on, by process and address
                        (the table of docs/serving.md);
  resume_figures        one Ray Train worker killed once before, during and right after a checkpoint of rm train,
                        align train --offline and the online rounds (tests/resume_drills.py): per moment, whether
                        the kill fired and the resume finished, the checkpoint it resumed from (and whether the
                        moment's own checkpoint was lost), the exactly-once counters against an uninterrupted
                        run's, the quality figure against the spread of --resume-seeds uninterrupted runs, and
                        the partitions the rounds consumed twice or lost; on a cluster of its own (--groups resume).
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
    from perfusion_ray.serve.client import RewardClient
    from perfusion_ray.serve.replica_drill import StatusTally, drill, score_request

    statuses, (prompt, images, merchant) = StatusTally(), score_request()
    clients = [RewardClient(url, token=TOKEN, observe=statuses) for _ in range(concurrency)]
    report = drill(REWARD, "RewardModel", lambda worker: clients[worker].score(prompt, images, merchant),
                   concurrency=concurrency, duration_s=seconds, kill_after_s=min(5.0, seconds / 4))
    for client in clients:
        client.close()

    def seconds_or_never(value: float | None) -> str:
        return "never" if value is None else f"{value:.1f} s"

    log(f"replica kill: 1 of {report.replicas_before} reward replicas SIGKILLed under {concurrency} RewardClient "
        f"workers for {report.load_s:.0f} s: {report.requests} requests, {len(report.failed)} failed; answers the "
        f"clients received (retries included) {dict(sorted(statuses.counts.items()))}")
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


def resume_figures(log: Tee, out: Path, seeds: int) -> None:
    from tests import resume_drills as drills

    out = out.absolute()  # the workers write the kill marker and the checkpoints from another working directory
    out.mkdir(parents=True, exist_ok=True)
    store = Path(tempfile.mkdtemp(prefix="store-", dir=out))
    drills.prepare_rm_store(store)
    port = free_port()
    online_template = Path(tempfile.mkdtemp(prefix="online-", dir=out)) / "template"
    fresh = drills.prepare_online_store(online_template, port)
    runs = (("rm train", drills.RM_MOMENTS, "best validation GAUC",
             lambda folder, moment, seed: drills.rm_drill(store, folder, moment, seed)),
            ("align train --offline", drills.OFFLINE_MOMENTS, "last loss",
             lambda folder, moment, seed: drills.offline_drill(store, folder, moment, seed)),
            ("online rounds", drills.ONLINE_MOMENTS, "last round's RM reward",
             lambda folder, moment, seed: drills.online_drill(online_template, fresh, folder, port, moment, seed)))
    started = finished = twice = lost = 0
    for name, moments, figure, drill in runs:
        references = [drill(Path(tempfile.mkdtemp(prefix="reference-", dir=out)) / "run", None, seed)
                      for seed in range(seeds)]
        values = [r.metric for r in references if r.finished]
        spread = max(values) - min(values) if values else float("nan")
        log(f"resume {name}: {sum(r.finished for r in references)} of {seeds} uninterrupted runs finished; "
            f"{figure} over seeds {', '.join(f'{v:.4f}' for v in values)} (spread {spread:.4f}); "
            f"{references[0].seconds:.0f} s each")
        for moment in moments:
            result = drill(Path(tempfile.mkdtemp(prefix="killed-", dir=out)) / "run", moment, 0)
            started += result.killed
            finished += result.killed and result.finished
            twice, lost = twice + result.consumed_twice, lost + result.lost
            partitions = (f"; partitions consumed {len(result.consumed)} of {len(result.expected)}, "
                          f"{result.consumed_twice} twice, {result.lost} lost") if result.expected else ""
            log(f"resume {name} killed at {moment}: kill {'fired' if result.killed else 'DID NOT FIRE'}, "
                f"{'finished' if result.finished else 'NOT FINISHED ' + result.error} in {result.seconds:.0f} s, "
                f"resumed from {result.restored_from}{' (its own checkpoint was lost)' if result.checkpoint_lost else ''}"
                f"; counters {'equal to' if result.counts == references[0].counts else 'DIFFERENT FROM'} the "
                f"uninterrupted run's {references[0].counts}; {figure} {result.metric:.4f} (uninterrupted "
                f"{references[0].metric:.4f}){partitions}")
    log(f"resume totals: {started} resumes started, {finished} finished; partitions consumed twice {twice}, lost {lost}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200, help="examples per fuzzing strategy and app")
    parser.add_argument("--kill-seconds", type=float, default=30.0, help="load duration around the replica kill")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=60.0, help="a request without an answer by then hung")
    parser.add_argument("--out", type=Path, default=Path("out/bench-faults"))
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 examples, 12 s of load")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--groups", default="http,replica,resume",
                        help="comma-separated figure groups: http (with the listening sockets), replica, resume")
    parser.add_argument("--resume-seeds", type=int, default=3, help="uninterrupted runs per kind for the spread")
    args = parser.parse_args()
    groups = set(args.groups.split(","))
    if args.quick:
        args.examples, args.kill_seconds = min(args.examples, 20), min(args.kill_seconds, 12.0)
        args.resume_seeds = min(args.resume_seeds, 2)
    ray_workers_at_our_priority()

    import torch

    from perfusion_ray.config import ClusterConfig
    from perfusion_ray.runtime import init_ray

    torch.set_num_threads(1)
    log = Tee(args.results)
    header(log, "benchmarks.faults")
    if groups & {"http", "replica"}:
        serving_figures(log, args, groups)
    if "resume" in groups:
        ray = init_ray(ClusterConfig(num_cpus=4))  # as the tests' cluster: the rounds' ingest runs beside the workers
        try:
            resume_figures(log, args.out / "resume", args.resume_seeds)
        finally:
            from ray import serve

            serve.shutdown()
            ray.shutdown()


def serving_figures(log: Tee, args, groups: set[str]) -> None:
    from perfusion_ray.config import load_config
    from perfusion_ray.runtime import init_ray
    from perfusion_ray.serve import apps, design_app, reward_app

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
        if "http" in groups:
            http_figures(log, {"reward": f"{base}/{REWARD}", "design": f"{base}/{DESIGN}"}, args.examples,
                         args.timeout)
            listening_sockets(log)
        if "replica" in groups:
            replica_kill_figures(log, f"{base}/{REWARD}", args.concurrency, args.kill_seconds)
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
