"""`perfusion pretrain base`: pretrain the embedded base diffusion model on FashionWorld, and measure it.

Three stages, each reusing its result from the work folder when present (so rerunning the same command
after an interruption continues where it stopped; `--fresh` starts over):

1. classifier: the Fashion-MNIST judge (models/classifier.py), a CNN on luminance, trained on colourised
   renders of the train split; test accuracy on colourised renders of the test split.
2. autoencoder: the plain conv autoencoder (models/autoencoder.py), 32x32x3 <-> 4x8x8, L1 + MSE on
   renders; then its latent scaling factor (1 / std). Measured by the judge and the oracle on
   reconstructions of test renders.
3. unet: UNet2DConditionModel + 2-layer CLIPTextModel on the real CLIP BPE vocabulary, jointly, in the
   autoencoder's latent space: v-prediction, cosine (squaredcos_cap_v2) schedule, AdamW, EMA, 10% empty
   prompts for classifier-free guidance. Training data are renders of random train items in random
   colour/shade/pattern with prompts from world.catalogue.prompt_text, each attribute left out with the
   config's world.omit probabilities, so the model learns the spread over what a prompt leaves open.
   Every --eval-every-minutes of training time the EMA model samples --curve-samples images (DDIM 20
   steps, guidance 4): requested-class accuracy by the judge, requested-colour accuracy by the oracle's
   colour_probabilities argmax. That is the accuracy-vs-training-time curve (curve.json, curve.png).

At the end the EMA weights are written to --out (default assets/embedded_base/) in Stable Diffusion's
layout (UNet and text encoder in fp16), with the judge, the curve, a sample grid and metrics.json of a
final evaluation on --eval-samples images plus as many prompts that name only the class (spread of
colours and shades). Single process, plain torch: on 2 CPU cores Ray Train's start-up and gloo
all-reduce buy nothing for a 4M-parameter model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from perfusion_ray.errors import PerfusionError
from perfusion_ray.weights_only import load_weights_only

DEFAULT_WORK = Path("out/pretrain_base")
COMMAND = "perfusion pretrain base"


# ---------------------------------------------------------------- arguments
def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The arguments of `perfusion pretrain base` (added to `parser` when given). Imports no torch."""
    from perfusion_ray.config import REPO_ROOT

    EMBEDDED_DIR = REPO_ROOT / "assets" / "embedded_base"  # noqa: N806 (models.base.EMBEDDED_DIR, without torch)
    if parser is None:
        parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
        parser.add_argument("--config", type=Path, default=None, help="YAML config (default fashionworld.yaml)")
        parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                            help="override one config field (repeatable); world.* drives the training data")
    add = parser.add_argument
    add("--stage", choices=["all", "classifier", "autoencoder", "unet", "eval", "export"], default="all",
        help="run one stage (later stages need the earlier ones' results in --work); default all")
    add("--out", type=Path, default=EMBEDDED_DIR, help=f"where the shipped weights go (default {EMBEDDED_DIR})")
    add("--work", type=Path, default=DEFAULT_WORK, help=f"checkpoints and intermediate results (default {DEFAULT_WORK})")
    add("--fresh", action="store_true", help="ignore results already in --work and start every stage over")
    add("--seed", type=int, default=0)
    add("--threads", type=int, default=1,
        help="torch threads; 1 (default) is far steadier when the cores are shared: 2 threads under contention ran 5-10x slower")
    add("--classifier-epochs", type=int, default=4)
    add("--classifier-items", type=int, default=None, help="train on the first N train items only (smoke runs)")
    add("--autoencoder-steps", type=int, default=2500)
    add("--autoencoder-batch", type=int, default=64)
    add("--autoencoder-lr", type=float, default=1e-3)
    add("--unet-steps", type=int, default=2400,
        help="total UNet steps; rerunning with a larger number continues from the checkpoint in --work")
    add("--unet-batch", type=int, default=128)
    add("--unet-lr", type=float, default=1e-3)
    add("--ema-decay", type=float, default=0.999)
    add("--empty-prompt-prob", type=float, default=0.1, help="share of empty prompts (classifier-free guidance)")
    add("--eval-every-minutes", type=float, default=5.0, help="training minutes between points of the curve")
    add("--checkpoint-every-minutes", type=float, default=2.0,
        help="training minutes between UNet checkpoints in --work (a killed run resumes from the last one)")
    add("--curve-samples", type=int, default=80, help="images per point of the curve")
    add("--eval-samples", type=int, default=200, help="images of the final evaluation (and as many for spread)")
    add("--guidance", type=float, default=4.0, help="classifier-free guidance scale of the evaluations")
    add("--inference-steps", type=int, default=20, help="DDIM steps of the evaluations")
    add("--quick", action="store_true",
        help="a smoke run of a minute or two: tiny stages, tiny evaluations (never ship its weights)")
    return parser


