"""Row-level validation of feedback events (pure pyarrow; runs inside Ray Data map_batches).

Each row either passes, typed, or carries the reason it is quarantined together with the row as it
was read. Rows are never dropped: len(output) == len(input), always.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from perfusion_ray.data.image_store import image_problem
from perfusion_ray.data.schemas import EVENT_TYPES, FEEDBACK_EVENT_SCHEMA, VALIDATED_EVENT_SCHEMA

ID_PATTERN = r"^[A-Za-z0-9._:/@+=-]{1,200}$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
_TIMESTAMP = pa.timestamp("us", tz="UTC")


@dataclass(frozen=True)
class RowRules:
    """What a valid event row is, for one ingest run."""

    group_size: int
    image_store: str  # root of the image store (local path or URI)
    image_size: int | None
    latest_time: dt.datetime  # events after this (now + allowed skew) are quarantined as future


def _parse_times(column: pa.Array) -> pa.Array:
    """Timestamps in UTC; null where a string does not parse."""
    if pa.types.is_timestamp(column.type):
        return column.cast(_TIMESTAMP) if column.type.tz else pc.assume_timezone(column, "UTC").cast(_TIMESTAMP)
    try:
        return column.cast(_TIMESTAMP)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        parsed = []
        for text in column.to_pylist():
            try:
                value = dt.datetime.fromisoformat(text) if text else None
                if value is not None and value.tzinfo is None:
                    value = value.replace(tzinfo=dt.timezone.utc)
                parsed.append(value)
            except (TypeError, ValueError):
                parsed.append(None)
        return pa.array(parsed, type=_TIMESTAMP)


def _bad(mask: pa.Array) -> np.ndarray:
    """A pyarrow boolean expression result as a numpy mask where null counts as bad."""
    return np.asarray(pc.fill_null(mask, True).to_numpy(zero_copy_only=False), dtype=bool)


def _id_problems(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    column = table[name]
    missing = _bad(pc.equal(pc.utf8_length(column), 0))
    malformed = ~missing & ~np.asarray(pc.fill_null(pc.match_substring_regex(column, ID_PATTERN), False))
    return missing, malformed


def row_json_texts(table: pa.Table, rows: np.ndarray) -> list[str]:
    """The given rows as JSON, as read (the source `path` column left out): what quarantine keeps."""
    columns = [name for name in table.column_names if name != "path"]
    return [json.dumps(row, default=str, sort_keys=True) for row in table.select(columns).take(rows).to_pylist()]


def validate_rows(table: pa.Table, rules: RowRules) -> pa.Table:
    """Type and check a batch of raw feedback rows (raw columns + `path`) -> VALIDATED_EVENT_SCHEMA."""
    n = table.num_rows
    reasons: list[list[str]] = [[] for _ in range(n)]

    def flag(mask: np.ndarray, reason) -> None:
        for row in np.flatnonzero(mask):
            reasons[row].append(reason(row) if callable(reason) else reason)

    for name in ("event_id", "request_id", "merchant_id"):
        missing, malformed = _id_problems(table, name)
        flag(missing, f"missing {name}")
        flag(malformed, f"malformed {name}")

    event_type = table["event_type"]
    unknown = _bad(pc.invert(pc.is_in(event_type, value_set=pa.array(EVENT_TYPES))))
    shown_types = event_type.to_pylist() if unknown.any() else None
    flag(unknown, lambda row: f"unknown event_type {shown_types[row]!r}")

    times = _parse_times(table["event_time"])
    unparseable = np.asarray(times.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    raw_times = table["event_time"].to_pylist() if unparseable.any() else None
    flag(unparseable, lambda row: f"unparseable event_time {raw_times[row]!r}")
    future = ~unparseable & _bad(pc.greater(times, pa.scalar(rules.latest_time, _TIMESTAMP)))
    flag(future, "event_time in the future")

    position = table["position"].cast(pa.int64())
    flag(_bad(pc.or_(pc.less(position, 0), pc.greater_equal(position, rules.group_size))),
         f"position missing or outside 0..{rules.group_size - 1}")

    value = table["value"].cast(pa.float64())
    flag(_bad(pc.invert(pc.is_finite(value))), "value is missing, NaN or infinite")
    flag(_bad(pc.is_null(table["prompt"])), "missing prompt")

    refs, digests = table["image_ref"], table["image_sha256"]
    flag(_bad(pc.equal(pc.utf8_length(refs), 0)), "missing image_ref")
    bad_digest = ~np.asarray(pc.fill_null(pc.match_substring_regex(digests, SHA256_PATTERN), False))
    flag(bad_digest, "malformed image_sha256")
    checkable = ~bad_digest & ~_bad(pc.equal(pc.utf8_length(refs), 0))
    ref_list, digest_list = refs.to_pylist(), digests.to_pylist()
    for row in np.flatnonzero(checkable):
        problem = image_problem(rules.image_store, ref_list[row], digest_list[row], rules.image_size)
        if problem:
            reasons[row].append(problem)

    bad_rows = np.array([bool(r) for r in reasons], dtype=bool)
    row_json = [None] * n
    for row, text in zip(np.flatnonzero(bad_rows), row_json_texts(table, np.flatnonzero(bad_rows))):
        row_json[row] = text
    columns = {}
    for field in FEEDBACK_EVENT_SCHEMA:
        if field.name == "event_time":
            columns[field.name] = times
        elif field.name in ("position",):
            columns[field.name] = pc.if_else(pa.array(bad_rows), pa.scalar(None, pa.int64()), position).cast(pa.int32())
        elif field.name == "value":
            columns[field.name] = value
        else:
            columns[field.name] = table[field.name].cast(field.type)
    columns["reason"] = pa.array(["; ".join(r) if r else None for r in reasons], pa.string())
    columns["row_json"] = pa.array(row_json, pa.string())
    columns["path"] = table["path"].cast(pa.string())
    return pa.table(columns, schema=VALIDATED_EVENT_SCHEMA)
