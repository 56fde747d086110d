"""Ingest: feedback partitions past the watermark -> validated events -> group examples + quarantine.

Two passes of small independent pieces of work, on Ray Data (engine "ray": each pass is a Ray Data map
over work items, streaming, as many at once as the cluster has CPUs) or one after the other in this
process (engine "local"); both run the same functions and write the same files:
  1. per partition file: read it (a file that cannot be read, or whose validation raises, is quarantined
     whole with the reason), validate its rows, stage them in the run folder, and tell the driver the
     valid rows' event ids, event hours and impressions;
  2. the driver plans the run (run_plan.py: the duplicates, within the run and against earlier runs, and
     each row's owner segment), then per event-hour segment: assemble the requests it owns from its own
     hour and the late-feedback window after it, and write their groups, their quarantine and the event
     ids it grouped (event_index.py).
A request's events already sit in its event hour (plus the window), so there is no all-to-all shuffle and
a piece of work holds at most window + 1 hours of events, whatever the size of the run.

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

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from perfusion_ray.config import LabelPolicy, PerfusionConfig
from perfusion_ray.data.event_index import EVENT_IDS, delete_expired, earlier_event_ids, grouped_ids_table
from perfusion_ray.data.grouping import assemble_groups
from perfusion_ray.data.partition_reader import read_partition
from perfusion_ray.data.run_plan import FileSummary, RunPlan, event_hours, plan_run, window_of
from perfusion_ray.data.schemas import QUARANTINE_SCHEMA, VALIDATED_EVENT_SCHEMA
from perfusion_ray.data.store import StoreLayout, list_partition_files
from perfusion_ray.data.validation import RowRules, validate_rows
from perfusion_ray.data.watermark import Watermark
from perfusion_ray.errors import PerfusionError
from perfusion_ray.faults import fault_point
from perfusion_ray.storage import atomic_write_bytes, atomic_write_json, atomic_write_table, read_json

MANIFEST = "manifest.json"
STAGED = "_validated"
ENGINES = ("ray", "local")


@dataclass
class IngestCounts:
    rows_read: int = 0
    rows_grouped: int = 0
    rows_quarantined: int = 0
    groups: int = 0
    files_quarantined: int = 0
    rows_late: int = 0  # of rows_quarantined: feedback later than data.late_window_hours after its impressions

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


@dataclass(frozen=True)
class RunContext:
    """What every piece of work of one run needs (small, sent to every task)."""

    root: str
    split: str
    run_id: str
    files: tuple[str, ...]  # relative to the split's feedback root
    rules: RowRules
    label_policy: LabelPolicy
    batch_rows: int

    @property
    def layout(self) -> StoreLayout:
        return StoreLayout(self.root, self.split)

    @property
    def folder(self) -> str:
        return self.layout.run_dir(self.run_id)

    def source(self, index: int) -> str:
        return os.path.join(self.layout.feedback, self.files[index])

    def staged(self, index: int) -> str:
        return os.path.join(self.folder, STAGED, f"{index:06d}.parquet")

    def output(self, kind: str, segment: int) -> str:
        return os.path.join(self.folder, kind, f"part-{segment:05d}.parquet")


@dataclass
class SegmentResult:
    counts: IngestCounts
    hours: tuple[int, int] | None  # event-hour range of the ids the segment grouped

    def to_table(self) -> pa.Table:
        return pa.table({**{name: [value] for name, value in asdict(self.counts).items()},
                         "hours": pa.array([list(self.hours) if self.hours else None], pa.list_(pa.int64()))})

    @classmethod
    def from_table(cls, table: pa.Table) -> list["SegmentResult"]:
        names = [f.name for f in IngestCounts.__dataclass_fields__.values()]
        return [cls(IngestCounts(**{name: row[name] for name in names}), tuple(row["hours"]) if row["hours"] else None)
                for row in table.to_pylist()]


def _run_id(files: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(files)).encode()).hexdigest()[:16]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {text[0][:200] if text else ''}".rstrip(": ")


# ---------------------------------------------------------------- pass 1: one partition file
def _stage(table: pa.Table, path: str, filesystem: pafs.FileSystem) -> None:
    """Validated rows for pass 2: lz4 (read back once, soon), written in place (the run folder is private to
    the run until its commit, and a retried task rewrites the same file)."""
    filesystem.create_dir(os.path.dirname(path), recursive=True)
    with filesystem.open_output_stream(path) as stream:
        pq.write_table(table, stream, compression="lz4")


def validate_partition(context: RunContext, index: int) -> FileSummary:
    """Read and validate one file and stage its validated rows; a file that cannot be read, or whose
    validation raises, comes back with the problem that quarantines it whole."""
    layout, path = context.layout, context.source(index)
    read = read_partition(path, layout.filesystem)
    if read.problem:
        return FileSummary(index, 0, read.problem)
    batches = [pa.Table.from_batches([b]) for b in read.table.to_batches(max_chunksize=context.batch_rows)]
    try:
        validated = pa.concat_tables([validate_rows(batch, context.rules, path) for batch in batches or [read.table]])
    except Exception as exc:  # noqa: BLE001 - a file must never stop the ingest; its reason names the error
        return FileSummary(index, 0, f"validation failed: {_first_line(exc)}")
    _stage(validated, context.staged(index), layout.filesystem)
    return FileSummary.of(index, validated)


# ---------------------------------------------------------------- pass 2: one event-hour segment
def _add_reasons(table: pa.Table, rows: np.ndarray, reasons: list[str]) -> pa.Table:
    """The table with these rows' reasons extended (a row may already have reasons of its own)."""
    current = table["reason"].to_pylist()
    for row, reason in zip(rows, reasons):
        current[row] = reason if current[row] is None else f"{current[row]}; {reason}"
    return table.set_column(table.schema.get_field_index("reason"), "reason", pa.array(current, pa.string()))


