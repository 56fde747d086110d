"""Ingest fuzzing at scale: thousands of mutated partition files (tests/partition_mutations.py) through the
single-process and the Ray Data engine side by side, with the figures the suite's smaller run checks.

    .venv/bin/python -m benchmarks.ingest_fuzz                  # 100 rounds of 20 files
    .venv/bin/python -m benchmarks.ingest_fuzz --rounds 5 --files 10

Prints: files mutated, ingest runs, exceptions that escaped, runs where rows read != grouped + quarantined,
runs where the engines disagree, good partitions that did not become their groups, then what ingest made
of the mutated files and how often each mutation ran. Exits 1 when any promise broke.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from perfusion_ray.config import load_config
from perfusion_ray.console import quiet_libraries, say
from perfusion_ray.runtime import machine
from perfusion_ray.world.simulator import simulate
from tests.conftest import TINY_OVERRIDES
from tests.ingest_fuzzing import FuzzReport, fuzz


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--files", type=int, default=20, help="mutated files per round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engines", default="local,ray")
    parser.add_argument("--log", type=Path, default=Path("out/bench-ingest-fuzz.log"),
                        help="Ray's and the libraries' output (the terminal keeps the figures)")
    args = parser.parse_args()
    with quiet_libraries(args.log, verbose=False):
        return run(args)


def run(args) -> int:
    say(f"machine: {machine()}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ingest-fuzz-") as work:
        base = Path(work) / "base"
        config = load_config(None, TINY_OVERRIDES + [f"data.root={base}"])
        simulate(config, "train", progress=False)

        def progress(index: int, report: FuzzReport) -> None:
            if (index + 1) % 10 == 0:
                say(f"  round {index + 1}/{args.rounds}: {report.files_mutated} files, "
                    f"{len(report.failures)} failures, {time.perf_counter() - started:.0f}s")

        report = fuzz(str(base), Path(work) / "stores", config, args.rounds, args.files,
                      tuple(args.engines.split(",")), args.seed, progress)
    say(f"\nfiles mutated {report.files_mutated}; ingest runs {report.ingest_runs} per engine "
        f"({args.engines}); rows read {report.rows_read:,} per engine; {time.perf_counter() - started:.0f}s")
    say(f"exceptions escaped {len(report.escaped)}; identity broken {len(report.identity_broken)}; "
        f"engines differ {len(report.engines_differ)}; good partitions not ingested {len(report.good_not_ingested)}")
    say("outcomes: " + ", ".join(f"{name} {count:,}" for name, count in report.outcomes.items()))
    single = Counter(part for shape, count in report.shapes.items() for part in shape.split("+") for _ in range(count))
    say(f"mutations ({sum(c for s, c in report.shapes.items() if '+' in s)} files had two stacked): "
        + ", ".join(f"{name} {count}" for name, count in sorted(single.items())))
    for failure in report.failures[:20]:
        say(f"  FAILED {failure}")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
