"""A feedback store written by another program than FashionWorld, for measuring what the reward model learns
beyond FashionWorld's vocabulary.

Its own merchants ("shop-b3"), side features ("channel", "city", numeric "basket_eur"), catalogue and
prompts ("a dress", "a sneaker"): real Fashion-MNIST items tinted with a continuous hue, saturation and
brightness and laid on an off-white background (FashionWorld draws 8 named hues in 2 shades on black).
Each merchant's hidden taste is a preferred hue with a width and a preferred brightness, perturbed around
its style; the side features follow the style (categorical, with noise) and the preferred brightness
(basket_eur), so a cold-start merchant's taste is partly readable from what it shows. A request asks
for K items of one class; the merchant selects 1-2 by Plackett-Luce on utility, and shoppers click, order
and return listed items with logistic rates in utility. Events go out in the published event schema as
hourly parquet partitions, images through the content-addressed ImageStore; a quarter of the merchants
appear only in the holdout split.

The store's ceiling is the GAUC of the true utilities against the simulated binary labels on the holdout
groups, for seen and cold-start merchants. Beside it, the side-feature ceiling scores each group with
E[utility | the merchant's observable features and the requested class] under the generator's own prior:
what a scorer that reads every image perfectly can know about a merchant without its history (the bound
that matters for cold start).

    .venv/bin/python -m tests.foreign_store --root /tmp/foreign [--size tiny|default] [--seed 0]
"""

from __future__ import annotations

import argparse
import colorsys
import datetime as dt
import sys
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from PIL import Image

from perfusion_ray.config import LabelPolicy
from perfusion_ray.data.events import event_id, event_times
from perfusion_ray.data.image_store import ImageStore
from perfusion_ray.data.labels import graded_labels, is_positive
from perfusion_ray.data.schemas import FEEDBACK_EVENT_SCHEMA
from perfusion_ray.data.store import StoreLayout, write_partition
from perfusion_ray.metrics import gauc
from perfusion_ray.world import fashion_mnist

