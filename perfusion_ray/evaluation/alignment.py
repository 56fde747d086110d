"""`perfusion align eval`: base vs aligned images on held-out requests, judged by the oracle.

For every merchant (seen and cold start) a few held-out requests (by default only those that leave
colour, shade or pattern open: there the merchant's taste can show), K images each from the base model
and from the aligned pipeline, from the same starting noise. Metrics (keys of metrics.json):
- align.utility.base / .aligned: mean oracle utility of the images under the requesting merchant's taste;
- align.win_rate: share of requests whose aligned group has a higher mean utility than the base group on
  the same noise (ties count half); align.win_rate_low / _high: its 95% Wilson interval over
  align.requests requests (two requests per merchant place a cold-start rate within about +-20 points);
- align.personalization(.base): utility under the merchant's own taste minus the mean utility under the
  other merchants' tastes, for the aligned (base) images;
- align.fidelity.class_acc(.base): the project's Fashion-MNIST judge names the requested class;
  align.fidelity.colour_acc(.base): the dominant hue is the requested colour, on prompts that name one.
Each also per split with a .seen / .cold suffix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from perfusion_ray.config import PerfusionConfig
from perfusion_ray.data.group_examples import read_groups
from perfusion_ray.errors import PerfusionError
from perfusion_ray.metrics import wilson_interval
from perfusion_ray.world.catalogue import parse_prompt


@dataclass
class EvalRequests:
    merchants: list[dict]  # merchant records, one per request
    prompts: list[str]
    cold: np.ndarray  # [R] bool
    taste_rows: np.ndarray  # [R] index into world.merchants
    classes: np.ndarray  # [R] requested class
    colours: np.ndarray  # [R] requested colour, -1 when left open


@dataclass
class AlignEvaluation:
    metrics: dict[str, float]
    requests: EvalRequests
    base_images: np.ndarray  # [R*K, H, W, 3]
    aligned_images: np.ndarray
    utilities: dict[str, np.ndarray] = field(default_factory=dict)  # base / aligned, [R*K]


def evaluation_requests(config: PerfusionConfig, world) -> EvalRequests:
    """Held-out requests, the first few per merchant in request-id order."""
    table = read_groups(config.data.root, "holdout")
    if table.num_rows == 0:
        raise PerfusionError(f"no held-out group examples under {config.data.root}",
                             hint="run `perfusion world simulate` and `perfusion data ingest` (both splits) first")
    rows = sorted(table.select(["request_id", "merchant_id", "merchant_features", "merchant_stats", "prompt"])
                  .to_pylist(), key=lambda r: r["request_id"])
    wanted = config.align.eval.requests_per_merchant
    taken: dict[str, int] = {}
    picked = []
    for row in rows:
        attributes = parse_prompt(row["prompt"])
        if config.align.eval.open_only and not attributes.open:
            continue
        if taken.get(row["merchant_id"], 0) >= wanted or row["merchant_id"] not in world.merchants.ids:
            continue
        taken[row["merchant_id"]] = taken.get(row["merchant_id"], 0) + 1
        picked.append((row, attributes))
    index = [world.merchants.index(row["merchant_id"]) for row, _ in picked]
    return EvalRequests(
        merchants=[{"merchant_id": row["merchant_id"], "merchant_features": dict(row["merchant_features"] or []),
                    "merchant_stats": dict(row["merchant_stats"] or [])} for row, _ in picked],
        prompts=[row["prompt"] for row, _ in picked],
        cold=world.merchants.cold_start[index],
        taste_rows=np.array(index),
        classes=np.array([a.cls for _, a in picked]),
        colours=np.array([-1 if a.colour is None else a.colour for _, a in picked]),
    )


def win_rate(aligned: np.ndarray, base: np.ndarray) -> float:
    """Share of groups (rows) where aligned beats base on mean utility; ties count half."""
    a, b = aligned.mean(1), base.mean(1)
    return float(((a > b) + 0.5 * (a == b)).mean()) if len(a) else float("nan")


def win_rate_text(metrics: dict, suffix: str = "") -> str:
    """'70.8% (58%-81%, n=72)': a win rate with its 95% interval, for tables (the rate alone if absent)."""
    rate = f"{metrics[f'align.win_rate{suffix}']:.1%}"
    if f"align.win_rate_low{suffix}" not in metrics:
        return rate
    return (f"{rate} ({metrics[f'align.win_rate_low{suffix}']:.0%}-{metrics[f'align.win_rate_high{suffix}']:.0%}, "
            f"n={metrics[f'align.requests{suffix}']})")


def personalization_index(tastes: np.ndarray, own_rows: np.ndarray, profiles: np.ndarray) -> float:
    """Mean over images of utility under the requesting merchant's taste minus the mean under the others'."""
    from perfusion_ray.world.oracle import utility

    all_utilities = utility(tastes, profiles)  # [M, N]
    own = all_utilities[own_rows, np.arange(len(own_rows))]
    others = (all_utilities.sum(0) - own) / (len(tastes) - 1)
    return float((own - others).mean()) if len(own) else float("nan")


def _suffix(split: str) -> str:
    """The metrics.json key suffix of a split: '' for all requests, '.seen' / '.cold' otherwise."""
    return "" if split == "all" else f".{split}"


def _split_metrics(prefix: str, values: dict[str, float | np.ndarray], masks: dict[str, np.ndarray], reduce) -> dict:
    out = {}
    for split, mask in masks.items():
        suffix = _suffix(split)
        for name, value in values.items():
            if mask.any():
                out[f"{prefix}.{name}{suffix}"] = reduce(value, mask)
    return out


def evaluate_pipeline(config: PerfusionConfig, pipeline, world, classifier, base_pipeline=None) -> AlignEvaluation:
    """Sample base and aligned groups for the held-out requests and score them (see the module docstring).

    `base_pipeline` draws the base images (default: `pipeline` without a merchant, which is the base model
    for the personalized branch but not for a pipeline whose UNet was fine-tuned, like the plain-LoRA
    ablation)."""
    from perfusion_ray.world.oracle import attribute_profile, colour_probabilities, utility

    evaluation = config.align.eval
    requests = evaluation_requests(config, world)
    k = evaluation.images_per_request
    count = len(requests.prompts) * k
    latent_shape = pipeline.base.latent_shape
    latents = torch.randn((count, *latent_shape), generator=torch.Generator().manual_seed(evaluation.seed))
    options = dict(num_images_per_prompt=k, latents=latents, output_type="np", batch_size=evaluation.batch_size,
                   num_inference_steps=config.policy.num_inference_steps, guidance_scale=config.policy.guidance_scale,
                   personalize_unconditional=config.policy.personalize_unconditional)
    base_images = (base_pipeline or pipeline)(requests.prompts, merchant=None, **options).images
    aligned_images = pipeline(requests.prompts, merchant=requests.merchants, **options).images

    tastes = world.merchants.tastes
    own_rows = np.repeat(requests.taste_rows, k)
    image_masks = {"all": np.ones(count, bool), "seen": ~np.repeat(requests.cold, k), "cold": np.repeat(requests.cold, k)}
    request_masks = {"all": np.ones(len(requests.prompts), bool), "seen": ~requests.cold, "cold": requests.cold}
    profiles = {"base": attribute_profile(base_images), "aligned": attribute_profile(aligned_images)}
    utilities = {name: utility(tastes, p)[own_rows, np.arange(count)] for name, p in profiles.items()}
    metrics = _split_metrics("align.utility", utilities, image_masks, lambda v, m: float(v[m].mean()))
    grouped = {name: u.reshape(-1, k) for name, u in utilities.items()}
    for split, mask in request_masks.items():
        if mask.any():  # the rate, and the 95% range a rate on this many requests allows
            suffix, count = _suffix(split), int(mask.sum())
            rate = win_rate(grouped["aligned"][mask], grouped["base"][mask])
            low, high = wilson_interval(rate, count)
            metrics.update({f"align.win_rate{suffix}": rate, f"align.win_rate_low{suffix}": low,
                            f"align.win_rate_high{suffix}": high, f"align.requests{suffix}": count})
    for split, mask in image_masks.items():
        suffix = _suffix(split)
        if mask.any():
            metrics[f"align.personalization{suffix}"] = personalization_index(tastes, own_rows[mask],
                                                                              profiles["aligned"][mask])
            metrics[f"align.personalization.base{suffix}"] = personalization_index(tastes, own_rows[mask],
                                                                                   profiles["base"][mask])
    classes, colours = np.repeat(requests.classes, k), np.repeat(requests.colours, k)
    named_colour = colours >= 0
    for name, images in (("aligned", aligned_images), ("base", base_images)):
        suffix = "" if name == "aligned" else ".base"
        metrics[f"align.fidelity.class_acc{suffix}"] = float((classifier.predict(images) == classes).mean())
        if named_colour.any():
            dominant = colour_probabilities(images[named_colour]).argmax(1)
            metrics[f"align.fidelity.colour_acc{suffix}"] = float((dominant == colours[named_colour]).mean())
    metrics["align.fidelity.class_acc.drop"] = metrics["align.fidelity.class_acc.base"] - metrics["align.fidelity.class_acc"]
    return AlignEvaluation(metrics, requests, base_images, aligned_images, utilities)


def comparison_grid(evaluation: AlignEvaluation, k: int, merchants: int = 6) -> np.ndarray:
    """Rows: one request per merchant (seen first, then cold); columns: K base images | K aligned images."""
    order = list(np.flatnonzero(~evaluation.requests.cold)[:merchants // 2 + merchants % 2]) + \
        list(np.flatnonzero(evaluation.requests.cold)[:merchants // 2])
    rows = []
    for r in order:
        base = evaluation.base_images[r * k:(r + 1) * k]
        aligned = evaluation.aligned_images[r * k:(r + 1) * k]
        gap = np.full((base.shape[1], 4, 3), 255, np.uint8)
        rows.append(np.concatenate([*base, gap, *aligned], axis=1))
    return np.concatenate(rows, axis=0) if rows else np.zeros((0, 0, 3), np.uint8)


def same_prompt_grid(config: PerfusionConfig, pipeline, base_pipeline, prompt: str, merchants: list[dict],
                     seed: int = 0) -> np.ndarray:
    """One prompt and one seed for everyone: the first row is the base model's K images, then one row of
    aligned images per merchant, so what differs between rows is the merchant alone."""
    k = config.align.eval.images_per_request
    latents = torch.randn((k, *pipeline.base.latent_shape), generator=torch.Generator().manual_seed(seed))
    options = dict(num_images_per_prompt=k, output_type="np", num_inference_steps=config.policy.num_inference_steps,
                   guidance_scale=config.policy.guidance_scale,
                   personalize_unconditional=config.policy.personalize_unconditional)
    base = base_pipeline([prompt], merchant=None, latents=latents, **options).images
    aligned = pipeline([prompt] * len(merchants), merchant=merchants, latents=latents.repeat(len(merchants), 1, 1, 1),
                       **options).images
    rows = [base] + [aligned[i * k:(i + 1) * k] for i in range(len(merchants))]
    gap = np.full((4, k * base.shape[2], 3), 255, np.uint8)
    return np.concatenate([np.concatenate([gap, np.concatenate(list(row), axis=1)]) for row in rows])[4:]


def evaluate_alignment(config: PerfusionConfig, pipeline_dir: str | Path, out_dir: str | Path | None = None
                       ) -> AlignEvaluation:
    """Load the exported pipeline, evaluate it, write metrics.json and grid.png into out_dir."""
    from perfusion_ray.models.base import load_base
    from perfusion_ray.models.classifier import load_classifier
    from perfusion_ray.models.pipeline import PerFusionPipeline
    from perfusion_ray.storage import atomic_write_json
    from perfusion_ray.world.simulator import build_world

    pipeline_dir = Path(pipeline_dir)
    if not (pipeline_dir / "model_index.json").is_file():
        raise PerfusionError(f"{pipeline_dir} is not an exported pipeline (no model_index.json)",
                             hint="run `perfusion align train --offline` first")
    pipeline = PerFusionPipeline.from_pretrained(str(pipeline_dir))
    pipeline.set_progress_bar_config(disable=True)
    base = PerFusionPipeline.from_base(load_base(config.policy.base))  # the frozen base, whatever the policy
    base.set_progress_bar_config(disable=True)
    evaluation = evaluate_pipeline(config, pipeline, build_world(config), load_classifier(), base)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_dir / "metrics.json", dict(sorted(evaluation.metrics.items())))
        save_grid(comparison_grid(evaluation, config.align.eval.images_per_request), out_dir / "grid.png")
    return evaluation


def save_grid(grid: np.ndarray, path: Path, scale: int = 3) -> None:
    """PNG, upscaled without smoothing (32x32 items are small to look at)."""
    from PIL import Image

    image = Image.fromarray(grid)
    image.resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)
