"""The feedback simulator: requests of K catalogue candidates, merchants' Plackett-Luce picks by
hidden utility, shoppers' clicks / orders / returns on listed items, written as hourly partitions.

Deterministic: the same config gives the same bytes. Every event of a request falls in the hour of
its request (the feedback window closes within the hour), so a partition holds whole requests.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from perfusion_ray.config import PerfusionConfig, ShopperModel, WorldConfig
from perfusion_ray.data.image_store import ImageStore
from perfusion_ray.data.events import event_id, event_times
from perfusion_ray.data.labels import graded_labels, is_positive
from perfusion_ray.data.schemas import EVENT_TYPES, FEEDBACK_EVENT_SCHEMA
from perfusion_ray.data.store import StoreLayout, write_partition
from perfusion_ray.errors import PerfusionError
from perfusion_ray.metrics import gauc
from perfusion_ray.storage import atomic_write_json
from perfusion_ray.world import fashion_mnist
from perfusion_ray.world.attributes import COLOURS, PATTERNS, SHADES
from perfusion_ray.world.catalogue import Catalogue, build_catalogue, prompt_text
from perfusion_ray.world.merchants import MerchantPopulation, TasteFamily, build_population, load_taste_family
from perfusion_ray.world.oracle import attribute_profile

HOUR_US = 3_600_000_000


@dataclass
class World:
    """Everything the simulator and the evaluators need to know about one FashionWorld."""

    config: PerfusionConfig
    family: TasteFamily
    merchants: MerchantPopulation
    catalogue: Catalogue

    @cached_property
    def profiles(self) -> np.ndarray:
        """Oracle attribute profile of every catalogue item, [N, 12]."""
        return attribute_profile(self.catalogue.images)

    @cached_property
    def _pools(self) -> dict[tuple, np.ndarray]:
        return {}

    def candidates(self, cls: int, colour: int, shade: int, pattern: int) -> np.ndarray:
        """Catalogue items matching a request (-1 = attribute left open), cached per request shape."""
        key = (cls, colour, shade, pattern)
        if key not in self._pools:
            self._pools[key] = self.catalogue.matching(
                cls, None if colour < 0 else colour, None if shade < 0 else shade, None if pattern < 0 else pattern)
        return self._pools[key]


def build_world(config: PerfusionConfig) -> World:
    family = load_taste_family(config.resolve_input(config.world.taste_family))
    if config.world.items_per_combination < config.data.group_size:
        raise PerfusionError(
            f"world.items_per_combination ({config.world.items_per_combination}) is below data.group_size "
            f"({config.data.group_size}): a fully specified request could not fill its group")
    dataset = fashion_mnist.load("train", config.world.fashion_mnist_dir)
    catalogue = build_catalogue(dataset, config.world.items_per_combination, config.world.image_size, config.world.seed)
    merchants = build_population(family, config.world.num_merchants, config.world.cold_start_fraction, config.world.seed)
    return World(config, family, merchants, catalogue)


@dataclass
class SimulationReport:
    split: str
    requests: int = 0
    events: int = 0
    events_by_type: dict[str, int] = field(default_factory=dict)
    partitions: list[str] = field(default_factory=list)
    faulty_events: int = 0  # events broken on purpose (world.faulty_event_rate)
    oracle_gauc: float = float("nan")  # GAUC of the true utilities against the simulated labels: the ceiling
    groups_with_preference: int = 0  # groups with both a positive and a negative
    seconds: float = 0.0


def _map_column(rows: list[dict], merchant: np.ndarray, value_type: pa.DataType) -> pa.Array:
    """A map column for events from the per-merchant dicts (all merchants share one key set)."""
    keys = sorted(rows[0]) if rows else []
    values = np.array([[row[key] for key in keys] for row in rows], dtype=object).reshape(len(rows), len(keys))
    offsets = pa.array(np.arange(0, (len(merchant) + 1) * len(keys), len(keys), dtype=np.int32)[: len(merchant) + 1])
    return pa.MapArray.from_arrays(
        offsets,
        pa.array(np.tile(np.array(keys, dtype=object), len(merchant)), pa.string()),
        pa.array(values[merchant].reshape(-1), value_type),
    )


class _HourBuilder:
    """Collects one hour's events as columns."""

    def __init__(self):
        self.columns: dict[str, list] = {name: [] for name in ("event_id", "time_us", "request", "merchant", "prompt",
                                                               "candidate", "position", "event_type", "value")}

    def add(self, request_id: str, merchant: int, prompt: str, candidates: np.ndarray, positions: np.ndarray,
            event_type: str, times_us: np.ndarray, counter: dict) -> None:
        c = self.columns
        for position, item, time_us in zip(positions, candidates[positions], times_us):
            n = counter.get((position, event_type), 0)
            counter[(position, event_type)] = n + 1
            c["event_id"].append(event_id(request_id, int(position), event_type, n))
            c["time_us"].append(int(time_us))
            c["request"].append(request_id)
            c["merchant"].append(merchant)
            c["prompt"].append(prompt)
            c["candidate"].append(int(item))
            c["position"].append(int(position))
            c["event_type"].append(event_type)
            c["value"].append(1.0)

    def table(self, world: World, refs: list[str], digests: list[str]) -> pa.Table:
        c = self.columns
        merchant = np.array(c["merchant"], dtype=np.int64)
        candidate = np.array(c["candidate"], dtype=np.int64)
        ids = world.merchants.ids
        return pa.table({
            "event_id": pa.array(c["event_id"], pa.string()),
            "event_time": pa.array(event_times(c["time_us"]), pa.string()),
            "request_id": pa.array(c["request"], pa.string()),
            "merchant_id": pa.array([ids[m] for m in merchant], pa.string()),
            "merchant_features": _map_column(world.merchants.features, merchant, pa.string()),
            "merchant_stats": _map_column(world.merchants.stats, merchant, pa.float64()),
            "prompt": pa.array(c["prompt"], pa.string()),
            "image_ref": pa.array([refs[i] for i in candidate], pa.string()),
            "image_sha256": pa.array([digests[i] for i in candidate], pa.string()),
            "position": pa.array(c["position"], pa.int32()),
            "event_type": pa.array(c["event_type"], pa.string()),
            "value": pa.array(c["value"], pa.float64()),
        }, schema=FEEDBACK_EVENT_SCHEMA)


