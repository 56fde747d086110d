"""Reward endpoint throughput and latency: requests/s and p50/p99 over HTTP and over the DeploymentHandle at
concurrency 1, 8 and 32, against in-process batched scoring of the same images, with the replica count
seen during each run (autoscaling up under load, and back down after), side by side in one run with the
machine printed.

    .venv/bin/python -m benchmarks.serve_reward [--model DIR] [--images-per-request 4 16] [--set serve.X=Y ...]

Requests are FashionWorld groups: K catalogue renders (32x32 PNG) for one merchant and prompt. The load
generator is bounded (at most --requests and --seconds per row, after --warmup seconds of the same load),
targets 127.0.0.1 only, and runs in this process (aiohttp for HTTP, asyncio over the handle), so it shares the 2 cores with the
endpoint. Results also go to benchmarks/results/serve_reward.txt.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.serve_common import (Tee, bounded_load, cpu_per_request, cpu_seconds, free_port, header, http_load,
                                     ray_workers_at_our_priority, reward_model_dir)
from perfusion_ray.config import load_config
from perfusion_ray.serve.apps import serve_token

RESULTS = Path(__file__).resolve().parent / "results" / "serve_reward.txt"
CONCURRENCY = (1, 8, 32)
REPLICAS = {"replicas": "RewardModel"}  # cpu_seconds role -> replica command-line marker


@dataclass
class Workload:
    prompts: list[str]
    merchants: list[dict]  # merchant fields per request
    images: list[np.ndarray]  # [K, 32, 32, 3] per request
    bodies: list[bytes] = field(default_factory=list)  # HTTP bodies, encoded once up front

    @property
    def images_per_request(self) -> int:
        return len(self.images[0])


def build_workload(requests: int, k: int, seed: int = 0) -> Workload:
    from perfusion_ray.serve.images import to_base64_png
    from perfusion_ray.world.catalogue import prompt_text
    from perfusion_ray.world.simulator import build_world

    world = build_world(load_config())
    rng = np.random.default_rng(seed)
    merchants = world.merchants
    prompts, fields, images = [], [], []
    for _ in range(requests):
        m = int(rng.integers(len(merchants.ids)))
        items = rng.choice(len(world.catalogue), size=k, replace=False)
        prompts.append(prompt_text(int(world.catalogue.classes[items[0]]), int(world.catalogue.colours[items[0]])))
        fields.append({"merchant_id": merchants.ids[m], "merchant_features": dict(merchants.features[m]),
                       "merchant_stats": {n: float(v) for n, v in merchants.stats[m].items()}})
        images.append(world.catalogue.images[items])
    workload = Workload(prompts, fields, images)
    workload.bodies = [json.dumps({**f, "prompt": p, "images": [to_base64_png(i) for i in imgs]}).encode()
                       for f, p, imgs in zip(fields, prompts, images)]
    return workload


class InProcess:
    """The same images through PerFusionRM.score in this process, one torch thread, batched."""

    def __init__(self, model_dir: Path, batch_size: int):
        from perfusion_ray.models.reward_model import load_reward_model

        self.model = load_reward_model(model_dir)
        self.batch_size = batch_size

    def images_per_second(self, workload: Workload, repeats: int = 2) -> float:
        """Best of `repeats` passes over every image of the workload."""
        from perfusion_ray.records import Merchant

        k = workload.images_per_request
        merchants = [Merchant.coerce(f) for f in workload.merchants for _ in range(k)]
        prompts = [p for p in workload.prompts for _ in range(k)]
        images = np.concatenate(workload.images)
        self.model.score(merchants[:8], prompts[:8],
                         images[:8])  # warm-up
        best = 0.0
        for _ in range(repeats):
            started = time.perf_counter()
            self.model.score(merchants, prompts, images, batch_size=self.batch_size)
            best = max(best, len(images) / (time.perf_counter() - started))
        return best


class ReplicaSampler(threading.Thread):
    """Counts RUNNING replicas of the deployment every `period` seconds."""

    def __init__(self, app: str, period: float = 0.5):
        super().__init__(daemon=True)
        self.app, self.period = app, period
        self.samples: list[tuple[float, int]] = []
        self.stop = threading.Event()

    def count(self) -> int:
        from ray import serve

        deployment = serve.status().applications[self.app].deployments["RewardModel"]
        return int(deployment.replica_states.get("RUNNING", 0))

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.samples.append((time.monotonic(), self.count()))
            except Exception:  # noqa: BLE001 - a missed sample is not a result
                pass
            self.stop.wait(self.period)

    def between(self, start: float, end: float) -> list[int]:
        return [n for t, n in self.samples if start <= t <= end]


@dataclass
class Run:
    transport: str
    concurrency: int
    requests: int
    failures: int
    seconds: float
    latencies: np.ndarray
    replicas: list[int]
    errors: list[str]
    reference: float = float("nan")  # in-process images/s measured just before and after this run (mean)
    cpu_ms: dict = field(default_factory=dict)  # CPU ms per request by role
    warmup_requests: int = 0
    warmup_failures: int = 0

    def rps(self) -> float:
        return self.requests / self.seconds


def http_run(url: str, workload: Workload, concurrency: int, max_requests: int, max_seconds: float, version: str,
             token: str | None):
    def check(index: int, answer: dict) -> None:
        if answer["model_version"] != version or len(answer["scores"]) != workload.images_per_request:
            raise RuntimeError(f"unexpected answer {answer}")

    return http_load(f"{url}/v1/score", workload.bodies, check, concurrency, max_requests, max_seconds, token=token)


def handle_run(app: str, workload: Workload, concurrency: int, max_requests: int, max_seconds: float, version: str):
    from ray import serve

    async def main():
        handle = serve.get_deployment_handle("RewardModel", app)

        async def send(index: int):
            answer = await handle.score.remote(workload.prompts[index], workload.images[index], workload.merchants[index])
            if answer["model_version"] != version or len(answer["scores"]) != workload.images_per_request:
                raise RuntimeError(f"unexpected answer {answer}")

        return await bounded_load(send, concurrency, max_requests, max_seconds, len(workload.images))

    return asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="RM directory (default out/rm/model, else an untrained RM)")
    parser.add_argument("--out", type=Path, default=Path("out/bench-serve"))
    parser.add_argument("--images-per-request", type=int, nargs="+", default=[4, 16],
                        help="K per request, one sweep each (a FashionWorld group is 4)")
    parser.add_argument("--distinct", type=int, default=256, help="distinct requests, cycled")
    parser.add_argument("--requests", type=int, default=3000, help="at most this many requests per run")
    parser.add_argument("--seconds", type=float, default=20.0, help="at most this long per run")
    parser.add_argument("--warmup", type=float, default=10.0,
                        help="seconds of the same load before each measured run (autoscaling reacts in ~10-20 s); "
                             "its requests are not timed but its failures count")
    parser.add_argument("--scale-down-timeout", type=float, default=120.0)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="config overrides for the endpoint, e.g. --set serve.max_batch_size=128")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    parser.add_argument("--transports", nargs="+", default=["http", "handle"], choices=["http", "handle"])
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment for the local cluster (Serve's own knobs), set before Ray starts")
    args = parser.parse_args()
    # Ray starts its workers (Serve's proxy and replicas) at niceness 15 by default, and this process runs at
    # 0: on cores shared with other jobs the in-process reference would then win CPU the endpoint loses.
    # Same priority for both sides (override with --env RAY_worker_niceness=15).
    ray_workers_at_our_priority(args.env)

    import torch

    torch.set_num_threads(1)  # as the replicas run; the 2 cores are shared
    log = Tee(args.results)
    overrides = [f"serve.port={free_port()}", "serve.app_name=bench_reward", *args.set]
    config = load_config(None, overrides)
    if config.cluster.serve_ingress == "haproxy" and not serve_token(config):
        # HAProxy ingress has the replicas listen on every interface, which needs a token: a fresh one per run.
        args.set.append(f"serve.bearer_token={secrets.token_urlsafe(16)}")
        overrides.append(args.set[-1])
        config = load_config(None, overrides)
    token = serve_token(config)
    s = config.serve
    header(log, "benchmarks.serve_reward", args.env)
    model_dir = reward_model_dir(args.model, args.out)
    workloads = {k: build_workload(args.distinct, k) for k in args.images_per_request}
    log(f"model: {model_dir}; requests: {args.distinct} distinct FashionWorld (merchant, prompt) requests of K "
        f"catalogue renders (32x32 PNG), at most {args.requests} requests or {args.seconds:.0f} s per run, each after "
        f"{args.warmup:.0f} s of the same load")
    log(f"endpoint: ingress {config.cluster.serve_ingress} (cluster.serve_ingress); @serve.batch up to {s.max_batch_size} images, wait {s.batch_wait_timeout_s * 1000:.0f} ms; "
        f"replicas {s.min_replicas}-{s.max_replicas} x {s.replica_cpus} CPU, target {s.target_ongoing_requests:g} "
        f"ongoing, max_ongoing_requests {s.max_ongoing_requests}, upscale/downscale delay "
        f"{s.upscale_delay_s:g}/{s.downscale_delay_s:g} s, look-back {s.look_back_period_s:g} s")

    # The in-process reference is measured right before and right after each endpoint run, in this process,
    # and the run is compared with their mean: the cores are shared with other jobs, whose load drifts.
    reference = InProcess(model_dir, s.max_batch_size)

    from perfusion_ray.runtime import init_ray
    from perfusion_ray.serve import reward_app
    from perfusion_ray.serve.model_store import model_version

    ray = init_ray(config.cluster.model_copy(update={"num_cpus": 2}))
    from ray import serve

    sampler = ReplicaSampler(s.app_name)
    runs: dict[int, list[Run]] = {k: [] for k in workloads}
    try:
        started = time.monotonic()
        reward_app.start_serve(config)
        reward_app.deploy(reward_app.application_entry(config, config.source, [f"serve.port={s.port}",
                                                                               f"serve.app_name={s.app_name}",
                                                                               *args.set], model_dir=str(model_dir)))
        version = model_version(model_dir)
        url = f"http://{s.host}:{s.port}"
        log(f"endpoint up in {time.monotonic() - started:.1f} s at {url}, model {version}")
        sampler.start()
        for k, workload in workloads.items():
            for concurrency in args.concurrency:
                for transport in args.transports:
                    def load(max_seconds: float):
                        if transport == "http":
                            return http_run(url, workload, concurrency, args.requests, max_seconds, version, token)
                        return handle_run(s.app_name, workload, concurrency, args.requests, max_seconds, version)

                    warm = load(args.warmup) if args.warmup > 0 else ([], [], 0.0)
                    before = reference.images_per_second(workload)
                    cpu_before = cpu_seconds(REPLICAS)
                    begin = time.monotonic()
                    latencies, errors, seconds = load(args.seconds)
                    replicas = sampler.between(begin, time.monotonic())
                    cpu = cpu_per_request(cpu_before, cpu_seconds(REPLICAS), len(latencies) + len(errors))
                    after = reference.images_per_second(workload)
                    run = Run(transport, concurrency, len(latencies) + len(errors), len(errors), seconds,
                              np.asarray(latencies), replicas, errors[:3] + warm[1][:3], (before + after) / 2, cpu,
                              len(warm[0]) + len(warm[1]), len(warm[1]))
                    runs[k].append(run)
                    log(f"  ran K={k} {transport} c={concurrency}: {run.requests} requests in {seconds:.1f} s, "
                        f"{run.failures} failed, replicas {min(replicas, default=0)}-{max(replicas, default=0)}; "
                        f"in-process {before:,.0f} / {after:,.0f} images/s before / after; load {os.getloadavg()[0]:.1f}")
        load_end = time.monotonic()
        while time.monotonic() - load_end < args.scale_down_timeout:
            if sampler.samples and sampler.samples[-1][0] > load_end + 1 and sampler.samples[-1][1] <= s.min_replicas:
                break
            time.sleep(0.5)
        after_load = sampler.between(load_end, time.monotonic())
        scaled_down = after_load[-1] if after_load else None
        down_seconds = time.monotonic() - load_end
    finally:
        sampler.stop.set()
        serve.shutdown()
        ray.shutdown()
    for k, workload in workloads.items():
        model_ms = 1000 * k / max(run.reference for run in runs[k])
        log(f"\nK={k}: the forward pass alone costs about {model_ms:.1f} ms of CPU per request in process")
        log(f"K={k} images per request; in-process = PerFusionRM.score of the same images in one process, batch "
            f"{s.max_batch_size}, one thread, measured just before and after each run (mean)")
        log(f"{'transport':<9} {'conc':>4} {'requests':>8} {'failed':>6} {'req/s':>7} {'images/s':>8} "
            f"{'p50 ms':>7} {'p99 ms':>7} {'in-process':>10} {'ratio':>6} {'replicas':>8}   CPU ms per request: "
            f"replicas / proxy / load generator")
        for run in runs[k]:
            p50, p99 = (np.percentile(run.latencies, [50, 99]) * 1000) if len(run.latencies) else (float("nan"),) * 2
            replicas = f"{min(run.replicas, default=0)}-{max(run.replicas, default=0)}"
            log(f"{run.transport:<9} {run.concurrency:>4} {run.requests:>8} {run.failures:>6} {run.rps():>7.1f} "
                f"{run.rps() * k:>8.0f} {p50:>7.1f} {p99:>7.1f} {run.reference:>10,.0f} "
                f"{run.rps() * k / run.reference:>5.2f}x {replicas:>8}   "
                + " / ".join(f"{run.cpu_ms.get(role, 0.0):.1f}" for role in ("replicas", "proxy", "load generator")))
            for error in run.errors:
                log(f"    error: {error}")
    all_runs = [run for group in runs.values() for run in group]
    peak = max((n for _, n in sampler.samples), default=0)
    log(f"\nreplicas: started at {s.min_replicas}, peak {peak} under load, {scaled_down} "
        f"{down_seconds:.0f} s after the load stopped (downscale delay {s.downscale_delay_s:g} s)")
    log(f"failed requests: {sum(run.failures + run.warmup_failures for run in all_runs)} of "
        f"{sum(run.requests + run.warmup_requests for run in all_runs)} (measured and warm-up)")
    log(f"load average (1 min) at the end: {os.getloadavg()[0]:.2f}")
    for k in workloads:
        http32 = next((run for run in runs[k] if run.transport == "http" and run.concurrency == 32), None)
        if http32 is not None:
            ratio = http32.rps() * k / http32.reference
            log(f"target (K={k}): HTTP at concurrency 32 keeps >= 0.5x in-process batched throughput: {ratio:.2f}x "
                f"-> {'met' if ratio >= 0.5 else 'NOT met'}")


if __name__ == "__main__":
    main()
