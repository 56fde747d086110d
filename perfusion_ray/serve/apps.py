"""What every perfusion Serve application shares: the builder's args, declarative deploys beside other live
apps, waiting for an app to run, and roll-outs that change only a deployment's user_config.

Every deploy here is declarative (deploy_apps with a ServeDeploySchema): a declarative apply replaces the
whole set of declarative applications, so deploy/rollout read the live set first and change only their
own application. A roll-out changes only user_config, so Serve calls reconfigure() on the running
replicas in place instead of replacing them (no failed call during the cut-over), and returns once every
replica answers version() with the expected version.

The reward app (reward_app.py) and the design app (design_app.py) are thin uses of these functions.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from perfusion_ray.config import PerfusionConfig, ServeConfig, load_config
from perfusion_ray.errors import PerfusionError
from perfusion_ray.serve.model_store import model_location, resolve_path
from perfusion_ray.serve.security import ALL_INTERFACES, check_bind, resolve_token


class ReplicaBounds(Protocol):
    min_replicas: int
    max_replicas: int
    target_ongoing_requests: float


def autoscaling_config(bounds: ReplicaBounds, serve: ServeConfig) -> dict:
    """Serve's autoscaling_config: replica bounds and target from `bounds`, delays and look-back from serve."""
    return {"min_replicas": bounds.min_replicas, "max_replicas": bounds.max_replicas,
            "target_ongoing_requests": bounds.target_ongoing_requests, "upscale_delay_s": serve.upscale_delay_s,
            "downscale_delay_s": serve.downscale_delay_s, "look_back_period_s": serve.look_back_period_s}


class DeploymentSection(ReplicaBounds, Protocol):
    max_ongoing_requests: int
    replica_cpus: float
    replica_gpus: float


def deployment_options(config: PerfusionConfig, section: DeploymentSection, user_config: dict) -> dict:
    """Serve deployment options: replicas from `section` (config.serve or config.design), autoscaling delays,
    health checks and the access log from config.serve, the model in user_config."""
    return dict(autoscaling_config=autoscaling_config(section, config.serve),
                max_ongoing_requests=section.max_ongoing_requests,
                ray_actor_options={"num_cpus": section.replica_cpus, "num_gpus": section.replica_gpus},
                logging_config={"enable_access_log": config.serve.access_log},
                health_check_period_s=config.serve.health_check_period_s,
                health_check_timeout_s=config.serve.health_check_timeout_s,
                user_config=user_config)


def bind_application(deployment, config: PerfusionConfig, section: DeploymentSection, user_config: dict,
                     *init_args):
    """`deployment` bound with its init args and the options deployment_options gives it."""
    return deployment.options(**deployment_options(config, section, user_config)).bind(*init_args)


def application_entry(name: str, route_prefix: str, import_path: str, deployment_name: str, user_config: dict,
                      config_path: str | Path | None = None, overrides: list[str] | None = None) -> dict:
    """One `applications:` entry of a Serve config file: the builder, its args, the model in user_config."""
    return {"name": name, "route_prefix": route_prefix, "import_path": import_path,
            "args": builder_args(config_path, overrides),
            "deployments": [{"name": deployment_name, "user_config": user_config}]}


def serve_token(config: PerfusionConfig) -> str | None:
    """The bearer token every app on the proxy checks (config.serve: one proxy per cluster)."""
    return resolve_token(config.serve.bearer_token, config.serve.bearer_token_env)


def bind_host(config: PerfusionConfig) -> str:
    """Where HTTP can reach the apps: serve.host, or every interface under cluster.serve_ingress=haproxy
    (the replicas then take HTTP on their own ports, on every interface)."""
    return ALL_INTERFACES if config.cluster.serve_ingress == "haproxy" else config.serve.host


def checked_token(config: PerfusionConfig, what: str = "the reward endpoint") -> str | None:
    """The token, after refusing a non-loopback bind address without one."""
    token = serve_token(config)
    check_bind(bind_host(config), token, config.serve.bearer_token_env, what)
    return token


def config_from_args(args: dict | None, builder: str, extra: tuple[str, ...] = ()) -> tuple[PerfusionConfig, dict]:
    """An application builder's args ({config, set, *extra}) -> (the loaded config, the args)."""
    args = dict(args or {})
    known = ("config", "set", *extra)
    unknown = set(args) - set(known)
    if unknown:
        raise PerfusionError(f"{builder}: unknown args {sorted(unknown)}", hint=f"known: {', '.join(known)}")
    config_path = resolve_path(args["config"]) if args.get("config") else None
    overrides = args.get("set") or []
    if isinstance(overrides, str):
        overrides = [overrides]
    return load_config(config_path, list(overrides)), args


