"""The ingest watermark: which feedback partition files, and which ingest runs, are consumed.

A set rather than a single time: partitions of an hour may arrive late or from several writers, and
each file must be consumed exactly once whatever order it lands in. Stored atomically.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow.fs as pafs

from perfusion_ray.storage import atomic_write_json, read_json


@dataclass
class Watermark:
    consumed: set[str] = field(default_factory=set)  # partition files, relative to the feedback root
    runs: set[str] = field(default_factory=set)  # committed ingest runs already counted

    @classmethod
    def load(cls, path: str, filesystem: pafs.FileSystem | None = None) -> "Watermark":
        state = read_json(path, default={}, filesystem=filesystem)
        return cls(set(state.get("consumed", [])), set(state.get("runs", [])))

    def save(self, path: str, filesystem: pafs.FileSystem | None = None) -> None:
        atomic_write_json(path, {"consumed": sorted(self.consumed), "runs": sorted(self.runs)}, filesystem)

    def advance(self, run_id: str, files: list[str]) -> None:
        self.consumed.update(files)
        self.runs.add(run_id)
