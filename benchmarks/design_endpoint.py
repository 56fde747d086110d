"""Design endpoint throughput and latency: images/s and p50/p99 of POST /v1/designs over HTTP through the Serve
proxy at concurrency 1, 8 and 32, with cross-merchant batching on vs off side by side (their ratio at each
concurrency), and the cost of best-of-n (n = 2k ranked by the reward app vs n = k), with the machine printed.

    .venv/bin/python -m benchmarks.design_endpoint [--pipeline DIR] [--rm DIR] [--quick] [--set design.X=Y ...]

Three apps on one proxy at 127.0.0.1: `bdesign_on` (design.batch_across_merchants=true), `bdesign_off` (false:
one pipeline call per merchant within a batch, same queue, batch size and wait) and `breward` (the reward app
that ranks best-of-n candidates for both). Requests are FashionWorld merchants and prompts, k = data.group_size;
request i comes from merchant i mod 48 with seed i, so the requests in flight at concurrency c (the last c
issued: batches are FIFO) are c different merchants, and both apps do exactly the same work. Best-of-n sends
the same requests with n = 2k to `bdesign_on`. Every load phase is bounded: at most --requests requests and no
new request after --seconds (the ones in flight then finish, each within --timeout). The rate limit is off
(design.rate_limit_per_minute=0); impressions go to a temporary store, removed at the end. Results also go
to benchmarks/results/design_endpoint.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.serve_common import (Tee, cpu_seconds, cpu_used, free_port, header, http_load, model_dir,
                                     ray_workers_at_our_priority, reward_model_dir)
from perfusion_ray.config import PerfusionConfig, load_config

RESULTS = Path(__file__).resolve().parent / "results" / "design_endpoint.txt"
CONCURRENCY = (1, 8, 32)
APPS = {"on": "bdesign_on", "off": "bdesign_off"}  # batching across merchants -> app name
REWARD_APP = "breward"
ROLES = {"on": f"ServeReplica:{APPS['on']}:", "off": f"ServeReplica:{APPS['off']}:",
         "reward": f"ServeReplica:{REWARD_APP}:"}  # cpu_seconds role -> replica command-line marker


@dataclass
class Requests:
    """HTTP bodies for n = k and n = 2k, request i from merchants[i % len(merchants)] with seed i."""

    k: int
    merchants: list  # [Merchant]
    bodies: dict[int, list[bytes]] = field(default_factory=dict)  # n -> bodies


def build_requests(config: PerfusionConfig, count: int, seed: int = 0) -> Requests:
    from perfusion_ray.serve.design_app import page_merchants
    from perfusion_ray.serve.design_client import design_body
    from perfusion_ray.records import Merchant
    from perfusion_ray.world.attributes import COLOURS
    from perfusion_ray.world.catalogue import prompt_text
    from perfusion_ray.models.class_names import CLASS_NAMES

    merchants = [Merchant(m["id"], m["features"], m["stats"])
                 for m in page_merchants(config, config.world.num_merchants)]
    if not merchants:
        raise SystemExit("no FashionWorld merchants: the config's world.taste_family cannot be read")
    rng = np.random.default_rng(seed)
    prompts = [prompt_text(int(rng.integers(len(CLASS_NAMES))), int(rng.integers(len(COLOURS)))) for _ in range(count)]
    k = config.data.group_size
    requests = Requests(k, merchants)
    for n in (k, 2 * k):
        requests.bodies[n] = [json.dumps(design_body(merchants[i % len(merchants)], prompts[i], k, n, i)).encode()
                              for i in range(count)]
    return requests


def pipeline_dir(given: Path | None, config: PerfusionConfig, out: Path) -> Path:
    """`given`, else the aligned pipeline in out/align/pipeline, else a fresh PerFusionPipeline of the shipped base
    model saved under `out`/pipeline (the adapter at init)."""

    def build() -> Path:
        import torch

        from perfusion_ray.models.base import load_base
        from perfusion_ray.models.policy import build_policy, policy_pipeline
        from perfusion_ray.records import Merchant
        from perfusion_ray.serve.design_app import page_merchants

        torch.manual_seed(0)
        records = [{"merchant_id": m["id"], "merchant_features": m["features"], "merchant_stats": m["stats"]}
                   for m in page_merchants(config, config.world.num_merchants)]
        base = load_base(config.policy.base)
        policy = build_policy(base.unet, config.policy, stat_names=tuple(sorted(records[0]["merchant_stats"])),
                              merchants=[Merchant.coerce(r) for r in records])
        policy_pipeline(base, policy).save_pretrained(str(out / "pipeline"))
        return out / "pipeline"

    return model_dir(given, "out/align/pipeline", "model_index.json", build)


@dataclass
class Run:
    batching: str  # on | off
    concurrency: int
    n: int
    k: int
    requests: int
    failures: int
    seconds: float
    latencies: np.ndarray
    batches: list[int] | None  # images per pipeline call formed during the run (None: the log wrapped)
    cpu: dict  # CPU seconds by role during the run
    load: float  # 1-minute load average at the end
    errors: list[str]

    @property
    def label(self) -> str:
        return f"{self.batching}, n={'2k' if self.n > self.k else 'k'}"

    def images_per_s(self) -> float:
        """Candidates returned per second (k per successful request)."""
        return self.k * len(self.latencies) / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if len(self.latencies) else float("nan")

    def replica_ms_per_image(self) -> float:
        """CPU ms of the design replica per image generated (n per successful request)."""
        return 1000 * self.cpu.get(self.batching, 0.0) / max(self.n * len(self.latencies), 1)


def new_batches(before: list[int], after: list[int]) -> list[int] | None:
    """The pipeline calls added to the replica's bounded log (newest last) between two reads."""
    if len(after) >= 1000 and len(before) >= 1000:
        return None  # the log wrapped: which entries are new is unknown
    return after[len(before):]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", type=Path, help="PerFusionPipeline directory (default out/align/pipeline, "
                                                      "else a fresh one of the shipped base model)")
    parser.add_argument("--rm", type=Path, help="RM directory for best-of-n (default out/rm/model, else untrained)")
    parser.add_argument("--out", type=Path, default=Path("out/bench-design"))
    parser.add_argument("--requests", type=int, default=400, help="at most this many requests per run")
    parser.add_argument("--seconds", type=float, default=60.0, help="no new request after this long per run")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one request may take")
    parser.add_argument("--warmup-requests", type=int, default=8,
                        help="requests at concurrency 8 to each app (and best-of-n) before the first run")
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    parser.add_argument("--no-best-of-n", action="store_true", help="skip the n = 2k runs")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: at most 12 requests and 10 s per run, 2 warm-up requests")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="config overrides for all three apps, e.g. --set design.batch_wait_timeout_s=0.1")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment for the local cluster (Serve's own knobs), set before Ray starts")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.requests, args.seconds, args.warmup_requests = min(args.requests, 12), min(args.seconds, 10.0), 2
    ray_workers_at_our_priority(args.env)

    import torch

    torch.set_num_threads(1)  # as the replicas run; the 2 cores are shared
    log = Tee(args.results)
    store = Path(tempfile.mkdtemp(prefix="bench-design-store-"))
    common = [f"serve.port={free_port()}", f"serve.app_name={REWARD_APP}", f"serve.route_prefix=/{REWARD_APP}",
              "design.rate_limit_per_minute=0", f"design.store_root={store}", *args.set]
    per_app = {name: [f"design.app_name={app}", f"design.route_prefix=/{app}",
                      f"design.batch_across_merchants={'true' if name == 'on' else 'false'}"]
               for name, app in APPS.items()}
    configs = {name: load_config(None, common + extra) for name, extra in per_app.items()}
    config = configs["on"]
    d = config.design
    header(log, "benchmarks.design_endpoint", args.env)
    requests = build_requests(config, max(args.requests, max(args.concurrency)))
    k = requests.k
    folder = pipeline_dir(args.pipeline, config, args.out)
    rm_dir = reward_model_dir(args.rm, args.out)
    log(f"pipeline: {folder}; RM (best-of-n): {rm_dir}; {config.policy.num_inference_steps} DDIM steps, guidance "
        f"{config.policy.guidance_scale:g}; k = {k}, best-of-n n = {2 * k}")
    log(f"requests: {len(requests.merchants)} FashionWorld merchants in turn, at most {args.requests} requests per run, "
        f"no new one after {args.seconds:.0f} s (in-flight ones finish, each within {args.timeout:.0f} s), after "
        f"{args.warmup_requests} warm-up requests per app")
    log(f"design apps: @serve.batch up to {d.max_batch_size} images, wait {d.batch_wait_timeout_s * 1000:.0f} ms; "
        f"replicas {d.min_replicas}-{d.max_replicas} x {d.replica_cpus} CPU, max_ongoing_requests "
        f"{d.max_ongoing_requests}; reward app replicas {config.serve.min_replicas}-{config.serve.max_replicas} x "
        f"{config.serve.replica_cpus} CPU, batch up to {config.serve.max_batch_size} images")

    from perfusion_ray.runtime import init_ray
    from perfusion_ray.serve import apps, design_app, reward_app
    from perfusion_ray.serve.design_client import DesignClient, DesignHandleClient
    from perfusion_ray.serve.model_store import pipeline_version

    ray = init_ray(config.cluster)
    from ray import serve

    url = f"http://{config.serve.host}:{config.serve.port}"
    version = pipeline_version(folder)
    runs: list[Run] = []
    try:
        started = time.monotonic()
        apps.start_serve(config)
        apps.deploy(reward_app.application_entry(config, config.source, common, model_dir=str(rm_dir)),
                    timeout_s=300)
        for name, app in APPS.items():
            apps.deploy(design_app.application_entry(configs[name], config.source, common + per_app[name],
                                                     pipeline_dir=str(folder)), timeout_s=300)
        handles = {name: DesignHandleClient(app) for name, app in APPS.items()}
        for name, app in APPS.items():  # one request through the typed client: the answer is what we expect
            client = DesignClient(f"{url}/{app}")
            result = client.design(requests.merchants[0], "a red dress", n=2 * k, seed=0)
            client.close()
            if result.model_version != version or result.images.shape[0] != k or result.reward_version is None:
                raise SystemExit(f"{app}: unexpected answer {result}")
        log(f"apps up in {time.monotonic() - started:.1f} s at {url}/{{{', '.join([*APPS.values(), REWARD_APP])}}}, "
            f"policy {version}")

        def load(name: str, n: int, concurrency: int, max_requests: int, max_seconds: float):
            def check(index: int, answer: dict) -> None:
                if answer["model_version"] != version or len(answer["candidates"]) != k or answer["n"] != n:
                    raise RuntimeError(f"unexpected answer: version {answer.get('model_version')}, "
                                       f"{len(answer.get('candidates', []))} candidates, n {answer.get('n')}")

            return http_load(f"{url}/{APPS[name]}/v1/designs", requests.bodies[n], check, concurrency, max_requests,
                             max_seconds, args.timeout)

        variants = [("on", k), ("off", k)] + ([] if args.no_best_of_n else [("on", 2 * k)])
        for name, n in dict.fromkeys(variants):
            latencies, errors, seconds = load(name, n, min(8, max(args.concurrency)), args.warmup_requests, 120.0)
            log(f"  warm-up {name} n={n}: {len(latencies)} requests in {seconds:.1f} s, {len(errors)} failed"
                + (f" ({errors[0]})" if errors else ""))
        for position, concurrency in enumerate(args.concurrency):
            # on/off order alternates, so drift in the other jobs' load does not always favour the same side
            order = variants[:2] if position % 2 == 0 else variants[1::-1]
            for name, n in order + variants[2:]:
                batches_before = handles[name].batch_sizes()
                cpu_before = cpu_seconds(ROLES)
                latencies, errors, seconds = load(name, n, concurrency, args.requests, args.seconds)
                cpu = cpu_used(cpu_before, cpu_seconds(ROLES))
                run = Run(name, concurrency, n, k, len(latencies) + len(errors), len(errors), seconds,
                          np.asarray(latencies), new_batches(batches_before, handles[name].batch_sizes()), cpu,
                          os.getloadavg()[0], errors[:3])
                runs.append(run)
                calls = run.batches or []
                log(f"  ran c={concurrency} {run.label}: {run.requests} requests in {seconds:.1f} s, {run.failures} "
                    f"failed, {run.images_per_s():.2f} images/s, p50 {run.percentile(50):.1f} s, {len(calls)} "
                    f"pipeline calls of {np.mean(calls) if calls else float('nan'):.1f} images; load {run.load:.1f}")
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(store, ignore_errors=True)

    log("\nimages/s = candidates returned per second (k per answer); latency per request over HTTP; calls = "
        "pipeline calls the replica made during the run, images/call their mean size (n per request); replica CPU "
        "= design replica CPU ms per image generated")
    log(f"{'conc':>4} {'run':<10} {'requests':>8} {'failed':>6} {'seconds':>7} {'images/s':>8} {'p50 s':>6} "
        f"{'p99 s':>6} {'calls':>5} {'images/call':>11} {'max':>4} {'replica CPU ms/img':>18} {'RM CPU s':>8} "
        f"{'load':>5}")
    for run in runs:
        calls = run.batches
        size = f"{np.mean(calls):.1f}" if calls else "n/a"
        log(f"{run.concurrency:>4} {run.label:<10} {run.requests:>8} {run.failures:>6} {run.seconds:>7.1f} "
            f"{run.images_per_s():>8.2f} {run.percentile(50):>6.1f} {run.percentile(99):>6.1f} "
            f"{len(calls) if calls is not None else 'n/a':>5} {size:>11} {max(calls, default=0) if calls else 0:>4} "
            f"{run.replica_ms_per_image():>18.0f} {run.cpu.get('reward', 0.0):>8.1f} {run.load:>5.1f}")
        for error in run.errors:
            log(f"    error: {error}")

    def find(batching: str, concurrency: int, n: int) -> Run | None:
        return next((r for r in runs if (r.batching, r.concurrency, r.n) == (batching, concurrency, n)), None)

    log(f"\nside by side: cross-merchant batching on vs off (n = k = {k}), and best-of-n (n = {2 * k} vs n = {k}, "
        f"both batching on); ratios of images/s returned and of latency")
    log(f"{'conc':>4} {'on img/s':>8} {'off img/s':>9} {'on/off':>6} {'on p50':>6} {'off p50':>7} "
        f"{'2k img/s':>8} {'2k/k img/s':>10} {'2k/k p50':>8} {'2k/k p99':>8}")
    for concurrency in args.concurrency:
        on, off, best = find("on", concurrency, k), find("off", concurrency, k), find("on", concurrency, 2 * k)
        if on is None or off is None:
            continue
        cost = (f"{best.images_per_s():>8.2f} {best.images_per_s() / on.images_per_s():>9.2f}x "
                f"{best.percentile(50) / on.percentile(50):>7.2f}x {best.percentile(99) / on.percentile(99):>7.2f}x"
                if best is not None else "")
        log(f"{concurrency:>4} {on.images_per_s():>8.2f} {off.images_per_s():>9.2f} "
            f"{on.images_per_s() / off.images_per_s():>5.2f}x {on.percentile(50):>6.1f} {off.percentile(50):>7.1f} "
            + cost)
    log(f"\nfailed requests: {sum(r.failures for r in runs)} of {sum(r.requests for r in runs)}")
    log(f"load average (1 min) at the end: {os.getloadavg()[0]:.2f}")
    on32, off32 = find("on", 32, k), find("off", 32, k)
    if on32 is not None and off32 is not None:
        ratio = on32.images_per_s() / off32.images_per_s()
        log(f"target: cross-merchant batching raises throughput at concurrency 32 (>= 1.10x): {ratio:.2f}x -> "
            f"{'met' if ratio >= 1.10 else 'NOT met'}")


if __name__ == "__main__":
    main()
