"""Atomic file writes and filesystem resolution for local paths and pyarrow filesystem URIs.

Every state file and every data file the project writes goes through here: written to a temporary
name in the same folder, then renamed, so a reader never sees half a file and a crash leaves either
the old file or the new one.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

TMP_PREFIX = ".tmp-"


def resolve_filesystem(root: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a URI such as s3://bucket/prefix."""
    root = str(root)
    if "://" in root:
        return pafs.FileSystem.from_uri(root)
    return pafs.LocalFileSystem(), str(Path(root).absolute())


def is_temporary(name: str) -> bool:
    return os.path.basename(name).startswith(TMP_PREFIX)


def _tmp_sibling(path: str) -> str:
    head, tail = os.path.split(path)
    return os.path.join(head, f"{TMP_PREFIX}{uuid.uuid4().hex}-{tail}")


def _write_local_sibling(path: str, data: bytes) -> str:
    """`data` in a complete, synced temporary file beside `path` (created with its folder); returns its path."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = _tmp_sibling(path)
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return tmp


def atomic_write_bytes(path: str | os.PathLike, data: bytes, filesystem: pafs.FileSystem | None = None) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a part."""
    path = str(path)
    if filesystem is None or isinstance(filesystem, pafs.LocalFileSystem):
        os.replace(_write_local_sibling(path, data), path)
        return
    # Object stores publish a PUT atomically; a temp + move would only add a copy.
    filesystem.create_dir(os.path.dirname(path), recursive=True)
    with filesystem.open_output_stream(path) as stream:
        stream.write(data)


def atomic_write_json(path: str | os.PathLike, payload: Any, filesystem: pafs.FileSystem | None = None) -> None:
    atomic_write_bytes(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode(), filesystem)


def read_json(path: str | os.PathLike, default: Any = None, filesystem: pafs.FileSystem | None = None) -> Any:
    filesystem = filesystem or pafs.LocalFileSystem()
    try:
        with filesystem.open_input_stream(str(path)) as stream:
            return json.loads(stream.read())
    except FileNotFoundError:
        return default


def parquet_bytes(table: pa.Table) -> bytes:
    """A parquet file's bytes. Same table, same bytes (no timestamps in the metadata)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def atomic_write_table(table: pa.Table, path: str, filesystem: pafs.FileSystem | None = None) -> None:
    """Write a parquet file atomically. Same table, same bytes (no timestamps in the metadata)."""
    atomic_write_bytes(path, parquet_bytes(table), filesystem)


def replace_directory(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copy `source` over `target` so that `target` is never half-written: copy to a staging sibling,
    then swap (a reader sees the old tree or the new one)."""
    import shutil

    source, target = os.fspath(source), os.fspath(target)
    staging, retired = target + ".tmp", target + ".old"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(retired, ignore_errors=True)
    shutil.copytree(source, staging)
    if os.path.exists(target):
        os.replace(target, retired)
    os.replace(staging, target)
    shutil.rmtree(retired, ignore_errors=True)


def atomic_create_bytes(path: str | os.PathLike, data: bytes, filesystem: pafs.FileSystem | None = None) -> bool:
    """Write `data` to `path` only if nothing is there yet; True when this call created it.

    Local files: a complete temporary file is hard-linked to `path`, which fails when `path` exists, so of two
    concurrent writers exactly one wins and a reader sees the whole file or none. Other filesystems have no
    exclusive create in pyarrow's API: check, then write (two writers racing on one path may both win).
    """
    path = str(path)
    if filesystem is None or isinstance(filesystem, pafs.LocalFileSystem):
        tmp = _write_local_sibling(path, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        return True
    if filesystem.get_file_info(path).type != pafs.FileType.NotFound:
        return False
    atomic_write_bytes(path, data, filesystem)
    return True
