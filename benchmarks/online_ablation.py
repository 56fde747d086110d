"""The online rounds with each group objective on the same feedback and the same reward model: pl, the
field anchor dgpo, pairwise Diffusion-DPO and sft (or any subset), one table.

Prepared once: FashionWorld's training stream minus its last online.live_hours hours and the holdout split,
ingested; the RM trained on the train split and the judge on the holdout split. Per variant: a copy of that
store with the held-back hours written as fresh partitions, `perfusion align` (run_online) with the variant,
then `align eval` on the same held-out requests and noise. Steps are equal by default; `--equal-passes`
scales each variant's steps per round to pl's denoiser passes (pairwise spends 4 passes per pair, pl 2 per
candidate). Columns: probe utility (first, best, last 3-round mean), win rates with 95% intervals by the
oracle, utility gain, class-accuracy drop, denoiser passes, optimizer wall time and whole-round wall time.
Printed with the machine and written to benchmarks/results/online_ablation.txt.

    .venv/bin/python -m benchmarks.online_ablation [--variants pl,dgpo,pairwise,sft] [--equal-passes]
        [--set online.rounds=8 ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from perfusion_ray.config import PerfusionConfig, load_config
from perfusion_ray.runtime import machine

RESULTS = Path(__file__).parent / "results" / "online_ablation.txt"
LABELS = {"pl": "ranking", "dgpo": "scores", "pairwise": "top_m", "sft": "top_m"}  # each objective's natural labels


def prepare(config: PerfusionConfig, work: Path) -> tuple[Path, Path]:
    """The shared starting point: the store before the rounds, and the trained RM (the judge beside it)."""
    from perfusion_ray.demo import ingest_both_splits, simulate_before_the_loop
    from perfusion_ray.evaluation.judge import judge_out
    from perfusion_ray.train.reward_model import train_reward_model
    from perfusion_ray.world.simulator import build_world

    marker = work / "prepared.json"
    if marker.is_file():
        return Path(json.loads(marker.read_text())["store"]), Path(json.loads(marker.read_text())["rm"])
    simulate_before_the_loop(config, build_world(config))
    ingest_both_splits(config)
    rm = train_reward_model(config).model_dir
    train_reward_model(config, split="holdout", out=judge_out(config))
    marker.write_text(json.dumps({"store": config.data.root, "rm": str(rm)}))
    return Path(config.data.root), rm


def run_variant(base: PerfusionConfig, name: str, store: Path, rm_dir: Path, work: Path, steps: int) -> dict:
    from ray import serve

    from perfusion_ray.coordinator import run_online
    from perfusion_ray.demo import live_hours
    from perfusion_ray.evaluation.alignment import evaluate_alignment
    from perfusion_ray.world.simulator import build_world, simulate

    config = base.model_copy(deep=True)
    folder = work / name
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(store, folder / "data")
    config.data.root = str(folder / "data")
    config.online.out, config.align.out = str(folder / "online"), str(folder / "align")
    config.align.variant, config.online.split = name, LABELS[name]
    config.online.steps_per_round = steps
    simulate(config, "train", build_world(config), progress=False, hours=live_hours(config))
    try:
        report = run_online(config, rm_dir=rm_dir, progress=False)
    finally:
        serve.shutdown()
    evaluation = evaluate_alignment(config, report.pipeline_dir, folder / "eval")
    return {"variant": name, "steps": steps, "history": report.history, "metrics": evaluation.metrics,
            "best_round": report.best_probe_round}


def _smoothed(values: list[float]) -> list[float]:
    return list(np.convolve(values, np.ones(3) / 3, mode="valid")) if len(values) >= 3 else values


def table(rows: list[dict]) -> str:
    header = ("variant", "steps/round", "probe first", "probe best", "probe last 3-round mean", "win seen (oracle)",
              "win cold (oracle)", "gain seen", "gain cold", "class acc drop", "passes", "optimize s", "round s")
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    from perfusion_ray.evaluation.alignment import win_rate_text

    for row in rows:
        history, m = row["history"], row["metrics"]
        probe = [h["probe_utility"] for h in history if "probe_utility" in h]
        lines.append(" | ".join([
            row["variant"], str(row["steps"]), f"{probe[0]:.3f}" if probe else "-", f"{max(probe):.3f}" if probe else "-",
            f"{_smoothed(probe)[-1]:.3f}" if probe else "-", win_rate_text(m, ".seen", "oracle"),
            win_rate_text(m, ".cold", "oracle"),
            f"{m['align.oracle.utility.aligned.seen'] - m['align.oracle.utility.base.seen']:+.3f}",
            f"{m['align.oracle.utility.aligned.cold'] - m['align.oracle.utility.base.cold']:+.3f}",
            f"{m.get('align.fidelity.class_acc.drop', float('nan')):+.1%}",
            str(sum(h.get("denoiser_passes", 0) for h in history)),
            f"{sum(h['optimize_seconds'] for h in history):.0f}", f"{sum(h['round_seconds'] for h in history):.0f}"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="pl,dgpo,pairwise,sft")
    parser.add_argument("--equal-passes", action="store_true", help="scale steps per round to pl's denoiser passes")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--work", type=Path, default=Path("out/bench-online-ablation"))
    args = parser.parse_args(argv)
    work = args.work.absolute()
    config = load_config(None, [f"data.root={work / 'prepared' / 'data'}", f"rm.out={work / 'prepared' / 'rm'}",
                                *args.overrides]).with_absolute_paths()
    work.mkdir(parents=True, exist_ok=True)
    store, rm_dir = prepare(config, work)
    rows = []
    k = config.data.group_size
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        steps = config.online.steps_per_round
        if args.equal_passes and name == "pairwise":  # 4 passes per (winner, loser) pair, 2 per candidate for pl
            pairs = k - 1 if LABELS[name] == "top_m" else k * (k - 1) // 2
            steps = max(1, round(steps * 2 * k / (4 * pairs)))
        rows.append(run_variant(config, name, store, rm_dir, work, steps))
        print(f"[{name}] done", flush=True)
        (work / "rows.json").write_text(json.dumps(rows, default=float))
    o = config.online
    budget = (f"{o.rounds} rounds x {o.requests_per_round} requests (K={k}), {config.align.batch_groups} groups per "
              f"step per worker x {config.align.num_workers} workers, logged share {o.logged_fraction}, beta "
              f"{config.align.beta}, lr {config.align.lr}; labels per variant {LABELS}; eval "
              f"{config.align.eval.requests_per_split or config.align.eval.requests_per_merchant} requests")
    text = "\n".join([f"machine: {machine()}", budget, "", table(rows), ""])
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
