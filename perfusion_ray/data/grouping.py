"""Group-level checks and assembly of validated events into group examples (pure; numpy + pyarrow).

Input: validated rows of whole requests (all events of a request are in the same table), with the
reasons of row-level checks and of the run's duplicate and window checks already set. Output:
group examples, and every row that did not make it into one, with its reason. Nothing is dropped:
rows in == rows quarantined + rows that became part of a group.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from perfusion_ray.config import LabelPolicy
from perfusion_ray.data.labels import graded_labels
from perfusion_ray.data.schemas import EVENT_TYPES, GROUP_EXAMPLE_SCHEMA, QUARANTINE_SCHEMA
from perfusion_ray.data.validation import row_json_texts


@dataclass(frozen=True)
class Assembled:
    groups: pa.Table  # GROUP_EXAMPLE_SCHEMA
    quarantine: pa.Table  # QUARANTINE_SCHEMA
    grouped: pa.Table  # event_id and event_time of the validated rows that went into a group

    @property
    def rows_grouped(self) -> int:
        return self.grouped.num_rows


def quarantine_rows(table: pa.Table, reasons: pa.Array | list[str]) -> pa.Table:
    """Quarantine records for validated rows (row_json is filled here when validation left it empty)."""
    row_json = table["row_json"]
    if row_json.null_count:
        filled = row_json.to_pylist()
        missing = [i for i, text in enumerate(filled) if text is None]
        for i, text in zip(missing, row_json_texts(table.drop_columns(["reason", "row_json"]), np.array(missing))):
            filled[i] = text
        row_json = pa.array(filled, pa.string())
    return pa.table({
        "reason": pa.array(reasons, pa.string()),
        "source_file": table["path"],
        "event_id": table["event_id"],
        "request_id": table["request_id"],
        "row_json": row_json,
    }, schema=QUARANTINE_SCHEMA)


def _codes(column) -> tuple[np.ndarray, pa.Array]:
    encoded = pc.dictionary_encode(column).combine_chunks() if isinstance(column, pa.ChunkedArray) else pc.dictionary_encode(column)
    return encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64), encoded.dictionary


def _impossible_position_requests(validated: pa.Table, group_size: int) -> pa.Array:
    """Request ids with an impression at a position outside 0..K-1 (or none): a group of another size, which
    must not be cut down to K."""
    impressions = pc.fill_null(pc.equal(validated["event_type"], "impression"), False)
    position = validated["position"]
    outside = pc.fill_null(pc.or_(pc.less(position, 0), pc.greater_equal(position, group_size)), True)
    flagged = validated["request_id"].filter(pc.and_(impressions, outside))
    return pc.unique(flagged.drop_null())


def assemble_groups(validated: pa.Table, group_size: int, policy: LabelPolicy, source: str) -> Assembled:
    empty_groups = GROUP_EXAMPLE_SCHEMA.empty_table()
    row_bad = np.asarray(validated["reason"].is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    pieces = [quarantine_rows(validated.filter(pa.array(row_bad)), validated["reason"].filter(pa.array(row_bad)))]
    impossible = _impossible_position_requests(validated, group_size)
    good = validated.filter(pa.array(~row_bad))
    if good.num_rows == 0:
        return Assembled(empty_groups, pa.concat_tables(pieces), good.select(["event_id", "event_time"]))

    k = group_size
    times = good["event_time"].cast(pa.int64()).to_numpy(zero_copy_only=False)
    request, request_names = _codes(good["request_id"])
    merchant, _ = _codes(good["merchant_id"])
    image, _ = _codes(good["image_ref"])
    types = pc.index_in(good["event_type"], value_set=pa.array(EVENT_TYPES)).to_numpy(zero_copy_only=False)
    type_index = {name: i for i, name in enumerate(EVENT_TYPES)}
    position = good["position"].to_numpy(zero_copy_only=False).astype(np.int64)
    num_requests = len(request_names)
    slot = request * k + position
    impression = types == type_index["impression"]

    impressions = np.bincount(slot[impression], minlength=num_requests * k).reshape(num_requests, k)
    merchant_low = np.full(num_requests, np.iinfo(np.int64).max)
    merchant_high = np.full(num_requests, -1)
    np.minimum.at(merchant_low, request, merchant)
    np.maximum.at(merchant_high, request, merchant)
    request_reason = np.full(num_requests, None, dtype=object)
    per_request = impressions.sum(1)
    for r in np.flatnonzero(per_request == 0):
        request_reason[r] = "no impression for request: feedback on a group that was never served"
    for r in np.flatnonzero((per_request > 0) & (impressions > 1).any(1)):
        request_reason[r] = f"duplicate impression at position {int(np.argmax(impressions[r] > 1))}"
    for r in np.flatnonzero((per_request > 0) & (impressions <= 1).all(1) & (per_request != k)):
        request_reason[r] = f"group of the wrong size: {int(per_request[r])} impressions, expected {k}"
    for r in np.flatnonzero((merchant_low != merchant_high) & (request_reason == None)):  # noqa: E711
        request_reason[r] = "merchant_id differs within request"
    for r in np.flatnonzero(np.asarray(pc.is_in(request_names, value_set=impossible).to_numpy(zero_copy_only=False))):
        request_reason[r] = f"request has impressions outside positions 0..{k - 1}"

    # Feedback on a position must name the image that was served there.
    served = np.full(num_requests * k, -1)
    served[slot[impression]] = image[impression]
    row_reason = np.array(request_reason[request], dtype=object)
    mismatched = (row_reason == None) & (served[slot] != image)  # noqa: E711
    row_reason[mismatched] = "image_ref differs from the impression at this position"
    served_time = np.full(num_requests * k, np.iinfo(np.int64).min)
    served_time[slot[impression]] = times[impression]
    before = (row_reason == None) & ~impression & (times < served_time[slot])  # noqa: E711
    row_reason[before] = "event_time before the impression at this position"

    rejected = row_reason != None  # noqa: E711
    if rejected.any():
        pieces.append(quarantine_rows(good.filter(pa.array(rejected)), list(row_reason[rejected])))
    ok_request = request_reason == None  # noqa: E711
    kept = ~rejected
    counts = {
        name: np.bincount(slot[kept & (types == i)], minlength=num_requests * k).reshape(num_requests, k)[ok_request]
        for name, i in type_index.items()
    }
    labels = graded_labels(counts, policy)

    # One row per group, taken from its impression rows in position order.
    impression_rows = np.flatnonzero(impression & ok_request[request])
    impression_rows = impression_rows[np.lexsort((position[impression_rows], request[impression_rows]))]
    heads = impression_rows[::k]
    offsets = pa.array(np.arange(0, len(impression_rows) + 1, k, dtype=np.int32))
    first_time = good["event_time"].take(pa.array(heads))
    groups = pa.table({
        "request_id": good["request_id"].take(heads),
        "merchant_id": good["merchant_id"].take(heads),
        "merchant_features": good["merchant_features"].take(heads),
        "merchant_stats": good["merchant_stats"].take(heads),
        "prompt": good["prompt"].take(heads),
        "event_time": first_time,
        "image_refs": pa.ListArray.from_arrays(offsets, good["image_ref"].take(impression_rows).combine_chunks()),
        "image_sha256": pa.ListArray.from_arrays(offsets, good["image_sha256"].take(impression_rows).combine_chunks()),
        "labels": pa.ListArray.from_arrays(offsets, pa.array(labels.reshape(-1), pa.float32())),
        "source": pa.array([source] * len(heads), pa.string()),
    }, schema=GROUP_EXAMPLE_SCHEMA).sort_by("request_id")
    return Assembled(groups, pa.concat_tables(pieces), good.filter(pa.array(kept)).select(["event_id", "event_time"]))
