"""The reward application: build it, describe it declaratively, deploy it, roll a new RM version out.

`build_app(args)` is the application builder that `serve run` / `serve deploy` call with the `args` of
cluster/serve_reward.yaml:
    args: {config: configs/fashionworld.yaml, set: [serve.max_batch_size=64, ...]}
Everything else (batching, autoscaling, limits, CPUs, GPUs and dtype per replica) comes from the
config's serve section. The model is not an init argument but the deployment's user_config,
{model_dir: ...}, so a new RM version is a declarative redeploy that changes only user_config: Serve then calls
reconfigure() on the running replicas in place instead of replacing them (no failed call during the
cut-over), and `rollout()` does exactly that.

Deploying, waiting and rolling out are apps.py's, shared with the design app (the names stay importable
from here).
"""

from __future__ import annotations

from pathlib import Path

from perfusion_ray.config import PerfusionConfig
from perfusion_ray.serve.apps import (AppKind, _apply, _client, _status, bind_application, checked_token,  # noqa: F401
                                      config_from_args, deploy, deployment_options, live_declarative_apps, serve_config, start_serve,
                                      wait_running)
from perfusion_ray.serve.model_store import model_version
from perfusion_ray.storage import join

IMPORT_PATH = "perfusion_ray.serve.reward_app:build_app"
DEPLOYMENT_NAME = "RewardModel"  # = deployment.DEPLOYMENT_NAME, without importing ray here


def default_model_dir(config: PerfusionConfig) -> str:
    return config.serve.model_dir or join(config.rm.out, "model")


def limits(config: PerfusionConfig) -> dict:
    s = config.serve
    return {"max_images_per_request": s.max_images_per_request, "max_body_bytes": s.max_body_bytes,
            "max_image_side": s.max_image_side, "image_policy": s.image_policy, "max_batch_size": s.max_batch_size,
            "batch_wait_timeout_s": s.batch_wait_timeout_s}


REWARD = AppKind(IMPORT_PATH, DEPLOYMENT_NAME, "model_dir", "reward", lambda config: config.serve, default_model_dir,
                 model_version, "start it with `perfusion serve` or `serve deploy cluster/serve_reward.yaml`")
user_config = REWARD.user_config
# application_entry(config, config_path=None, overrides=None, model_dir=None, **extra_user_config) -> dict
application_entry = REWARD.entry
# rollout(model_dir, app_name="reward", timeout_s=180, **extra_user_config) -> version, replicas reconfigured in place
rollout = REWARD.rollout


def reward_application(config: PerfusionConfig, token: str | None, model_dir: str | Path | None = None):
    """The bound Serve application (deployment options from config.serve)."""
    from perfusion_ray.serve.deployment import RewardModel

    return bind_application(RewardModel, config, config.serve, user_config(model_dir or default_model_dir(config)),
                            limits(config), token, config.serve.replica_dtype)


def build_app(args: dict):
    """Application builder for `serve run` / `serve deploy` (import path perfusion_ray.serve.reward_app:build_app).

    args: config (YAML path; relative to the working directory, else the repo root), set (list of
    section.field=value overrides), model_dir (optional; the yaml's user_config usually names it).
    """
    config, args = config_from_args(args, "build_app", ("model_dir",))
    return reward_application(config, checked_token(config), args.get("model_dir"))
