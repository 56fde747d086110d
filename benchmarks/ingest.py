"""Ingest throughput and peak memory: Ray Data ingest vs a single-process pyarrow read + validate of
the same partitions, side by side in one run, with the machine printed.

    .venv/bin/python benchmarks/ingest.py                 # 1 million events (default)
    .venv/bin/python benchmarks/ingest.py --events 100000 # quicker

Each engine runs in its own subprocess; the parent samples the resident memory of that process and
all its descendants (Ray's raylet, object store and workers included) every 0.1 s.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from perfusion_ray.runtime import machine

REPO = Path(__file__).resolve().parents[1]
EVENTS_PER_REQUEST = 14  # what the default FashionWorld produces, measured




def overrides(root: Path, events: int) -> list[str]:
    requests = max(1, events // EVENTS_PER_REQUEST)
    hours = 24
    return [f"data.root={root}", f"world.hours={hours}", f"world.requests_per_hour={-(-requests // hours)}",
            "world.faulty_event_rate=0.002"]


def run_worker(engine: str, root: Path, events: int, result: Path) -> None:
    from perfusion_ray.config import load_config
    from perfusion_ray.data.ingest import ingest

    config = load_config(None, overrides(root, events))
    if engine == "ray":
        from perfusion_ray.runtime import init_ray

        init_ray(config.cluster)  # cluster start-up is not part of the measured ingest
    report = ingest(config, "train", engine=engine)
    result.write_text(json.dumps({"seconds": report.seconds, "rows": report.counts.rows_read,
                                  "groups": report.counts.groups, "quarantined": report.counts.rows_quarantined}))


def peak_tree_rss(process: subprocess.Popen) -> tuple[int, threading.Thread]:
    peak = [0]

    def sample():
        root = psutil.Process(process.pid)
        while process.poll() is None:
            try:
                total = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
                peak[0] = max(peak[0], total)
            except psutil.Error:
                pass
            time.sleep(0.1)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    return peak, thread


def measure(engine: str, root: Path, events: int) -> dict:
    shutil.rmtree(root / "train" / "ingest", ignore_errors=True)
    shutil.rmtree(root / "train" / "state", ignore_errors=True)
    result = root / f"result-{engine}.json"
    process = subprocess.Popen([sys.executable, __file__, "--worker", engine, "--root", str(root),
                                "--events", str(events), "--result", str(result)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak, thread = peak_tree_rss(process)
    if process.wait(timeout=3600) != 0:
        raise SystemExit(f"{engine} ingest failed (exit {process.returncode})")
    thread.join()
    measured = json.loads(result.read_text())
    measured["peak_mib"] = peak[0] / 2**20
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--root", type=Path, default=None, help="store (default out/bench-ingest-<events>)")
    parser.add_argument("--worker", choices=["ray", "local"], help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.root = args.root or REPO / "out" / f"bench-ingest-{args.events}"
    if args.worker:
        run_worker(args.worker, args.root, args.events, args.result)
        return

    from perfusion_ray.config import load_config
    from perfusion_ray.data.store import StoreLayout, list_partition_files
    from perfusion_ray.world.simulator import simulate

    config = load_config(None, overrides(args.root, args.events))
    if not list_partition_files(StoreLayout(config.data.root, "train")):
        print(f"simulating about {args.events:,} events into {args.root} (once; reused next time)...")
        simulate(config, "train")
    print(f"machine: {machine()}")
    results = {engine: measure(engine, args.root, args.events) for engine in ("local", "ray")}
    rows = results["local"]["rows"]
    print(f"\ningest of {rows:,} feedback events ({results['ray']['groups']:,} groups, "
          f"{results['ray']['quarantined']:,} rows quarantined)")
    print(f"{'engine':<44} {'seconds':>8} {'events/s':>10} {'peak MiB':>9}")
    names = {"local": "single process: pyarrow read + validate + group", "ray": "Ray Data: read_parquet -> validate -> shuffle"}
    for engine, measured in results.items():
        print(f"{names[engine]:<44} {measured['seconds']:>8.1f} {rows / measured['seconds']:>10,.0f} "
              f"{measured['peak_mib']:>9,.0f}")
    print(f"ratio Ray Data / single process: throughput {results['local']['seconds'] / results['ray']['seconds']:.2f}x, "
          f"peak memory {results['ray']['peak_mib'] / results['local']['peak_mib']:.2f}x")
    assert results["local"]["groups"] == results["ray"]["groups"], "the two engines disagree"


if __name__ == "__main__":
    main()