IMAGE_SIZE = 32
GROUP_SIZE = 4
BACKGROUND = 0.93  # off-white, as product photos
START = dt.datetime(2026, 3, 2, tzinfo=dt.timezone.utc)
NOUNS = ("tee", "trousers", "jumper", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
CHANNELS = ("marketplace", "boutique", "social", "outlet")
CITIES = ("lisbon", "porto", "graz", "ghent", "turin", "lyon")
FEATURE_NOISE = 0.2  # share of merchants whose channel / city is drawn uniformly instead of from the style
BASKET_NOISE = 12.0  # euros
PRIOR_DRAWS = 100_000  # merchants drawn from the prior for the side-feature ceiling
BRIGHTNESS_WIDTH = 0.15  # how far from its preferred brightness a value still pleases
SELECTION_TEMPERATURE = 0.12
VIEWS, CLICK_RATE, ORDER_RATE, RETURN_RATE, SHOPPER_SLOPE = 4, 0.45, 0.4, 0.3, 2.5


@dataclass(frozen=True)
class Style:
    """A group of merchants with similar tastes and similar observable features."""

    hue: float  # preferred hue, degrees
    hue_width: float  # degrees: how far from it a colour still pleases
    brightness: float  # preferred value (HSV), 0..1
    brightness_weight: float  # share of utility from brightness (the rest from hue)
    channel: str
    cities: tuple[str, ...]
    classes: tuple[int, ...]  # the item classes its merchants ask for most


STYLES = (
    Style(25.0, 40.0, 0.90, 0.50, "marketplace", ("lisbon", "porto"), (3, 0, 5)),
    Style(135.0, 45.0, 0.45, 0.60, "boutique", ("graz",), (4, 2, 9)),
    Style(210.0, 35.0, 0.75, 0.45, "social", ("ghent", "lyon"), (7, 6, 8)),
    Style(295.0, 50.0, 0.40, 0.55, "outlet", ("turin", "lyon"), (1, 3, 6)),
)


@dataclass(frozen=True)
class StoreSize:
    merchants: int = 48
    cold_fraction: float = 0.25
    hours: int = 48  # hours of training feedback
    requests_per_hour: int = 60
    holdout_requests_per_merchant: int = 30
    items_per_class: int = 300


SIZES = {
    "default": StoreSize(),  # about FashionWorld's default: 2,880 training groups of 36 seen merchants
    "tiny": StoreSize(merchants=8, hours=3, requests_per_hour=12, holdout_requests_per_merchant=4, items_per_class=12),
}


@dataclass
class Merchants:
    ids: list[str]
    channel: np.ndarray  # [M] index into CHANNELS
    city: np.ndarray  # [M] index into CITIES
    basket: np.ndarray  # [M] euros
    hue: np.ndarray  # [M] preferred hue, degrees
    hue_width: np.ndarray
    brightness: np.ndarray
    brightness_weight: np.ndarray
    class_probs: np.ndarray  # [M, 10]
    cold: np.ndarray  # [M] bool: only in the holdout split

    def features(self, m: int) -> dict[str, str]:
        return {"channel": CHANNELS[self.channel[m]], "city": CITIES[self.city[m]]}

    def stats(self, m: int) -> dict[str, float]:
        return {"basket_eur": float(self.basket[m])}


@dataclass
class Catalogue:
    images: np.ndarray  # uint8 [N, S, S, 3]
    classes: np.ndarray  # [N]
    hue: np.ndarray  # [N] degrees
    brightness: np.ndarray  # [N] HSV value


@dataclass(frozen=True)
class Group:
    """What the generator knows about one written request."""

    merchant: int
    items: np.ndarray  # [K] catalogue items, in position order
    utility: np.ndarray  # [K] the merchant's true utility
    positive: np.ndarray  # [K] bool: label above the policy's threshold


@dataclass
class ForeignStoreReport:
    root: str
    groups: dict[str, int] = field(default_factory=dict)  # split -> requests written
    events: dict[str, int] = field(default_factory=dict)  # split -> event rows written
    partitions: dict[str, int] = field(default_factory=dict)  # split -> partition files
    ceiling: dict[str, float] = field(default_factory=dict)  # "seen" / "cold" -> holdout GAUC of true utilities
    # the same with E[utility | observable features]: all a scorer reading pixels perfectly can know of a merchant
    side_feature_ceiling: dict[str, float] = field(default_factory=dict)
    holdout_groups_with_preference: dict[str, int] = field(default_factory=dict)
    seen_ids: list[str] = field(default_factory=list)
    cold_ids: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"foreign store {self.root}: train {self.groups['train']} groups ({self.events['train']} events), "
                f"holdout {self.groups['holdout']} groups ({self.events['holdout']} events); "
                f"{len(self.seen_ids)} seen + {len(self.cold_ids)} cold-start merchants; ceiling GAUC on holdout: "
                f"seen {self.ceiling['seen']:.3f}, cold {self.ceiling['cold']:.3f}" + (
                    f"; side-feature ceiling: seen {self.side_feature_ceiling['seen']:.3f}, cold "
                    f"{self.side_feature_ceiling['cold']:.3f}" if self.side_feature_ceiling else ""))


def merchant_id(index: int) -> str:
    """'shop-a0', 'shop-a1', ..., 'shop-b0', ...: another producer's naming."""
    return f"shop-{chr(ord('a') + index // 10 % 26)}{index % 10}"


