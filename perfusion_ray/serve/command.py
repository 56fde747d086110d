"""`perfusion serve`: start (or roll out) the reward endpoint from the config.

  perfusion serve [--model DIR]            local cluster on 127.0.0.1, serves until Ctrl-C / SIGTERM
  perfusion serve --model NEW --detach     with RAY_ADDRESS (or cluster.address) set: deploy or roll out
                                           NEW to the running cluster's app and return

The bind check runs before Ray or Serve start: a host other than loopback without a bearer token is
refused with one line and a hint, and nothing binds.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from perfusion_ray.config import PerfusionConfig
from perfusion_ray.errors import PerfusionError
from perfusion_ray.serve.model_store import CONFIG_FILE, WEIGHTS_FILE, model_version, resolve_path
from perfusion_ray.serve.security import check_bind, resolve_token


def _model_dir(config: PerfusionConfig, given: Path | None) -> Path:
    from perfusion_ray.serve.reward_app import default_model_dir

    folder = resolve_path(given or default_model_dir(config))
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise PerfusionError(f"reward model directory {folder} is missing {name}",
                                 hint="train one with `perfusion rm train` (writes <rm.out>/model) or pass --model")
    return folder


def run(args, config: PerfusionConfig) -> int:
    token = resolve_token(config.serve.bearer_token, config.serve.bearer_token_env)
    check_bind(config.serve.host, token, config.serve.bearer_token_env)  # before anything binds
    model_dir = _model_dir(config, args.model)
    joined = bool(config.cluster.address or os.environ.get("RAY_ADDRESS"))
    if args.detach and not joined:
        raise PerfusionError("--detach needs a running cluster to leave the endpoint on",
                             hint="set RAY_ADDRESS (or cluster.address), or drop --detach to serve until Ctrl-C")

    from perfusion_ray.runtime import init_ray

    ray = init_ray(config.cluster)
    from ray import serve

    from perfusion_ray.serve import reward_app

    started = time.monotonic()
    reward_app.start_serve(config)
    live = reward_app.live_declarative_apps().get(config.serve.app_name)
    entry = reward_app.application_entry(config, config.source, args.set, model_dir)
    if live and live.get("import_path") == entry["import_path"] and live.get("args") == entry["args"]:
        version = reward_app.rollout(model_dir, config.serve.app_name)  # only user_config changes: in place
        action = "rolled out"
    else:
        reward_app.deploy(entry)
        version = model_version(model_dir)
        action = "serving"
    prefix = config.serve.route_prefix.rstrip("/")
    url = f"http://{config.serve.host}:{config.serve.port}{prefix}"
    print(f"{action} reward model {version} from {model_dir} at {url} ({time.monotonic() - started:.1f}s)")
    print(f"  POST {url}/v1/score   GET {url}/v1/version   GET {url}/healthz"
          + ("   (Authorization: Bearer required on /v1/*)" if token else ""))
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
        print("stopping the reward endpoint")
    finally:
        if joined:
            serve.delete(config.serve.app_name)  # others' apps on a shared cluster stay up
        else:
            serve.shutdown()
            ray.shutdown()
    return 0
