"""`perfusion serve`: start (or roll out) the reward endpoint, or with --app design the design endpoint and
merchant page, from the config.

  perfusion serve [--model DIR]                 local cluster on 127.0.0.1, serves until Ctrl-C / SIGTERM
  perfusion serve --app design [--model PIPE]   the design app (PerFusionPipeline) the same way
  perfusion serve --model NEW --detach          with RAY_ADDRESS (or cluster.address) set: deploy or roll out
                                                NEW to the running cluster's app and return

The bind check runs before Ray or Serve start: a host other than loopback without a bearer token is
refused with one line and a hint, and nothing binds.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from perfusion_ray.config import PerfusionConfig
from perfusion_ray.errors import PerfusionError
from perfusion_ray.serve.apps import AppKind, checked_token
from perfusion_ray.serve.model_store import (CONFIG_FILE, WEIGHTS_FILE, local_model_dir, model_location, model_version,
                                             pipeline_version)


@dataclass(frozen=True)
class ServedApp:
    """What `perfusion serve` needs to know of one application."""

    what: str  # "reward model" / "design policy"
    endpoint: str  # for the bind refusal: "the reward endpoint"
    app_name: str
    route_prefix: str
    folder: str  # a resolved local path or a URI
    version: str
    kind: AppKind
    routes: str


def _local(folder: str) -> Path:
    """The local folder of a model directory (a URI: its cached copy, refused in one line when nothing complete
    was published there)."""
    try:
        return local_model_dir(folder)
    except FileNotFoundError as exc:
        raise PerfusionError(str(exc), hint="publish one there with `perfusion rm train` / `perfusion align`, or "
                                            "pass another --model") from None


def _reward(config: PerfusionConfig, given: str | Path | None) -> ServedApp:
    from perfusion_ray.serve import reward_app

    folder = model_location(given or reward_app.default_model_dir(config))
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (_local(folder) / name).is_file():
            raise PerfusionError(f"reward model directory {folder} is missing {name}",
                                 hint="train one with `perfusion rm train` (writes <rm.out>/model) or pass --model")
    return ServedApp("reward model", "the reward endpoint", config.serve.app_name, config.serve.route_prefix, folder,
                     model_version(folder), reward_app.REWARD,
                     "POST {url}/v1/score   GET {url}/v1/version   GET {url}/healthz")


def _design(config: PerfusionConfig, given: str | Path | None) -> ServedApp:
    from perfusion_ray.serve import design_app

    folder = model_location(given or design_app.default_pipeline_dir(config))
    if not (_local(folder) / "model_index.json").is_file():
        raise PerfusionError(f"{folder} is not a PerFusionPipeline directory (no model_index.json)",
                             hint="export one with `perfusion align train --offline` or `perfusion align` "
                                  "(writes <out>/pipeline), or pass --model")
    return ServedApp("design policy", "the design endpoint", config.design.app_name, config.design.route_prefix,
                     folder, pipeline_version(folder), design_app.DESIGN,
                     "page {url}/   POST {url}/v1/designs   POST {url}/v1/feedback   GET {url}/v1/version")


def run(args, config: PerfusionConfig) -> int:
    app_kind = getattr(args, "app", "reward")
    # Before anything binds.
    token = checked_token(config, "the design endpoint" if app_kind == "design" else "the reward endpoint")
    app = (_design if app_kind == "design" else _reward)(config, args.model)
    joined = bool(config.cluster.address or os.environ.get("RAY_ADDRESS"))
    if args.detach and not joined:
        raise PerfusionError("--detach needs a running cluster to leave the endpoint on",
                             hint="set RAY_ADDRESS (or cluster.address), or drop --detach to serve until Ctrl-C")

    from perfusion_ray.runtime import init_ray

    ray = init_ray(config.cluster)
    from ray import serve

    from perfusion_ray.serve import apps

    started = time.monotonic()
    apps.start_serve(config)
    live = apps.live_declarative_apps().get(app.app_name)
    entry = app.kind.entry(config, config.source, args.set, **{app.kind.folder_key: app.folder})
    if live and live.get("import_path") == entry["import_path"] and live.get("args") == entry["args"]:
        version = app.kind.rollout(app.folder, app.app_name)  # only user_config changes: in place
        action = "rolled out"
    else:
        apps.deploy(entry, timeout_s=300)
        version = app.version
        action = "serving"
    prefix = app.route_prefix.rstrip("/")
    url = f"http://{config.serve.host}:{config.serve.port}{prefix}"
    print(f"{action} {app.what} {version} from {app.folder} at {url} ({time.monotonic() - started:.1f}s)")
    print("  " + app.routes.format(url=url) + ("   (Authorization: Bearer required on /v1/*)" if token else ""))
    if args.detach:
        return 0

    def _stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        deadline = time.monotonic() + args.duration if args.duration else None
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.5)
    except KeyboardInterrupt:
        print(f"stopping {app.endpoint}")
    finally:
        if joined:
            serve.delete(app.app_name)  # others' apps on a shared cluster stay up
        else:
            serve.shutdown()
            ray.shutdown()
    return 0