def _inject_faults(table: pa.Table, rate: float, rng: np.random.Generator) -> tuple[pa.Table, int]:
    """Break a share of rows the way real logs break: each chosen row gets one defect, in turn.
    Returns (table, number of broken or resent events)."""
    chosen = np.flatnonzero(rng.random(table.num_rows) < rate)
    if not len(chosen):
        return table, 0
    rows = table.to_pylist()
    resent = []
    for n, row_index in enumerate(chosen):
        row = rows[row_index]
        kind = n % 4
        if kind == 0:
            row["event_type"] = "view"
        elif kind == 1:
            row["value"] = float("nan")
        elif kind == 2:
            row["event_time"] = row["event_time"].replace("T", " at ")
        else:
            resent.append(dict(row))  # at-least-once delivery: the same event again
    return pa.Table.from_pylist(rows + resent, schema=FEEDBACK_EVENT_SCHEMA), len(chosen)


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


def store_catalogue(world: World, store: ImageStore) -> tuple[list[str], list[str]]:
    """Write every catalogue image to the image store; returns (refs, sha256s) by item."""
    pairs = [store.put_array(image) for image in world.catalogue.images]
    return [ref for ref, _ in pairs], [digest for _, digest in pairs]


def _schedule(world: World, split: str) -> list[tuple[dt.datetime, np.ndarray]]:
    """(hour start, merchant index per request) for every hour of the split."""
    cfg = world.config.world
    rng = np.random.default_rng([cfg.seed, 3, 0 if split == "train" else 1])
    if split == "train":
        seen = world.merchants.seen_indices
        return [(cfg.start_time + dt.timedelta(hours=h), rng.choice(seen, size=cfg.requests_per_hour))
                for h in range(cfg.hours)]
    everyone = np.repeat(np.arange(len(world.merchants.ids)), cfg.holdout_requests_per_merchant)
    rng.shuffle(everyone)
    chunks = [everyone[i:i + cfg.requests_per_hour] for i in range(0, len(everyone), cfg.requests_per_hour)]
    return [(cfg.start_time + dt.timedelta(hours=cfg.hours + h), chunk) for h, chunk in enumerate(chunks)]


