"""`perfusion pretrain clip`: the embedded CLIP, trained contrastively on FashionWorld renders and their
captions by our own code (no hub weights exist for this world), then shipped in assets/embedded_clip/.

Each step renders fresh real Fashion-MNIST train items in random colours, shades and patterns, with
captions that name every attribute or, with probability `omit`, leave one out.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from perfusion_ray.models.clip_towers import EMBEDDED_CLIP, TEXT_LENGTH, pixel_values, small_clip_config, text_inputs
from perfusion_ray.models.tokenizer import clip_tokenizer
from perfusion_ray.world import fashion_mnist
from perfusion_ray.world.attributes import COLOURS, PATTERNS, SHADES, Attributes, render
from perfusion_ray.world.catalogue import prompt_text


def sample_batch(dataset, rng: np.random.Generator, size: int, image_size: int, omit: float):
    picks = rng.integers(0, len(dataset.labels), size)
    colours, shades, patterns = (rng.integers(0, len(v), size) for v in (COLOURS, SHADES, PATTERNS))
    images = np.stack([render(dataset.images[i], Attributes(COLOURS[c], SHADES[s], PATTERNS[p]), image_size)
                       for i, c, s, p in zip(picks, colours, shades, patterns)])
    keep = rng.random((size, 3)) >= omit
    prompts = [prompt_text(int(dataset.labels[i]), int(c) if k[0] else None, int(s) if k[1] else None,
                           int(p) if k[2] else None) for i, c, s, p, k in zip(picks, colours, shades, patterns, keep)]
    return images, prompts


def pretrain_clip(out: Path, steps: int, batch_size: int, lr: float, seed: int, omit: float, threads: int) -> dict:
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    dataset = fashion_mnist.load("train")
    tokenizer = clip_tokenizer()
    config = small_clip_config()
    from transformers import CLIPModel

    model = CLIPModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    started = time.perf_counter()
    curve = []
    bar = tqdm(range(steps), desc="pretrain clip", unit="step")
    for step in bar:
        images, prompts = sample_batch(dataset, rng, batch_size, config.vision_config.image_size, omit)
        output = model(**text_inputs(tokenizer, prompts, TEXT_LENGTH),
                       pixel_values=pixel_values(images, config.vision_config.image_size), return_loss=True)
        optimizer.zero_grad()
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))
        if step % 25 == 0 or step == steps - 1:
            accuracy = (output.logits_per_image.argmax(1) == torch.arange(batch_size)).float().mean().item()
            curve.append({"step": step, "seconds": time.perf_counter() - started, "loss": output.loss.item(),
                          "batch_retrieval_accuracy": accuracy})
            bar.set_postfix(loss=f"{output.loss.item():.3f}", acc=f"{accuracy:.2f}")
    model.save_pretrained(str(out))
    summary = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "omit": omit,
               "seconds": time.perf_counter() - started, "curve": curve,
               "command": f"perfusion pretrain clip --steps {steps} --batch-size {batch_size} --lr {lr} --seed {seed}"}
    (out / "training.json").write_text(json.dumps(summary, indent=2))
    return summary


def run(args) -> int:
    """The `perfusion pretrain clip` command (arguments defined in cli.py)."""
    out = args.out or EMBEDDED_CLIP
    summary = pretrain_clip(out, args.steps, args.batch_size, args.lr, args.seed, args.omit, args.threads)
    print(f"embedded CLIP written to {out} in {summary['seconds'] / 60:.1f} min; "
          f"final batch retrieval accuracy {summary['curve'][-1]['batch_retrieval_accuracy']:.2f}")
    return 0
