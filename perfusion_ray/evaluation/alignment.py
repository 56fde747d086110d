"""`perfusion align eval`: base vs aligned images on held-out requests, judged by the oracle and the judge.

For every merchant (seen and cold start: a merchant absent from the train split's groups) a few held-out
requests (by default only those where the environment says the merchant's taste can show), K images each
from the base model and from the aligned pipeline, from the same starting noise. Each available judge
scores them: the environment's oracle when it has one, and the judge of evaluation/judge.py (a reward
model trained only on held-out feedback) when it has been trained. Metrics (keys of metrics.json), per
judge `by` (oracle or judge):
- align.<by>.utility.base / .aligned: mean utility of the images for the requesting merchant;
- align.<by>.win_rate: share of requests whose aligned group has a higher mean utility than the base group
  on the same noise (ties count half); _low / _high: its 95% Wilson interval over align.requests requests;
- align.<by>.personalization(.base): utility for the requesting merchant minus the mean utility for the
  other merchants, of the aligned (base) images;
each also per split with a .seen / .cold suffix. With both judges, align.agreement.*: the rank correlation
of their per-request gains (aligned minus base) and the win-rate differences (judge minus oracle).
Fidelity: align.fidelity.class_acc(.base), the project's Fashion-MNIST classifier names the requested class
(when the base is the embedded one); plus the environment's own measures (FashionWorld: colour_acc).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from perfusion_ray.config import PerfusionConfig
from perfusion_ray.environment import Environment
from perfusion_ray.errors import PerfusionError
from perfusion_ray.evaluation.judge import OracleJudge, UtilityJudge
from perfusion_ray.metrics import wilson_interval
from perfusion_ray.records import Merchant, Request

SPLITS = ("all", "seen", "cold")


@dataclass
class EvalRequests:
    requests: list[Request]
    cold: np.ndarray  # [R] bool: the merchant is absent from the train split's groups

    @property
    def prompts(self) -> list[str]:
        return [r.prompt for r in self.requests]

    @property
    def merchants(self) -> list[Merchant]:
        return [r.merchant for r in self.requests]


@dataclass
class AlignEvaluation:
    metrics: dict[str, float]
    requests: EvalRequests
    base_images: np.ndarray  # [R*K, H, W, 3]
    aligned_images: np.ndarray
    utilities: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # by -> base / aligned -> [R*K]


def evaluation_requests(config: PerfusionConfig, environment: Environment) -> EvalRequests:
    """Held-out requests in request-id order: the first align.eval.requests_per_merchant of every merchant, or
    align.eval.requests_per_split of each split (seen, cold start) taken round-robin over its merchants."""
    from perfusion_ray.data.group_examples import read_group_table
    from perfusion_ray.data.store import StoreLayout
    from perfusion_ray.evaluation.reward_model import train_merchant_ids

    table = read_group_table(StoreLayout(config.data.root, "holdout"))
    if table.num_rows == 0:
        raise PerfusionError(f"no held-out group examples under {config.data.root}",
                             hint="ingest the store's holdout split (`perfusion data ingest --split holdout`)")
    rows = sorted(table.select(["request_id", "merchant_id", "merchant_features", "merchant_stats", "prompt"])
                  .to_pylist(), key=lambda r: r["request_id"])
    evaluation = config.align.eval
    by_merchant: dict[str, list[Request]] = {}
    for row in rows:
        if evaluation.open_only and not environment.prompt_is_open(row["prompt"] or ""):
            continue
        by_merchant.setdefault(row["merchant_id"], []).append(
            Request(row["request_id"], Merchant.from_record(row), row["prompt"] or ""))
    if not by_merchant:
        raise PerfusionError("no held-out request qualifies for evaluation",
                             hint="set align.eval.open_only=false to evaluate every held-out request")
    seen = train_merchant_ids(config.data.root)
    if evaluation.requests_per_split is None:
        picked = [r for requests in by_merchant.values() for r in requests[:evaluation.requests_per_merchant]]
    else:
        picked = []
        for cold in (False, True):
            split = [requests for merchant, requests in by_merchant.items() if (merchant not in seen) == cold]
            picked += _round_robin(split, evaluation.requests_per_split)
    picked.sort(key=lambda r: r.request_id)
    return EvalRequests(picked, np.array([r.merchant.id not in seen for r in picked]))


def _round_robin(queues: list[list[Request]], count: int) -> list[Request]:
    """Up to `count` requests, one from each queue in turn (each merchant's in request-id order)."""
    picked, depth = [], 0
    while len(picked) < count and any(depth < len(q) for q in queues):
        picked += [q[depth] for q in queues if depth < len(q)][: count - len(picked)]
        depth += 1
    return picked


def win_rate(aligned: np.ndarray, base: np.ndarray) -> float:
    """Share of groups (rows) where aligned beats base on mean utility; ties count half."""
    a, b = aligned.mean(1), base.mean(1)
    return float(((a > b) + 0.5 * (a == b)).mean()) if len(a) else float("nan")


def _suffix(split: str) -> str:
    """The metrics.json key suffix of a split: '' for all requests, '.seen' / '.cold' otherwise."""
    return "" if split == "all" else f".{split}"


def primary_judge(metrics: dict) -> str:
    """The judge whose numbers a table shows first: the oracle where there is one, else the judge."""
    return "oracle" if "align.oracle.win_rate" in metrics else "judge"


def win_rate_text(metrics: dict, suffix: str = "", by: str | None = None) -> str:
    """'70.8% (58%-81%, n=72)': a win rate with its 95% interval, for tables (the rate alone if absent)."""
    key = f"align.{by or primary_judge(metrics)}"
    rate = f"{metrics[f'{key}.win_rate{suffix}']:.1%}"
    if f"{key}.win_rate_low{suffix}" not in metrics:
        return rate
    return (f"{rate} ({metrics[f'{key}.win_rate_low{suffix}']:.0%}-{metrics[f'{key}.win_rate_high{suffix}']:.0%}, "
            f"n={metrics[f'align.requests{suffix}']})")


def judged_metrics(judge: UtilityJudge, requests: EvalRequests, k: int, base_images: np.ndarray,
                   aligned_images: np.ndarray) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Every align.<judge>.* metric of the module docstring, and the per-image utilities it rests on."""
    merchants = [m for m in requests.merchants for _ in range(k)]
    prompts = [p for p in requests.prompts for _ in range(k)]
    population = requests.merchants
    own, others = {}, {}
    for name, images in (("base", base_images), ("aligned", aligned_images)):
        own[name], others[name] = judge.utilities(merchants, prompts, images, population)
    request_masks = {"all": np.ones(len(requests.requests), bool), "seen": ~requests.cold, "cold": requests.cold}
    prefix, metrics = f"align.{judge.name}", {}
    for split, mask in request_masks.items():
        if not mask.any():
            continue
        suffix, images = _suffix(split), np.repeat(mask, k)
        rate = win_rate(own["aligned"].reshape(-1, k)[mask], own["base"].reshape(-1, k)[mask])
        low, high = wilson_interval(rate, int(mask.sum()))
        metrics.update({f"{prefix}.win_rate{suffix}": rate, f"{prefix}.win_rate_low{suffix}": low,
                        f"{prefix}.win_rate_high{suffix}": high, f"align.requests{suffix}": int(mask.sum())})
        for name in ("base", "aligned"):
            metrics[f"{prefix}.utility.{name}{suffix}"] = float(own[name][images].mean())
            gap = float((own[name][images] - others[name][images]).mean())
            metrics[f"{prefix}.personalization{'.base' if name == 'base' else ''}{suffix}"] = gap
    return metrics, own


def agreement_metrics(metrics: dict[str, float], utilities: dict[str, dict[str, np.ndarray]], k: int,
                      requests: EvalRequests) -> dict[str, float]:
    """How far the judge agrees with the oracle: the Spearman correlation of their per-request gains and the
    win-rate differences (judge minus oracle), overall and per split."""
    from perfusion_ray.metrics import spearman

    gains = {by: (u["aligned"] - u["base"]).reshape(-1, k).mean(1) for by, u in utilities.items()}
    out = {"align.agreement.rank_correlation": spearman(gains["oracle"], gains["judge"])}
    for split in SPLITS:
        suffix = _suffix(split)
        if f"align.oracle.win_rate{suffix}" in metrics and f"align.judge.win_rate{suffix}" in metrics:
            out[f"align.agreement.win_rate_difference{suffix}"] = (metrics[f"align.judge.win_rate{suffix}"]
                                                                   - metrics[f"align.oracle.win_rate{suffix}"])
    return out


def fidelity_metrics(config: PerfusionConfig, environment: Environment, classifier, requests: EvalRequests, k: int,
                     images: dict[str, np.ndarray]) -> dict[str, float]:
    from perfusion_ray.models.class_names import requested_class

    prompts = [p for p in requests.prompts for _ in range(k)]
    metrics: dict[str, float] = {}
    classes = np.array([requested_class(p) for p in prompts])
    named = classes >= 0
    for name, batch in images.items():
        suffix = "" if name == "aligned" else ".base"
        if classifier is not None and named.any():
            metrics[f"align.fidelity.class_acc{suffix}"] = float((classifier.predict(batch[named]) == classes[named]).mean())
        if environment.oracle is not None:
            for measure, value in environment.oracle.fidelity(prompts, batch).items():
                metrics[f"align.fidelity.{measure}{suffix}"] = value
    if "align.fidelity.class_acc" in metrics:
        metrics["align.fidelity.class_acc.drop"] = metrics["align.fidelity.class_acc.base"] - metrics["align.fidelity.class_acc"]
    return metrics


def evaluate_pipeline(config: PerfusionConfig, pipeline, environment: Environment, classifier, base_pipeline=None,
                      judges: list[UtilityJudge] | None = None) -> AlignEvaluation:
    """Sample base and aligned groups for the held-out requests and score them (see the module docstring).

    `base_pipeline` draws the base images (default: `pipeline` without a merchant, which is the base model
    for the personalized branch but not for a pipeline whose UNet was fine-tuned, like the plain-LoRA
    ablation). `judges`: default the environment's oracle alone."""
    evaluation = config.align.eval
    requests = evaluation_requests(config, environment)
    if judges is None:
        judges = [OracleJudge(environment.oracle)] if environment.oracle is not None else []
    if not judges:
        raise PerfusionError("nothing can judge the generated images: the environment has no oracle and there is "
                             "no judge", hint="train one with `perfusion rm train --judge` (on held-out feedback)")
    k = evaluation.images_per_request
    count = len(requests.requests) * k
    latents = torch.randn((count, *pipeline.base.latent_shape), generator=torch.Generator().manual_seed(evaluation.seed))
    options = dict(num_images_per_prompt=k, latents=latents, output_type="np", batch_size=evaluation.batch_size,
                   num_inference_steps=config.policy.num_inference_steps, guidance_scale=config.policy.guidance_scale,
                   personalize_unconditional=config.policy.personalize_unconditional)
    base_images = (base_pipeline or pipeline)(requests.prompts, merchant=None, **options).images
    aligned_images = pipeline(requests.prompts, merchant=requests.merchants, **options).images
    metrics, utilities = {}, {}
    for judge in judges:
        judged, own = judged_metrics(judge, requests, k, base_images, aligned_images)
        metrics.update(judged)
        utilities[judge.name] = own
    if {"oracle", "judge"} <= utilities.keys():
        metrics.update(agreement_metrics(metrics, utilities, k, requests))
    metrics.update(fidelity_metrics(config, environment, classifier, requests, k,
                                    {"aligned": aligned_images, "base": base_images}))
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


def same_prompt_grid(config: PerfusionConfig, pipeline, base_pipeline, prompt: str, merchants: list[Merchant],
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


def evaluate_alignment(config: PerfusionConfig, pipeline_dir: str | Path, out_dir: str | Path | None = None,
                       judge_dir: str | Path | None = None, environment: Environment | None = None) -> AlignEvaluation:
    """Load the exported pipeline, evaluate it with every judge available (the environment's oracle, the
    trained judge), write metrics.json and grid.png into out_dir."""
    from perfusion_ray.environment import build_environment
    from perfusion_ray.evaluation.judge import load_judge
    from perfusion_ray.models.base import load_base
    from perfusion_ray.models.classifier import load_classifier
    from perfusion_ray.models.pipeline import PerFusionPipeline
    from perfusion_ray.storage import is_file, join, local_directory, write_bytes, write_json

    if not is_file(join(pipeline_dir, "model_index.json")):
        raise PerfusionError(f"{pipeline_dir} is not an exported pipeline (no model_index.json)",
                             hint="run `perfusion align train --offline` or `perfusion align` first")
    environment = environment or build_environment(config)
    judges = [OracleJudge(environment.oracle)] if environment.oracle is not None else []
    judge = load_judge(config, judge_dir)
    if judge is not None:
        judges.append(judge)
    elif judge_dir is not None:
        raise PerfusionError(f"no judge at {judge_dir}", hint="train one with `perfusion rm train --judge`")
    pipeline = PerFusionPipeline.from_pretrained(str(local_directory(pipeline_dir)))
    pipeline.set_progress_bar_config(disable=True)
    base = PerFusionPipeline.from_base(load_base(config.policy.base))  # the frozen base, whatever the policy
    base.set_progress_bar_config(disable=True)
    classifier = load_classifier() if config.policy.base == "embedded" else None
    evaluation = evaluate_pipeline(config, pipeline, environment, classifier, base, judges)
    if out_dir is not None:  # a local folder or a URI
        write_json(join(out_dir, "metrics.json"), dict(sorted(evaluation.metrics.items())))
        write_bytes(join(out_dir, "grid.png"), grid_png(comparison_grid(evaluation, config.align.eval.images_per_request)))
    return evaluation


def grid_png(grid: np.ndarray, scale: int = 3) -> bytes:
    """PNG bytes, upscaled without smoothing (32x32 items are small to look at)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    image = Image.fromarray(grid)
    image.resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(buffer, format="PNG")
    return buffer.getvalue()
