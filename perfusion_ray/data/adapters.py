"""Adapters: public preference data sets -> group examples (GROUP_EXAMPLE_SCHEMA) + quarantine.

Pick-a-Pic v2 rows are pairwise choices with both images inline; PickaPic-rankings rows pick the best
of four images named by uid. Each row becomes one group, a dropped tie, or one quarantine record with
its reason, never nothing: rows_read == groups_written + ties_dropped + rows_rejected.

Refused rows: a v2 row whose has_label is false (the data set's own flag for a pair nobody judged; its
labels are not a choice), a strict preference between two identical images (byte-equal), and a second
row with a ranking_id already seen in the file (the first one is kept).

The input is streamed batch by batch, so image bytes are only held for one batch; the group rows
(strings, no bytes) are kept until the end and written atomically with the quarantine.

Decisions:
- A Pick-a-Pic tie (0.5, 0.5) carries no preference. It is kept by default, as a group with equal
  labels, because the objectives count and skip such groups; ties="drop" leaves it out instead.
- Images are stored as the bytes the data set holds (JPEG or PNG, not re-encoded), so image_sha256
  is the hash of the source bytes. Only the header is checked (that the bytes are a JPEG or PNG),
  not a full decode: decoding every image would dominate the run.
- PickaPic-rankings rows carry no image bytes, so their image_refs are the data set's image uids, not
  image store paths, and image_sha256 entries are empty strings: nothing can mistake a uid for a
  verified file in the store. Resolving uids to images is a separate step.
- event_time is null: the rows have no impression time we can trust as one.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from perfusion_ray.data.image_store import ImageStore
from perfusion_ray.data.schemas import GROUP_EXAMPLE_SCHEMA, QUARANTINE_SCHEMA
from perfusion_ray.data.validation import row_json_texts
from perfusion_ray.errors import PerfusionError
from perfusion_ray.storage import atomic_write_table, resolve_filesystem

AdapterKind = Literal["pickapic_v2", "pickapic_rankings"]
TiePolicy = Literal["keep", "drop"]
Row = dict[str, Any]

PICKAPIC_V2_COLUMNS = ("user_id", "ranking_id", "caption", "jpg_0", "jpg_1", "label_0", "label_1")  # plus has_label
RANKING_IMAGE_COLUMNS = ("image_0_uid", "image_1_uid", "image_2_uid", "image_3_uid")
PICKAPIC_RANKINGS_COLUMNS = ("user_id", *RANKING_IMAGE_COLUMNS, "best_image_uid")  # plus optional caption, ranking_id

_IMAGE_BYTES_COLUMNS = ("jpg_0", "jpg_1")
_V2_LABEL_PAIRS = {(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)}
_IMAGE_FORMATS = ("JPEG", "PNG")


@dataclass
class AdapterReport:
    rows_read: int = 0
    groups_written: int = 0
    ties: int = 0  # rows whose labels are all equal, kept or dropped
    ties_dropped: int = 0
    rows_rejected: int = 0
    reasons: dict[str, int] = field(default_factory=dict)  # rejection reason -> rows

    def reject(self, reason: str) -> None:
        self.rows_rejected += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1


def _missing(row: Row, names: tuple[str, ...]) -> str | None:
    """'missing a, b' for the named values that are null or empty, else None."""
    absent = [name for name in names if row.get(name) is None or row[name] in (b"", "")]
    return f"missing {', '.join(absent)}" if absent else None


def _image_format_problem(data: bytes) -> str | None:
    """Why the bytes are not a JPEG or PNG image, from the header only."""
    if not isinstance(data, bytes):
        return "not image bytes"
    try:
        with Image.open(io.BytesIO(data)) as image:
            found = image.format
    except Exception:  # noqa: BLE001 - PIL's header parsers raise OSError, ValueError, SyntaxError...
        return "not an image"
    return None if found in _IMAGE_FORMATS else f"a {found} image, expected JPEG or PNG"


def _group(request_id: str, user_id: Any, prompt: str, refs: list[str], digests: list[str], labels: list[float],
           source: str) -> Row:
    return {
        "request_id": request_id,
        "merchant_id": f"pickapic:{user_id}",
        "merchant_features": [],
        "merchant_stats": [],
        "prompt": prompt,
        "event_time": None,
        "image_refs": refs,
        "image_sha256": digests,
        "labels": labels,
        "source": source,
    }


def pickapic_v2_request_id(row: Row, number: int) -> str | None:
    return None if row.get("ranking_id") is None else f"pickapic_v2:{row['ranking_id']}"


def pickapic_v2_problem(row: Row) -> str | None:
    """Why a Pick-a-Pic v2 row cannot become a group, or None."""
    missing = _missing(row, PICKAPIC_V2_COLUMNS)
    if missing:
        return missing
    if row.get("has_label", True) not in (True,):  # absent column: every row is labelled
        return "has_label is not true: the pair carries no judgement"
    try:
        pair = (float(row["label_0"]), float(row["label_1"]))
    except (TypeError, ValueError):
        return "label_0 and label_1 must be numbers"
    if pair not in _V2_LABEL_PAIRS:
        return f"label pair {pair} is not (1, 0), (0, 1) or (0.5, 0.5)"
    if row["jpg_0"] == row["jpg_1"] and pair[0] != pair[1]:
        return "jpg_0 and jpg_1 are the same image but labelled a preference"
    for name in _IMAGE_BYTES_COLUMNS:
        problem = _image_format_problem(row[name])
        if problem:
            return f"{name}: {problem}"
    return None


def pickapic_v2_labels(row: Row) -> list[float]:
    return [float(row["label_0"]), float(row["label_1"])]


def pickapic_v2_group(row: Row, number: int, store: ImageStore) -> Row:
    """A group of K=2 from a valid row; both images go into the store."""
    refs, digests = zip(*(store.put(row[name]) for name in _IMAGE_BYTES_COLUMNS))
    return _group(pickapic_v2_request_id(row, number), row["user_id"], row["caption"], list(refs), list(digests),
                  pickapic_v2_labels(row), "pickapic_v2")


def pickapic_rankings_request_id(row: Row, number: int) -> str | None:
    """By ranking_id when the file has that column, else by row number (unique within one file only)."""
    if "ranking_id" not in row:
        return f"pickapic_rankings:{number}"
    return None if row["ranking_id"] is None else f"pickapic_rankings:{row['ranking_id']}"


def pickapic_rankings_problem(row: Row) -> str | None:
    """Why a PickaPic-rankings row cannot become a group, or None."""
    missing = _missing(row, ("user_id", *RANKING_IMAGE_COLUMNS, *(("ranking_id",) if "ranking_id" in row else ())))
    if missing:
        return missing
    uids = [row[name] for name in RANKING_IMAGE_COLUMNS]
    if len(set(uids)) != len(uids):
        return "image uids are not distinct"
    if row["best_image_uid"] not in uids:
        return "best_image_uid is none of the four image uids"
    return None


def pickapic_rankings_labels(row: Row) -> list[float]:
    return [1.0 if row[name] == row["best_image_uid"] else 0.0 for name in RANKING_IMAGE_COLUMNS]


def pickapic_rankings_group(row: Row, number: int, store: ImageStore) -> Row:
    """A group of K=4 from a valid row, referencing images by uid (see the module docstring)."""
    uids = [str(row[name]) for name in RANKING_IMAGE_COLUMNS]
    return _group(pickapic_rankings_request_id(row, number), row["user_id"], row.get("caption") or "", uids,
                  [""] * len(uids), pickapic_rankings_labels(row), "pickapic_rankings")


@dataclass(frozen=True)
class _Kind:
    columns: tuple[str, ...]
    request_id: Callable[[Row, int], str | None]
    problem: Callable[[Row], str | None]
    labels: Callable[[Row], list[float]]
    group: Callable[[Row, int, ImageStore], Row]


_KINDS: dict[str, _Kind] = {
    "pickapic_v2": _Kind(PICKAPIC_V2_COLUMNS, pickapic_v2_request_id, pickapic_v2_problem, pickapic_v2_labels,
                         pickapic_v2_group),
    "pickapic_rankings": _Kind(PICKAPIC_RANKINGS_COLUMNS, pickapic_rankings_request_id, pickapic_rankings_problem,
                               pickapic_rankings_labels, pickapic_rankings_group),
}


def _quarantine(batch: pa.Table, rows: list[int], reasons: list[str], request_ids: list[str | None],
                source_file: str) -> pa.Table:
    """Quarantine records for rejected rows; row_json leaves the image bytes out."""
    without_bytes = batch.drop_columns([name for name in _IMAGE_BYTES_COLUMNS if name in batch.column_names])
    return pa.table({
        "reason": pa.array(reasons, pa.string()),
        "source_file": pa.array([source_file] * len(rows), pa.string()),
        "event_id": pa.nulls(len(rows), pa.string()),
        "request_id": pa.array(request_ids, pa.string()),
        "row_json": pa.array(row_json_texts(without_bytes, np.array(rows, dtype=np.int64)), pa.string()),
    }, schema=QUARANTINE_SCHEMA)


def _adapt_batch(table: pa.Table, spec: _Kind, store: ImageStore, ties: TiePolicy, report: AdapterReport,
                 source_file: str, adopted: set[str]) -> tuple[pa.Table, pa.Table]:
    """(groups, quarantine) of one batch; counts go into the report, whose rows_read numbers the rows.
    `adopted` holds the request ids of the rows already kept (or dropped as ties) from this file."""
    kept: list[Row] = []
    rejected: list[int] = []
    reasons: list[str] = []
    request_ids: list[str | None] = []
    for offset, row in enumerate(table.to_pylist()):
        number = report.rows_read
        report.rows_read += 1
        problem = spec.problem(row)
        if problem is None and spec.request_id(row, number) in adopted:
            problem = "duplicate ranking_id: an earlier row with it is kept"
        if problem:
            report.reject(problem)
            rejected.append(offset)
            reasons.append(problem)
            request_ids.append(spec.request_id(row, number))
            continue
        adopted.add(spec.request_id(row, number))
        if len(set(spec.labels(row))) == 1:
            report.ties += 1
            if ties == "drop":
                report.ties_dropped += 1
                continue
        kept.append(spec.group(row, number, store))
    report.groups_written += len(kept)
    groups = pa.Table.from_pylist(kept, schema=GROUP_EXAMPLE_SCHEMA)
    return groups, _quarantine(table, rejected, reasons, request_ids, source_file)


def adapt_file(kind: AdapterKind, input_path: str, output_dir: str, image_store_root: str, ties: TiePolicy = "keep",
               batch_rows: int = 64) -> AdapterReport:
    """Stream one parquet file of `kind` into output_dir/groups.parquet and output_dir/quarantine.parquet.

    batch_rows is small by default because a Pick-a-Pic v2 batch holds its image bytes in memory.
    """
    if kind not in _KINDS:
        raise PerfusionError(f"unknown adapter kind {kind!r}", hint=f"use one of {', '.join(_KINDS)}")
    if ties not in ("keep", "drop"):
        raise PerfusionError(f"unknown ties policy {ties!r}", hint="use keep or drop")
    spec = _KINDS[kind]
    store = ImageStore(image_store_root)
    in_fs, in_path = resolve_filesystem(input_path)
    out_fs, out_dir = resolve_filesystem(output_dir)
    report = AdapterReport()
    groups, quarantine = [GROUP_EXAMPLE_SCHEMA.empty_table()], [QUARANTINE_SCHEMA.empty_table()]
    adopted: set[str] = set()
    try:
        with in_fs.open_input_file(in_path) as handle:
            parquet = pq.ParquetFile(handle)
            missing = [name for name in spec.columns if name not in parquet.schema_arrow.names]
            if missing:
                raise PerfusionError(f"{input_path}: missing column(s) {', '.join(missing)} for {kind}",
                                     hint=f"a {kind} file has columns {', '.join(spec.columns)}")
            for batch in parquet.iter_batches(batch_size=batch_rows):
                batch_groups, batch_quarantine = _adapt_batch(pa.Table.from_batches([batch]), spec, store, ties,
                                                              report, input_path, adopted)
                groups.append(batch_groups)
                quarantine.append(batch_quarantine)
    except FileNotFoundError as exc:
        raise PerfusionError(f"{input_path}: no such file", hint="--input names a parquet file") from exc
    except (pa.ArrowException, OSError) as exc:  # not parquet, or damaged: nothing is written
        detail = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:200]
        raise PerfusionError(f"{input_path}: not a readable parquet file ({detail})",
                             hint=f"--input names a {kind} parquet file") from exc
    atomic_write_table(pa.concat_tables(groups), os.path.join(out_dir, "groups.parquet"), out_fs)
    atomic_write_table(pa.concat_tables(quarantine), os.path.join(out_dir, "quarantine.parquet"), out_fs)
    return report
