"""Row-level validation of feedback events (pure pyarrow + numpy; one partition file at a time).

Each row either passes, typed, or carries the reason it is quarantined together with the row as it
was read. Rows are never dropped: len(output) == len(input), always. A value that does not convert to
the schema's type (invalid UTF-8, an integer beyond int64, a time beyond the microsecond range) is a
reason on its row, never an exception for the file.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from perfusion_ray.data.image_store import image_problem
from perfusion_ray.data.schemas import EVENT_TYPES, FEATURES_TYPE, STATS_TYPE, VALIDATED_EVENT_SCHEMA

ID_PATTERN = r"^[A-Za-z0-9._:/@+=-]+$"
ID_MAX_LENGTH = 200  # checked apart from the pattern: a counted repetition makes the regex several times slower
SHA256_PATTERN = r"^[0-9a-f]{64}$"
# The spelling producers write (data/events.py), which the vectorised cast parses; others go row by row.
_CANONICAL_TIME = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z$"
_TIMESTAMP = pa.timestamp("us", tz="UTC")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_US_PER_UNIT = {"s": 1_000_000, "ms": 1_000, "us": 1}
_INT64_MAX = int(np.iinfo(np.int64).max)
_TEXT_COLUMNS = ("event_id", "request_id", "merchant_id", "prompt", "image_ref", "image_sha256", "event_type")


@dataclass(frozen=True)
class RowRules:
    """What a valid event row is, for one ingest run."""

    group_size: int
    image_store: str  # root of the image store (local path or URI)
    image_size: int | None
    latest_time: dt.datetime  # events after this (now + allowed skew) are quarantined as future
    earliest_time: dt.datetime  # events before this are implausible (a zero or default timestamp)


class _Reasons:
    """Reasons per row, collected as boolean masks (vectorised) and joined only for the rows they hit."""

    def __init__(self, n: int):
        self.n = n
        self.flags: list[tuple[np.ndarray, str | Callable[[int], str]]] = []

    def flag(self, mask: np.ndarray, reason: str | Callable[[int], str]) -> None:
        if mask.any():
            self.flags.append((mask, reason))

    def bad(self) -> np.ndarray:
        bad = np.zeros(self.n, dtype=bool)
        for mask, _ in self.flags:
            bad |= mask
        return bad

    def texts(self) -> pa.Array:
        texts: dict[int, list[str]] = {}
        for mask, reason in self.flags:
            for row in np.flatnonzero(mask):
                texts.setdefault(int(row), []).append(reason(row) if callable(reason) else reason)
        joined = [None] * self.n
        for row, parts in texts.items():
            joined[row] = "; ".join(parts)
        return pa.array(joined, pa.string())


def _mask(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A pyarrow boolean result as a numpy mask where null counts as True (bad)."""
    return np.asarray(pc.fill_null(values, True).to_numpy(zero_copy_only=False), dtype=bool)


