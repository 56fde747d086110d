"""The judge: how generated images are scored where the environment has no oracle.

A judge is a PerFusionRM trained only on the holdout split's feedback (`perfusion rm train --judge`,
exported to <rm.out>/judge/model). The policy's RM and the policy train on the train split only, so the
judge never saw a group either of them learned from; it knows the cold-start merchants, whose feedback
exists only in the holdout split. Evaluation requests are holdout requests too: the judge has seen their
logged candidates, never the generated images it scores.

Both an oracle and a judge answer the same two questions of an image asked by a merchant: its utility for
that merchant, and its mean utility for other merchants (the personalization index is the difference).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from perfusion_ray.config import PerfusionConfig
from perfusion_ray.environment import Oracle
from perfusion_ray.records import Merchant
from perfusion_ray.storage import is_file, join, local_directory

OTHER_MERCHANTS = 8  # the judge scores each image for this many other merchants (the oracle: for all of them)


def judge_out(config: PerfusionConfig) -> str:
    """The judge's run folder, <rm.out>/judge (a local path or a URI)."""
    return join(config.rm.out, "judge")


def judge_dir(config: PerfusionConfig) -> str:
    """The judge's exported model, <rm.out>/judge/model."""
    return join(judge_out(config), "model")


class UtilityJudge(Protocol):
    name: str

    def own(self, merchants: Sequence[Merchant], prompts: Sequence[str], images: np.ndarray) -> np.ndarray:
        """[N]: the utility of image i for merchant i."""
        ...

    def utilities(self, merchants: Sequence[Merchant], prompts: Sequence[str], images: np.ndarray,
                  population: Sequence[Merchant]) -> tuple[np.ndarray, np.ndarray]:
        """(utility of image i for merchant i, mean utility of image i for the other merchants of
        `population`), each [N]."""
        ...


class OracleJudge:
    name = "oracle"

    def __init__(self, oracle: Oracle):
        self.oracle = oracle

    def own(self, merchants, prompts, images):
        return self.oracle.utility(merchants, images)

    def utilities(self, merchants, prompts, images, population):
        population = list(dict.fromkeys(population))
        matrix = self.oracle.utility_matrix(population, images)  # [M, N]
        own = matrix[[population.index(m) for m in merchants], np.arange(len(merchants))]
        others = (matrix.sum(0) - own) / max(len(population) - 1, 1)
        return own, others


class RewardModelJudge:
    """A reward model's scores as utilities (the judge of module docstring)."""

    name = "judge"

    def __init__(self, model, seed: int = 0):
        self.model, self.seed = model, seed

    def own(self, merchants, prompts, images):
        return self.model.score(list(merchants), list(prompts), images)

    def utilities(self, merchants, prompts, images, population):
        own = self.own(merchants, prompts, images)
        population = list(dict.fromkeys(population))
        rng = np.random.default_rng(self.seed)
        others = np.zeros(len(merchants))
        for _ in range(min(OTHER_MERCHANTS, len(population) - 1)):
            # For each image another merchant than its own, drawn at random (one draw per pass).
            picks = [population[(population.index(m) + 1 + rng.integers(len(population) - 1)) % len(population)]
                     for m in merchants]
            others += self.model.score(picks, list(prompts), images)
        return own, others / max(min(OTHER_MERCHANTS, len(population) - 1), 1)


def load_judge(config: PerfusionConfig, folder: str | Path | None = None) -> RewardModelJudge | None:
    """The trained judge (default <rm.out>/judge/model), or None when there is none."""
    from perfusion_ray.models.reward_model import load_reward_model

    folder = folder if folder is not None else judge_dir(config)
    if not is_file(join(folder, "config.json")):
        return None
    return RewardModelJudge(load_reward_model(local_directory(folder)), seed=config.align.eval.seed)
