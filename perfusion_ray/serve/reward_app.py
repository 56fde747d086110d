"""The reward application: build it, describe it declaratively, deploy it, roll a new RM version out.

`build_app(args)` is the application builder that `serve run` / `serve deploy` call with the `args` of
cluster/serve_reward.yaml:
    args: {config: configs/fashionworld.yaml, set: [serve.max_batch_size=64, ...]}
Everything else (batching, autoscaling, limits, CPUs per replica) comes from the config's serve
section. The model is not an init argument but the deployment's user_config, {model_dir: ...}, so a
new RM version is a declarative redeploy that changes only user_config: Serve then calls
reconfigure() on the running replicas in place instead of replacing them (STACK.md measured 0 failed
calls of 310), and `rollout()` does exactly that.

Every deploy here is declarative (deploy_apps with a ServeDeploySchema): a declarative apply replaces
the whole set of declarative applications, so deploy/rollout read the live set first and change
only their own application.
"""

from __future__ import annotations

import time
from pathlib import Path

from perfusion_ray.config import PerfusionConfig, load_config
from perfusion_ray.errors import PerfusionError
from perfusion_ray.serve.model_store import model_version, resolve_path
from perfusion_ray.serve.security import check_bind, resolve_token

IMPORT_PATH = "perfusion_ray.serve.reward_app:build_app"
DEPLOYMENT_NAME = "RewardModel"  # = deployment.DEPLOYMENT_NAME, without importing ray here


def default_model_dir(config: PerfusionConfig) -> str:
    return config.serve.model_dir or str(Path(config.rm.out) / "model")


def limits(config: PerfusionConfig) -> dict:
    s = config.serve
    return {"max_images_per_request": s.max_images_per_request, "max_body_bytes": s.max_body_bytes,
            "max_image_side": s.max_image_side, "image_policy": s.image_policy, "max_batch_size": s.max_batch_size,
            "batch_wait_timeout_s": s.batch_wait_timeout_s}


def autoscaling_config(config: PerfusionConfig) -> dict:
    s = config.serve
    return {"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
            "target_ongoing_requests": s.target_ongoing_requests, "upscale_delay_s": s.upscale_delay_s,
            "downscale_delay_s": s.downscale_delay_s, "look_back_period_s": s.look_back_period_s}


def user_config(model_dir: str | Path, **extra) -> dict:
    return {"model_dir": str(resolve_path(model_dir)), **extra}


def reward_application(config: PerfusionConfig, token: str | None, model_dir: str | Path | None = None):
    """The bound Serve application (deployment options from config.serve)."""
    from perfusion_ray.serve.deployment import RewardModel

    options = dict(
        autoscaling_config=autoscaling_config(config),
        max_ongoing_requests=config.serve.max_ongoing_requests,
        ray_actor_options={"num_cpus": config.serve.replica_cpus},
        logging_config={"enable_access_log": config.serve.access_log},
        user_config=user_config(model_dir or default_model_dir(config)),
    )
    return RewardModel.options(**options).bind(limits(config), token)


def build_app(args: dict):
    """Application builder for `serve run` / `serve deploy` (import path perfusion_ray.serve.reward_app:build_app).

    args: config (YAML path; relative to the working directory, else the repo root), set (list of
    section.field=value overrides), model_dir (optional; the yaml's user_config usually names it).
    """
    args = dict(args or {})
    unknown = set(args) - {"config", "set", "model_dir"}
    if unknown:
        raise PerfusionError(f"build_app: unknown args {sorted(unknown)}", hint="known: config, set, model_dir")
    config_path = resolve_path(args["config"]) if args.get("config") else None
    overrides = args.get("set") or []
    if isinstance(overrides, str):
        overrides = [overrides]
    config = load_config(config_path, list(overrides))
    token = resolve_token(config.serve.bearer_token, config.serve.bearer_token_env)
    check_bind(config.serve.host, token, config.serve.bearer_token_env)
    return reward_application(config, token, args.get("model_dir"))


# ---------------------------------------------------------------- declarative configs
def application_entry(config: PerfusionConfig, config_path: str | Path | None = None,
                      overrides: list[str] | None = None, model_dir: str | Path | None = None,
                      **extra_user_config) -> dict:
    """One `applications:` entry of a Serve config file, naming the model in user_config."""
    args: dict = {}
    if config_path is not None:
        args["config"] = str(resolve_path(config_path))
    if overrides:
        args["set"] = list(overrides)
    return {
        "name": config.serve.app_name,
        "route_prefix": config.serve.route_prefix,
        "import_path": IMPORT_PATH,
        "args": args,
        "deployments": [{"name": DEPLOYMENT_NAME,
                         "user_config": user_config(model_dir or default_model_dir(config), **extra_user_config)}],
    }


