"""The rounds' endpoint roll-outs: the reward endpoint to a refreshed RM, the design endpoint (when one is
deployed) to a newly published policy. Both are declarative redeploys that change only user_config, so
replicas reconfigure in place without dropping requests."""

from __future__ import annotations

from perfusion_ray.config import PerfusionConfig


class EndpointRollouts:
    def __init__(self, config: PerfusionConfig):
        self.config = config

    def serving_version(self) -> str:
        from perfusion_ray.serve.client import RewardHandleClient

        return RewardHandleClient(self.config.serve.app_name).version()

    def ensure_rm(self, model_dir: str) -> str:
        """Serve `model_dir` (roll the deployment if it serves another version); returns the version."""
        from perfusion_ray.serve.model_store import model_version
        from perfusion_ray.serve.reward_app import rollout

        wanted = model_version(model_dir)
        if self.serving_version() != wanted:
            rollout(model_dir, self.config.serve.app_name)
        return wanted

    def publish_policy(self, pipeline_dir: str) -> str | None:
        """Roll the design endpoint to an exported policy when one is deployed; its version, else None."""
        from perfusion_ray.serve import design_app
        from perfusion_ray.serve.apps import live_declarative_apps

        if self.config.design.app_name not in live_declarative_apps():
            return None
        return design_app.rollout(pipeline_dir, self.config.design.app_name)