def build_merchants(count: int, cold_fraction: float, rng: np.random.Generator) -> Merchants:
    style = rng.integers(0, len(STYLES), count)
    of_style = lambda name: np.array([getattr(STYLES[s], name) for s in style])  # noqa: E731
    hue = (of_style("hue") + rng.normal(0, 20, count)) % 360
    width = of_style("hue_width") * np.exp(rng.normal(0, 0.2, count))
    brightness = np.clip(of_style("brightness") + rng.normal(0, 0.1, count), 0.3, 1.0)
    weight = np.clip(of_style("brightness_weight") + rng.normal(0, 0.08, count), 0.1, 0.7)
    pick = rng.random(count)  # which of its style's cities a merchant is in
    style_city = np.array([CITIES.index(STYLES[s].cities[int(p * len(STYLES[s].cities))]) for s, p in zip(style, pick)])
    channel = np.where(rng.random(count) < FEATURE_NOISE, rng.integers(0, len(CHANNELS), count),
                       [CHANNELS.index(c) for c in of_style("channel")])
    city = np.where(rng.random(count) < FEATURE_NOISE, rng.integers(0, len(CITIES), count), style_city)
    # dimmer tastes buy dearer baskets: the preferred brightness shows in a number, with noise
    basket = np.round(basket_eur(brightness) + rng.normal(0, BASKET_NOISE, count), 2)
    class_probs = np.full((count, len(NOUNS)), 0.25 / len(NOUNS))
    for m, s in enumerate(style):
        class_probs[m, list(STYLES[s].classes)] += 0.75 / len(STYLES[s].classes)
    cold = np.zeros(count, bool)
    cold[rng.permutation(count)[: max(1, round(cold_fraction * count))]] = True
    return Merchants([merchant_id(m) for m in range(count)], channel, city, basket, hue, width, brightness, weight,
                     class_probs / class_probs.sum(1, keepdims=True), cold)


def basket_eur(brightness: np.ndarray) -> np.ndarray:
    """The mean basket of merchants with this preferred brightness."""
    return 30 + 140 * (1 - brightness)


def tint(grey: np.ndarray, hue: float, saturation: float, value: float) -> np.ndarray:
    """A 28x28 white-on-black item as a tinted item on an off-white canvas, IMAGE_SIZE square."""
    mask = np.asarray(Image.fromarray(grey).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC), np.float32) / 255.0
    colour = np.array(colorsys.hsv_to_rgb(hue / 360.0, saturation, value), np.float32)
    rgb = (1 - mask[..., None]) * BACKGROUND + mask[..., None] * colour
    return np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8)


def build_catalogue(items_per_class: int, rng: np.random.Generator) -> Catalogue:
    dataset = fashion_mnist.load("train")
    sources = np.concatenate([rng.choice(np.flatnonzero(dataset.labels == c), items_per_class, replace=False)
                              for c in range(len(NOUNS))])
    n = len(sources)
    hue, saturation, value = rng.uniform(0, 360, n), rng.uniform(0.45, 1.0, n), rng.uniform(0.3, 1.0, n)
    images = np.stack([tint(dataset.images[s], h, c, v) for s, h, c, v in zip(sources, hue, saturation, value)])
    return Catalogue(images, dataset.labels[sources], hue, value)


def utility(merchants: Merchants, m, catalogue: Catalogue, items: np.ndarray) -> np.ndarray:
    """Hidden utility in [0, 1] of items [K] to merchant m (an index: [K]; an index array [D]: [D, K]): a bump
    around its preferred hue, a bump around its preferred brightness."""
    column = (lambda values: values[m][..., None]) if np.ndim(m) else (lambda values: values[m])
    distance = np.abs((catalogue.hue[items] - column(merchants.hue) + 180) % 360 - 180)
    hue_term = np.exp(-0.5 * (distance / column(merchants.hue_width)) ** 2)
    brightness_term = np.exp(-0.5 * ((catalogue.brightness[items] - column(merchants.brightness)) / BRIGHTNESS_WIDTH) ** 2)
    w = column(merchants.brightness_weight)
    return (1 - w) * hue_term + w * brightness_term


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


def feedback(u: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Event counts per candidate: impressions, the merchant's 1-2 selections (Plackett-Luce by Gumbel-max on
    u / temperature), shoppers' clicks, orders and returns on the selected items."""
    k = len(u)
    ranking = np.argsort(-(u / SELECTION_TEMPERATURE + rng.gumbel(size=k)))
    chosen = ranking[: rng.integers(1, 3)]
    counts = {name: np.zeros(k, np.int64) for name in ("impression", "select", "click", "order", "return")}
    counts["impression"][:] = 1
    counts["select"][chosen] = 1
    slope = SHOPPER_SLOPE * (u[chosen] - 0.5)
    clicks = rng.binomial(VIEWS, _sigmoid(_logit(CLICK_RATE) + slope))
    orders = rng.binomial(clicks, _sigmoid(_logit(ORDER_RATE) + slope))
    returns = rng.binomial(orders, _sigmoid(_logit(RETURN_RATE) - slope))
    counts["click"][chosen], counts["order"][chosen], counts["return"][chosen] = clicks, orders, returns
    return counts


