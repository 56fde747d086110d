"""The event ids each committed ingest run grouped, by event hour: what the duplicate check across runs reads.

Stored inside the run folder (run-<id>/event_ids/part-*.parquet: event_id, event_hour), so they are
committed with the run's groups (manifest last) and a crashed run leaves none behind; the manifest records
the run's event-hour range and when it was committed. A new run reads, from the runs committed within the
last `duplicate_window_hours`, the ids of the event hours its own valid rows fall in (row-group statistics
prune the rest). Ids of runs older than that window are deleted. So the store keeps, and a run reads, at
most one window of ingest, however old the store is.

What is caught: a copy of an event that a run within the window grouped, carrying its original
event_time (a resend, a file stored again under another name); within one run every copy of an id, at any
time. What is not: a copy that arrives after the window, or the same id under another event hour in a
later run.
"""

from __future__ import annotations

import datetime as dt
import os

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from perfusion_ray.data.store import StoreLayout
from perfusion_ray.storage import atomic_write_json

EVENT_IDS = "event_ids"
EVENT_IDS_SCHEMA = pa.schema([pa.field("event_id", pa.string()), pa.field("event_hour", pa.int64())])


def grouped_ids_table(event_ids: pa.Array, hours: np.ndarray) -> pa.Table:
    """The ids a segment grouped, sorted by hour (row-group statistics then prune reads by hour)."""
    table = pa.table({"event_id": event_ids, "event_hour": pa.array(hours, pa.int64())}, schema=EVENT_IDS_SCHEMA)
    return table.sort_by("event_hour")


def _hour_range(manifest: dict) -> tuple[int, int] | None:
    hours = manifest.get("event_hours")
    return (int(hours[0]), int(hours[1])) if hours else None


def _retained(manifest: dict, now: dt.datetime, window_hours: int) -> bool:
    committed = manifest.get("committed_at")
    if not committed or manifest.get("event_ids_deleted"):
        return False
    return dt.datetime.fromisoformat(committed) >= now - dt.timedelta(hours=window_hours)


def earlier_event_ids(layout: StoreLayout, manifests: list[dict], hours: np.ndarray, now: dt.datetime,
                      window_hours: int) -> pa.Array:
    """Ids that runs committed within the window grouped in any of these event hours."""
    wanted = np.unique(hours)
    if not len(wanted):
        return pa.array([], pa.string())
    low, high = int(wanted[0]), int(wanted[-1])
    fs = layout.filesystem
    found = []
    for manifest in manifests:
        span = _hour_range(manifest)
        if span is None or span[1] < low or span[0] > high or not _retained(manifest, now, window_hours):
            continue
        folder = os.path.join(layout.run_dir(manifest["run_id"]), EVENT_IDS)
        infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
        for path in sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")):
            table = pq.read_table(path, filesystem=fs, columns=["event_id"],
                                  filters=[("event_hour", "in", wanted.tolist())])
            found.append(table["event_id"].combine_chunks())
    return pa.concat_arrays(found) if found else pa.array([], pa.string())


def delete_expired(layout: StoreLayout, manifests: list[dict], now: dt.datetime, window_hours: int,
                   manifest_name: str) -> None:
    """Delete the ids of runs committed before the window, and mark their manifests so (once)."""
    fs = layout.filesystem
    for manifest in manifests:
        if not manifest.get("committed_at") or manifest.get("event_ids_deleted") or \
                _retained(manifest, now, window_hours):
            continue
        folder = layout.run_dir(manifest["run_id"])
        if fs.get_file_info(os.path.join(folder, EVENT_IDS)).type == pafs.FileType.Directory:
            fs.delete_dir(os.path.join(folder, EVENT_IDS))
        manifest["event_ids_deleted"] = True
        atomic_write_json(os.path.join(folder, manifest_name), manifest, fs)