def _single(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def _utf8_valid(array: pa.Array) -> bool:
    try:
        array.validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


def _is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _bytes_type(kind: pa.DataType) -> pa.DataType:
    """The binary type with the layout of a text type (a zero-copy view of its bytes)."""
    return pa.large_binary() if pa.types.is_large_string(kind) else pa.binary()


def _decode(value: bytes | None) -> tuple[str | None, bool]:
    """(text, whether the bytes were invalid UTF-8: then they are replaced by U+FFFD)."""
    if value is None:
        return None, False
    try:
        return value.decode("utf-8"), False
    except UnicodeDecodeError:
        return value.decode("utf-8", "replace"), True


def _as_text(column, n: int) -> tuple[pa.Array, np.ndarray]:
    """A string column, and the rows whose bytes were not UTF-8 (kept, replaced, so that the row is
    quarantined as read)."""
    array = _single(column)
    if pa.types.is_null(array.type):
        return pa.nulls(n, pa.string()), np.zeros(n, dtype=bool)
    if _utf8_valid(array):
        return array.cast(pa.string()), np.zeros(n, dtype=bool)
    decoded = [_decode(value) for value in array.view(_bytes_type(array.type)).to_pylist()]
    return pa.array([text for text, _ in decoded], pa.string()), np.array([bad for _, bad in decoded], dtype=bool)


def _decoded_map(array: pa.MapArray) -> tuple[pa.Array, np.ndarray]:
    """A map rebuilt from its bytes with invalid UTF-8 replaced, and the rows that had some."""
    item = array.type.item_type
    text_items = _is_text(item)
    raw = array.view(pa.map_(_bytes_type(array.type.key_type), _bytes_type(item) if text_items else item))
    rows, invalid = [], np.zeros(len(array), dtype=bool)
    for row, pairs in enumerate(raw.to_pylist()):
        if pairs is None:
            rows.append(None)
            continue
        entries = []
        for key, value in pairs:
            key, bad_key = _decode(key)
            value, bad_value = _decode(value) if text_items else (value, False)
            entries.append((key, value))
            invalid[row] |= bad_key or bad_value
        rows.append(entries)
    return pa.array(rows, pa.map_(pa.string(), pa.string() if text_items else item)), invalid


def _as_map(column, n: int, target: pa.DataType) -> tuple[pa.Array, np.ndarray]:
    """A map column in the schema's type, and the rows whose keys or values were not UTF-8."""
    array = _single(column)
    if pa.types.is_null(array.type):
        return pa.nulls(n, target), np.zeros(n, dtype=bool)
    invalid = np.zeros(n, dtype=bool)
    if not _utf8_valid(array):
        array, invalid = _decoded_map(array)
    return array.cast(target, safe=False), invalid  # unsafe: a 64-bit integer stat keeps its magnitude


def _as_int64(column, n: int) -> pa.Array:
    """Integers as int64; null where a value does not fit (an unsigned 64-bit value above int64's range)."""
    array = _single(column)
    if pa.types.is_null(array.type):
        return pa.nulls(n, pa.int64())
    if pa.types.is_uint64(array.type):
        too_big = pc.greater(array, pa.scalar(_INT64_MAX, pa.uint64()))
        array = pc.if_else(too_big, pa.scalar(None, pa.uint64()), array)
    return array.cast(pa.int64())


def _as_float64(column, n: int) -> pa.Array:
    array = _single(column)
    if pa.types.is_null(array.type):
        return pa.nulls(n, pa.float64())
    return array.cast(pa.float64(), safe=False)  # a 64-bit integer keeps its magnitude, not every digit


def _timestamps_to_us(array: pa.Array) -> pa.Array:
    """Timestamps of any unit as UTC microseconds (naive values taken as UTC), nanoseconds floored; null
    where a value is beyond the microsecond range."""
    raw = array.cast(pa.int64())
    valid = np.asarray(raw.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    values = np.asarray(raw.fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)
    if array.type.unit == "ns":
        micros = np.floor_divide(values, 1000)
    else:
        scale = _US_PER_UNIT[array.type.unit]
        fits = (values <= _INT64_MAX // scale) & (values >= -(_INT64_MAX // scale))
        valid &= fits
        micros = np.where(fits, values, 0) * scale
    return pa.array(micros, pa.int64(), mask=~valid).cast(_TIMESTAMP)


def _parse_one(text: str | None) -> int | None:
    """Microseconds since the epoch of an ISO-8601 text (UTC when it names no zone), or None."""
    try:
        value = dt.datetime.fromisoformat(text) if text else None
    except (TypeError, ValueError):
        return None
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return (value - _EPOCH) // dt.timedelta(microseconds=1)


def _parse_texts(texts: pa.Array) -> pa.Array:
    """ISO-8601 texts -> UTC microsecond timestamps; null where a text does not parse."""
    n = len(texts)
    micros, valid = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool)
    canonical = np.asarray(pc.fill_null(pc.match_substring_regex(texts, _CANONICAL_TIME), False), dtype=bool)
    fast = np.flatnonzero(canonical)
    try:
        parsed = texts.take(fast).cast(_TIMESTAMP).cast(pa.int64())
        micros[fast] = parsed.fill_null(0).to_numpy(zero_copy_only=False)
        valid[fast] = np.asarray(parsed.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
        slow = np.flatnonzero(~canonical)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # e.g. month 13 in the canonical spelling
        slow = np.arange(n)
    values = texts.take(slow).to_pylist()
    for row, text in zip(slow, values):
        parsed_one = _parse_one(text)
        if parsed_one is not None:
            micros[row], valid[row] = parsed_one, True
    return pa.array(micros, pa.int64(), mask=~valid).cast(_TIMESTAMP)


def parse_times(column, n: int) -> tuple[pa.Array, pa.Array, np.ndarray]:
    """(UTC microsecond timestamps, the times as read as text, rows whose text was not UTF-8); a time that
    does not parse, or does not fit, is null."""
    array = _single(column)
    if pa.types.is_timestamp(array.type):
        return _timestamps_to_us(array), array.cast(pa.string()), np.zeros(n, dtype=bool)
    texts, invalid = _as_text(array, n)
    return _parse_texts(texts), texts, invalid


def row_json_texts(table: pa.Table, rows: np.ndarray) -> list[str]:
    """The given rows as JSON, as read (the source `path` column left out): what quarantine keeps."""
    columns = [name for name in table.column_names if name != "path"]
    selected = table.select(columns).take(rows)
    for index, field in enumerate(selected.schema):
        if pa.types.is_timestamp(field.type):  # as text: a time beyond Python's datetime range still prints
            selected = selected.set_column(index, field.name, selected[field.name].cast(pa.string()))
    return [json.dumps(row, default=str, sort_keys=True) for row in selected.to_pylist()]


def _map_rows_with(array: pa.Array, item_bad: Callable[[pa.Array], np.ndarray]) -> np.ndarray:
    """Rows of a map column with at least one value for which item_bad is true."""
    offsets = np.asarray(array.offsets.to_numpy(zero_copy_only=False), dtype=np.int64)
    items = array.items.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
    parents = np.repeat(np.arange(len(array)), np.diff(offsets))
    return np.bincount(parents[item_bad(items)], minlength=len(array)) > 0


def _image_problems(refs: pa.Array, digests: pa.Array, checkable: np.ndarray, rules: RowRules) -> list[str | None]:
    """image_problem for each checkable row, called once per distinct (ref, digest) pair."""
    problems: list[str | None] = [None] * len(refs)
    rows = np.flatnonzero(checkable)
    if not len(rows):
        return problems
    pairs = pc.dictionary_encode(pc.binary_join_element_wise(refs.take(rows), digests.take(rows), "\n"))
    found = [image_problem(rules.image_store, *pair.split("\n"), rules.image_size)
             for pair in pairs.dictionary.to_pylist()]
    for row, code in zip(rows, pairs.indices.to_numpy(zero_copy_only=False)):
        problems[row] = found[code]
    return problems


def _id_problems(reasons: _Reasons, column: pa.Array, name: str) -> None:
    length = pc.utf8_length(column)
    missing = _mask(pc.equal(length, 0))
    well_formed = (np.asarray(pc.fill_null(pc.match_substring_regex(column, ID_PATTERN), False), dtype=bool)
                   & ~_mask(pc.greater(length, ID_MAX_LENGTH)))
    reasons.flag(missing, f"missing {name}")
    reasons.flag(~missing & ~well_formed, f"malformed {name}")


def validate_rows(table: pa.Table, rules: RowRules, source_file: str) -> pa.Table:
    """Type and check the raw feedback rows of one file (the columns of FEEDBACK_EVENT_SCHEMA, in any type
    schema_problem accepts) -> VALIDATED_EVENT_SCHEMA."""
    n = table.num_rows
    reasons = _Reasons(n)
    text = {}
    for name in _TEXT_COLUMNS:
        text[name], invalid = _as_text(table[name], n)
        reasons.flag(invalid, f"invalid UTF-8 in {name}")
    features, invalid = _as_map(table["merchant_features"], n, FEATURES_TYPE)
    reasons.flag(invalid, "invalid UTF-8 in merchant_features")
    stats, invalid = _as_map(table["merchant_stats"], n, STATS_TYPE)
    reasons.flag(invalid, "invalid UTF-8 in merchant_stats")
    times, time_texts, invalid = parse_times(table["event_time"], n)
    reasons.flag(invalid, "invalid UTF-8 in event_time")
    position = _as_int64(table["position"], n)
    value = _as_float64(table["value"], n)

    for name in ("event_id", "request_id", "merchant_id"):
        _id_problems(reasons, text[name], name)
    event_type = text["event_type"]
    unknown = _mask(pc.invert(pc.is_in(event_type, value_set=pa.array(EVENT_TYPES))))
    shown_types = event_type.to_pylist() if unknown.any() else None
    reasons.flag(unknown, lambda row: f"unknown event_type {shown_types[row]!r}")

    unparseable = np.asarray(times.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    shown_times = time_texts.to_pylist() if unparseable.any() else None
    reasons.flag(unparseable, lambda row: f"unparseable event_time {shown_times[row]!r}")
    reasons.flag(~unparseable & _mask(pc.greater(times, pa.scalar(rules.latest_time, _TIMESTAMP))),
                 "event_time in the future")
    reasons.flag(~unparseable & _mask(pc.less(times, pa.scalar(rules.earliest_time, _TIMESTAMP))),
                 f"event_time before {rules.earliest_time:%Y-%m-%d}: implausible")

    reasons.flag(_mask(pc.or_(pc.less(position, 0), pc.greater_equal(position, rules.group_size))),
                 f"position missing or outside 0..{rules.group_size - 1}")
    reasons.flag(_mask(pc.invert(pc.is_finite(value))), "value is missing, NaN or infinite")
    reasons.flag(_mask(pc.is_null(text["prompt"])), "missing prompt")
    reasons.flag(_map_rows_with(stats, lambda items: _mask(pc.invert(pc.is_finite(items)))),
                 "merchant_stats holds a missing, NaN or infinite value")
    reasons.flag(_map_rows_with(features, lambda items: _mask(pc.is_null(items))),
                 "merchant_features holds a missing value")

    refs, digests = text["image_ref"], text["image_sha256"]
    missing_ref = _mask(pc.equal(pc.utf8_length(refs), 0))
    reasons.flag(missing_ref, "missing image_ref")
    bad_digest = ~np.asarray(pc.fill_null(pc.match_substring_regex(digests, SHA256_PATTERN), False), dtype=bool)
    reasons.flag(bad_digest, "malformed image_sha256")
    image = _image_problems(refs, digests, ~bad_digest & ~missing_ref, rules)
    reasons.flag(np.array([problem is not None for problem in image], dtype=bool), lambda row: image[row])

    bad = np.flatnonzero(reasons.bad())
    as_read = pa.table({**text, "merchant_features": features, "merchant_stats": stats, "event_time": time_texts,
                        "position": position, "value": value})
    row_json = [None] * n
    for row, json_text in zip(bad, row_json_texts(as_read, bad)):
        row_json[row] = json_text
    computed = {"event_time": times, "position": position, "value": value, "merchant_features": features,
                "merchant_stats": stats, "reason": reasons.texts(), "row_json": pa.array(row_json, pa.string()),
                "path": pa.repeat(pa.scalar(source_file, pa.string()), n)}
    return pa.table([computed.get(name, text.get(name)) for name in VALIDATED_EVENT_SCHEMA.names],
                    schema=VALIDATED_EVENT_SCHEMA)
