"""FashionWorld client mode: what a simulated merchant posts after looking at a group of designs."""

from __future__ import annotations

import numpy as np

from perfusion_ray.config import load_config
from perfusion_ray.serve.design_schemas import FEEDBACK_TYPES
from perfusion_ray.world.endpoint_merchants import reactions
from perfusion_ray.world.simulator import build_world
from tests.conftest import TINY_OVERRIDES


def test_reactions_select_within_bounds_and_shoppers_act_only_on_selected_items():
    world = build_world(load_config(None, TINY_OVERRIDES))
    cfg = world.config.world
    for seed in range(50):
        utility = np.random.default_rng(seed).random(4)
        events = reactions(utility, world, np.random.default_rng(seed))
        selected = {e.position for e in events if e.type == "select"}
        assert cfg.min_selected <= len(selected) <= cfg.max_selected
        assert {e.position for e in events} <= selected  # clicks, orders, returns only on listed items
        assert {e.type for e in events} <= set(FEEDBACK_TYPES)
        assert len({e.event_id for e in events}) == len(events)  # resends are recognised by these ids


def test_merchants_pick_what_their_taste_prefers():
    world = build_world(load_config(None, TINY_OVERRIDES + ["world.selection_temperature=0.05", "world.max_selected=1"]))
    picks = [reactions(np.array([0.1, 0.9, 0.2, 0.3]), world, np.random.default_rng(seed))[0].position
             for seed in range(200)]
    assert np.mean(np.array(picks) == 1) > 0.9
