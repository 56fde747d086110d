"""Where an online round's time goes on the default config: plan (fresh partitions through Ray Data
ingest), RM refresh + roll-out, generation with the current policy, scoring through the Serve handle,
and the group-objective steps. Runs `perfusion align` (run_online) on a freshly simulated FashionWorld
whose last online.live_hours hours wait as fresh partitions, with an untrained RM (the split of time does
not depend on how good the RM is). Printed with the machine and written to
benchmarks/results/online_rounds.txt.

    .venv/bin/python -m benchmarks.online_rounds [--set online.rounds=4]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from perfusion_ray.config import load_config
from perfusion_ray.runtime import machine

PHASES = ("plan_seconds", "rm_refresh_seconds", "generate_seconds", "score_seconds", "optimize_seconds",
          "probe_seconds")
RESULTS = Path(__file__).parent / "results" / "online_rounds.txt"


def split_table(history: list[dict]) -> str:
    header = ("round", *[p.removesuffix("_seconds") + " s" for p in PHASES], "round s")
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for m in history:
        lines.append(" | ".join([str(m["round"]), *[f"{m.get(p, 0.0):.1f}" for p in PHASES], f"{m['round_seconds']:.1f}"]))
    totals = {p: sum(m.get(p, 0.0) for m in history) for p in PHASES}
    whole = sum(totals.values())
    lines.append(" | ".join(["share", *[f"{totals[p] / whole:.0%}" for p in PHASES], "100%"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from perfusion_ray.coordinator import run_online
    from perfusion_ray.demo import ingest_both_splits, live_hours, simulate_before_the_loop
    from perfusion_ray.train.reward_model import export_untrained
    from perfusion_ray.world.simulator import build_world, simulate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-online-"))
    try:
        config = load_config(None, [f"data.root={root / 'data'}", f"rm.out={root / 'rm'}",
                                    f"online.out={root / 'online'}", "serve.port=8131", *args.set])
        world = build_world(config)
        simulate_before_the_loop(config, world)
        ingest_both_splits(config)
        simulate(config, "train", world, hours=live_hours(config))  # all fresh partitions wait from the start
        rm_dir = export_untrained(config, root / "rm" / "model")
        report = run_online(config, rm_dir=rm_dir)
        o = config.online
        budget = (f"{o.rounds} rounds, {o.requests_per_round} requests x K={config.data.group_size} per round, "
                  f"{o.steps_per_round} steps of {config.align.batch_groups} groups per worker, "
                  f"{config.align.num_workers} workers (ZeRO {config.align.zero_stage}), RM refresh every "
                  f"{o.rm_refresh_every} rounds, {o.partitions_per_round} partitions per round; "
                  f"whole run {report.seconds:.0f}s")
        text = "\n".join([f"machine: {machine()}", budget, "", split_table(report.history), ""])
        print("\n" + text)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(text)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
