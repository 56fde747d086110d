"""Mutations of valid feedback partitions for fuzzing ingest: bit flips, truncation, type changes, column
renames, and the named shapes of damage that once stopped an ingest (each deterministic given its rng).

A mutation takes the rows of one valid partition (already given ids of their own), an rng and a
`put_image(bytes) -> (ref, sha256)` that stores an image in every store under test, and returns the files
to write: (event-hour offset from the partition's own hour, file bytes).
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from perfusion_ray.data.schemas import FEEDBACK_EVENT_SCHEMA

PutImage = Callable[[bytes], tuple[str, str]]
Files = list[tuple[int, bytes]]
Mutation = Callable[[pa.Table, np.random.Generator, PutImage], Files]
READER_COLUMNS = ("path", "reason", "row_json")  # names ingest's own tables use


def parquet_file(table: pa.Table, **options) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, **options)
    return sink.getvalue()


def with_ids(table: pa.Table, suffix: str) -> pa.Table:
    """The same rows with request and event ids of their own (suffixed), so that a copy is new feedback."""
    for name in ("request_id", "event_id"):
        index = table.schema.get_field_index(name)
        table = table.set_column(index, name, pc.binary_join_element_wise(table[name], pa.scalar(suffix), ""))
    return table


def _rows(rng: np.random.Generator, n: int, share: float = 0.2) -> np.ndarray:
    return np.flatnonzero(rng.random(n) < share) if n else np.zeros(0, np.int64)


def _schema_column(table: pa.Table, rng: np.random.Generator) -> str:
    """A column of the event schema the table still has (a stacked mutation may have renamed some)."""
    present = [name for name in FEEDBACK_EVENT_SCHEMA.names if name in table.column_names]
    return str(rng.choice(present or table.column_names))


def _replace(table: pa.Table, name: str, column: pa.Array) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, column)


def _invalid_utf8(values: list[str | None], rows: np.ndarray) -> pa.Array:
    """A string array (unvalidated) whose chosen rows hold bytes that are not UTF-8."""
    raw = [None if v is None else (b"\xff\xfe" + v.encode() if i in set(rows.tolist()) else v.encode())
           for i, v in enumerate(values)]
    binary = pa.array(raw, pa.binary())
    return pa.Array.from_buffers(pa.string(), len(binary), binary.buffers(), null_count=binary.null_count)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(width: int, height: int, before_data: bytes = b"", within_data: bytes = b"") -> bytes:
    """A PNG of this header size (pixels for at most 32x32), with extra chunks before the image data or between
    its two halves."""
    header = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    pixels = zlib.compress(b"".join(b"\x00" + b"\x80" * 3 * min(width, 32) for _ in range(min(height, 32))))
    half = len(pixels) // 2
    return (b"\x89PNG\r\n\x1a\n" + header + before_data + _png_chunk(b"IDAT", pixels[:half]) + within_data
            + _png_chunk(b"IDAT", pixels[half:]) + _png_chunk(b"IEND", b""))


HUGE_HEADER_PNG = _png(12_000, 12_000)  # below PIL's decompression-bomb limit: decoding would allocate 432 MB
# PIL raises SyntaxError for a chunk with an invalid type in the image data (while decoding), ValueError for a
# text chunk that inflates beyond its limit (while opening): neither is an OSError.
BROKEN_CHUNK_PNG = _png(32, 32, within_data=struct.pack(">I", 4) + b"\x00\x01\x02\x03" + b"abcd" + b"\0\0\0\0")
BOMB_TEXT_PNG = _png(32, 32, before_data=_png_chunk(b"zTXt", b"k\x00\x00" + zlib.compress(b"x" * 2**24)))


# ---------------------------------------------------------------- the named shapes
def overwritten_data_page(table, rng, put_image) -> Files:
    """Bytes of the data pages overwritten, the footer left intact."""
    data = bytearray(parquet_file(table, compression="none"))
    footer = struct.unpack("<I", data[-8:-4])[0] + 8
    start = int(rng.integers(4, max(5, len(data) - footer - 64)))
    data[start:start + 64] = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
    return [(0, bytes(data))]


def nanosecond_times(table, rng, put_image) -> Files:
    """event_time as nanosecond timestamps that microseconds cannot hold exactly (pandas' default)."""
    micros = table["event_time"].cast(pa.timestamp("us", tz="UTC")).cast(pa.int64()).to_numpy()
    nanos = pa.array(micros * 1000 + rng.integers(1, 999, len(micros)), pa.int64()).cast(pa.timestamp("ns"))
    return [(0, parquet_file(_replace(table, "event_time", nanos)))]


def integers_out_of_range(table, rng, put_image) -> Files:
    """position as uint64 with values above int64, value as int64 beyond float precision."""
    rows = _rows(rng, table.num_rows)
    position = table["position"].to_numpy().astype(np.uint64)
    position[rows] = np.uint64(2**64 - 1)
    value = np.full(table.num_rows, 2**62 + 1, dtype=np.int64)
    table = _replace(table, "position", pa.array(position, pa.uint64()))
    return [(0, parquet_file(_replace(table, "value", pa.array(value, pa.int64()))))]


def _point_rows_at(table, rng, image: bytes, put_image) -> pa.Table:
    ref, digest = put_image(image)
    rows = set(_rows(rng, table.num_rows).tolist())
    refs = [ref if i in rows else v for i, v in enumerate(table["image_ref"].to_pylist())]
    digests = [digest if i in rows else v for i, v in enumerate(table["image_sha256"].to_pylist())]
    table = _replace(table, "image_ref", pa.array(refs, pa.string()))
    return _replace(table, "image_sha256", pa.array(digests, pa.string()))


def huge_png_header(table, rng, put_image) -> Files:
    return [(0, parquet_file(_point_rows_at(table, rng, HUGE_HEADER_PNG, put_image)))]


def png_chunk_errors(table, rng, put_image) -> Files:
    image = BROKEN_CHUNK_PNG if rng.random() < 0.5 else BOMB_TEXT_PNG
    return [(0, parquet_file(_point_rows_at(table, rng, image, put_image)))]


def invalid_utf8(table, rng, put_image) -> Files:
    name = str(rng.choice(["event_id", "request_id", "merchant_id", "prompt", "image_ref", "event_type",
                           "event_time"]))
    column = _invalid_utf8(table[name].to_pylist(), _rows(rng, table.num_rows))
    return [(0, parquet_file(_replace(table, name, column)))]


def null_type_column(table, rng, put_image) -> Files:
    name = _schema_column(table, rng)
    return [(0, parquet_file(_replace(table, name, pa.nulls(table.num_rows))))]


def wrong_map_value_type(table, rng, put_image) -> Files:
    if rng.random() < 0.5:
        stats = [[(k, f"{v}") for k, v in (row or [])] for row in table["merchant_stats"].to_pylist()]
        column = pa.array(stats, pa.map_(pa.string(), pa.string()))
        return [(0, parquet_file(_replace(table, "merchant_stats", column)))]
    features = [[(k, len(v)) for k, v in (row or [])] for row in table["merchant_features"].to_pylist()]
    column = pa.array(features, pa.map_(pa.string(), pa.int64()))
    return [(0, parquet_file(_replace(table, "merchant_features", column)))]


def colliding_column(table, rng, put_image) -> Files:
    name = str(rng.choice(READER_COLUMNS))
    return [(0, parquet_file(table.append_column(name, pa.array(["x"] * table.num_rows))))]


def non_finite_stats(table, rng, put_image) -> Files:
    rows = set(_rows(rng, table.num_rows).tolist())
    stats = [[(k, float("inf") if i in rows else v) for k, v in (row or [])]
             for i, row in enumerate(table["merchant_stats"].to_pylist())]
    return [(0, parquet_file(_replace(table, "merchant_stats", pa.array(stats, table["merchant_stats"].type))))]


def impossible_positions(table, rng, put_image) -> Files:
    """One request served at positions 0..999."""
    first = table.slice(0, 1).to_pylist()[0]
    extra = [{**first, "event_id": f"{first['event_id']}-p{p}", "position": p, "event_type": "impression"}
             for p in range(4, 1000)]
    return [(0, parquet_file(pa.concat_tables([table, pa.Table.from_pylist(extra, schema=table.schema)])))]


def implausible_times(table, rng, put_image) -> Files:
    """Some rows dated 1900 or 1960, some feedback dated before its impression."""
    times = table["event_time"].to_pylist()
    kinds = table["event_type"].to_pylist()
    for row in _rows(rng, table.num_rows):
        if kinds[row] == "impression" or rng.random() < 0.5:
            times[row] = str(rng.choice(["1900-01-01T00:00:00Z", "1960-06-01T12:00:00Z"]))
        else:
            times[row] = times[row][:11] + "00:00:00.000000Z"  # the start of its hour: before its impression
    return [(0, parquet_file(_replace(table, "event_time", pa.array(times, pa.string()))))]


def copied_events(table, rng, put_image) -> Files:
    """The same events again: in the same file, in a copy under another name, and one id on two requests."""
    rows = _rows(rng, table.num_rows)
    again = pa.concat_tables([table, table.take(rows)])
    ids = table["event_id"].to_pylist()
    if table.num_rows > 1:
        ids[-1] = ids[0]  # an event id reused by another request (or another event of the same one)
    return [(0, parquet_file(again)), (0, parquet_file(_replace(table, "event_id", pa.array(ids, pa.string()))))]


def late_feedback(table, rng, put_image) -> Files:
    """The feedback of the requests split off into later hours (within the late window and beyond it)."""
    kinds = np.array(table["event_type"].to_pylist())
    impressions = table.filter(pa.array(kinds == "impression"))
    feedback = table.filter(pa.array(kinds != "impression"))
    later = rng.integers(1, 4, feedback.num_rows)
    return [(0, parquet_file(impressions))] + [
        (int(hours), parquet_file(feedback.filter(pa.array(later == hours)))) for hours in np.unique(later)]


# ---------------------------------------------------------------- generic damage
def flip_bits(table, rng, put_image) -> Files:
    data = bytearray(parquet_file(table, compression=str(rng.choice(["none", "snappy", "zstd"]))))
    for at in rng.integers(0, len(data) * 8, int(rng.integers(1, 16))):
        data[at // 8] ^= 1 << int(at % 8)
    return [(0, bytes(data))]


def truncate(table, rng, put_image) -> Files:
    data = parquet_file(table)
    return [(0, data[:int(rng.integers(0, len(data)))])]


def not_parquet(table, rng, put_image) -> Files:
    return [(0, rng.choice([b"", b"PAR1", b"event_id,request_id\n1,2\n", rng.bytes(512)]))]


def retype_column(table, rng, put_image) -> Files:
    """A column stored in another type (cast where arrow can, else all missing)."""
    name = _schema_column(table, rng)
    kind = rng.choice([pa.int32(), pa.uint8(), pa.float32(), pa.string(), pa.large_string(), pa.binary(),
                       pa.bool_(), pa.timestamp("s"), pa.date32(), pa.list_(pa.string()),
                       pa.dictionary(pa.int32(), pa.string())])
    try:
        column = table[name].cast(kind)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):  # TypeError: a map to a list
        column = pa.nulls(table.num_rows, kind)
    return [(0, parquet_file(_replace(table, name, column)))]


def rename_column(table, rng, put_image) -> Files:
    names = list(table.column_names)
    at = int(rng.integers(0, len(names)))
    names[at] = str(rng.choice([names[at].upper(), names[at] + "_v2", names[(at + 1) % len(names)], *READER_COLUMNS]))
    return [(0, parquet_file(table.rename_columns(names)))]


def drop_or_repeat_column(table, rng, put_image) -> Files:
    name = str(rng.choice(table.column_names))
    if rng.random() < 0.5:
        return [(0, parquet_file(table.drop_columns([name])))]
    return [(0, parquet_file(table.append_column(name, table[name])))]


def shuffle_values(table, rng, put_image) -> Files:
    """One column's values shuffled across rows (ids, positions or images no longer agree)."""
    name = str(rng.choice(table.column_names))
    return [(0, parquet_file(_replace(table, name, table[name].take(pa.array(rng.permutation(table.num_rows))))))]


NAMED = {fn.__name__: fn for fn in (
    overwritten_data_page, nanosecond_times, integers_out_of_range, huge_png_header, png_chunk_errors,
    invalid_utf8, null_type_column, wrong_map_value_type, colliding_column, non_finite_stats, impossible_positions,
    implausible_times, copied_events, late_feedback)}
GENERIC = {fn.__name__: fn for fn in (
    flip_bits, truncate, not_parquet, retype_column, rename_column, drop_or_repeat_column, shuffle_values)}
MUTATIONS: dict[str, Mutation] = {**NAMED, **GENERIC}


def mutate(table: pa.Table, rng: np.random.Generator, put_image: PutImage, rounds: int = 1) -> tuple[str, Files]:
    """One random mutation (rounds > 1: table-level mutations stacked before the last one)."""
    names = list(MUTATIONS)
    chosen = [str(rng.choice(names)) for _ in range(rounds)]
    applied: list[str] = []
    for index, name in enumerate(chosen):
        try:
            files = MUTATIONS[name](table, rng, put_image)
        except Exception:  # noqa: BLE001 - it needs what an earlier mutation renamed, retyped or broke
            if not applied:  # on the valid table every mutation applies
                raise
            continue
        applied.append(name)
        if index == len(chosen) - 1:
            break
        try:
            table = pq.read_table(io.BytesIO(files[0][1]))
        except Exception:  # noqa: BLE001 - the damage made it unreadable: stack nothing more on it
            break
    return "+".join(applied), files
