"""Ablation of the generator on one feedback budget: the objective variants pl, multi_neg, pairwise, sft and
the field anchor dgpo with the personalized branch, and the branch replaced by a plain LoRA on the UNet (no merchant
input, pl objective). Each run is `perfusion align train --offline` (Ray Train + DeepSpeed, same steps
and groups per step) followed by `perfusion align eval` on the same held-out requests and noise; one
table: utility gain over the base, win rate, personalization index, class accuracy, wall time and
denoiser forward passes per group. Printed with the machine and written to
benchmarks/results/alignment_ablation.txt.

    .venv/bin/python -m benchmarks.alignment_ablation [--runs pl,pairwise] [--set align.max_steps=200]

Needs ingested train and holdout groups under data.root (`./run demo`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from perfusion_ray.runtime import machine
from perfusion_ray.config import load_config

RUNS = {  # name -> (variant, adapter)
    "pl": ("pl", "personalized"),
    "multi_neg": ("multi_neg", "personalized"),
    "pairwise": ("pairwise", "personalized"),
    "sft": ("sft", "personalized"),
    "dgpo": ("dgpo", "personalized"),
    "plain_lora": ("pl", "plain_lora"),
}


def run_one(config, name: str, root: Path) -> dict:
    from perfusion_ray.evaluation.alignment import evaluate_alignment
    from perfusion_ray.train.align_offline import train_alignment

    run = config.model_copy(deep=True)
    run.align.variant, run.align.adapter = RUNS[name]
    run.align.out = str(root / name)
    started = time.perf_counter()
    report = train_alignment(run)
    train_seconds = time.perf_counter() - started
    metrics = evaluate_alignment(run, report.pipeline_dir, root / name / "eval").metrics
    return {"run": name, "train_s": train_seconds, "passes": report.denoiser_passes_per_group,
            "groups": report.groups_trained, "metrics": metrics}


def table(rows: list[dict]) -> str:
    header = ("run", "utility gain seen", "utility gain cold", "win seen", "win cold", "personalization",
              "class acc", "train wall s", "passes/group")
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for row in rows:
        m = row["metrics"]
        lines.append(" | ".join([
            row["run"],
            f"{m['align.oracle.utility.aligned.seen'] - m['align.oracle.utility.base.seen']:+.4f}",
            f"{m['align.oracle.utility.aligned.cold'] - m['align.oracle.utility.base.cold']:+.4f}",
            f"{m['align.oracle.win_rate.seen']:.1%}", f"{m['align.oracle.win_rate.cold']:.1%}",
            f"{m['align.oracle.personalization']:+.4f} (base {m['align.oracle.personalization.base']:+.4f})",
            f"{m['align.fidelity.class_acc']:.1%} (base {m['align.fidelity.class_acc.base']:.1%})",
            f"{row['train_s']:.0f}", f"{row['passes']:.1f}"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, from {', '.join(RUNS)}")
    parser.add_argument("--work", type=Path, default=Path("out/bench-align"))
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/alignment_ablation.txt"))
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    names = [name.strip() for name in args.runs.split(",") if name.strip()]
    unknown = sorted(set(names) - set(RUNS))
    if unknown:
        parser.error(f"unknown runs {unknown}; choose from {', '.join(RUNS)}")
    rows = []
    for name in names:
        rows.append(run_one(config, name, args.work))
        print(f"[{name}] done in {rows[-1]['train_s']:.0f}s", flush=True)
    budget = (f"budget per run: {config.align.max_steps} steps x {config.align.batch_groups} groups x "
              f"{config.align.num_workers} workers, beta {config.align.beta}, lr {config.align.lr}, "
              f"K = {config.data.group_size}; eval {config.align.eval.requests_per_merchant} held-out "
              f"requests per merchant x {config.align.eval.images_per_request} images")
    report = "\n".join([machine(), budget, "", table(rows), ""])
    print(report)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
