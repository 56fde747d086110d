"""The feedback store's layout, and appending event partitions to it.

    {root}/images/ab/ab12...png                             content-addressed images (shared by splits)
    {root}/{split}/feedback/event_hour=2026-01-05T10/*.parquet   appended atomically, never edited
    {root}/{split}/ingest/run-<id>/{groups,quarantine}/*.parquet  one committed ingest run
    {root}/{split}/ingest/run-<id>/manifest.json            the partition files that run consumed
    {root}/{split}/ingest/_staging/run-<id>/                an uncommitted run (deleted on the next start)
    {root}/{split}/state/watermark.json                     the partition files consumed so far
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs

from perfusion_ray.storage import atomic_write_table, is_temporary, is_uri, join, resolve_filesystem

SPLITS = ("train", "holdout")


@dataclass(frozen=True)
class StoreLayout:
    root: str
    split: str = "train"

    def __post_init__(self):
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")

    @property
    def filesystem(self) -> pafs.FileSystem:
        return resolve_filesystem(self.root)[0]

    @property
    def base(self) -> str:
        return resolve_filesystem(self.root)[1]

    def _path(self, *parts: str) -> str:
        return os.path.join(self.base, *parts)

    @property
    def images(self) -> str:
        return self._path("images")

    @property
    def images_uri(self) -> str:
        return join(self.root, "images") if is_uri(self.root) else self.images

    @property
    def feedback(self) -> str:
        return self._path(self.split, "feedback")

    @property
    def ingest(self) -> str:
        return self._path(self.split, "ingest")

    @property
    def staging(self) -> str:
        return self._path(self.split, "ingest", "_staging")

    @property
    def watermark(self) -> str:
        return self._path(self.split, "state", "watermark.json")

    @property
    def report(self) -> str:
        return self._path(self.split, "simulation.json")

    def run_dir(self, run_id: str) -> str:
        return os.path.join(self.ingest, f"run-{run_id}")

    def committed_runs(self) -> list[str]:
        """Ids of committed ingest runs, sorted."""
        infos = self.filesystem.get_file_info(pafs.FileSelector(self.ingest, allow_not_found=True))
        return sorted(i.base_name[4:] for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("run-"))

    def output_files(self, kind: str, runs: list[str] | None = None) -> list[str]:
        """Committed parquet files of one kind ('groups' or 'quarantine'), in run order: of every committed
        run, or of the given runs only."""
        files = []
        for run_id in self.committed_runs() if runs is None else runs:
            folder = os.path.join(self.run_dir(run_id), kind)
            infos = self.filesystem.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
            files += sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
        return files


def hour_partition(time: dt.datetime) -> str:
    return "event_hour=" + time.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H")


def write_partition(layout: StoreLayout, hour: dt.datetime, table: pa.Table, name: str) -> str:
    """Append one partition file for an event hour (atomically); returns its path."""
    path = os.path.join(layout.feedback, hour_partition(hour), f"part-{name}.parquet")
    atomic_write_table(table, path, layout.filesystem)
    return path


def list_partition_files(layout: StoreLayout) -> list[str]:
    """Every finished file under the feedback root (any name: a stray non-parquet file is quarantined)."""
    selector = pafs.FileSelector(layout.feedback, recursive=True, allow_not_found=True)
    infos = layout.filesystem.get_file_info(selector)
    return sorted(
        os.path.relpath(i.path, layout.feedback)
        for i in infos
        if i.type == pafs.FileType.File and not is_temporary(i.base_name)
    )
