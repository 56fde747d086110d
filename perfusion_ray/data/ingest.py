"""Ingest: feedback partitions past the watermark -> validated events -> group examples + quarantine.

Runs on Ray Data (read_parquet -> map_batches(validate_rows) -> hash repartition by request_id ->
a datasink that assembles and writes groups and quarantine per partition), streaming: no step holds
the whole input. `engine="local"` runs the same pure functions in one process (the benchmark's
baseline, and a way to ingest a few files without a cluster).

Exactly once, crash at any point:
  1. an incomplete run folder (no manifest) left by a crash is deleted;
  2. committed runs missing from the watermark (crash after commit) are added to it;
  3. the new files are processed into ingest/run-<id>/, the manifest is written last (the commit);
  4. the watermark is advanced and stored atomically.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import time
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.data import Datasink
from ray.data.block import BlockAccessor

from perfusion_ray.config import PerfusionConfig
from perfusion_ray.data.grouping import assemble_groups
from perfusion_ray.data.schemas import QUARANTINE_SCHEMA, schema_problem
from perfusion_ray.data.store import StoreLayout, list_partition_files
from perfusion_ray.data.validation import RowRules, validate_rows
from perfusion_ray.data.watermark import Watermark
from perfusion_ray.errors import PerfusionError
from perfusion_ray.faults import fault_point
from perfusion_ray.runtime import init_ray
from perfusion_ray.storage import atomic_write_bytes, atomic_write_json, atomic_write_table, read_json

MANIFEST = "manifest.json"


@dataclass
class IngestCounts:
    rows_read: int = 0
    rows_grouped: int = 0
    rows_quarantined: int = 0
    groups: int = 0
    files_quarantined: int = 0

    def add(self, other: "IngestCounts") -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)


@dataclass
class IngestReport:
    split: str
    run_id: str | None  # None when there was nothing new
    files: list[str] = field(default_factory=list)
    counts: IngestCounts = field(default_factory=IngestCounts)
    recovered_runs: list[str] = field(default_factory=list)
    seconds: float = 0.0
    engine: str = "ray"


def _run_id(files: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(files)).encode()).hexdigest()[:16]


def _write_outputs(folder: str, name: str, table_groups: pa.Table, table_quarantine: pa.Table, fs: pafs.FileSystem) -> None:
    atomic_write_table(table_groups, os.path.join(folder, "groups", f"{name}.parquet"), fs)
    atomic_write_table(table_quarantine, os.path.join(folder, "quarantine", f"{name}.parquet"), fs)


def _assemble_and_write(table: pa.Table, folder: str, name: str, config: PerfusionConfig, run_id: str,
                        fs: pafs.FileSystem) -> IngestCounts:
    assembled = assemble_groups(table, config.data.group_size, config.data.label_policy, source=f"ingest:{run_id}")
    _write_outputs(folder, name, assembled.groups, assembled.quarantine, fs)
    return IngestCounts(rows_read=table.num_rows, rows_grouped=assembled.rows_grouped,
                        rows_quarantined=assembled.quarantine.num_rows, groups=assembled.groups.num_rows)


class GroupSink(Datasink):
    """Ray Data datasink: each write task assembles its hash partition(s) of whole requests and writes
    one groups file and one quarantine file, named by task index (a retried task overwrites its own)."""

    def __init__(self, folder: str, root: str, config: PerfusionConfig, run_id: str):
        self.folder, self.root, self.config, self.run_id = folder, root, config, run_id
        self.counts = IngestCounts()

    def write(self, blocks, ctx) -> IngestCounts:
        tables = [BlockAccessor.for_block(block).to_arrow() for block in blocks]
        tables = [table for table in tables if table.num_rows]
        if not tables:
            return IngestCounts()
        table = pa.concat_tables(tables, promote_options="permissive")
        fs = StoreLayout(self.root).filesystem
        return _assemble_and_write(table, self.folder, f"part-{ctx.task_idx:05d}", self.config, self.run_id, fs)

    def on_write_complete(self, write_result) -> None:
        for counts in write_result.write_returns:
            self.counts.add(counts)


def _probe(layout: StoreLayout, files: list[str]) -> tuple[list[str], list[tuple[str, str]], int]:
    """Split files into readable event partitions and (file, reason) to quarantine; count readable rows."""
    fs = layout.filesystem
    readable, rejected, rows = [], [], 0
    for name in files:
        path = os.path.join(layout.feedback, name)
        try:
            metadata = pq.read_metadata(path, filesystem=fs)
            problem = schema_problem(metadata.schema.to_arrow_schema())
        except (pa.ArrowInvalid, OSError) as exc:
            problem = f"not a readable parquet file: {str(exc).splitlines()[0][:200]}"
        if problem:
            rejected.append((name, problem))
        else:
            readable.append(name)
            rows += metadata.num_rows
    return readable, rejected, rows


def _quarantine_files(layout: StoreLayout, folder: str, rejected: list[tuple[str, str]]) -> None:
    fs = layout.filesystem
    for name, _ in rejected:
        with fs.open_input_stream(os.path.join(layout.feedback, name)) as stream:
            atomic_write_bytes(os.path.join(folder, "quarantine", "files", name), stream.read(), fs)
    table = pa.table({
        "reason": [reason for _, reason in rejected],
        "source_file": [os.path.join(layout.feedback, name) for name, _ in rejected],
        "event_id": pa.nulls(len(rejected), pa.string()),
        "request_id": pa.nulls(len(rejected), pa.string()),
        "row_json": pa.nulls(len(rejected), pa.string()),
    }, schema=QUARANTINE_SCHEMA)
    atomic_write_table(table, os.path.join(folder, "quarantine", "files.parquet"), fs)


def run_manifest(layout: StoreLayout, run_id: str) -> dict:
    """A committed run's manifest: run_id, the partition files it consumed, its counts."""
    manifest = read_json(os.path.join(layout.run_dir(run_id), MANIFEST), filesystem=layout.filesystem)
    if manifest is None:
        raise PerfusionError(f"ingest run {run_id} under {layout.ingest} has no manifest (not committed)")
    return manifest


