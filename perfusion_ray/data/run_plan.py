"""How one ingest run splits its rows into independent pieces of work, and which rows it refuses as
duplicates (pure: numpy + pyarrow, no I/O).

Segments: the run's files grouped by their event-hour folder (event_hour=YYYY-MM-DDTHH). A request's
events sit in the hour of its impressions and, for late feedback, in the `window` hours after it. Each
row has exactly one owner segment, the one that assembles it:
  - the earliest segment, among the row's own and the `window` hours before it, that holds a valid
    impression of the row's request (a refused copy of one included: where the request's group is
    assembled, the copy is quarantined as a duplicate);
  - else the row's own segment (it is then quarantined there, as feedback without an impression, or as
    late when the request's impressions lie further back in the run).
A segment's work reads its own hour and the `window` hours after it, nothing else, so segments run in
parallel without a shuffle and memory is bounded by window + 1 hours of events. Files outside any hour
folder form a segment each, alone.

Duplicates: the first valid copy of an event id in the run's order (files in name order, which is hour
order, then row order) is kept; later copies are refused, and so are copies of an id that an earlier
committed run grouped (event_index.py). The driver sees a 64-bit hash per valid row, not the ids, and reads
the ids of the few rows whose hashes match, so its memory grows by about 12 bytes per event. Both engines
compute this plan the same way on the driver, so they produce the same groups.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

HOUR_FOLDER = re.compile(r"(?:^|/)event_hour=(\d{4}-\d{2}-\d{2}T\d{2})(?:/|$)")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_US_PER_HOUR = 3_600_000_000
DUPLICATE = "duplicate event_id"
DUPLICATE_OF_EARLIER_RUN = "duplicate event_id (grouped by an earlier ingest run)"


def file_hour(name: str) -> int | None:
    """Hours since the epoch of the event-hour folder a partition file sits in, or None outside one."""
    match = HOUR_FOLDER.search(name.replace("\\", "/"))
    if not match:
        return None
    try:
        hour = dt.datetime.strptime(match.group(1), "%Y-%m-%dT%H").replace(tzinfo=dt.timezone.utc)
    except ValueError:
        return None
    return int((hour - _EPOCH) // dt.timedelta(hours=1))


def event_hours(times: pa.Array) -> np.ndarray:
    """Hours since the epoch of UTC microsecond timestamps (valid ones: no nulls)."""
    micros = np.asarray(times.cast(pa.int64()).to_numpy(zero_copy_only=False), dtype=np.int64)
    return np.floor_divide(micros, _US_PER_HOUR).astype(np.int64)


@dataclass(frozen=True)
class Segment:
    index: int
    hour: int | None  # event hour (hours since the epoch); None: a file outside any hour folder
    files: tuple[int, ...]  # indices into the run's file list


def segments_of(files: list[str]) -> list[Segment]:
    """Hour segments in hour order, then one segment per file outside an hour folder."""
    by_hour: dict[int, list[int]] = {}
    loose = []
    for index, name in enumerate(files):
        hour = file_hour(name)
        if hour is None:
            loose.append(index)
        else:
            by_hour.setdefault(hour, []).append(index)
    hourly = [(hour, tuple(indices)) for hour, indices in sorted(by_hour.items())]
    return ([Segment(i, hour, indices) for i, (hour, indices) in enumerate(hourly)]
            + [Segment(len(hourly) + j, None, (index,)) for j, index in enumerate(loose)])


def window_of(segments: list[Segment], segment: Segment, window: int) -> list[Segment]:
    """The segments whose rows `segment` may own: itself and the hours up to `window` after it."""
    if segment.hour is None:
        return [segment]
    return [s for s in segments if s.hour is not None and segment.hour <= s.hour <= segment.hour + window]


_MIX = np.uint64(0x9E3779B97F4A7C15)
_ALL_BITS = np.uint64(0xFFFFFFFFFFFFFFFF)


def id_hashes(ids: pa.Array) -> np.ndarray:
    """A 64-bit hash of each string, eight bytes at a time (vectorised). Equal strings hash equal; the
    duplicate check confirms every equal hash on the strings themselves, so a collision costs a read, never
    a row."""
    ids = ids.cast(pa.string())
    n = len(ids)
    if n == 0:
        return np.zeros(0, np.uint64)
    offsets = np.frombuffer(ids.buffers()[1], dtype=np.int32, count=n + 1, offset=ids.offset * 4).astype(np.int64)
    data = ids.buffers()[2]
    data = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
    padded = np.concatenate([data, np.zeros(8, np.uint8)])
    windows = np.lib.stride_tricks.as_strided(padded, shape=(len(data) + 1, 8), strides=(1, 1))
    lengths = np.diff(offsets)
    hashes = lengths.astype(np.uint64) * _MIX
    for start in range(0, int(lengths.max()), 8):
        words = windows[np.minimum(offsets[:-1] + start, len(data))].view(np.uint64).ravel()
        remaining = np.clip(lengths - start, 0, 8).astype(np.uint64)
        words &= np.where(remaining >= 8, _ALL_BITS, (np.uint64(1) << (remaining * np.uint64(8))) - np.uint64(1))
        hashes ^= words
        hashes *= _MIX
        hashes ^= hashes >> np.uint64(29)
    return hashes


@dataclass
class FileSummary:
    """What validating one partition file tells the driver: a few bytes per valid row."""

    index: int
    rows: int  # rows read (0 when the file is quarantined whole)
    problem: str | None  # why the file is quarantined whole
    valid_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # in row order
    id_hashes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))  # of their event ids
    event_hours: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # distinct, of the valid rows
    impression_requests: pa.Array = field(default_factory=lambda: pa.array([], pa.string()))  # distinct

    @classmethod
    def of(cls, index: int, validated: pa.Table) -> "FileSummary":
        valid = np.asarray(validated["reason"].is_null().to_numpy(zero_copy_only=False), dtype=bool)
        good = validated.filter(pa.array(valid))
        impressions = good["request_id"].filter(pc.equal(good["event_type"], "impression"))
        return cls(index, validated.num_rows, None, np.flatnonzero(valid).astype(np.int32),
                   id_hashes(good["event_id"].combine_chunks()),
                   np.unique(event_hours(good["event_time"].combine_chunks())),
                   pc.unique(impressions.combine_chunks()))

    def to_table(self) -> pa.Table:
        """One row, for a Ray Data batch."""
        return pa.table({
            "index": [self.index], "rows": [self.rows], "problem": pa.array([self.problem], pa.string()),
            "valid_rows": _one_list(pa.array(self.valid_rows, pa.int32())),
            "id_hashes": _one_list(pa.array(self.id_hashes, pa.uint64())),
            "event_hours": _one_list(pa.array(self.event_hours, pa.int64())),
            "impression_requests": _one_list(self.impression_requests.cast(pa.string())),
        })

    @classmethod
    def from_table(cls, table: pa.Table) -> list["FileSummary"]:
        summaries = []
        for row in range(table.num_rows):
            def values(name: str) -> pa.Array:
                return table[name][row].values

            def numbers(name: str, kind) -> np.ndarray:
                return np.asarray(values(name).to_numpy(zero_copy_only=False), dtype=kind)

            summaries.append(cls(table["index"][row].as_py(), table["rows"][row].as_py(),
                                 table["problem"][row].as_py(), numbers("valid_rows", np.int32),
                                 numbers("id_hashes", np.uint64), numbers("event_hours", np.int64),
                                 values("impression_requests")))
        return summaries


@dataclass
class RunPlan:
    """What every segment's work needs from the whole run."""

    segments: list[Segment]
    segment_of_file: np.ndarray  # per file index
    readable: np.ndarray  # per file index: False when the file is quarantined whole
    window: int
    marks: dict[int, tuple[np.ndarray, list[str]]]  # file index -> (rows, reason) the run refuses
    home_requests: pa.Array  # distinct request ids with a valid impression in the run (copies included)
    home_keys: np.ndarray  # sorted request code * len(segments) + segment index of each such impression
    first_home_hour: np.ndarray  # per request code: the earliest hour of its impressions (-1: not an hour)

    def owners(self, request_ids: pa.Array, segment: int) -> tuple[np.ndarray, np.ndarray]:
        """(owner segment of each row of a file in `segment`, rows that are late feedback: their request's
        impressions lie more than `window` hours before)."""
        n = len(request_ids)
        owner = np.full(n, segment, dtype=np.int64)
        own = self.segments[segment]
        if own.hour is None or not len(self.home_requests):
            return owner, np.zeros(n, dtype=bool)
        codes = np.asarray(pc.fill_null(pc.index_in(request_ids, value_set=self.home_requests), -1)
                           .to_numpy(zero_copy_only=False), dtype=np.int64)
        known = codes >= 0
        assigned = np.zeros(n, dtype=bool)
        count = len(self.segments)
        for candidate in self.segments:  # earliest first
            if candidate.hour is None or not own.hour - self.window <= candidate.hour <= own.hour:
                continue
            keys = codes * count + candidate.index
            position = np.clip(np.searchsorted(self.home_keys, keys), 0, len(self.home_keys) - 1)
            hit = known & ~assigned & (self.home_keys[position] == keys)
            owner[hit] = candidate.index
            assigned |= hit
        first = np.where(known, self.first_home_hour[np.maximum(codes, 0)], -1)
        late = known & ~assigned & (first >= 0) & (first < own.hour - self.window)
        return owner, late