def main_pretrain_base(argv: list[str] | None = None) -> int:
    """Entry point of `perfusion pretrain base` (argv without the subcommand words)."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    except PerfusionError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return 2


def _apply_quick(args: argparse.Namespace) -> None:
    args.classifier_epochs = min(args.classifier_epochs, 1)
    args.classifier_items = min(args.classifier_items or 2000, 2000)
    args.autoencoder_steps = min(args.autoencoder_steps, 30)
    args.unet_steps = min(args.unet_steps, 30)
    args.unet_batch = min(args.unet_batch, 32)
    args.eval_every_minutes = min(args.eval_every_minutes, 0.25)
    args.curve_samples = min(args.curve_samples, 8)
    args.eval_samples = min(args.eval_samples, 8)
    args.inference_steps = min(args.inference_steps, 4)


# ---------------------------------------------------------------- the data
@dataclass
class Batch:
    images: np.ndarray  # uint8 [B, S, S, 3]
    classes: np.ndarray
    colours: np.ndarray
    shades: np.ndarray
    patterns: np.ndarray


class WorldStream:
    """Random catalogue renders of real Fashion-MNIST items with prompts that leave attributes out."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, image_size: int, omit: dict[str, float],
                 empty_prompt_prob: float):
        self.images, self.labels = images, labels
        self.image_size = image_size
        self.omit = omit
        self.empty_prompt_prob = empty_prompt_prob

    def batch(self, rng: np.random.Generator, size: int, indices: np.ndarray | None = None) -> Batch:
        from perfusion_ray.world.attributes import COLOURS, PATTERNS, SHADES, Attributes, render

        idx = rng.integers(0, len(self.labels), size) if indices is None else indices
        n = len(idx)
        colours, shades, patterns = rng.integers(0, 8, n), rng.integers(0, 2, n), rng.integers(0, 2, n)
        images = np.stack([
            render(self.images[i], Attributes(COLOURS[c], SHADES[h], PATTERNS[p]), self.image_size)
            for i, c, h, p in zip(idx, colours, shades, patterns)])
        return Batch(images, self.labels[idx], colours, shades, patterns)

    def prompts(self, rng: np.random.Generator, batch: Batch) -> list[str]:
        from perfusion_ray.world.catalogue import prompt_text

        out = []
        for cls, colour, shade, pattern in zip(batch.classes, batch.colours, batch.shades, batch.patterns):
            if rng.random() < self.empty_prompt_prob:
                out.append("")
                continue
            keep = [rng.random() >= self.omit[name] for name in ("colour", "shade", "pattern")]
            out.append(prompt_text(int(cls), int(colour) if keep[0] else None, int(shade) if keep[1] else None,
                                   int(pattern) if keep[2] else None))
        return out


# ---------------------------------------------------------------- bookkeeping
class Curve:
    """Points of the accuracy-vs-training-time curve, kept in a JSON file in the work folder."""

    def __init__(self, path: Path):
        self.path = path
        self.points: list[dict] = json.loads(path.read_text()) if path.is_file() else []

    def add(self, **point) -> None:
        self.points.append(point)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.points, indent=1) + "\n")

    def drop_stage(self, stage: str) -> None:
        self.points = [p for p in self.points if p.get("stage") != stage]