def recover(layout: StoreLayout) -> tuple[Watermark, list[str]]:
    """Delete incomplete runs; count committed runs the watermark missed. Returns (watermark, recovered)."""
    fs = layout.filesystem
    watermark = Watermark.load(layout.watermark, fs)
    recovered = []
    infos = fs.get_file_info(pafs.FileSelector(layout.ingest, allow_not_found=True))
    for info in infos:
        if info.type != pafs.FileType.Directory or not info.base_name.startswith("run-"):
            continue
        manifest = read_json(os.path.join(info.path, MANIFEST), filesystem=fs)
        if manifest is None:
            fs.delete_dir(info.path)  # crashed before its commit: redo from scratch
        elif manifest["run_id"] not in watermark.runs:
            watermark.advance(manifest["run_id"], manifest["files"])
            recovered.append(manifest["run_id"])
    if recovered:
        watermark.save(layout.watermark, fs)
    return watermark, recovered


def _rules(config: PerfusionConfig, layout: StoreLayout) -> RowRules:
    now = dt.datetime.now(dt.timezone.utc)
    return RowRules(
        group_size=config.data.group_size,
        image_store=layout.images_uri,
        image_size=config.data.image_size,
        latest_time=now + dt.timedelta(seconds=config.data.max_clock_skew_s),
    )


def _run_ray(config: PerfusionConfig, layout: StoreLayout, files: list[str], folder: str, run_id: str) -> IngestCounts:
    init_ray(config.cluster)
    fs = layout.filesystem
    paths = [os.path.join(layout.feedback, name) for name in files]
    dataset = (
        ray.data.read_parquet(paths, filesystem=fs, include_paths=True)
        .map_batches(validate_rows, fn_kwargs={"rules": _rules(config, layout)}, batch_format="pyarrow",
                     batch_size=config.data.batch_rows)
        .repartition(config.data.shuffle_blocks, keys=["request_id"])
    )
    sink = GroupSink(folder, layout.root, config, run_id)
    dataset.write_datasink(sink)
    return sink.counts


def _run_local(config: PerfusionConfig, layout: StoreLayout, files: list[str], folder: str, run_id: str) -> IngestCounts:
    fs = layout.filesystem
    rules = _rules(config, layout)
    validated = []
    for name in files:
        path = os.path.join(layout.feedback, name)
        table = pq.read_table(path, filesystem=fs)
        table = table.append_column("path", pa.array([path] * table.num_rows, pa.string()))
        validated.append(validate_rows(table, rules))
    table = pa.concat_tables(validated)
    return _assemble_and_write(table, folder, "part-00000", config, run_id, fs)


def ingest(config: PerfusionConfig, split: str = "train", engine: str = "ray", max_files: int = 0) -> IngestReport:
    """Consume every feedback partition past the watermark exactly once (at most `max_files` of them,
    oldest event hour first, when it is positive). See the module docstring."""
    started = time.perf_counter()
    layout = StoreLayout(config.data.root, split)
    fs = layout.filesystem
    watermark, recovered = recover(layout)
    files = [name for name in list_partition_files(layout) if name not in watermark.consumed]
    files = files[:max_files] if max_files > 0 else files
    report = IngestReport(split=split, run_id=None, recovered_runs=recovered, engine=engine)
    if not files:
        report.seconds = time.perf_counter() - started
        return report
    run_id = _run_id(files)
    folder = layout.run_dir(run_id)
    readable, rejected, rows_expected = _probe(layout, files)
    counts = IngestCounts(files_quarantined=len(rejected))
    if rejected:
        _quarantine_files(layout, folder, rejected)
    if readable:
        runner = {"ray": _run_ray, "local": _run_local}[engine]
        counts.add(runner(config, layout, readable, folder, run_id))
    if counts.rows_read != rows_expected or counts.rows_grouped + counts.rows_quarantined != counts.rows_read:
        raise RuntimeError(f"ingest accounting broke, nothing committed: {counts} for {rows_expected} rows in files")
    fault_point("ingest:written")
    atomic_write_json(os.path.join(folder, MANIFEST), {"run_id": run_id, "files": files, "counts": asdict(counts)}, fs)
    fault_point("ingest:committed")
    watermark.advance(run_id, files)
    watermark.save(layout.watermark, fs)
    fault_point("ingest:watermarked")
    report.run_id, report.files, report.counts = run_id, files, counts
    report.seconds = time.perf_counter() - started
    return report
