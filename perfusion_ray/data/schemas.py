"""Arrow schemas of the feedback store, the group examples and the quarantine.

Feedback events are written by producers we do not control (the design endpoint, logs, simulators),
so the event schema keeps `event_time` as an ISO-8601 string: parsing it is validation's job, and a
bad time is one quarantined row rather than a file that cannot be read.
"""

from __future__ import annotations

import pyarrow as pa

EVENT_TYPES = ("impression", "select", "click", "order", "return")

FEATURES_TYPE = pa.map_(pa.string(), pa.string())
STATS_TYPE = pa.map_(pa.string(), pa.float64())

FEEDBACK_EVENT_SCHEMA = pa.schema([
    pa.field("event_id", pa.string()),  # unique per event; resending an event reuses it
    pa.field("event_time", pa.string()),  # ISO-8601 UTC, e.g. 2026-01-05T10:03:12.5Z
    pa.field("request_id", pa.string()),  # one request = one group of K candidates
    pa.field("merchant_id", pa.string()),
    pa.field("merchant_features", FEATURES_TYPE),  # observable categorical side features
    pa.field("merchant_stats", STATS_TYPE),  # observable numeric side features
    pa.field("prompt", pa.string()),
    pa.field("image_ref", pa.string()),  # path relative to the image store root
    pa.field("image_sha256", pa.string()),  # hex digest of the image file's bytes
    pa.field("position", pa.int32()),  # 0..K-1 within the group
    pa.field("event_type", pa.string()),  # one of EVENT_TYPES
    pa.field("value", pa.float64()),  # e.g. order amount; 1.0 when the event has no magnitude
])

# Validated events: typed time, the position as read (a request-level check needs impossible ones), plus
# the two columns validation adds.
VALIDATED_EVENT_SCHEMA = (
    FEEDBACK_EVENT_SCHEMA.set(1, pa.field("event_time", pa.timestamp("us", tz="UTC")))
    .set(9, pa.field("position", pa.int64()))  # null when missing or beyond int64
    .append(pa.field("reason", pa.string()))  # null when the row passed, else why it is quarantined
    .append(pa.field("row_json", pa.string()))  # the row as read, kept for quarantined rows
    .append(pa.field("path", pa.string()))  # source partition file
)

GROUP_EXAMPLE_SCHEMA = pa.schema([
    pa.field("request_id", pa.string()),
    pa.field("merchant_id", pa.string()),
    pa.field("merchant_features", FEATURES_TYPE),
    pa.field("merchant_stats", STATS_TYPE),
    pa.field("prompt", pa.string()),
    pa.field("event_time", pa.timestamp("us", tz="UTC")),  # the request's impression time
    pa.field("image_refs", pa.list_(pa.string())),  # K, in position order
    pa.field("image_sha256", pa.list_(pa.string())),
    pa.field("labels", pa.list_(pa.float32())),  # graded labels from the label policy
    pa.field("source", pa.string()),  # ingest run id, or the adapter that produced the group
])

QUARANTINE_SCHEMA = pa.schema([
    pa.field("reason", pa.string()),
    pa.field("source_file", pa.string()),
    pa.field("event_id", pa.string()),  # as read, when there is one
    pa.field("request_id", pa.string()),
    pa.field("row_json", pa.string()),  # the whole row as read; null for a whole-file quarantine
])


def _is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _is_number(kind: pa.DataType) -> bool:
    return pa.types.is_floating(kind) or pa.types.is_integer(kind)


def _text_map(kind: pa.DataType) -> bool:
    return pa.types.is_map(kind) and _is_text(kind.key_type) and _is_text(kind.item_type)


def _number_map(kind: pa.DataType) -> bool:
    return pa.types.is_map(kind) and _is_text(kind.key_type) and _is_number(kind.item_type)


# Types each feedback column may arrive in and still be read (validation converts them to the schema's
# type row by row, so a value that does not convert is one quarantined row). A column of null type is
# read as all-missing: every row then carries the reason for its missing value.
COMPATIBLE_TYPES = {
    "event_time": lambda kind: _is_text(kind) or pa.types.is_timestamp(kind),
    "position": pa.types.is_integer,
    "value": _is_number,
    "merchant_features": _text_map,
    "merchant_stats": _number_map,
}


def schema_problem(schema: pa.Schema) -> str | None:
    """Why a partition file's schema cannot be read as feedback events, or None if it can."""
    missing = [name for name in FEEDBACK_EVENT_SCHEMA.names if name not in schema.names]
    if missing:
        return f"schema: missing column(s) {', '.join(missing)}"
    repeated = [name for name in FEEDBACK_EVENT_SCHEMA.names if schema.names.count(name) > 1]
    if repeated:
        return f"schema: column(s) {', '.join(repeated)} appear more than once"
    for field in FEEDBACK_EVENT_SCHEMA:
        actual = schema.field(field.name).type
        compatible = COMPATIBLE_TYPES.get(field.name, _is_text)
        if not (pa.types.is_null(actual) or compatible(actual)):
            return f"schema: column {field.name} has type {actual}, expected {field.type}"
    return None
