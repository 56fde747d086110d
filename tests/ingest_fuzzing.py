"""Fuzzing ingest with mutated partitions (tests/partition_mutations.py), on every engine side by side.

Each round writes the same mutated files into one store per engine, ingests each store, then writes one
good partition and ingests again. It records, instead of raising, everything that breaks a promise:
an exception out of ingest, rows read != grouped + quarantined, engines that disagree (counts, groups or
quarantine), and a later good partition that does not become its groups.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from perfusion_ray.config import PerfusionConfig
from perfusion_ray.data.image_store import ImageStore
from perfusion_ray.data.ingest import IngestReport, ingest
from perfusion_ray.data.run_plan import file_hour
from perfusion_ray.data.store import StoreLayout, hour_partition, list_partition_files
from tests.partition_mutations import mutate, with_ids


@dataclass
class FuzzReport:
    files_mutated: int = 0
    ingest_runs: int = 0  # per engine
    rows_read: int = 0  # per engine, over every run
    shapes: Counter = field(default_factory=Counter)  # mutation -> files
    outcomes: Counter = field(default_factory=Counter)  # what ingest made of each mutated file
    escaped: list[str] = field(default_factory=list)  # exceptions out of ingest
    identity_broken: list[str] = field(default_factory=list)
    engines_differ: list[str] = field(default_factory=list)
    good_not_ingested: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[str]:
        return self.escaped + self.identity_broken + self.engines_differ + self.good_not_ingested


def _outputs(layout: StoreLayout, run_id: str, kind: str) -> pa.Table:
    tables = [pq.read_table(path, filesystem=layout.filesystem) for path in layout.output_files(kind, [run_id])]
    return pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})


def _comparable(layout: StoreLayout, report: IngestReport) -> tuple:
    """What must be equal between engines: counts, the groups, and the quarantine (reason, event, file)."""
    if report.run_id is None:
        return (report.counts,)
    groups = _outputs(layout, report.run_id, "groups")
    groups = groups.drop_columns(["source"]).sort_by([("request_id", "ascending")]) if groups.num_rows else groups
    quarantine = _outputs(layout, report.run_id, "quarantine")
    records = Counter()
    for row in quarantine.select(["reason", "event_id", "source_file"]).to_pylist():
        records[(row["reason"], row["event_id"], os.path.relpath(row["source_file"], layout.feedback))] += 1
    return report.counts, groups.to_pylist(), sorted(records.items(), key=repr)


def _identity_problem(layout: StoreLayout, report: IngestReport) -> str | None:
    c = report.counts
    if report.run_id is None:
        return None
    quarantined = _outputs(layout, report.run_id, "quarantine")
    row_records = int(pc.sum(quarantined["row_json"].is_valid()).as_py() or 0) if quarantined.num_rows else 0
    groups = _outputs(layout, report.run_id, "groups").num_rows
    if c.rows_read != c.rows_grouped + c.rows_quarantined or row_records != c.rows_quarantined or groups != c.groups:
        return f"{c}: {row_records} quarantined rows and {groups} groups on disk"
    return None


class Fuzzer:
    """Stores of one base store, one per engine, fed the same mutated files."""

    def __init__(self, base_root: str, work: Path, config: PerfusionConfig, engines: tuple[str, ...], seed: int):
        self.engines, self.rng = engines, np.random.default_rng(seed)
        self.configs, self.layouts = {}, {}
        for engine in engines:
            root = work / engine
            shutil.rmtree(root, ignore_errors=True)
            shutil.copytree(base_root, root)
            self.configs[engine] = config.model_copy(update={"data": config.data.model_copy(update={"root": str(root)})})
            self.layouts[engine] = StoreLayout(str(root), "train")
        base = self.layouts[engines[0]]
        self.partitions = [(name, pq.read_table(os.path.join(base.feedback, name)))
                           for name in list_partition_files(base)]
        self.report = FuzzReport()

    def _put_image(self, data: bytes) -> tuple[str, str]:
        """Store an image in every store (content-addressed: the same ref and digest everywhere)."""
        stored = [ImageStore(layout.images_uri).put(data) for layout in self.layouts.values()]
        return stored[0]

    def _write(self, hour: int, name: str, data: bytes) -> None:
        moment = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(hours=hour)
        for layout in self.layouts.values():
            path = Path(layout.feedback) / hour_partition(moment) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)

    def _ingest_all(self, label: str) -> dict[str, IngestReport] | None:
        reports = {}
        for engine in self.engines:
            try:
                reports[engine] = ingest(self.configs[engine], "train", engine=engine)
            except Exception as exc:  # noqa: BLE001 - the fuzz records what escapes, it does not stop on it
                self.report.escaped.append(f"{label} ({engine}): {exc.__class__.__name__}: {str(exc)[:300]}")
                return None
            problem = _identity_problem(self.layouts[engine], reports[engine])
            if problem:
                self.report.identity_broken.append(f"{label} ({engine}): {problem}")
        self.report.ingest_runs += 1
        self.report.rows_read += reports[self.engines[0]].counts.rows_read
        seen = [_comparable(self.layouts[e], reports[e]) for e in self.engines]
        if any(s != seen[0] for s in seen[1:]):
            self.report.engines_differ.append(f"{label}: {[reports[e].counts for e in self.engines]}")
        return reports

    def round(self, index: int, files: int) -> None:
        shapes = []
        for n in range(files):
            name, table = self.partitions[int(self.rng.integers(len(self.partitions)))]
            stacked = 2 if self.rng.random() < 0.25 else 1
            shape, mutated = mutate(with_ids(table, f"-r{index}f{n}"), self.rng, self._put_image, stacked)
            for k, (offset, data) in enumerate(mutated):
                self._write(file_hour(name) + offset, f"part-fuzz-r{index}f{n}k{k}.parquet", data)
            self.report.files_mutated += len(mutated)
            self.report.shapes[shape] += len(mutated)
            shapes.append(shape)
        reports = self._ingest_all(f"round {index} ({', '.join(shapes)})")
        if reports:
            counts = next(iter(reports.values())).counts
            self.report.outcomes["files quarantined whole"] += counts.files_quarantined
            self.report.outcomes["rows quarantined"] += counts.rows_quarantined
            self.report.outcomes["rows grouped"] += counts.rows_grouped
            self.report.outcomes["rows late"] += counts.rows_late
        self._good_partition(index)

    def _good_partition(self, index: int) -> None:
        name, table = self.partitions[index % len(self.partitions)]
        good = with_ids(table, f"-good{index}")
        sink = pa.BufferOutputStream()
        pq.write_table(good, sink)
        self._write(file_hour(name), f"part-good-r{index}.parquet", sink.getvalue().to_pybytes())
        reports = self._ingest_all(f"good partition after round {index}")
        if reports is None:
            return
        requests = len(pc.unique(good["request_id"]))
        for engine, report in reports.items():
            c = report.counts
            if (c.groups, c.rows_grouped, c.rows_quarantined, c.files_quarantined) != (requests, good.num_rows, 0, 0):
                self.report.good_not_ingested.append(f"after round {index} ({engine}): {c}, expected {requests} groups")


def fuzz(base_root: str, work: Path, config: PerfusionConfig, rounds: int, files_per_round: int,
         engines: tuple[str, ...] = ("local", "ray"), seed: int = 0, progress=None) -> FuzzReport:
    """Mutated files, `files_per_round` at a time, through every engine; see the module docstring."""
    fuzzer = Fuzzer(base_root, work, config, engines, seed)
    fuzzer._ingest_all("the base store")
    for index in range(rounds):
        fuzzer.round(index, files_per_round)
        if progress:
            progress(index, fuzzer.report)
    return fuzzer.report