def _owned_rows(context: RunContext, plan: RunPlan, segment: int, file_index: int) -> tuple[pa.Table, int]:
    """The staged rows of one file that `segment` owns, with the run's reasons applied; and how many are late."""
    fs = context.layout.filesystem
    path = context.staged(file_index)
    file_segment = int(plan.segment_of_file[file_index])
    if file_segment != segment:  # a later hour of the window: the request ids first, the rows only if some are ours
        request_ids = pq.read_table(path, filesystem=fs, columns=["request_id"])["request_id"].combine_chunks()
        if not (plan.owners(request_ids, file_segment)[0] == segment).any():
            return VALIDATED_EVENT_SCHEMA.empty_table(), 0
    table = pq.read_table(path, filesystem=fs)
    owner, late = plan.owners(table["request_id"].combine_chunks(), file_segment)
    rows, reasons = plan.marks.get(file_index, (np.zeros(0, np.int64), []))
    late_rows = np.flatnonzero(late)
    if len(rows) or len(late_rows):
        late_reason = f"late feedback: more than {plan.window} h after its request's impressions"
        table = _add_reasons(table, np.concatenate([rows, late_rows]), reasons + [late_reason] * len(late_rows))
    mine = owner == segment
    return table.filter(pa.array(mine)), int((mine & late).sum())


def assemble_segment(context: RunContext, plan: RunPlan, segment: int) -> SegmentResult:
    """Groups of the requests one segment owns, written with their quarantine and their grouped event ids."""
    own = plan.segments[segment]
    pieces, late = [], 0
    for member in window_of(plan.segments, own, plan.window):
        for file_index in member.files:
            if plan.readable[file_index]:
                rows, late_rows = _owned_rows(context, plan, segment, file_index)
                pieces.append(rows)
                late += late_rows
    table = pa.concat_tables(pieces) if pieces else VALIDATED_EVENT_SCHEMA.empty_table()
    assembled = assemble_groups(table, context.rules.group_size, context.label_policy, f"ingest:{context.run_id}")
    fs = context.layout.filesystem
    atomic_write_table(assembled.groups, context.output("groups", segment), fs)
    atomic_write_table(assembled.quarantine, context.output("quarantine", segment), fs)
    hours = event_hours(assembled.grouped["event_time"].combine_chunks())
    atomic_write_table(grouped_ids_table(assembled.grouped["event_id"].combine_chunks(), hours),
                       context.output(EVENT_IDS, segment), fs)
    counts = IngestCounts(rows_read=table.num_rows, rows_grouped=assembled.rows_grouped,
                          rows_quarantined=assembled.quarantine.num_rows, groups=assembled.groups.num_rows, rows_late=late)
    return SegmentResult(counts, (int(hours.min()), int(hours.max())) if len(hours) else None)