def builder_args(config_path: str | Path | None, overrides: list[str] | None) -> dict:
    """The `args` of an applications: entry, for config_from_args on the other side."""
    args: dict = {}
    if config_path is not None:
        args["config"] = str(resolve_path(config_path))
    if overrides:
        args["set"] = list(overrides)
    return args


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

    checked_token(config)
    serve.start(proxy_location="HeadOnly", http_options={"host": config.serve.host, "port": config.serve.port})


def _status(app_name: str) -> tuple[str, dict[str, str], str]:
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None:
        return "NOT_STARTED", {}, ""
    return str(app.status), {name: str(d.status) for name, d in app.deployments.items()}, app.message


def _name(status: str) -> str:
    """HEALTHY from "DeploymentStatus.HEALTHY" or "HEALTHY" (and UNHEALTHY stays UNHEALTHY)."""
    return status.rsplit(".", 1)[-1]


def _healthy(app_name: str) -> bool:
    status, deployments, _ = _status(app_name)
    return _name(status) == "RUNNING" and all(_name(s) == "HEALTHY" for s in deployments.values())


def wait_running(app_name: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        status, deployments, message = _status(app_name)
        if _healthy(app_name):
            return
        if status.endswith("DEPLOY_FAILED"):
            raise PerfusionError(f"Serve application {app_name!r} failed to deploy: {message.strip()[-2000:]}")
        if time.monotonic() > deadline:
            raise PerfusionError(f"Serve application {app_name!r} not running after {timeout_s:.0f}s "
                                 f"(status {status}, deployments {deployments}): {message.strip()[-500:]}")
        time.sleep(0.2)


def rollout_user_config(app_name: str, deployment_name: str, user_config: dict, expected_version: str,
                        timeout_s: float = 120.0, hint: str = "") -> str:
    """Give `deployment_name` of the live app `app_name` a new user_config and nothing else; return
    `expected_version` once the app is healthy and repeated version() calls agree on it."""
    from ray import serve

    apps = live_declarative_apps()
    if app_name not in apps:
        raise PerfusionError(f"no declaratively deployed Serve application {app_name!r} to roll out to", hint=hint)
    entry = apps[app_name]
    others = [d for d in entry.get("deployments", []) if d.get("name") != deployment_name]
    previous = next((d for d in entry.get("deployments", []) if d.get("name") == deployment_name),
                    {"name": deployment_name})
    entry["deployments"] = others + [{**previous, "user_config": user_config}]
    _apply(apps)
    handle = serve.get_deployment_handle(deployment_name, app_name)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _healthy(app_name) and all(handle.version.remote().result(timeout_s=30)["model_version"] == expected_version
                                      for _ in range(8)):
            return expected_version
        time.sleep(0.2)
    raise PerfusionError(f"rollout of {expected_version} to {app_name!r} not complete after {timeout_s:.0f}s")


@dataclass(frozen=True)
class AppKind:
    """One kind of perfusion application: how its applications: entry, user_config and roll-out look.

    The model directory is named in user_config under `folder_key` (model_dir, pipeline_dir); the app's
    name and route prefix come from its config section (config.serve, config.design)."""

    import_path: str
    deployment_name: str
    folder_key: str
    default_app: str
    section: Callable[[PerfusionConfig], object]  # -> a section with app_name and route_prefix
    default_folder: Callable[[PerfusionConfig], str]
    version_of: Callable[[Path], str]
    hint: str

    def user_config(self, folder: str | Path, **extra) -> dict:
        return {self.folder_key: model_location(folder), **extra}

    def entry(self, config: PerfusionConfig, config_path: str | Path | None = None,
              overrides: list[str] | None = None, **user_config) -> dict:
        """One `applications:` entry of a Serve config file; user_config[folder_key] defaults to the config's
        directory, other keyword arguments join user_config (e.g. revision)."""
        folder = user_config.pop(self.folder_key, None) or self.default_folder(config)
        section = self.section(config)
        return application_entry(section.app_name, section.route_prefix, self.import_path, self.deployment_name,
                                 self.user_config(folder, **user_config), config_path, overrides)

    def rollout(self, folder: str | Path, app_name: str | None = None, timeout_s: float = 180.0, **extra) -> str:
        """Roll a new directory out to the running app by changing only its user_config; replicas reconfigure in
        place and keep answering. Returns the new version once every replica serves it."""
        folder = model_location(folder)
        return rollout_user_config(app_name or self.default_app, self.deployment_name,
                                   self.user_config(folder, **extra), self.version_of(folder), timeout_s, self.hint)
