"""Ingest throughput and peak memory, Ray Data vs one process, as the feedback grows: both engines side by
side at N events and at GROWTH x N events in one run, with the machine printed.

    .venv/bin/python benchmarks/ingest.py                          # 1 million and 4 million events
    .venv/bin/python benchmarks/ingest.py --events 100000 --growth 2  # quicker

The feedback grows the way a store does, by hours: N events are 24 event hours of FashionWorld feedback,
GROWTH x N are 24 x GROWTH hours at the same rate (one store, simulated once and reused; the smaller size
ingests its first 24 partition files). Each measurement runs in its own subprocess on an empty ingest
state; the parent samples the resident memory of that process and all its descendants (Ray's raylet,
object store and workers included) every 0.1 s. Cluster start-up is not part of the measured seconds: the
Ray worker starts its cluster and runs a trivial Ray Data job first, as a cluster that is up has.
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
BASE_HOURS = 24
ENGINES = ("local", "ray")
NAMES = {"local": "single process", "ray": "Ray Data"}


def overrides(root: Path, events: int, growth: int) -> list[str]:
    requests_per_hour = -(-max(1, events // EVENTS_PER_REQUEST) // BASE_HOURS)
    return [f"data.root={root}", f"world.hours={BASE_HOURS * growth}", f"world.requests_per_hour={requests_per_hour}",
            "world.faulty_event_rate=0.002"]


def run_worker(engine: str, root: Path, events: int, growth: int, files: int, result: Path) -> None:
    from perfusion_ray.config import load_config
    from perfusion_ray.data.ingest import ingest

    config = load_config(None, overrides(root, events, growth))
    if engine == "ray":
        import ray

        from perfusion_ray.runtime import init_ray

        init_ray(config.cluster)  # cluster start-up is not part of the measured ingest: a cluster that is up
        ray.data.range(64, override_num_blocks=8).map_batches(lambda batch: batch).materialize()  # and has run Ray Data
    report = ingest(config, "train", engine=engine, max_files=files)
    result.write_text(json.dumps({"seconds": report.seconds, "rows": report.counts.rows_read,
                                  "groups": report.counts.groups, "quarantined": report.counts.rows_quarantined}))


def peak_tree_rss(process: subprocess.Popen) -> tuple[list[int], threading.Thread]:
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


def measure(engine: str, root: Path, events: int, growth: int, files: int) -> dict:
    shutil.rmtree(root / "train" / "ingest", ignore_errors=True)
    shutil.rmtree(root / "train" / "state", ignore_errors=True)
    result = root / f"result-{engine}.json"
    command = [sys.executable, __file__, "--worker", engine, "--root", str(root), "--events", str(events),
               "--growth", str(growth), "--files", str(files), "--result", str(result)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak, thread = peak_tree_rss(process)
    if process.wait(timeout=3600) != 0:
        raise SystemExit(f"{engine} ingest failed (exit {process.returncode}): rerun with --worker to see why")
    thread.join()
    measured = json.loads(result.read_text())
    measured["peak_mib"] = peak[0] / 2**20
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="events of the smaller size")
    parser.add_argument("--growth", type=int, default=4, help="the larger size, as a multiple of --events")
    parser.add_argument("--root", type=Path, default=None, help="store (default out/bench-ingest-<events>x<growth>)")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--files", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.root = args.root or REPO / "out" / f"bench-ingest-{args.events}x{args.growth}"
    if args.worker:
        run_worker(args.worker, args.root, args.events, args.growth, args.files, args.result)
        return

    from perfusion_ray.config import load_config
    from perfusion_ray.data.store import StoreLayout, list_partition_files
    from perfusion_ray.world.simulator import simulate

    config = load_config(None, overrides(args.root, args.events, args.growth))
    if len(list_partition_files(StoreLayout(config.data.root, "train"))) != BASE_HOURS * args.growth:
        print(f"simulating about {args.events * args.growth:,} events into {args.root} (once; reused next time)...")
        simulate(config, "train", progress=False)
    print(f"machine: {machine()}")
    sizes = {1: BASE_HOURS, args.growth: 0}  # growth -> files to ingest (0: all)
    results = {(g, e): measure(e, args.root, args.events, args.growth, files) for g, files in sizes.items()
               for e in ENGINES}
    print(f"\n{'events':>10} {'hours':>6} {'engine':<15} {'seconds':>8} {'events/s':>10} {'peak MiB':>9} "
          f"{'groups':>8} {'quarantined':>11}")
    for (growth, engine), measured in results.items():
        print(f"{measured['rows']:>10,} {BASE_HOURS * growth:>6} {NAMES[engine]:<15} {measured['seconds']:>8.1f} "
              f"{measured['rows'] / measured['seconds']:>10,.0f} {measured['peak_mib']:>9,.0f} "
              f"{measured['groups']:>8,} {measured['quarantined']:>11,}")
    for growth in sizes:
        local, ray = results[(growth, "local")], results[(growth, "ray")]
        assert (local["groups"], local["quarantined"]) == (ray["groups"], ray["quarantined"]), "the engines disagree"
        print(f"at {local['rows']:,} events: Ray Data / single process throughput "
              f"{local['seconds'] / ray['seconds']:.2f}x, peak memory {ray['peak_mib'] / local['peak_mib']:.2f}x")
    for engine in ENGINES:
        small, large = results[(1, engine)], results[(args.growth, engine)]
        print(f"{NAMES[engine]}: peak memory at {large['rows']:,} events / at {small['rows']:,} events "
              f"{large['peak_mib'] / small['peak_mib']:.2f}x")


if __name__ == "__main__":
    main()
