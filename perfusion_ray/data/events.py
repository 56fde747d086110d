"""Feedback event rows as every producer writes them (the FashionWorld simulator, the design endpoint).

One place says how an event id and an event time are spelled and how rows become a table of
FEEDBACK_EVENT_SCHEMA, so ingest reads whatever a producer wrote the same way.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa

from perfusion_ray.data.schemas import FEEDBACK_EVENT_SCHEMA


def event_id(request_id: str, position: int, event_type: str, n: int = 0) -> str:
    """The id of the n-th `event_type` event at `position` of a request (an impression is n = 0)."""
    return f"{request_id}.{position}.{event_type}.{n}"


def event_times(times_us: Iterable[int]) -> list[str]:
    """Microseconds since the epoch -> ISO-8601 UTC strings with a trailing Z (the schema's spelling)."""
    times = np.datetime_as_string(np.array(list(times_us), dtype="datetime64[us]"), unit="us")
    return [text + "Z" for text in times]


def event_time(moment: dt.datetime) -> str:
    delta = moment.astimezone(dt.timezone.utc) - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
    return event_times([delta // dt.timedelta(microseconds=1)])[0]


def event_row(*, event_id: str, event_time: str, request_id: str, merchant_id: str,
              merchant_features: Mapping[str, str], merchant_stats: Mapping[str, float], prompt: str,
              image_ref: str, image_sha256: str, position: int, event_type: str, value: float = 1.0) -> dict:
    """One row of FEEDBACK_EVENT_SCHEMA (keyword-only: a row is never built by position)."""
    return {"event_id": event_id, "event_time": event_time, "request_id": request_id, "merchant_id": merchant_id,
            "merchant_features": dict(merchant_features), "merchant_stats": {k: float(v) for k, v in merchant_stats.items()},
            "prompt": prompt, "image_ref": image_ref, "image_sha256": image_sha256, "position": int(position),
            "event_type": event_type, "value": float(value)}


def events_table(rows: Sequence[Mapping]) -> pa.Table:
    """Rows built by event_row -> a table of FEEDBACK_EVENT_SCHEMA."""
    return pa.Table.from_pylist([dict(row) for row in rows], schema=FEEDBACK_EVENT_SCHEMA)