# ---------------------------------------------------------------- the engines
def _run_local(context: RunContext, plan_from) -> tuple[list[FileSummary], list[SegmentResult]]:
    summaries = [validate_partition(context, index) for index in range(len(context.files))]
    plan = plan_from(summaries)
    return summaries, [assemble_segment(context, plan, s.index) for s in plan.segments]


def _validate_batch(batch: pa.Table, context: RunContext) -> pa.Table:
    return pa.concat_tables([validate_partition(context, i).to_table() for i in batch["index"].to_pylist()])


def _assemble_batch(batch: pa.Table, context: RunContext, plan_ref) -> pa.Table:
    import ray

    plan = ray.get(plan_ref[0])
    return pa.concat_tables([assemble_segment(context, plan, i).to_table() for i in batch["index"].to_pylist()])


def _ray_map(count: int, fn, fn_kwargs: dict) -> pa.Table:
    """fn over the work items 0..count-1 as a Ray Data map (one item per task), collected on the driver."""
    import ray

    dataset = ray.data.from_items([{"index": i} for i in range(count)], override_num_blocks=max(1, count))
    dataset = dataset.map_batches(fn, batch_size=1, batch_format="pyarrow", fn_kwargs=fn_kwargs)
    return pa.concat_tables(list(dataset.iter_batches(batch_size=None, batch_format="pyarrow")))


def _run_ray(context: RunContext, plan_from, cluster) -> tuple[list[FileSummary], list[SegmentResult]]:
    import ray

    from perfusion_ray.runtime import init_ray

    init_ray(cluster)
    summaries = FileSummary.from_table(_ray_map(len(context.files), _validate_batch, {"context": context}))
    plan = plan_from(summaries)
    plan_ref = ray.put(plan)
    results = _ray_map(len(plan.segments), _assemble_batch, {"context": context, "plan_ref": [plan_ref]})
    return summaries, SegmentResult.from_table(results)


# ---------------------------------------------------------------- the run
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
    """A committed run's manifest: run_id, the partition files it consumed, its counts, its event hours."""
    manifest = read_json(os.path.join(layout.run_dir(run_id), MANIFEST), filesystem=layout.filesystem)
    if manifest is None:
        raise PerfusionError(f"ingest run {run_id} under {layout.ingest} has no manifest (not committed)")
    return manifest


@dataclass
class StoreState:
    watermark: Watermark
    recovered: list[str]  # committed runs the watermark had missed
    manifests: list[dict]  # of every committed run


def recover(layout: StoreLayout) -> StoreState:
    """Delete incomplete runs; count committed runs the watermark missed."""
    fs = layout.filesystem
    watermark = Watermark.load(layout.watermark, fs)
    recovered, manifests = [], []
    infos = fs.get_file_info(pafs.FileSelector(layout.ingest, allow_not_found=True))
    for info in infos:
        if info.type != pafs.FileType.Directory or not info.base_name.startswith("run-"):
            continue
        manifest = read_json(os.path.join(info.path, MANIFEST), filesystem=fs)
        if manifest is None:
            fs.delete_dir(info.path)  # crashed before its commit: redo from scratch
            continue
        manifests.append(manifest)
        if manifest["run_id"] not in watermark.runs:
            watermark.advance(manifest["run_id"], manifest["files"])
            recovered.append(manifest["run_id"])
    if recovered:
        watermark.save(layout.watermark, fs)
    return StoreState(watermark, recovered, manifests)


def _utc(moment: dt.datetime) -> dt.datetime:
    return moment.replace(tzinfo=dt.timezone.utc) if moment.tzinfo is None else moment


