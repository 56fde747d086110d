"""FashionWorld behind the framework's two interfaces (perfusion_ray/environment.py): its request sampler
(seen merchants asking as they do in the simulated stream) and its pixel oracle."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from perfusion_ray.config import PerfusionConfig
from perfusion_ray.environment import Environment, Oracle
from perfusion_ray.errors import PerfusionError
from perfusion_ray.records import GroupBatch, Merchant, Request
from perfusion_ray.world.catalogue import parse_prompt, prompt_text
from perfusion_ray.world.simulator import World, build_world, draw_requests


def world_merchant(world: World, index: int) -> Merchant:
    population = world.merchants
    return Merchant(population.ids[index], dict(population.features[index]), dict(population.stats[index]))


def population_merchants(config: PerfusionConfig) -> list[tuple[Merchant, bool]]:
    """Every merchant of the config's world with its cold-start flag, without rendering the catalogue."""
    from perfusion_ray.world.merchants import build_population, load_taste_family

    world = config.world
    population = build_population(load_taste_family(config.resolve_input(world.taste_family)), world.num_merchants,
                                  world.cold_start_fraction, world.seed)
    return [(Merchant(population.ids[i], dict(population.features[i]), dict(population.stats[i])),
             bool(population.cold_start[i])) for i in range(len(population.ids))]


class FashionWorldRequests:
    """Seen merchants, chosen uniformly, asking for classes and attributes as they do in the feedback stream.
    Seeded by (seed, round), so a resumed round asks the same."""

    def __init__(self, world: World, seed: int):
        self.world, self.seed = world, seed

    def requests(self, round_index: int, count: int) -> list[Request]:
        rng = np.random.default_rng([self.seed, 11, round_index])
        requesters = rng.choice(self.world.merchants.seen_indices, size=count)
        classes, asked = draw_requests(self.world, requesters, rng)
        return [Request(f"online-r{round_index:04d}-{i:04d}", world_merchant(self.world, int(m)),
                        prompt_text(int(classes[i]), *[None if a < 0 else int(a) for a in asked[i]]))
                for i, m in enumerate(requesters)]


class FashionWorldOracle(Oracle):
    """Utility = hidden taste . attribute profile read off the pixels (world/oracle.py)."""

    def __init__(self, world: World):
        self.world = world

    def _taste_rows(self, merchants: Sequence[Merchant]) -> list[int]:
        ids = self.world.merchants.ids
        unknown = sorted({m.id for m in merchants if m.id not in ids})
        if unknown:
            raise PerfusionError(f"merchant(s) {', '.join(unknown[:3])} are not merchants of this FashionWorld",
                                 hint="the store was written by another world or program: evaluate it without "
                                      "the world (remove `world:` from the config)")
        return [ids.index(m.id) for m in merchants]

    def utility_matrix(self, merchants: Sequence[Merchant], images: np.ndarray) -> np.ndarray:
        from perfusion_ray.world.oracle import attribute_profile, utility

        return utility(self.world.merchants.tastes[self._taste_rows(merchants)], attribute_profile(images))

    def reference_scores(self, groups: GroupBatch) -> dict[str, np.ndarray]:
        """The oracle ceiling, and the side-feature oracle: the taste expected from the merchant's observable
        features (E[taste | features]) times the true attribute profile, what a perfect reader of pixels can
        reach knowing only what a cold-start merchant shows."""
        from perfusion_ray.world.merchants import expected_taste
        from perfusion_ray.world.oracle import attribute_profile

        merchants, _, images = groups.candidates()
        profiles = attribute_profile(images).reshape(*groups.labels.shape, -1)
        rows = self._taste_rows(groups.merchants)
        population = self.world.merchants
        expected = expected_taste(self.world.family, population.features, population.stats,
                                  seed=self.world.config.world.seed)
        return {"oracle": np.einsum("gkd,gd->gk", profiles, population.tastes[rows]),
                "oracle_side_features": np.einsum("gkd,gd->gk", profiles, expected[rows])}

    def fidelity(self, prompts: Sequence[str], images: np.ndarray) -> dict[str, float]:
        """colour_acc: on prompts that name a colour, the share of images whose dominant hue is that colour."""
        from perfusion_ray.world.oracle import colour_probabilities

        asked = np.array([_named_colour(p) for p in prompts])
        named = asked >= 0
        if not named.any():
            return {}
        return {"colour_acc": float((colour_probabilities(images[named]).argmax(1) == asked[named]).mean())}


def _named_colour(prompt: str) -> int:
    try:
        colour = parse_prompt(prompt).colour
    except ValueError:
        return -1
    return -1 if colour is None else colour


def _is_open(prompt: str) -> bool:
    try:
        return parse_prompt(prompt).open
    except ValueError:
        return True


def fashionworld_environment(config: PerfusionConfig, world: World | None = None) -> Environment:
    world = world or build_world(config)
    return Environment("fashionworld", FashionWorldRequests(world, config.online.seed), FashionWorldOracle(world),
                       prompt_is_open=_is_open)