def _requests(split: str, merchants: Merchants, size: StoreSize, rng: np.random.Generator) -> list[np.ndarray]:
    """The requesting merchant of every request, hour by hour."""
    if split == "train":
        seen = np.flatnonzero(~merchants.cold)
        return [rng.choice(seen, size.requests_per_hour) for _ in range(size.hours)]
    everyone = rng.permutation(np.repeat(np.arange(len(merchants.ids)), size.holdout_requests_per_merchant))
    return [everyone[i:i + size.requests_per_hour] for i in range(0, len(everyone), size.requests_per_hour)]


def write_split(root: str, split: str, merchants: Merchants, catalogue: Catalogue, refs: list[tuple[str, str]],
                size: StoreSize, seed: int, policy: LabelPolicy) -> tuple[int, int, int, list["Group"]]:
    """Write a split's partitions; returns (requests, events, partitions, every group's truth)."""
    layout = StoreLayout(root, split)
    rng = np.random.default_rng([seed, 7, split == "holdout"])
    pools = [np.flatnonzero(catalogue.classes == c) for c in range(len(NOUNS))]
    first_hour = 0 if split == "train" else size.hours
    requests = events = 0
    truth = []
    hours = _requests(split, merchants, size, rng)
    for hour_index, requesters in enumerate(hours):
        hour = START + dt.timedelta(hours=first_hour + hour_index)
        hour_us = int(hour.timestamp() * 1e6)
        rows: dict[str, list] = {name: [] for name in FEEDBACK_EVENT_SCHEMA.names}
        times: list[int] = []
        for n, m in enumerate(requesters):
            cls = int(rng.choice(len(NOUNS), p=merchants.class_probs[m]))
            items = rng.choice(pools[cls], GROUP_SIZE, replace=False)
            u = utility(merchants, m, catalogue, items)
            counts = feedback(u, rng)
            features, stats = merchants.features(m), merchants.stats(m)
            request_id = f"ext-{split[0]}{hour_index:03d}-{n:03d}-s{seed}"
            prompt = f"a {NOUNS[cls]}" if NOUNS[cls] != "trousers" else "trousers"
            start_us = hour_us + int(rng.integers(0, 2400)) * 1_000_000
            for event_type, delay_s in (("impression", 0), ("select", 60), ("click", 600), ("order", 900),
                                        ("return", 1100)):
                for position in np.repeat(np.arange(GROUP_SIZE), counts[event_type]):
                    rows["request_id"].append(request_id)
                    rows["merchant_id"].append(merchants.ids[m])
                    rows["merchant_features"].append(features)
                    rows["merchant_stats"].append(stats)
                    rows["prompt"].append(prompt)
                    ref, digest = refs[items[position]]
                    rows["image_ref"].append(ref)
                    rows["image_sha256"].append(digest)
                    rows["position"].append(int(position))
                    rows["event_type"].append(event_type)
                    rows["value"].append(stats["basket_eur"] if event_type == "order" else 1.0)
                    # Every impression at the request's start, feedback after it (never before its impression).
                    jitter_s = int(rng.integers(0, 240)) if delay_s else 0
                    times.append(start_us + (delay_s + jitter_s) * 1_000_000)
            truth.append(Group(int(m), items, u, is_positive(graded_labels(counts, policy), policy)))
            requests += 1
        rows["event_id"] = _event_ids(rows["request_id"], rows["position"], rows["event_type"])
        rows["event_time"] = event_times(times)
        table = pa.table({name: rows[name] for name in FEEDBACK_EVENT_SCHEMA.names}, schema=FEEDBACK_EVENT_SCHEMA)
        write_partition(layout, hour, table, f"ext-s{seed}")
        events += table.num_rows
    return requests, events, len(hours), truth


