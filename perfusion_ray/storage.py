"""Atomic file writes and filesystem resolution for local paths and pyarrow filesystem URIs.

Every state file and every data file the project writes goes through here: written to a temporary
name in the same folder, then renamed, so a reader never sees half a file and a crash leaves either
the old file or the new one. On an object store a PUT is that atomic step.

Folders a cluster shares (the store, run folders, exported models) are named by a local path or a URI
such as s3://bucket/prefix?endpoint_override=host:port; `join` keeps the URI's query at the end.
Directories move between the two through `publish_directory` (a local folder -> its place, a manifest
written last on an object store) and `local_directory` (its place -> a local folder, a verified copy
in a cache for URIs), because diffusers and transformers load from local paths only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

TMP_PREFIX = ".tmp-"


def is_uri(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def resolve_filesystem(root: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a URI such as s3://bucket/prefix. Credentials and endpoints
    come the way the AWS SDKs read them (environment, profile, AWS_ENDPOINT_URL_S3) unless the URI's query
    names them (endpoint_override, scheme, region)."""
    root = str(root)
    if is_uri(root):
        base, query = _split_query(root)
        filesystem = _uri_filesystem(urlsplit(base).scheme, urlsplit(base).netloc, query)
        return pafs.FileSystem.from_uri(root) if filesystem is None else (filesystem, _uri_path(base))
    return pafs.LocalFileSystem(), str(Path(root).absolute())


def _split_query(uri: str) -> tuple[str, str]:
    """("s3://b/prefix", "?endpoint_override=...") of a URI; the query part is "" when there is none."""
    base, mark, query = uri.partition("?")
    return base, mark + query


_PATH_ONLY_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "az")  # pyarrow's path is <bucket>/<key> for these


def _uri_path(base: str) -> str:
    parts = urlsplit(base)
    return (parts.netloc + parts.path).rstrip("/")


@lru_cache(maxsize=64)
def _uri_filesystem(scheme: str, netloc: str, query: str) -> pafs.FileSystem | None:
    """One filesystem per bucket and query (resolving one costs a region lookup on S3); None for schemes
    whose paths pyarrow spells differently (hdfs, file): those resolve per call."""
    if scheme not in _PATH_ONLY_SCHEMES:
        return None
    return pafs.FileSystem.from_uri(f"{scheme}://{netloc}{query}")[0]


def join(root: str | os.PathLike, *parts: str) -> str:
    """root/part/... for a local path or a URI; a URI's query (?endpoint_override=...) stays at the end."""
    if not is_uri(root):
        return os.path.join(os.fspath(root), *parts)
    base, query = _split_query(str(root))
    return "/".join([base.rstrip("/"), *(part.strip("/") for part in parts if part)]) + query


def absolute(path: str | os.PathLike) -> str:
    """A URI as it is, a local path made absolute against the working directory."""
    return str(path) if is_uri(path) else str(Path(path).expanduser().absolute())


def path_or_uri(path: str | os.PathLike) -> Path | str:
    """A local location as a Path (what local callers work with), a URI as the string it is."""
    return str(path) if is_uri(path) else Path(path)


def exists(path: str | os.PathLike) -> bool:
    filesystem, inner = resolve_filesystem(path)
    return filesystem.get_file_info(inner).type != pafs.FileType.NotFound


def is_file(path: str | os.PathLike) -> bool:
    filesystem, inner = resolve_filesystem(path)
    return filesystem.get_file_info(inner).type == pafs.FileType.File