def draw_requests(world: World, requesters: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """What each requesting merchant asks for: (class [n], asked colour/shade/pattern [n, 3], -1 = left open).
    The class follows the merchant's category focus; each attribute is omitted with its omit probability."""
    cfg = world.config.world
    n = len(requesters)
    cumulative = np.cumsum(world.merchants.category_probs[requesters], axis=1)
    classes = np.minimum((rng.random((n, 1)) > cumulative).sum(1), cumulative.shape[1] - 1)
    attribute_sizes = (len(COLOURS), len(SHADES), len(PATTERNS))
    omit = (cfg.omit.colour, cfg.omit.shade, cfg.omit.pattern)
    asked = np.stack([np.where(rng.random(n) < p_omit, -1, rng.integers(0, size, n))
                      for size, p_omit in zip(attribute_sizes, omit)], axis=1)
    return classes, asked


def merchant_picks(utility: np.ndarray, cfg: WorldConfig, rng: np.random.Generator) -> np.ndarray:
    """Positions the merchant selects from a group: a Plackett-Luce ranking by utility / temperature
    (Gumbel-max), of which the top min_selected..max_selected are listed."""
    k = len(utility)
    ranking = np.argsort(-(utility / cfg.selection_temperature + rng.gumbel(size=k)))
    return ranking[: rng.integers(cfg.min_selected, min(cfg.max_selected, k) + 1)]


def shopper_events(utility: np.ndarray, shoppers: ShopperModel, rng: np.random.Generator
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clicks, orders and returns of each listed item (utility [n] of the listed items): every rate is a
    logistic in the utility."""
    slope = shoppers.utility_slope * utility
    clicks = rng.binomial(shoppers.views_per_listing, 1 / (1 + np.exp(-(_logit(shoppers.click_rate) + slope))))
    orders = rng.binomial(clicks, 1 / (1 + np.exp(-(_logit(shoppers.order_rate) + slope))))
    returns = rng.binomial(orders, 1 / (1 + np.exp(-(_logit(shoppers.return_rate) - slope))))
    return clicks, orders, returns


def simulate(config: PerfusionConfig, split: str = "train", world: World | None = None,
             progress: bool = True, hours: Sequence[int] | None = None) -> SimulationReport:
    """Simulate a split ('train': the stream of seen merchants; 'holdout': seen and cold-start) into the store.

    hours: only these hour indices of the split's schedule (each hour is seeded on its own, so writing
    hours in several calls gives the same bytes as one call); None: all of them.
    """
    started = time.perf_counter()
    world = world or build_world(config)
    cfg, k, policy = config.world, config.data.group_size, config.data.label_policy
    layout = StoreLayout(config.data.root, split)
    refs, digests = store_catalogue(world, ImageStore(layout.images_uri))
    shoppers = cfg.shoppers
    report = SimulationReport(split=split)
    utilities, positives, group_ids = [], [], []
    schedule = list(enumerate(_schedule(world, split)))
    if hours is not None:
        schedule = [schedule[h] for h in hours]
    for hour_index, (hour, requesters) in tqdm(schedule, desc=f"simulate {split}", unit="hour", disable=not progress):
        rng = np.random.default_rng([cfg.seed, 4, 0 if split == "train" else 1, hour_index])
        n = len(requesters)
        classes, asked = draw_requests(world, requesters, rng)
        starts = rng.integers(0, 3000 * 10**6, n)  # request times, leaving room for its feedback in the hour
        hour_us = int(hour.timestamp() * 10**6)
        builder = _HourBuilder()
        for i, merchant in enumerate(requesters):
            request_id = f"fw{cfg.seed}-{split}-{hour_index:04d}-{i:05d}"
            pool = world.candidates(int(classes[i]), *map(int, asked[i]))
            candidates = rng.choice(pool, size=k, replace=False)
            utility = world.profiles[candidates] @ world.merchants.tastes[merchant]
            prompt = prompt_text(int(classes[i]), *[None if a < 0 else int(a) for a in asked[i]])
            counter: dict = {}
            t0 = hour_us + starts[i]
            positions = np.arange(k)
            builder.add(request_id, merchant, prompt, candidates, positions, "impression", np.full(k, t0), counter)
            chosen = merchant_picks(utility, cfg, rng)
            select_times = t0 + rng.integers(5, 120, len(chosen)) * 10**6
            builder.add(request_id, merchant, prompt, candidates, chosen, "select", select_times, counter)
            clicks, orders, returns = shopper_events(utility[chosen], shoppers, rng)
            counts = {"impression": np.ones(k), "select": np.zeros(k), "click": np.zeros(k),
                      "order": np.zeros(k), "return": np.zeros(k)}
            counts["select"][chosen] = 1
            for event_type, per_item, delay in (("click", clicks, 300), ("order", orders, 360), ("return", returns, 420)):
                counts[event_type][chosen] = per_item
                positions = np.repeat(chosen, per_item)
                offsets = rng.integers(delay - 60, delay, len(positions)) * 10**6
                builder.add(request_id, merchant, prompt, candidates, positions, event_type,
                            np.repeat(select_times, per_item) + offsets, counter)
            utilities.append(utility)
            positives.append(is_positive(graded_labels(counts, policy), policy))
            group_ids.append(np.full(k, len(group_ids)))
        table, faulty = _inject_faults(builder.table(world, refs, digests), cfg.faulty_event_rate, rng)
        report.faulty_events += faulty
        write_partition(layout, hour, table, f"sim-seed{cfg.seed}")
        report.partitions.append(hour.strftime("%Y-%m-%dT%H"))
        report.requests += n
        report.events += table.num_rows
        for event_type in EVENT_TYPES:
            report.events_by_type[event_type] = report.events_by_type.get(event_type, 0) + builder.columns["event_type"].count(event_type)
    if utilities:
        positive = np.concatenate(positives)
        groups = np.concatenate(group_ids)
        report.oracle_gauc = gauc(np.concatenate(utilities), positive, groups)
        both = np.bincount(groups, weights=positive)
        report.groups_with_preference = int(((both > 0) & (both < k)).sum())
    report.seconds = time.perf_counter() - started
    atomic_write_json(layout.report, asdict(report), layout.filesystem)
    return report
