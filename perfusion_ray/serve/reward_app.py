"""The reward application: build it, describe it declaratively, deploy it, roll a new RM version out.

`build_app(args)` is the application builder that `serve run` / `serve deploy` call with the `args` of
cluster/serve_reward.yaml:
    args: {config: configs/fashionworld.yaml, set: [serve.max_batch_size=64, ...]}
Everything else (batching, autoscaling, limits, CPUs per replica) comes from the config's serve
section. The model is not an init argument but the deployment's user_config, {model_dir: ...}, so a
new RM version is a declarative redeploy that changes only user_config: Serve then calls
reconfigure() on the running replicas in place instead of replacing them (STACK.md measured 0 failed
calls of 310), and `rollout()` does exactly that.

Deploying, waiting and rolling out are apps.py's, shared with the design app (the names stay importable
from here).
"""

from __future__ import annotations

from pathlib import Path

from perfusion_ray.config import PerfusionConfig
from perfusion_ray.serve import apps
from perfusion_ray.serve.apps import (_apply, _client, _status, checked_token, config_from_args, deploy,  # noqa: F401
                                      deployment_options, live_declarative_apps, rollout_user_config, serve_config,
                                      start_serve, wait_running)
from perfusion_ray.serve.model_store import model_version, resolve_path

IMPORT_PATH = "perfusion_ray.serve.reward_app:build_app"
DEPLOYMENT_NAME = "RewardModel"  # = deployment.DEPLOYMENT_NAME, without importing ray here


def default_model_dir(config: PerfusionConfig) -> str:
    return config.serve.model_dir or str(Path(config.rm.out) / "model")


def limits(config: PerfusionConfig) -> dict:
    s = config.serve
    return {"max_images_per_request": s.max_images_per_request, "max_body_bytes": s.max_body_bytes,
            "max_image_side": s.max_image_side, "image_policy": s.image_policy, "max_batch_size": s.max_batch_size,
            "batch_wait_timeout_s": s.batch_wait_timeout_s}


def user_config(model_dir: str | Path, **extra) -> dict:
    return {"model_dir": str(resolve_path(model_dir)), **extra}


def reward_application(config: PerfusionConfig, token: str | None, model_dir: str | Path | None = None):
    """The bound Serve application (deployment options from config.serve)."""
    from perfusion_ray.serve.deployment import RewardModel

    options = deployment_options(config, config.serve, user_config(model_dir or default_model_dir(config)))
    return RewardModel.options(**options).bind(limits(config), token)


def build_app(args: dict):
    """Application builder for `serve run` / `serve deploy` (import path perfusion_ray.serve.reward_app:build_app).

    args: config (YAML path; relative to the working directory, else the repo root), set (list of
    section.field=value overrides), model_dir (optional; the yaml's user_config usually names it).
    """
    config, args = config_from_args(args, "build_app", ("model_dir",))
    return reward_application(config, checked_token(config), args.get("model_dir"))


# ---------------------------------------------------------------- declarative configs
def application_entry(config: PerfusionConfig, config_path: str | Path | None = None,
                      overrides: list[str] | None = None, model_dir: str | Path | None = None,
                      **extra_user_config) -> dict:
    """One `applications:` entry of a Serve config file, naming the model in user_config."""
    return apps.application_entry(config.serve.app_name, config.serve.route_prefix, IMPORT_PATH, DEPLOYMENT_NAME,
                                  user_config(model_dir or default_model_dir(config), **extra_user_config),
                                  config_path, overrides)


def rollout(model_dir: str | Path, app_name: str = "reward", timeout_s: float = 120.0, **extra_user_config) -> str:
    """Roll a new RM directory out to a running reward app by changing only its user_config.

    Replicas reconfigure in place and keep answering; returns the new version once every replica
    serves it (deployment HEALTHY again and repeated version() calls agree).
    """
    model_dir = resolve_path(model_dir)
    return rollout_user_config(app_name, DEPLOYMENT_NAME, user_config(model_dir, **extra_user_config),
                               model_version(model_dir), timeout_s,
                               hint="start it with `perfusion serve` or `serve deploy cluster/serve_reward.yaml`")
