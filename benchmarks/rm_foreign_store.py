"""Reward model quality on a feedback store FashionWorld did not write, against that store's ceiling.

generate (tests/foreign_store.py: its own merchants, side features, tinting and continuous hue /
brightness tastes) -> `perfusion data ingest --engine local` -> `perfusion rm train` (the default
recipe unless --set says otherwise) -> GAUC of PerFusionRM.score on the holdout groups, seen and
cold-start merchants (cold: absent from the train split's groups), beside the store's ceiling (GAUC of
the true utilities on the same groups) and the ratio. `--store fashionworld` runs the same chain on
FashionWorld's default config (`world simulate` instead of the generator) and takes the oracle ceiling
from `perfusion rm eval`. Each run retrains on the same store; the machine and load are printed.

    .venv/bin/python -m benchmarks.rm_foreign_store [--runs 2] [--size default|tiny] [--work DIR]
    .venv/bin/python -m benchmarks.rm_foreign_store --store fashionworld [--runs 2]
    .venv/bin/python -m benchmarks.rm_foreign_store --set rm.image_head_channels=0   # the frozen-only recipe
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from perfusion_ray.config import load_config
from perfusion_ray.data.group_examples import load_groups, read_group_table
from perfusion_ray.data.store import StoreLayout
from perfusion_ray.metrics import gauc
from perfusion_ray.models.reward_model import load_reward_model
from perfusion_ray.runtime import machine

PERFUSION = [sys.executable, "-m", "perfusion_ray.cli"]
TARGETS = {"foreign": {"seen": 0.90, "cold": 0.85}}  # share of the store's ceiling


def perfusion(*args: str, timeout_s: float = 3600) -> tuple[float, str]:
    """Run one CLI command; (seconds, stdout). A failure raises with the end of its output."""
    started = time.perf_counter()
    done = subprocess.run([*PERFUSION, *args], capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"perfusion {' '.join(args)} failed ({done.returncode}):\n{done.stdout[-2000:]}"
                           f"{done.stderr[-3000:]}")
    return time.perf_counter() - started, done.stdout


def holdout_gauc(root: str, model_dir: Path, threshold: float) -> dict[str, float]:
    """GAUC of the exported model on the holdout groups of seen and of cold-start merchants."""
    seen_ids = set(read_group_table(StoreLayout(root, "train"))["merchant_id"].to_pylist())
    holdout = load_groups(StoreLayout(root, "holdout"))
    scores = load_reward_model(model_dir).score(*holdout.candidates()).reshape(holdout.labels.shape)
    positive = holdout.labels > threshold
    cold = np.array([m.id not in seen_ids for m in holdout.merchants])
    result = {}
    for subset, rows in (("seen", ~cold), ("cold", cold)):
        s, p = scores[rows], positive[rows]
        result[subset] = gauc(s.reshape(-1), p.reshape(-1), np.repeat(np.arange(len(p)), p.shape[1]))
    return result


def make_foreign_store(root: str, size: str, seed: int) -> dict[str, float]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.foreign_store import generate

    report = generate(root, size, seed)
    print(report.summary())
    return report.ceiling


def make_fashionworld_store(root: str) -> None:
    seconds, _ = perfusion("world", "simulate", "--split", "both", "--set", f"data.root={root}")
    print(f"FashionWorld simulated under {root} ({seconds:.0f}s)")


def fashionworld_ceiling(root: str, rm_out: str) -> dict[str, float]:
    """The oracle ceiling on the holdout groups, from `perfusion rm eval` (metrics.json)."""
    perfusion("rm", "eval", "--set", f"data.root={root}", "--set", f"rm.out={rm_out}")
    metrics = json.loads((Path(rm_out) / "metrics.json").read_text())
    return {"seen": metrics["rm.gauc.oracle"], "cold": metrics["rm.gauc.oracle.cold"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", choices=("foreign", "fashionworld"), default="foreign")
    parser.add_argument("--size", choices=("default", "tiny"), default="default", help="foreign store size")
    parser.add_argument("--seed", type=int, default=0, help="foreign store seed")
    parser.add_argument("--runs", type=int, default=1, help="rm train runs on the same store (rm.seed 0, 1, ...)")
    parser.add_argument("--work", help="folder for the store and the runs (default: a temporary one, removed)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="passed to `rm train`")
    args = parser.parse_args(argv)
    print(machine())
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="rm-foreign-"))
    root = str(work / "data")
    if Path(root).exists():
        shutil.rmtree(root)
    ceiling = make_foreign_store(root, args.size, args.seed) if args.store == "foreign" else None
    if ceiling is None:
        make_fashionworld_store(root)
    seconds, out = perfusion("data", "ingest", "--engine", "local", "--set", f"data.root={root}")
    print(out.strip())
    threshold = load_config(None, []).data.label_policy.positive_threshold
    rows = []
    for run in range(args.runs):
        rm_out = str(work / f"rm-{run}")
        load_before = os.getloadavg()[0]
        seconds, _ = perfusion("rm", "train", "--set", f"data.root={root}", "--set", f"rm.out={rm_out}",
                               "--set", f"rm.seed={run}", *[f"--set={o}" for o in args.overrides])
        if ceiling is None:
            ceiling = fashionworld_ceiling(root, rm_out)
        rows.append((run, seconds, load_before, os.getloadavg()[0], holdout_gauc(root, Path(rm_out) / "model", threshold)))
        run, seconds, before, after, result = rows[-1]
        print(f"run {run}: rm train {seconds:.0f}s (1-min load {before:.1f} -> {after:.1f}); GAUC seen "
              f"{result['seen']:.3f} ({result['seen'] / ceiling['seen']:.1%} of {ceiling['seen']:.3f}), cold "
              f"{result['cold']:.3f} ({result['cold'] / ceiling['cold']:.1%} of {ceiling['cold']:.3f})", flush=True)
    for subset in ("seen", "cold"):
        values = [r[4][subset] for r in rows]
        target = TARGETS.get(args.store, {}).get(subset)
        print(f"{args.store} {subset}: GAUC {' / '.join(f'{v:.3f}' for v in values)} (mean {np.mean(values):.3f}) "
              f"= {np.mean(values) / ceiling[subset]:.1%} of the ceiling {ceiling[subset]:.3f}"
              + (f" (target {target:.0%})" if target else ""))
    print(f"rm train: {' / '.join(f'{r[1]:.0f}s' for r in rows)}; recipe overrides: {args.overrides or 'none'}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
