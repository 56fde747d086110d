"""Merchants: segments and hidden tastes from a taste-family YAML, observable side features.

A taste family is configuration, not code: any YAML of this shape runs unchanged.

    name: boutique
    perturbation: 0.3          # std of per-merchant noise on every taste weight
    feature_noise: 0.15        # chance a categorical side feature ignores the segment (correlated, not identical)
    segments:
      - name: romantic
        share: 0.4             # relative frequency of the segment among merchants
        taste:                 # hidden; unlisted values weigh 0
          colour: {pink: 1.0, red: 0.6}
          shade: {light: 0.5}
          pattern: {striped: -0.4}
        category_focus: {dress: 3.0, t-shirt: 1.0}   # how often they ask for each class (unlisted: 1)
        side_features:         # observable categorical features: a distribution per feature
          region: {south: 0.7, west: 0.3}
        stats:                 # observable numeric features: [mean, std]
          price_level: [0.8, 0.1]

Every segment must name the same side features and stats, so that all merchants share one schema.
Observable features also include `category_focus`, the class a merchant asks for most.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from perfusion_ray.errors import PerfusionError
from perfusion_ray.world.attributes import COLOURS, PATTERNS, PROFILE_NAMES, SHADES
from perfusion_ray.models.class_names import CLASS_NAMES

_VOCABULARY = {"colour": COLOURS, "shade": SHADES, "pattern": PATTERNS}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Segment(_Strict):
    name: str
    share: float = Field(gt=0)
    taste: dict[str, dict[str, float]] = {}
    category_focus: dict[str, float] = {}
    side_features: dict[str, dict[str, float]] = {}
    stats: dict[str, tuple[float, float]] = {}

    @field_validator("taste")
    @classmethod
    def _known_attributes(cls, taste: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        for attribute, weights in taste.items():
            if attribute not in _VOCABULARY:
                raise ValueError(f"unknown attribute {attribute!r}; known: {', '.join(_VOCABULARY)}")
            unknown = set(weights) - set(_VOCABULARY[attribute])
            if unknown:
                raise ValueError(f"unknown {attribute} {sorted(unknown)}; known: {', '.join(_VOCABULARY[attribute])}")
        return taste

    @field_validator("category_focus")
    @classmethod
    def _known_classes(cls, focus: dict[str, float]) -> dict[str, float]:
        unknown = set(focus) - set(CLASS_NAMES)
        if unknown:
            raise ValueError(f"unknown classes {sorted(unknown)}; known: {', '.join(CLASS_NAMES)}")
        if any(weight < 0 for weight in focus.values()):
            raise ValueError("category_focus weights must be >= 0")
        return focus

    @field_validator("side_features")
    @classmethod
    def _distributions(cls, features: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        for name, distribution in features.items():
            if name == "category_focus":
                raise ValueError("category_focus is derived from the taste, not a side feature to configure")
            if not distribution or any(p < 0 for p in distribution.values()) or sum(distribution.values()) <= 0:
                raise ValueError(f"side feature {name!r} needs non-negative weights with a positive sum")
        return features


class TasteFamily(_Strict):
    name: str
    perturbation: float = Field(0.3, ge=0)
    feature_noise: float = Field(0.15, ge=0, le=1)
    segments: list[Segment] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_schema(self) -> "TasteFamily":
        first = self.segments[0]
        for segment in self.segments[1:]:
            if set(segment.side_features) != set(first.side_features) or set(segment.stats) != set(first.stats):
                raise ValueError(
                    f"segment {segment.name!r} names other side features or stats than {first.name!r}; "
                    "all segments must share one schema"
                )
        return self

    def feature_values(self, feature: str) -> list[str]:
        return sorted({value for segment in self.segments for value in segment.side_features[feature]})


def load_taste_family(path: Path) -> TasteFamily:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise PerfusionError(f"taste family {path} does not exist", hint="world.taste_family is relative to the config file") from None
    except yaml.YAMLError as exc:
        raise PerfusionError(f"{path}: not valid YAML: {exc}") from None
    try:
        return TasteFamily.model_validate(raw)
    except ValidationError as exc:
        problems = "\n  ".join(
            f"{path}: {'.'.join(str(p) for p in e['loc'])}: {'unknown field' if e['type'] == 'extra_forbidden' else e['msg']}"
            for e in exc.errors()
        )
        raise PerfusionError(f"invalid taste family:\n  {problems}") from None


@dataclass(frozen=True)
class MerchantPopulation:
    """All merchants of a world, as arrays. Row i of every array is merchant ids[i]."""

    ids: list[str]
    segments: list[str]
    tastes: np.ndarray  # [M, len(PROFILE_NAMES)] hidden utility weights
    category_probs: np.ndarray  # [M, 10] how often each class is requested
    features: list[dict[str, str]]  # observable categorical side features
    stats: list[dict[str, float]]  # observable numeric side features
    cold_start: np.ndarray  # [M] bool: never in the training stream

    def index(self, merchant_id: str) -> int:
        return self.ids.index(merchant_id)

    @property
    def seen_indices(self) -> np.ndarray:
        return np.flatnonzero(~self.cold_start)


def _taste_vector(segment: Segment) -> np.ndarray:
    vector = np.zeros(len(PROFILE_NAMES))
    for attribute, weights in segment.taste.items():
        for value, weight in weights.items():
            vector[PROFILE_NAMES.index(f"{attribute}:{value}")] = weight
    return vector


def build_population(family: TasteFamily, num_merchants: int, cold_start_fraction: float, seed: int) -> MerchantPopulation:
    """Deterministic in (family, num_merchants, cold_start_fraction, seed)."""
    rng = np.random.default_rng([seed, 1])
    shares = np.array([segment.share for segment in family.segments])
    assignment = rng.choice(len(family.segments), size=num_merchants, p=shares / shares.sum())
    tastes, category_probs, features, stats = [], [], [], []
    for index in assignment:
        segment = family.segments[index]
        tastes.append(_taste_vector(segment) + rng.normal(0.0, family.perturbation, len(PROFILE_NAMES)))
        focus = np.array([segment.category_focus.get(name, 1.0) for name in CLASS_NAMES], dtype=np.float64)
        focus = focus * rng.lognormal(0.0, family.perturbation, len(CLASS_NAMES))
        category_probs.append(focus / focus.sum())
        row = {"category_focus": CLASS_NAMES[int(np.argmax(focus))]}
        for name, distribution in sorted(segment.side_features.items()):
            values = family.feature_values(name)
            if rng.random() < family.feature_noise:
                row[name] = values[rng.integers(len(values))]
            else:
                weights = np.array([distribution.get(value, 0.0) for value in values])
                row[name] = values[rng.choice(len(values), p=weights / weights.sum())]
        features.append(row)
        stats.append({name: float(rng.normal(mean, std)) for name, (mean, std) in sorted(segment.stats.items())})
    num_cold = max(1, int(round(cold_start_fraction * num_merchants)))
    cold = np.zeros(num_merchants, dtype=bool)
    cold[rng.choice(num_merchants, size=min(num_cold, num_merchants - 1), replace=False)] = True
    return MerchantPopulation(
        ids=[f"m{i:04d}" for i in range(num_merchants)],
        segments=[family.segments[i].name for i in assignment],
        tastes=np.array(tastes),
        category_probs=np.array(category_probs),
        features=features,
        stats=stats,
        cold_start=cold,
    )


def expected_taste(family: TasteFamily, features: list[dict[str, str]], stats: list[dict[str, float]],
                   samples: int = 20000, seed: int = 0) -> np.ndarray:
    """E[taste | observable side features] under the taste family: [M, len(PROFILE_NAMES)].

    The best any model can know about a merchant it has never seen: side features are drawn from the
    segment alone, so they tell the segment (a posterior), never the merchant's own perturbation of it.
    Exact Bayes over segments, since every observable is independent of the others given the segment:
    categorical features from their noisy segment distribution, stats from their Gaussian, and
    `category_focus` (the argmax of the perturbed focus) from a Monte Carlo estimate of its distribution.
    The perturbation has mean zero, so the expected taste is the posterior mix of segment tastes.
    """
    rng = np.random.default_rng([seed, 7])
    shares = np.array([segment.share for segment in family.segments])
    log_prior = np.log(shares / shares.sum())
    segment_tastes = np.stack([_taste_vector(segment) for segment in family.segments])
    focus_probs = []
    for segment in family.segments:
        focus = np.array([segment.category_focus.get(name, 1.0) for name in CLASS_NAMES], dtype=np.float64)
        draws = focus * rng.lognormal(0.0, family.perturbation, (samples, len(CLASS_NAMES)))
        counts = np.bincount(draws.argmax(1), minlength=len(CLASS_NAMES)) + 0.5  # smoothed
        focus_probs.append(counts / counts.sum())
    tastes = np.zeros((len(features), len(PROFILE_NAMES)))
    for row, (observed, numbers) in enumerate(zip(features, stats)):
        log_post = log_prior.copy()
        for k, segment in enumerate(family.segments):
            if observed.get("category_focus") in CLASS_NAMES:
                log_post[k] += np.log(focus_probs[k][CLASS_NAMES.index(observed["category_focus"])])
            for name, distribution in segment.side_features.items():
                if name not in observed:
                    continue
                values = family.feature_values(name)
                weights = np.array([distribution.get(value, 0.0) for value in values])
                noisy = (1 - family.feature_noise) * weights / weights.sum() + family.feature_noise / len(values)
                probability = noisy[values.index(observed[name])] if observed[name] in values else 1e-9
                log_post[k] += np.log(max(probability, 1e-12))
            for name, (mean, std) in segment.stats.items():
                if numbers.get(name) is not None and np.isfinite(numbers[name]):
                    log_post[k] += -0.5 * ((numbers[name] - mean) / std) ** 2 - np.log(std)
        posterior = np.exp(log_post - log_post.max())
        tastes[row] = (posterior / posterior.sum()) @ segment_tastes
    return tastes
