"""What the framework needs from the world it runs in, and the one place that picks that world.

Two small interfaces separate the framework from any environment:
- a `RequestSource`: where the online rounds' on-policy requests (merchant + prompt) come from. Any store
  has one: its recent logged requests, drawn in proportion to their traffic (data/logged_requests.py);
- an optional `Oracle`: the true utility of an image for a merchant. A simulator has one; a real store has
  none, and evaluation then uses a judge (evaluation/judge.py) while monitoring uses the reward model.

`build_environment(config)` returns FashionWorld's implementations when the config has a `world:`
section and the store's own otherwise. Nothing outside world/ imports world/ but this module, the demo
and the benchmarks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from perfusion_ray.config import PerfusionConfig
from perfusion_ray.errors import PerfusionError
from perfusion_ray.records import GroupBatch, Merchant, Request


class RequestSource(Protocol):
    def requests(self, round_index: int, count: int) -> list[Request]:
        """`count` requests for round `round_index`; the same round asks the same (a resumed round too)."""
        ...


class Oracle(ABC):
    """The true utility of images for merchants: what an environment knows and no model is shown."""

    @abstractmethod
    def utility_matrix(self, merchants: Sequence[Merchant], images: np.ndarray) -> np.ndarray:
        """[M, N]: the utility of each of N images (uint8 [N, H, W, 3]) for each of M merchants."""

    def utility(self, merchants: Sequence[Merchant], images: np.ndarray) -> np.ndarray:
        """[N]: the utility of image i for merchant i."""
        distinct = list(dict.fromkeys(merchants))
        matrix = self.utility_matrix(distinct, images)
        rows = [distinct.index(m) for m in merchants]
        return matrix[rows, np.arange(len(merchants))]

    def reference_scores(self, groups: GroupBatch) -> dict[str, np.ndarray]:
        """Reference scorers of held-out groups for `perfusion rm eval` (name -> scores [B, K]): by default
        the oracle's own utilities, the ceiling a perfect reader of taste reaches."""
        merchants, _, images = groups.candidates()
        return {"oracle": self.utility(merchants, images).reshape(groups.labels.shape)}

    def fidelity(self, prompts: Sequence[str], images: np.ndarray) -> dict[str, float]:
        """Environment-specific fidelity measures of images for their prompts (name -> share correct)."""
        return {}


@dataclass
class Environment:
    name: str
    request_source: RequestSource
    oracle: Oracle | None = None
    # Evaluation keeps requests where the merchant's taste can show (a prompt that fixes everything leaves
    # nothing to personalize); an environment that cannot tell keeps every request.
    prompt_is_open: Callable[[str], bool] = lambda prompt: True


def has_world(config: PerfusionConfig) -> bool:
    return config.world is not None


def require_world(config: PerfusionConfig, command: str) -> None:
    if config.world is None:
        raise PerfusionError(f"`{command}` needs a world: this config has no `world:` section",
                             hint="add one (see configs/fashionworld.yaml), or bring your own feedback store: "
                                  "every other command runs on it")


def build_environment(config: PerfusionConfig) -> Environment:
    """FashionWorld's request sampler and oracle when the config has a world, else the store's logged requests
    and no oracle. online.request_source=logged picks the logged requests in either case."""
    from perfusion_ray.data.logged_requests import LoggedRequests

    logged = LoggedRequests(config.data.root, config.online.request_window_hours, config.online.seed)
    if config.world is None:
        return Environment("store", logged)
    from perfusion_ray.world.environment import fashionworld_environment

    environment = fashionworld_environment(config)
    if config.online.request_source == "logged":
        environment.request_source = logged
    return environment


def offered_merchants(config: PerfusionConfig, limit: int) -> list[tuple[Merchant, bool]]:
    """Up to `limit` merchants a merchant page offers, each with whether it is new (cold start): the world's
    merchants when the config has a world, else the store's (those of its train groups, then the holdout
    split's others, which are new)."""
    if config.world is not None:
        from perfusion_ray.world.environment import population_merchants

        return population_merchants(config)[:limit]
    from perfusion_ray.data.group_examples import distinct_merchants
    from perfusion_ray.data.store import StoreLayout

    offered: dict[str, tuple[Merchant, bool]] = {}
    for split in ("train", "holdout"):
        layout = StoreLayout(config.data.root, split)
        merchants, _, _ = distinct_merchants(layout, layout.output_files("groups"))
        for merchant in merchants:
            offered.setdefault(merchant.id, (merchant, split == "holdout"))
    return list(offered.values())[:limit]


def simulate(config: PerfusionConfig, split: str):
    """`perfusion world simulate`: the world's feedback for one split into the store."""
    require_world(config, "perfusion world simulate")
    from perfusion_ray.world.simulator import simulate as simulate_world

    return simulate_world(config, split)


def pretrain_base_arguments(parser) -> None:
    """`perfusion pretrain base`'s options (its module imports no torch at import time)."""
    from perfusion_ray.world.pretrain_base import build_parser

    build_parser(parser)


def pretraining_command(kind: str) -> Callable:
    """The `perfusion pretrain <kind>` runner: the embedded models are trained on FashionWorld's renders."""
    if kind == "clip":
        from perfusion_ray.world.pretrain_clip import run
    else:
        from perfusion_ray.world.pretrain_base import run
    return run