def _progress(total: int, initial: int, desc: str):
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, mininterval=0.5 if tty else 30.0,
                file=sys.stderr)


def _log(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stdout)
    sys.stdout.flush()


def _cosine_lr(step: int, total: int, peak: float, warmup: int, floor: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------- stage 1: the judge
def train_classifier(args, train, test, work: Path, curve: Curve) -> dict:
    import torch
    from torch.nn import functional as F

    from perfusion_ray.models.classifier import FashionClassifier, to_luminance

    folder = work / "classifier"
    if (folder / "config.json").is_file() and not args.fresh:
        _log(f"classifier: reusing {folder}")
        return json.loads((folder / "metrics.json").read_text())
    curve.drop_stage("classifier")
    torch.manual_seed(args.seed)
    model = FashionClassifier()
    items = args.classifier_items or len(train.labels)
    batch_size, started, train_seconds = 128, time.time(), 0.0
    steps_per_epoch = math.ceil(items / batch_size)
    total = args.classifier_epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    test_rng = np.random.default_rng([args.seed, 11])
    test_items = np.arange(1000 if args.quick else len(test.labels))  # quick: smoke runs measure nothing
    test_batch = test.batch(test_rng, 0, indices=test_items)
    bar = _progress(total, 0, "classifier")
    step = 0
    for epoch in range(args.classifier_epochs):
        rng = np.random.default_rng([args.seed, 1, epoch])
        order = rng.permutation(items)
        model.train()
        tick = time.time()
        for start in range(0, items, batch_size):
            batch = train.batch(rng, 0, indices=order[start:start + batch_size])
            lum = to_luminance(batch.images)
            shift = rng.integers(-2, 3, 2)  # small translations: generated items are not always centred
            lum = np.roll(lum, tuple(int(s) for s in shift), axis=(2, 3))
            for group in optimizer.param_groups:
                group["lr"] = _cosine_lr(step, total, 2e-3, 50, 5e-5)
            loss = F.cross_entropy(model(torch.from_numpy(lum)), torch.from_numpy(batch.classes))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        train_seconds += time.time() - tick
        accuracy = float((model.eval().predict(test_batch.images) == test_batch.classes).mean())
        curve.add(stage="classifier", epoch=epoch + 1, step=step, train_seconds=round(train_seconds, 1),
                  test_accuracy=accuracy)
        _log(f"classifier epoch {epoch + 1}: test accuracy {accuracy:.4f} on colourised test renders "
             f"({train_seconds / 60:.1f} min)")
    bar.close()
    model.eval()
    grey = np.repeat(test.images[test_items, :, :, None], 3, axis=3)
    grey = np.pad(grey, ((0, 0), (2, 2), (2, 2), (0, 0))) if test.image_size == 32 else grey
    metrics = {"test_accuracy_colourised": accuracy,
               "test_accuracy_grey": float((model.predict(grey) == test.labels[test_items]).mean()),
               "train_seconds": round(train_seconds, 1), "wall_seconds": round(time.time() - started, 1),
               "epochs": args.classifier_epochs, "train_items": items}
    model.save_pretrained(str(folder), safe_serialization=True)
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    _log(f"classifier: {metrics}")
    return metrics


# ---------------------------------------------------------------- stage 2: the autoencoder
def evaluate_autoencoder(vae, classifier, batch: Batch) -> dict:
    import torch

    from perfusion_ray.models.base import images_to_model
    from perfusion_ray.world.oracle import colour_probabilities, light_probability

    with torch.no_grad():
        x = images_to_model(batch.images)
        recon = torch.cat([vae(x[i:i + 256]) for i in range(0, len(x), 256)])
        mse = float(((recon.clamp(-1, 1) - x) ** 2).mean())
        images = ((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return {"mse": mse,
            "recon_class_accuracy": float((classifier.predict(images) == batch.classes).mean()),
            "original_class_accuracy": float((classifier.predict(batch.images) == batch.classes).mean()),
            "recon_colour_accuracy": float((colour_probabilities(images).argmax(1) == batch.colours).mean()),
            "recon_shade_accuracy": float(((light_probability(images) > 0.5) == (batch.shades == 0)).mean())}


def train_autoencoder(args, train, test, classifier, work: Path, curve: Curve):
    import torch
    from torch.nn import functional as F

    from perfusion_ray.models.autoencoder import TinyAutoencoder
    from perfusion_ray.models.base import EMBEDDED_VAE, images_to_model

    folder = work / "vae"
    if (folder / "config.json").is_file() and not args.fresh:
        _log(f"autoencoder: reusing {folder}")
        return TinyAutoencoder.from_pretrained(str(folder)).eval(), json.loads((folder / "metrics.json").read_text())
    curve.drop_stage("autoencoder")
    torch.manual_seed(args.seed)
    vae = TinyAutoencoder(**{**EMBEDDED_VAE, "sample_size": train.image_size})
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.autoencoder_lr, weight_decay=0.0)
    held_out = test.batch(np.random.default_rng([args.seed, 12]), 200 if args.quick else 1000)
    total = args.autoencoder_steps
    eval_every = max(1, math.ceil(total / 6))
    bar = _progress(total, 0, "autoencoder")
    train_seconds, started, smooth = 0.0, time.time(), None
    for step in range(total):
        tick = time.time()
        rng = np.random.default_rng([args.seed, 2, step])
        x = images_to_model(train.batch(rng, args.autoencoder_batch).images)
        for group in optimizer.param_groups:
            group["lr"] = _cosine_lr(step, total, args.autoencoder_lr, 50, args.autoencoder_lr * 0.05)
        recon = vae(x)
        loss = F.mse_loss(recon, x) + F.l1_loss(recon, x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        train_seconds += time.time() - tick
        smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{smooth:.4f}", refresh=False)
        if (step + 1) % eval_every == 0 or step + 1 == total:
            vae.eval()
            metrics = evaluate_autoencoder(vae, classifier, held_out)
            vae.train()
            curve.add(stage="autoencoder", step=step + 1, train_seconds=round(train_seconds, 1), **metrics)
            _log(f"autoencoder step {step + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                 + f" ({train_seconds / 60:.1f} min)")
    bar.close()
    vae.eval()
    with torch.no_grad():
        sample = images_to_model(train.batch(np.random.default_rng([args.seed, 13]), 2048).images)
        latents = torch.cat([vae.encode(sample[i:i + 256]).latent_dist.mode() for i in range(0, 2048, 256)])
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    metrics = {**metrics, "scaling_factor": scaling, "latent_mean": float(latents.mean()), "steps": total,
               "batch": args.autoencoder_batch, "train_seconds": round(train_seconds, 1),
               "wall_seconds": round(time.time() - started, 1)}
    vae.save_pretrained(str(folder), safe_serialization=True)
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    _log(f"autoencoder: {metrics}")
    return vae, metrics


# ---------------------------------------------------------------- evaluation of a base model
def evaluation_prompts(num: int, seed: int, spread: bool = False) -> tuple[list[str], dict[str, np.ndarray]]:
    """Balanced requests: class cycles, colour cycles (shuffled), shade and pattern named or left out.

    spread=True: prompts that name only the class ('a dress'), to see what the model does with the rest.
    """
    from perfusion_ray.world.catalogue import prompt_text

    rng = np.random.default_rng([seed, 21 if spread else 20])
    classes = np.arange(num) % 10
    colours = rng.permutation(np.resize(np.arange(8), num))
    shades = rng.integers(-1, 2, num)  # -1 = left out
    patterns = rng.integers(-1, 2, num)
    if spread:
        prompts = [prompt_text(int(c)) for c in classes]
        return prompts, {"classes": classes}
    prompts = [prompt_text(int(c), int(k), None if h < 0 else int(h), None if p < 0 else int(p))
               for c, k, h, p in zip(classes, colours, shades, patterns)]
    return prompts, {"classes": classes, "colours": colours, "shades": shades, "patterns": patterns}


def evaluate_base(base, classifier, num_samples: int, seed: int = 0, guidance_scale: float = 4.0,
                  num_inference_steps: int = 20, spread_samples: int = 0) -> dict:
    """Fidelity of a base model on FashionWorld prompts.

    class_accuracy: the judge names the requested class; colour_accuracy: the oracle's dominant hue is
    the requested colour; shade_accuracy on prompts that name a shade. With spread_samples, prompts that
    name only the class: the share of each colour and of light items, and the normalised entropy of the
    colour histogram (1.0 = uniform over 8 colours, as in the training data).
    """
    from perfusion_ray.world.attributes import COLOURS
    from perfusion_ray.world.oracle import colour_probabilities, light_probability

    started = time.time()
    prompts, want = evaluation_prompts(num_samples, seed)
    images = base.sample(prompts, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, seed=seed)
    colours = colour_probabilities(images).argmax(1)
    light = light_probability(images) > 0.5
    named_shade = want["shades"] >= 0
    result = {
        "samples": num_samples, "guidance_scale": guidance_scale, "inference_steps": num_inference_steps,
        "class_accuracy": float((classifier.predict(images) == want["classes"]).mean()),
        "colour_accuracy": float((colours == want["colours"]).mean()),
        "shade_accuracy": float((light[named_shade] == (want["shades"][named_shade] == 0)).mean())
        if named_shade.any() else None,
    }
    if spread_samples:
        prompts, want = evaluation_prompts(spread_samples, seed, spread=True)
        images = base.sample(prompts, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                             seed=seed + 1)
        hist = np.bincount(colour_probabilities(images).argmax(1), minlength=8) / len(images)
        nonzero = hist[hist > 0]
        result["spread"] = {
            "samples": spread_samples,
            "class_accuracy": float((classifier.predict(images) == want["classes"]).mean()),
            "colour_shares": {name: round(float(share), 3) for name, share in zip(COLOURS, hist)},
            "colour_entropy": float(-(nonzero * np.log(nonzero)).sum() / np.log(8)),
            "colours_seen": int((hist > 0).sum()),
            "max_colour_share": float(hist.max()),
            "light_share": float((light_probability(images) > 0.5).mean()),
        }
    result["seconds"] = round(time.time() - started, 1)
    return result


# ---------------------------------------------------------------- stage 3: the UNet
def _ema_update(ema_module, module, decay: float) -> None:
    import torch

    ema_params = [p for p in ema_module.parameters()]
    params = [p.detach() for p in module.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


def _state_path(work: Path) -> Path:
    return work / "unet_state.pt"


def _save_state(work: Path, state: dict) -> None:
    import torch

    path = _state_path(work)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train_unet(args, train, vae, classifier, work: Path, curve: Curve):
    import torch
    from diffusers import DDPMScheduler
    from torch.nn import functional as F

    from perfusion_ray.models.base import build_embedded, images_to_model

    base = build_embedded(seed=args.seed, image_size=train.image_size)
    base.vae = vae.eval().requires_grad_(False)
    unet, text_encoder = base.unet, base.text_encoder
    ema = build_embedded(seed=args.seed, image_size=train.image_size)
    ema.vae = base.vae
    ema.unet.load_state_dict(unet.state_dict())
    ema.text_encoder.load_state_dict(text_encoder.state_dict())
    ema.eval()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=0.0)
    step, train_seconds = 0, 0.0
    if _state_path(work).is_file() and not args.fresh:
        state = load_weights_only(_state_path(work))  # data only: the work folder may be shared
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        ema.unet.load_state_dict(state["ema_unet"])
        ema.text_encoder.load_state_dict(state["ema_text_encoder"])
        optimizer.load_state_dict(state["optimizer"])
        step, train_seconds = state["step"], state["train_seconds"]
        _log(f"unet: resuming at step {step} ({train_seconds / 60:.1f} training minutes)")
    elif args.fresh:
        curve.drop_stage("unet")
    noise_scheduler = DDPMScheduler.from_config(base.scheduler.config)
    scaling = float(vae.config.scaling_factor)
    token_cache: dict[str, torch.Tensor] = {}

    def tokens(prompts: list[str]) -> torch.Tensor:
        missing = sorted({p for p in prompts if p not in token_cache})
        if missing:
            for prompt, ids in zip(missing, base.tokenize(missing)):
                token_cache[prompt] = ids
        return torch.stack([token_cache[p] for p in prompts])

    def checkpoint() -> None:
        _save_state(work, {"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                           "ema_unet": ema.unet.state_dict(), "ema_text_encoder": ema.text_encoder.state_dict(),
                           "optimizer": optimizer.state_dict(), "step": step, "train_seconds": train_seconds,
                           "scaling_factor": scaling})

    def evaluate() -> None:
        result = evaluate_base(ema, classifier, args.curve_samples, seed=args.seed,
                               guidance_scale=args.guidance, num_inference_steps=args.inference_steps)
        curve.add(stage="unet", step=step, train_seconds=round(train_seconds, 1),
                  loss=round(smooth, 5) if smooth is not None else None,
                  **{k: result[k] for k in ("class_accuracy", "colour_accuracy", "shade_accuracy", "samples")})
        _log(f"unet step {step} ({train_seconds / 60:.1f} min): class {result['class_accuracy']:.3f}, "
             f"colour {result['colour_accuracy']:.3f}, shade {result['shade_accuracy']:.3f} "
             f"on {result['samples']} samples ({result['seconds']:.0f}s)")

    total = args.unet_steps
    bar = _progress(total, step, "unet")
    smooth = None
    next_eval = (math.floor(train_seconds / (60 * args.eval_every_minutes)) + 1) * 60 * args.eval_every_minutes
    last_checkpoint = train_seconds
    if step == 0:
        evaluate()
    unet.train()
    text_encoder.train()
    while step < total:
        tick = time.time()
        rng = np.random.default_rng([args.seed, 3, step])
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        batch = train.batch(rng, args.unet_batch)
        prompts = train.prompts(rng, batch)
        with torch.no_grad():
            latents = vae.encode(images_to_model(batch.images)).latent_dist.mode() * scaling
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        target = noise_scheduler.get_velocity(latents, noise, t)
        for group in optimizer.param_groups:
            group["lr"] = args.unet_lr * min(1.0, (step + 1) / 100)
        context = text_encoder(tokens(prompts))[0]
        loss = F.mse_loss(unet(noisy, t, encoder_hidden_states=context).sample, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            _ema_update(ema.unet, unet, decay)
            _ema_update(ema.text_encoder, text_encoder, decay)
        step += 1
        train_seconds += time.time() - tick
        smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{smooth:.4f}", min=f"{train_seconds / 60:.1f}", refresh=False)
        if train_seconds >= next_eval or step == total:
            next_eval = (math.floor(train_seconds / (60 * args.eval_every_minutes)) + 1) * 60 * args.eval_every_minutes
            checkpoint()
            evaluate()
            last_checkpoint = train_seconds
        elif train_seconds - last_checkpoint >= 60 * args.checkpoint_every_minutes:
            checkpoint()
            last_checkpoint = train_seconds
    bar.close()
    checkpoint()
    return ema, {"steps": step, "batch": args.unet_batch, "train_seconds": round(train_seconds, 1)}


def load_unet_state(args, train, vae):
    """The EMA model from the work folder's checkpoint (for --stage eval/export)."""
    from perfusion_ray.models.base import build_embedded

    if not _state_path(args.work).is_file():
        raise PerfusionError(f"no UNet checkpoint in {args.work}", hint="run the unet stage first")
    state = load_weights_only(_state_path(args.work))
    ema = build_embedded(seed=args.seed, image_size=train.image_size)
    ema.vae = vae.eval()
    ema.unet.load_state_dict(state["ema_unet"])
    ema.text_encoder.load_state_dict(state["ema_text_encoder"])
    return ema.eval(), {"steps": state["step"], "batch": args.unet_batch, "train_seconds": state["train_seconds"]}


# ---------------------------------------------------------------- export
def sample_grid(base, seed: int, guidance_scale: float, steps: int) -> np.ndarray:
    """Rows: the 10 classes; columns: the 8 colours ('a red dress'); then a column of class-only prompts."""
    from perfusion_ray.world.catalogue import prompt_text

    prompts = [prompt_text(c, k) for c in range(10) for k in range(8)] + [prompt_text(c) for c in range(10)]
    images = base.sample(prompts, guidance_scale=guidance_scale, num_inference_steps=steps, seed=seed)
    coloured, plain = images[:80].reshape(10, 8, *images.shape[1:]), images[80:][:, None]
    gap = np.full((10, 1, *images.shape[1:]), 255, np.uint8)
    rows = np.concatenate([coloured, gap, plain], axis=1)  # [10, 10, S, S, 3]
    grid = rows.transpose(0, 2, 1, 3, 4).reshape(10 * images.shape[1], 10 * images.shape[2], 3)
    return np.kron(grid, np.ones((2, 2, 1), np.uint8))


def plot_curve(points: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    unet = [p for p in points if p.get("stage") == "unet"]
    auto = [p for p in points if p.get("stage") == "autoencoder"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    if unet:
        minutes = [p["train_seconds"] / 60 for p in unet]
        ax.plot(minutes, [p["class_accuracy"] for p in unet], "o-", label="requested class (judge)")
        ax.plot(minutes, [p["colour_accuracy"] for p in unet], "s-", label="requested colour (oracle)")
        if all(p.get("shade_accuracy") is not None for p in unet):
            ax.plot(minutes, [p["shade_accuracy"] for p in unet], "^-", alpha=0.6, label="requested shade")
    ax.axhline(0.6, color="C0", ls="--", lw=0.8, label="class target 60%")
    ax.axhline(0.8, color="C1", ls="--", lw=0.8, label="colour target 80%")
    ax.axhline(0.1, color="grey", ls=":", lw=0.8, label="class chance 10%")
    ax.set(xlabel="UNet training time (minutes, CPU)", ylabel="accuracy of EMA samples", ylim=(0, 1.02),
           title="embedded base: fidelity over training")
    ax.legend(fontsize=7, loc="lower right")
    ax = axes[1]
    if auto:
        minutes = [p["train_seconds"] / 60 for p in auto]
        ax.plot(minutes, [p["recon_class_accuracy"] for p in auto], "o-", label="class kept (judge)")
        ax.plot(minutes, [p["recon_colour_accuracy"] for p in auto], "s-", label="colour kept (oracle)")
        ax.axhline(auto[-1]["original_class_accuracy"], color="C0", ls="--", lw=0.8, label="judge on originals")
    ax.set(xlabel="autoencoder training time (minutes, CPU)", ylabel="on reconstructions of test renders",
           ylim=(0, 1.02), title="autoencoder 32x32x3 <-> 4x8x8")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def export(args, ema, classifier, curve: Curve, metrics: dict) -> None:
    from PIL import Image

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    ema.save_pretrained(out, fp16=True, with_tokenizer=False)
    classifier.save_pretrained(str(out / "classifier"), safe_serialization=True)
    (out / "curve.json").write_text(json.dumps(curve.points, indent=1) + "\n")
    if not plot_curve(curve.points, out / "curve.png"):
        _log("matplotlib is not installed: curve.png skipped (curve.json has the numbers)")
    Image.fromarray(sample_grid(ema, args.seed, args.guidance, args.inference_steps)).save(out / "samples.png")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    _log(f"exported to {out} ({size / 2**20:.1f} MiB)")


# ---------------------------------------------------------------- the command
def run(args: argparse.Namespace) -> int:
    import torch

    from perfusion_ray.config import load_config
    from perfusion_ray.models.classifier import FashionClassifier
    from perfusion_ray.world import fashion_mnist

    if args.quick:
        _apply_quick(args)
    config = load_config(getattr(args, "config", None), getattr(args, "set", []) or [])
    torch.set_num_threads(max(1, args.threads))
    with contextlib.suppress(RuntimeError):  # already set in this process
        torch.set_num_interop_threads(1)
    fashion_dir = config.resolve_input(config.world.fashion_mnist_dir) if config.world.fashion_mnist_dir else None
    size = config.world.image_size
    omit = config.world.omit.model_dump()
    train_set, test_set = fashion_mnist.load("train", fashion_dir), fashion_mnist.load("test", fashion_dir)
    train = WorldStream(train_set.images, train_set.labels, size, omit, args.empty_prompt_prob)
    test = WorldStream(test_set.images, test_set.labels, size, omit, args.empty_prompt_prob)
    args.work.mkdir(parents=True, exist_ok=True)
    curve = Curve(args.work / "curve.json")
    argv = getattr(args, "argv", None)
    if argv is None:  # wired into the `perfusion` parser: the words after `pretrain base`
        argv = sys.argv[1:]
        argv = argv[2:] if argv[:2] == ["pretrain", "base"] else []
    command = " ".join([COMMAND] + [shlex.quote(a) for a in argv])
    _log(f"pretrain base: stage {args.stage}, work {args.work}, out {args.out}, {args.threads} torch thread(s)")

    stages = {"all": ("classifier", "autoencoder", "unet"), "classifier": ("classifier",),
              "autoencoder": ("classifier", "autoencoder"), "unet": ("classifier", "autoencoder", "unet"),
              "eval": (), "export": ()}[args.stage]
    classifier_metrics = train_classifier(args, train, test, args.work, curve) if "classifier" in stages else \
        json.loads((args.work / "classifier" / "metrics.json").read_text())
    classifier = FashionClassifier.from_pretrained(str(args.work / "classifier")).eval()
    if args.stage == "classifier":
        return 0
    if "autoencoder" in stages:
        vae, vae_metrics = train_autoencoder(args, train, test, classifier, args.work, curve)
    else:
        from perfusion_ray.models.autoencoder import TinyAutoencoder

        vae = TinyAutoencoder.from_pretrained(str(args.work / "vae")).eval()
        vae_metrics = json.loads((args.work / "vae" / "metrics.json").read_text())
    if args.stage == "autoencoder":
        return 0
    ema, unet_metrics = train_unet(args, train, vae, classifier, args.work, curve) if "unet" in stages else \
        load_unet_state(args, train, vae)
    _log(f"final evaluation on {args.eval_samples} + {args.eval_samples} samples ...")
    final = evaluate_base(ema, classifier, args.eval_samples, seed=args.seed + 1000, guidance_scale=args.guidance,
                          num_inference_steps=args.inference_steps, spread_samples=args.eval_samples)
    _log("final: " + json.dumps(final))
    metrics = {
        "evaluation": final,
        "stages": {"classifier": classifier_metrics, "autoencoder": vae_metrics, "unet": unet_metrics},
        "training_minutes": {
            "classifier": round(classifier_metrics["train_seconds"] / 60, 1),
            "autoencoder": round(vae_metrics["train_seconds"] / 60, 1),
            "unet": round(unet_metrics["train_seconds"] / 60, 1)},
        "parameters": {name: sum(p.numel() for p in module.parameters()) for name, module in ema.modules().items()},
        "command": command, "threads": args.threads, "quick": bool(args.quick),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
                   f"Python {platform.python_version()}, torch {torch.__version__}",
    }
    if args.stage != "eval":
        export(args, ema, classifier, curve, metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main_pretrain_base())
