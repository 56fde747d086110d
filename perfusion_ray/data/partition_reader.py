"""Reading one feedback partition file, whatever is in it: its event columns, or why it cannot be read.

Producers we do not control write these files, and bytes rot: any exception pyarrow raises while opening
or decoding a file (a truncated footer, a data page overwritten behind an intact footer, a thrift bomb)
makes the file one whole-file quarantine record instead of an ingest that stops. Only the columns of
FEEDBACK_EVENT_SCHEMA are read, so extra columns never reach validation.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from perfusion_ray.data.schemas import FEEDBACK_EVENT_SCHEMA, schema_problem


@dataclass(frozen=True)
class PartitionRead:
    table: pa.Table | None  # the event columns as stored; None when the file is quarantined whole
    problem: str | None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {text[0][:200] if text else ''}".rstrip(": ")


def _bytes_view(kind: pa.DataType) -> pa.DataType:
    """The same layout with text as bytes: validating it checks offsets and lengths, not UTF-8 (which
    validation reports per row)."""
    if pa.types.is_string(kind):
        return pa.binary()
    if pa.types.is_large_string(kind):
        return pa.large_binary()
    if pa.types.is_map(kind):
        return pa.map_(_bytes_view(kind.key_type), _bytes_view(kind.item_type))
    return kind


def _structure_problem(table: pa.Table) -> str | None:
    for name in table.column_names:
        for chunk in table[name].chunks:
            try:
                chunk.view(_bytes_view(chunk.type)).validate(full=True)
            except (pa.ArrowException, ValueError) as exc:
                return f"corrupt column {name}: {_first_line(exc)}"
    return None


def read_partition(path: str, filesystem: pafs.FileSystem) -> PartitionRead:
    """The event columns of the partition file at `path`, or the reason it is quarantined whole."""
    try:
        with filesystem.open_input_file(path) as handle:
            parquet = pq.ParquetFile(handle)
            problem = schema_problem(parquet.schema_arrow)
            if problem:
                return PartitionRead(None, problem)
            expected = parquet.metadata.num_rows
            table = parquet.read(columns=list(FEEDBACK_EVENT_SCHEMA.names))
    except FileNotFoundError:
        raise  # the store changed under the run: not a property of the file
    except Exception as exc:  # noqa: BLE001 - whatever a damaged file makes pyarrow raise
        return PartitionRead(None, f"not a readable parquet file: {_first_line(exc)}")
    if table.num_rows != expected:
        return PartitionRead(None, f"not a readable parquet file: {table.num_rows} rows decoded, footer says {expected}")
    problem = _structure_problem(table)
    return PartitionRead(None, problem) if problem else PartitionRead(table, None)