def _one_list(values: pa.Array) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array([0, len(values)], pa.int32()), values)


def _concat(arrays: list[pa.Array], kind: pa.DataType) -> pa.Array:
    return pa.concat_arrays([a.cast(kind) for a in arrays]) if arrays else pa.array([], kind)


ReadIds = Callable[[int, np.ndarray], pa.Array]  # (file index, rows) -> their event ids, as staged


def _refused(readable: list[FileSummary], earlier_ids: pa.Array, read_ids: ReadIds) -> dict[int, tuple[list, list]]:
    """file index -> (rows, reasons) of the copies the run refuses. Hashes find the candidates (an id that
    repeats within the run or an earlier run grouped); their strings decide."""
    file_index = np.concatenate([np.full(len(s.valid_rows), s.index, np.int32) for s in readable]
                                or [np.zeros(0, np.int32)])
    rows = np.concatenate([s.valid_rows for s in readable] or [np.zeros(0, np.int32)])
    hashes = np.concatenate([s.id_hashes for s in readable] or [np.zeros(0, np.uint64)])
    if not len(hashes):
        return {}
    order = np.argsort(hashes, kind="stable")
    same = hashes[order][1:] == hashes[order][:-1]
    repeated = np.zeros(len(hashes), dtype=bool)
    repeated[order[np.r_[same, False] | np.r_[False, same]]] = True
    candidates = np.flatnonzero(repeated | np.isin(hashes, id_hashes(earlier_ids)))  # in run order
    if not len(candidates):
        return {}
    ids = pa.concat_arrays([read_ids(int(f), rows[candidates][file_index[candidates] == f]).cast(pa.string())
                            for f in np.unique(file_index[candidates])])  # files ascending: run order kept
    earlier = np.asarray(pc.is_in(ids, value_set=earlier_ids).to_numpy(zero_copy_only=False), dtype=bool)
    codes = pc.dictionary_encode(ids.filter(pa.array(~earlier))).indices.to_numpy(zero_copy_only=False)
    first = np.zeros(len(codes), dtype=bool)
    first[np.unique(codes, return_index=True)[1]] = True
    later_copy = np.zeros(len(candidates), dtype=bool)
    later_copy[np.flatnonzero(~earlier)[~first]] = True
    marks: dict[int, tuple[list, list]] = {}
    for mask, reason in ((earlier, DUPLICATE_OF_EARLIER_RUN), (later_copy, DUPLICATE)):
        for at in candidates[mask]:
            entry = marks.setdefault(int(file_index[at]), ([], []))
            entry[0].append(int(rows[at]))
            entry[1].append(reason)
    return marks