def delete_tree(path: str | os.PathLike) -> None:
    """Remove a folder and everything below it, if it is there."""
    filesystem, inner = resolve_filesystem(path)
    if filesystem.get_file_info(inner).type == pafs.FileType.Directory:
        filesystem.delete_dir(inner)
    elif isinstance(filesystem, pafs.LocalFileSystem):
        shutil.rmtree(inner, ignore_errors=True)
    else:  # object stores may hold keys below a prefix without a directory marker
        filesystem.delete_dir_contents(inner, missing_dir_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """atomic_write_bytes at a local path or a URI."""
    filesystem, inner = resolve_filesystem(path)
    atomic_write_bytes(inner, data, filesystem)


def write_json(path: str | os.PathLike, payload: Any) -> None:
    filesystem, inner = resolve_filesystem(path)
    atomic_write_json(inner, payload, filesystem)


def load_json(path: str | os.PathLike, default: Any = None) -> Any:
    """read_json at a local path or a URI."""
    filesystem, inner = resolve_filesystem(path)
    return read_json(inner, default, filesystem)


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append to a text file (JSON lines). Object stores cannot append: the object is read and PUT whole
    again, which suits the small per-round files this is for."""
    filesystem, inner = resolve_filesystem(path)
    if isinstance(filesystem, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(inner), exist_ok=True)
        with open(inner, "a") as handle:
            handle.write(text)
        return
    try:
        with filesystem.open_input_stream(inner) as stream:
            previous = stream.read()
    except FileNotFoundError:
        previous = b""
    atomic_write_bytes(inner, previous + text.encode(), filesystem)


def ray_storage(path: str | os.PathLike) -> tuple[str, pafs.FileSystem | None]:
    """(storage_path, storage_filesystem) for Ray Train's RunConfig: a local path alone; for a URI the path
    inside its filesystem and the filesystem itself (Ray's own parsing would drop the URI's query)."""
    if not is_uri(path):
        return absolute(path), None
    filesystem, inner = resolve_filesystem(path)
    return inner, filesystem


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


# ---------------------------------------------------------------- directories between local disk and a URI
MANIFEST = ".perfusion-manifest.json"  # written last into a directory published to an object store
CACHE_ENV = "PERFUSION_CACHE_DIR"
FETCH_ATTEMPTS = 3  # a copy that meets a concurrent re-publish fails its digests: read the manifest again


def cache_root() -> Path:
    """Local copies of URI directories and logs of URI run folders: $PERFUSION_CACHE_DIR, else
    ~/.cache/perfusion_ray."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "perfusion_ray")


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _local_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def publish_directory(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Put the local folder `source` at `target` (a local path or a URI) so that no reader sees half of it.

    Local: replace_directory (a staged copy swapped in). Object store: a PUT per file, then MANIFEST (every
    file's size and sha256) last, then the keys of an earlier version that the new one lacks are deleted.
    local_directory copies only what a manifest lists and checks every digest, so a reader sees the old
    version or the new one."""
    if not is_uri(target):
        replace_directory(source, target)
        return
    source = Path(source)
    filesystem, base = resolve_filesystem(target)
    files = {}
    for relative in _local_files(source):
        filesystem.create_dir(os.path.dirname(f"{base}/{relative}"), recursive=True)
        with open(source / relative, "rb") as handle, filesystem.open_output_stream(f"{base}/{relative}") as out:
            shutil.copyfileobj(handle, out, 1 << 20)
        files[relative] = {"size": (source / relative).stat().st_size, "sha256": file_sha256(source / relative)}
    atomic_write_json(f"{base}/{MANIFEST}", {"files": files}, filesystem)
    stale = [info.path for info in filesystem.get_file_info(pafs.FileSelector(base, recursive=True))
             if info.type == pafs.FileType.File and os.path.relpath(info.path, base) not in {*files, MANIFEST}]
    for key in stale:
        filesystem.delete_file(key)


def local_directory(path: str | os.PathLike) -> Path:
    """A local folder holding the directory at `path`: the folder itself when it is local; for a URI, a copy
    under cache_root()/directories, one per published version (the manifest's digest), reused while the
    version stands (the last CACHED_VERSIONS are kept), each file checked against its manifest digest."""
    if not is_uri(path):
        return Path(path)
    filesystem, base = resolve_filesystem(path)
    for _ in range(FETCH_ATTEMPTS):
        manifest = read_json(f"{base}/{MANIFEST}", None, filesystem)
        if manifest is None:
            raise FileNotFoundError(f"{path} holds no complete directory (no {MANIFEST}: nothing was published "
                                    f"there, or the upload did not finish)")
        version = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
        source = hashlib.sha256(_split_query(str(path))[0].encode()).hexdigest()[:16]
        folder = cache_root() / "directories" / f"{source}-{version}"
        if (folder / MANIFEST).is_file():
            return folder
        if _fetch_verified(filesystem, base, manifest["files"], folder):
            _prune_versions(folder)
            return folder
    raise OSError(f"{path} changed during {FETCH_ATTEMPTS} copies in a row (a publish under way?)")


CACHED_VERSIONS = 3  # of one URI directory; older copies go (a process may still be loading the one before)


def _prune_versions(newest: Path) -> None:
    source = newest.name.split("-", 1)[0]
    versions = sorted(newest.parent.glob(f"{source}-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for folder in versions[CACHED_VERSIONS:]:
        shutil.rmtree(folder, ignore_errors=True)


def _fetch_verified(filesystem: pafs.FileSystem, base: str, files: dict, folder: Path) -> bool:
    """Copy the manifest's files to `folder` through a staging sibling; False when a digest does not match."""
    staging = folder.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex}-{folder.name}")
    try:
        for relative, expected in files.items():
            local = staging / relative
            local.parent.mkdir(parents=True, exist_ok=True)
            try:
                with filesystem.open_input_stream(f"{base}/{relative}") as stream, open(local, "wb") as out:
                    shutil.copyfileobj(stream, out, 1 << 20)
            except FileNotFoundError:
                return False
            if file_sha256(local) != expected["sha256"]:
                return False
        (staging / MANIFEST).write_text(json.dumps({"files": files}))  # marks the copy complete
        try:
            os.rename(staging, folder)
        except OSError:  # another process of this node finished the same version first
            if not (folder / MANIFEST).is_file():
                raise
        return True
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def log_file(out: str | os.PathLike, name: str) -> Path:
    """Where a command writes its log: <out>/logs/<name> for a local run folder; for a URI (logs are
    appended as they are written) a local folder under cache_root()/logs named after the URI."""
    if not is_uri(out):
        return Path(out) / "logs" / name
    base = _split_query(str(out))[0]
    readable = "".join(c if c.isalnum() or c in "-_." else "_" for c in base.split("://", 1)[1])
    return cache_root() / "logs" / readable / name
