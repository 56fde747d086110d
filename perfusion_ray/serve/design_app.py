"""The design application: build it, describe it declaratively, deploy it, roll a new policy version out.

`build_app(args)` is the application builder `serve run` / `serve deploy` call with the `args` of
cluster/serve_design.yaml ({config, set}); everything else comes from the config's design section (limits,
batching, autoscaling, replica CPUs, GPUs and dtype, the store) plus serve (host, port, token: one proxy per
cluster) and policy (sampling steps, guidance). The policy is the deployment's user_config, {pipeline_dir: ...},
so a new aligned version is a declarative redeploy that changes only user_config and the replicas reconfigure
in place: `rollout(pipeline_dir)` does exactly that (apps.py, shared with the reward app).
"""

from __future__ import annotations

from perfusion_ray.config import PerfusionConfig
from perfusion_ray.serve.apps import AppKind, bind_application, checked_token, config_from_args
from perfusion_ray.serve.model_store import pipeline_version, resolve_path
from perfusion_ray.storage import join

IMPORT_PATH = "perfusion_ray.serve.design_app:build_app"
DEPLOYMENT_NAME = "DesignModel"  # = design_deployment.DEPLOYMENT_NAME, without importing ray here
PAGE_MERCHANTS = 12


def default_pipeline_dir(config: PerfusionConfig) -> str:
    return config.design.pipeline_dir or join(config.align.out, "pipeline")


def store_root(config: PerfusionConfig) -> str:
    """Where impressions and feedback go: design.store_root, else data.root (absolute, for every replica)."""
    root = config.design.store_root or config.data.root
    return root if "://" in root else str(resolve_path(root))


def page_merchants(config: PerfusionConfig, limit: int = PAGE_MERCHANTS) -> list[dict]:
    """The merchants the page offers (ids and observable features only), from the environment. Empty when
    there are none to read (the page then takes a typed merchant id)."""
    from perfusion_ray.environment import offered_merchants

    try:
        offered = offered_merchants(config, limit)
    except Exception:  # noqa: BLE001 - the page works without a list
        return []
    return [{"id": m.id, "features": dict(m.features), "stats": dict(m.stats), "cold_start": new} for m, new in offered]


def settings(config: PerfusionConfig) -> dict:
    """The replica's DesignSettings, as a plain dict (it travels through Serve's config)."""
    d, policy = config.design, config.policy
    return {"store_root": store_root(config), "split": d.split, "group_size": config.data.group_size,
            "max_k": d.max_k, "any_k": d.any_k, "best_of_n": d.best_of_n, "max_n": d.max_n,
            "reward_app": d.reward_app or config.serve.app_name, "max_body_bytes": d.max_body_bytes,
            "max_events_per_feedback": d.max_events_per_feedback, "rate_limit_per_minute": d.rate_limit_per_minute,
            "rate_limit_burst": d.rate_limit_burst, "batch_across_merchants": d.batch_across_merchants,
            "max_batch_size": d.max_batch_size, "batch_wait_timeout_s": d.batch_wait_timeout_s,
            "num_inference_steps": policy.num_inference_steps, "guidance_scale": policy.guidance_scale,
            "personalize_unconditional": policy.personalize_unconditional, "route_prefix": d.route_prefix,
            "merchants": tuple(page_merchants(config)), "dtype": d.replica_dtype}


DESIGN = AppKind(IMPORT_PATH, DEPLOYMENT_NAME, "pipeline_dir", "design", lambda config: config.design,
                 default_pipeline_dir, pipeline_version,
                 "start it with `perfusion serve --app design` or `serve deploy cluster/serve_design.yaml`")
user_config = DESIGN.user_config
# application_entry(config, config_path=None, overrides=None, pipeline_dir=None, **extra_user_config) -> dict
application_entry = DESIGN.entry
# rollout(pipeline_dir, app_name="design", timeout_s=180, **extra_user_config) -> the new version, once every
# replica serves it (a request runs on, and names, the version it started with)
rollout = DESIGN.rollout


def build_app(args: dict):
    """Application builder for `serve run` / `serve deploy` (import path perfusion_ray.serve.design_app:build_app).

    args: config (YAML path; relative to the working directory, else the repo root), set (list of
    section.field=value overrides), pipeline_dir (optional; the yaml's user_config usually names it).
    Deployment options come from config.design (replicas) and config.serve (autoscaling delays, access log).
    """
    from perfusion_ray.serve.design_deployment import DesignModel

    config, args = config_from_args(args, "design build_app", ("pipeline_dir",))
    token = checked_token(config, "the design endpoint")
    folder = args.get("pipeline_dir") or default_pipeline_dir(config)
    return bind_application(DesignModel, config, config.design, user_config(folder), settings(config), token)
