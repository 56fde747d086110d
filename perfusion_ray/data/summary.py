"""What is in a split of the store: groups, labels, quarantine reasons, watermark (for `data inspect`)."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq

from perfusion_ray.config import LabelPolicy
from perfusion_ray.data.labels import is_positive
from perfusion_ray.data.store import StoreLayout, list_partition_files
from perfusion_ray.data.watermark import Watermark


@dataclass
class StoreSummary:
    split: str
    partition_files: int = 0
    consumed_files: int = 0
    ingest_runs: int = 0
    groups: int = 0
    merchants: int = 0
    label_counts: dict[float, int] = field(default_factory=dict)  # candidates per graded label
    groups_with_preference: int = 0  # both a P and an N candidate
    groups_all_positive: int = 0
    groups_all_negative: int = 0
    quarantined_rows: int = 0
    quarantined_files: int = 0
    quarantine_reasons: dict[str, int] = field(default_factory=dict)  # reason kind -> rows

    @property
    def pending_files(self) -> int:
        return self.partition_files - self.consumed_files


def reason_kind(reason: str) -> str:
    """A reason without its row-specific details ("unknown event_type 'x'" -> "unknown event_type")."""
    first = reason.split("; ")[0]
    return re.sub(r"( '.*'| \S+\.png.*| \d+ impressions.*| at position \d+| outside .*|: .*)$", "", first)


def summarize(root: str, split: str, policy: LabelPolicy) -> StoreSummary:
    layout = StoreLayout(root, split)
    fs = layout.filesystem
    summary = StoreSummary(split=split)
    summary.partition_files = len(list_partition_files(layout))
    summary.consumed_files = len(Watermark.load(layout.watermark, fs).consumed)
    summary.ingest_runs = len(layout.committed_runs())
    labels_seen: Counter = Counter()
    merchants: set[str] = set()
    for path in layout.output_files("groups"):
        table = pq.read_table(path, filesystem=fs, columns=["merchant_id", "labels"])
        summary.groups += table.num_rows
        merchants.update(table["merchant_id"].to_pylist())
        for labels in table["labels"].to_pylist():
            labels_seen.update(labels)
            positive = is_positive(np.array(labels), policy)
            summary.groups_with_preference += bool(positive.any() and not positive.all())
            summary.groups_all_positive += bool(positive.all())
            summary.groups_all_negative += bool(not positive.any())
    summary.merchants = len(merchants)
    summary.label_counts = dict(sorted(labels_seen.items()))
    reasons: Counter = Counter()
    for path in layout.output_files("quarantine"):
        table = pq.read_table(path, filesystem=fs, columns=["reason", "row_json"])
        whole_files = table["row_json"].is_null().to_pylist()
        for reason, whole_file in zip(table["reason"].to_pylist(), whole_files):
            reasons[("file " if whole_file else "") + reason_kind(reason)] += 1
            summary.quarantined_files += whole_file
            summary.quarantined_rows += not whole_file
    summary.quarantine_reasons = dict(reasons.most_common())
    return summary