def serve_config(config: PerfusionConfig, applications: list[dict]) -> dict:
    """A whole ServeDeploySchema dict (a file for `serve deploy`): HTTP options from config.serve, proxy on
    the head node only."""
    return {"proxy_location": "HeadOnly",
            "http_options": {"host": config.serve.host, "port": config.serve.port},
            "applications": applications}


def _client():
    from ray.serve.context import _get_global_client

    return _get_global_client()


def live_declarative_apps() -> dict[str, dict]:
    """name -> application config of every declaratively deployed app on the running Serve instance."""
    details = _client().get_serve_details()
    apps = {}
    for name, app in (details.get("applications") or {}).items():
        deployed = app.get("deployed_app_config")
        if deployed:
            apps[name] = deployed
    return apps


def _apply(apps: dict[str, dict]) -> None:
    """Apply these declarative apps with the running instance's own HTTP options and proxy location."""
    from ray.serve.schema import ServeDeploySchema

    details = _client().get_serve_details()
    schema = ServeDeploySchema.model_validate({
        "proxy_location": details.get("proxy_location") or "HeadOnly",
        "http_options": details.get("http_options") or {},
        "applications": list(apps.values()),
    })
    _client().deploy_apps(schema)


def deploy(entry: dict, timeout_s: float = 120.0) -> None:
    """Apply `entry` declaratively beside the other live declarative apps (Serve must be started, e.g. by
    start_serve); wait until it runs."""
    apps = live_declarative_apps()
    apps[entry["name"]] = entry
    _apply(apps)
    wait_running(entry["name"], timeout_s)


def start_serve(config: PerfusionConfig) -> None:
    """Start Serve's HTTP proxy on config.serve.host:port (head node only), after the bind check."""
    from ray import serve

    check_bind(config.serve.host, resolve_token(config.serve.bearer_token, config.serve.bearer_token_env),
               config.serve.bearer_token_env)
    serve.start(proxy_location="HeadOnly", http_options={"host": config.serve.host, "port": config.serve.port})


def _status(app_name: str) -> tuple[str, dict[str, str], str]:
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None:
        return "NOT_STARTED", {}, ""
    return str(app.status), {name: str(d.status) for name, d in app.deployments.items()}, app.message


def wait_running(app_name: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        status, deployments, message = _status(app_name)
        if status.endswith("RUNNING") and all(s.endswith("HEALTHY") for s in deployments.values()):
            return
        if status.endswith("DEPLOY_FAILED"):
            raise PerfusionError(f"Serve application {app_name!r} failed to deploy: {message.strip()[-2000:]}")
        if time.monotonic() > deadline:
            raise PerfusionError(f"Serve application {app_name!r} not running after {timeout_s:.0f}s "
                                 f"(status {status}, deployments {deployments}): {message.strip()[-500:]}")
        time.sleep(0.2)


def rollout(model_dir: str | Path, app_name: str = "reward", timeout_s: float = 120.0, **extra_user_config) -> str:
    """Roll a new RM directory out to a running reward app by changing only its user_config.

    Replicas reconfigure in place and keep answering; returns the new version once every replica
    serves it (deployment HEALTHY again and repeated version() calls agree).
    """
    from ray import serve

    model_dir = resolve_path(model_dir)
    expected = model_version(model_dir)
    apps = live_declarative_apps()
    if app_name not in apps:
        raise PerfusionError(f"no declaratively deployed Serve application {app_name!r} to roll out to",
                             hint="start it with `perfusion serve` or `serve deploy cluster/serve_reward.yaml`")
    entry = apps[app_name]
    deployments = [d for d in entry.get("deployments", []) if d.get("name") != DEPLOYMENT_NAME]
    previous = next((d for d in entry.get("deployments", []) if d.get("name") == DEPLOYMENT_NAME), {"name": DEPLOYMENT_NAME})
    entry["deployments"] = deployments + [{**previous, "user_config": user_config(model_dir, **extra_user_config)}]
    _apply(apps)
    handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status, deployments_status, _ = _status(app_name)
        healthy = status.endswith("RUNNING") and all(s.endswith("HEALTHY") for s in deployments_status.values())
        if healthy and all(handle.version.remote().result(timeout_s=30)["model_version"] == expected
                           for _ in range(8)):
            return expected
        time.sleep(0.2)
    raise PerfusionError(f"rollout of {model_dir} ({expected}) to {app_name!r} not complete after {timeout_s:.0f}s")