def _rules(config: PerfusionConfig, layout: StoreLayout) -> RowRules:
    now = dt.datetime.now(dt.timezone.utc)
    return RowRules(
        group_size=config.data.group_size,
        image_store=layout.images_uri,
        image_size=config.data.image_size,
        latest_time=now + dt.timedelta(seconds=config.data.max_clock_skew_s),
        earliest_time=_utc(config.data.earliest_event_time),
    )


def _planner(config: PerfusionConfig, context: RunContext, manifests: list[dict], now: dt.datetime):
    """summaries -> RunPlan, with the ids that earlier runs within the duplicate window grouped in the run's hours."""
    layout = context.layout

    def read_ids(file_index: int, rows: np.ndarray) -> pa.Array:
        staged = pq.read_table(context.staged(file_index), filesystem=layout.filesystem, columns=["event_id"])
        return staged["event_id"].combine_chunks().take(pa.array(rows))

    def plan_from(summaries: list[FileSummary]) -> RunPlan:
        hours = np.concatenate([s.event_hours for s in summaries if s.problem is None] or [np.zeros(0, np.int64)])
        earlier = earlier_event_ids(layout, manifests, hours, now, config.data.duplicate_window_hours)
        return plan_run(list(context.files), summaries, config.data.late_window_hours, earlier, read_ids)

    return plan_from


def ingest(config: PerfusionConfig, split: str = "train", engine: str = "ray", max_files: int = 0) -> IngestReport:
    """Consume every feedback partition past the watermark exactly once (at most `max_files` of them,
    oldest event hour first, when it is positive). See the module docstring."""
    if engine not in ENGINES:
        raise PerfusionError(f"unknown ingest engine {engine!r}", hint=f"use one of {', '.join(ENGINES)}")
    started = time.perf_counter()
    layout = StoreLayout(config.data.root, split)
    fs = layout.filesystem
    state = recover(layout)
    files = [name for name in list_partition_files(layout) if name not in state.watermark.consumed]
    files = files[:max_files] if max_files > 0 else files
    report = IngestReport(split=split, run_id=None, recovered_runs=state.recovered, engine=engine)
    if not files:
        report.seconds = time.perf_counter() - started
        return report
    run_id = _run_id(files)
    context = RunContext(config.data.root, split, run_id, tuple(files), _rules(config, layout),
                         config.data.label_policy, config.data.batch_rows)
    now = dt.datetime.now(dt.timezone.utc)
    plan_from = _planner(config, context, state.manifests, now)
    if engine == "ray":
        summaries, results = _run_ray(context, plan_from, config.cluster)
    else:
        summaries, results = _run_local(context, plan_from)
    rejected = [(files[s.index], s.problem) for s in sorted(summaries, key=lambda s: s.index) if s.problem]
    if rejected:
        _quarantine_files(layout, context.folder, rejected)
    counts = IngestCounts(files_quarantined=len(rejected))
    for result in results:
        counts.add(result.counts)
    rows_in_files = sum(s.rows for s in summaries)
    if counts.rows_read != rows_in_files or counts.rows_grouped + counts.rows_quarantined != counts.rows_read:
        raise RuntimeError(f"ingest accounting broke, nothing committed: {counts} for {rows_in_files} rows in files")
    staged = os.path.join(context.folder, STAGED)
    if fs.get_file_info(staged).type == pafs.FileType.Directory:
        fs.delete_dir(staged)  # before the commit: a committed run holds outputs only
    fault_point("ingest:written")
    spans = [r.hours for r in results if r.hours]
    manifest = {"run_id": run_id, "files": files, "counts": asdict(counts), "committed_at": now.isoformat(),
                "event_hours": [min(s[0] for s in spans), max(s[1] for s in spans)] if spans else None}
    atomic_write_json(os.path.join(context.folder, MANIFEST), manifest, fs)
    fault_point("ingest:committed")
    state.watermark.advance(run_id, files)
    state.watermark.save(layout.watermark, fs)
    fault_point("ingest:watermarked")
    delete_expired(layout, state.manifests, now, config.data.duplicate_window_hours, MANIFEST)
    report.run_id, report.files, report.counts = run_id, files, counts
    report.seconds = time.perf_counter() - started
    return report
