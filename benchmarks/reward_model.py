"""Reward model throughput: training groups/s with 2 Ray Train + DeepSpeed workers against a
single-process plain PyTorch loop on the same model and data, and scoring images/s at batch sizes
1, 8 and 64, side by side in one run with the machine printed.

    .venv/bin/python benchmarks/reward_model.py [--epochs 2]

Needs ingested train groups under data.root (`./run demo` or `perfusion data ingest`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from perfusion_ray.runtime import machine
from perfusion_ray.config import load_config
from perfusion_ray.data.group_examples import load_groups
from perfusion_ray.data.store import StoreLayout
from perfusion_ray.models.clip_towers import load_clip
from perfusion_ray.models.reward_model import PerFusionRM, RewardModelConfig
from perfusion_ray.objectives import plackett_luce_loss
from perfusion_ray.records import Merchant


def plain_pytorch_groups_per_second(config, epochs: int) -> float:
    """The same model, loss and batch size in one process with torch AdamW (all threads)."""
    batch = load_groups(StoreLayout(config.data.root, "train"))
    model = PerFusionRM(load_clip(config.rm.clip), RewardModelConfig(towers=config.rm.towers, plugin=True))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.rm.lr)
    size = len(batch)
    step = config.rm.batch_groups * config.rm.num_workers  # the same global batch as the Ray run
    started = time.perf_counter()
    for _ in range(epochs):
        for start in range(0, size, step):
            part = batch.take(range(start, min(start + step, size)))
            inputs = model.inputs(*part.candidates())
            labels = torch.as_tensor(part.labels)
            loss, _ = plackett_luce_loss(model(**inputs).view(labels.shape), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return size * epochs / (time.perf_counter() - started)


def scoring_images_per_second(batch_size: int, images: int = 256) -> float:
    model = PerFusionRM(load_clip(), RewardModelConfig()).eval()
    pixels = np.random.default_rng(0).integers(0, 256, (images, 32, 32, 3), dtype=np.uint8)
    merchants = [Merchant("m0", {"region": "south"})] * images
    prompts = ["a dark red dress"] * images
    model.score(merchants[:8], prompts[:8], pixels[:8])  # the first CPU forward pays a one-off warm-up
    started = time.perf_counter()
    model.score(merchants, prompts, pixels, batch_size=batch_size)
    return images / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("out/bench-rm"))
    parser.add_argument("--scoring-only", action="store_true", help="skip the training comparison")
    args = parser.parse_args()
    # One thread per process, as Ray Train workers run (OMP_NUM_THREADS=1): on 2 cores shared with any other
    # job, a 2-thread process oversubscribes and slows down several-fold.
    torch.set_num_threads(1)
    config = load_config(None, [f"rm.out={args.out}", f"rm.epochs={args.epochs}", f"rm.patience={args.epochs}"])
    print(f"machine: {machine()}, torch threads in this process: {torch.get_num_threads()}")
    if not args.scoring_only:
        compare_training(config, args.epochs)
    print(f"\n{'scoring batch size':<20} {'images/s':>9}")
    for batch_size in (1, 8, 64):
        print(f"{batch_size:<20} {scoring_images_per_second(batch_size):>9.0f}")


def compare_training(config, epochs: int) -> None:
    from perfusion_ray.train.reward_model import train_reward_model

    ray_report = train_reward_model(config)
    plain = plain_pytorch_groups_per_second(config, epochs)
    print(f"\nRM training, {epochs} epochs, {config.rm.batch_groups * config.rm.num_workers} groups per step")
    print(f"{'':<48} {'groups/s':>9}")
    print(f"{'Ray Train + DeepSpeed ZeRO-' + str(config.rm.zero_stage) + ', 2 workers x 0.5 CPU':<48} "
          f"{ray_report.groups_per_second:>9.1f}")
    print(f"{'single-process plain PyTorch loop':<48} {plain:>9.1f}")
    print(f"ratio Ray/plain: {ray_report.groups_per_second / plain:.2f}x "
          f"(whole Ray run incl. start-up and validation: {ray_report.seconds:.0f}s)")


if __name__ == "__main__":
    main()