def plan_run(files: list[str], summaries: list[FileSummary], window: int, earlier_ids: pa.Array,
             read_ids: ReadIds) -> RunPlan:
    """The run's segments, the rows it refuses (copies of an id an earlier run grouped, later copies within
    the run) and the segments holding each request's valid impressions."""
    segments = segments_of(files)
    segment_of_file = np.zeros(len(files), dtype=np.int64)
    for segment in segments:
        segment_of_file[list(segment.files)] = segment.index
    readable_summaries = sorted((s for s in summaries if s.problem is None), key=lambda s: s.index)
    marks = _refused(readable_summaries, earlier_ids, read_ids)

    requests = _concat([s.impression_requests for s in readable_summaries], pa.string())
    impression_segments = np.concatenate([np.full(len(s.impression_requests), segment_of_file[s.index])
                                          for s in readable_summaries] or [np.zeros(0, np.int64)]).astype(np.int64)
    encoded = pc.dictionary_encode(requests)
    home_requests = encoded.dictionary
    request_codes = np.asarray(encoded.indices.to_numpy(zero_copy_only=False), dtype=np.int64)
    home_keys = np.unique(request_codes * len(segments) + impression_segments)
    segment_hours = np.array([-1 if s.hour is None else s.hour for s in segments] or [0], dtype=np.int64)
    first_home_hour = np.full(len(home_requests), np.iinfo(np.int64).max)
    hourly = segment_hours[impression_segments] >= 0 if len(impression_segments) else np.zeros(0, bool)
    np.minimum.at(first_home_hour, request_codes[hourly], segment_hours[impression_segments][hourly])
    first_home_hour[first_home_hour == np.iinfo(np.int64).max] = -1
    readable = np.zeros(len(files), dtype=bool)
    readable[[s.index for s in readable_summaries]] = True
    return RunPlan(segments, segment_of_file, readable, window,
                   {k: (np.array(r, dtype=np.int64), m) for k, (r, m) in marks.items()},
                   home_requests, home_keys, first_home_hour)