def _event_ids(request_ids: list[str], positions: list[int], event_types: list[str]) -> list[str]:
    """The n-th event of a type at a position of a request gets n (an order after two clicks is order.0)."""
    seen: dict[tuple, int] = {}
    ids = []
    for key in zip(request_ids, positions, event_types):
        n = seen.get(key, 0)
        seen[key] = n + 1
        ids.append(event_id(key[0], key[1], key[2], n))
    return ids


def groups_gauc(groups: list[Group], scores: list[np.ndarray]) -> float:
    """GAUC of per-group scores against the groups' binary labels (NaN without groups)."""
    if not groups:
        return float("nan")
    labels = np.concatenate([g.positive for g in groups])
    return gauc(np.concatenate(scores), labels, np.repeat(np.arange(len(groups)), GROUP_SIZE))


def expected_utility(draws: tuple[np.ndarray, np.ndarray], prior: Merchants, catalogue: Catalogue,
                     items: np.ndarray) -> np.ndarray:
    """E[utility | a merchant's observable features and the class it asks for] under the generator's own prior:
    the prior draws that show what the merchant shows, weighted by their likelihood (`posterior`) and by how
    often they ask for that class (a style favours some classes)."""
    keep, weight = draws
    weight = weight * prior.class_probs[keep, catalogue.classes[items[0]]]
    return (weight / weight.sum()) @ utility(prior, keep, catalogue, items)


def posterior(merchants: Merchants, m: int, prior: Merchants) -> tuple[np.ndarray, np.ndarray]:
    """Prior draws that show merchant m's channel and city, and their normalised basket_eur likelihoods."""
    match = (prior.channel == merchants.channel[m]) & (prior.city == merchants.city[m])
    weight = match * np.exp(-0.5 * ((basket_eur(prior.brightness) - merchants.basket[m]) / BASKET_NOISE) ** 2)
    keep = np.flatnonzero(weight > 1e-9 * weight.max())
    return keep, weight[keep] / weight[keep].sum()


def generate(root: str, size: StoreSize | str = "default", seed: int = 0,
             side_features: bool = True) -> ForeignStoreReport:
    """Write both splits of a foreign store under `root`; same seed and size, same bytes. side_features: also
    compute the side-feature ceiling (a few seconds per hundred holdout groups)."""
    size = SIZES[size] if isinstance(size, str) else size
    rng = np.random.default_rng([seed, 1])
    merchants = build_merchants(size.merchants, size.cold_fraction, rng)
    catalogue = build_catalogue(size.items_per_class, rng)
    images = ImageStore(StoreLayout(root).images_uri)
    refs = [images.put_array(image) for image in catalogue.images]
    policy = LabelPolicy()
    report = ForeignStoreReport(root=str(root), seen_ids=[i for i, c in zip(merchants.ids, merchants.cold) if not c],
                                cold_ids=[i for i, c in zip(merchants.ids, merchants.cold) if c])
    for split in ("train", "holdout"):
        requests, events, partitions, truth = write_split(root, split, merchants, catalogue, refs, size, seed, policy)
        report.groups[split], report.events[split], report.partitions[split] = requests, events, partitions
        if split == "holdout":
            prior = build_merchants(PRIOR_DRAWS, size.cold_fraction, np.random.default_rng([seed, 2])) \
                if side_features else None
            draws = {m: posterior(merchants, m, prior) for m in range(len(merchants.ids))} if side_features else {}
            for name in ("seen", "cold"):
                groups = [g for g in truth if merchants.cold[g.merchant] == (name == "cold")]
                report.ceiling[name] = groups_gauc(groups, [g.utility for g in groups])
                report.holdout_groups_with_preference[name] = sum(g.positive.any() and not g.positive.all()
                                                                  for g in groups)
                if prior is not None:
                    report.side_feature_ceiling[name] = groups_gauc(groups, [
                        expected_utility(draws[g.merchant], prior, catalogue, g.items) for g in groups])
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a foreign feedback store and print its ceiling.")
    parser.add_argument("--root", required=True, help="store root (data.root); should be empty")
    parser.add_argument("--size", choices=sorted(SIZES), default="default")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(generate(args.root, args.size, args.seed).summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
