"""A content-addressed image store: PNG files named by their sha256, under one root (local or URI)."""

from __future__ import annotations

import hashlib
import io
import os
from functools import lru_cache

import numpy as np
import pyarrow.fs as pafs
from PIL import Image

from perfusion_ray.storage import atomic_write_bytes, resolve_filesystem


JPEG_MAGIC = b"\xff\xd8\xff"


def encode_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    # optimize=False and no metadata: the same pixels always give the same bytes.
    Image.fromarray(image).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ImageStore:
    def __init__(self, root: str):
        self.root = str(root)
        self.filesystem, self.base = resolve_filesystem(root)

    def put(self, data: bytes) -> tuple[str, str]:
        """Store encoded image bytes as they are; returns (image_ref, sha256). Storing twice is free.

        The file is named by its digest, with the extension of its format (JPEG or PNG) so that other
        tools see what it is.
        """
        digest = sha256_hex(data)
        extension = "jpg" if data.startswith(JPEG_MAGIC) else "png"
        ref = f"{digest[:2]}/{digest}.{extension}"
        path = os.path.join(self.base, ref)
        if self.filesystem.get_file_info(path).type == pafs.FileType.NotFound:
            atomic_write_bytes(path, data, self.filesystem)
        return ref, digest

    def put_array(self, image: np.ndarray) -> tuple[str, str]:
        return self.put(encode_png(image))

    def read_bytes(self, ref: str) -> bytes:
        if not ref or ref.startswith("/") or ".." in ref.split("/"):
            raise ValueError(f"image_ref {ref!r} is not a path inside the image store")
        with self.filesystem.open_input_stream(os.path.join(self.base, ref)) as stream:
            return stream.read()

    def load(self, ref: str) -> np.ndarray:
        """uint8 RGB array of a stored image."""
        with Image.open(io.BytesIO(self.read_bytes(ref))) as image:
            return np.asarray(image.convert("RGB"))


# Beyond this many pixels an image is refused from its header, before any decoding (a PNG whose header
# claims a huge size would otherwise allocate it).
MAX_IMAGE_PIXELS = 4096 * 4096


@lru_cache(maxsize=200_000)
def image_problem(store_root: str, ref: str, digest: str, size: int | None) -> str | None:
    """Why the image behind (ref, digest) is unusable, or None. Cached per process: images are immutable."""
    store = ImageStore(store_root)
    try:
        data = store.read_bytes(ref)
    except (OSError, ValueError) as exc:
        return f"unreadable image: {ref}: {exc.__class__.__name__}"
    if sha256_hex(data) != digest:
        return f"unreadable image: {ref}: content does not match image_sha256"
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if size is not None and (width, height) != (size, size):
                return f"unreadable image: {ref}: size {width}x{height}, expected {size}x{size}"
            if width * height > MAX_IMAGE_PIXELS:
                return f"unreadable image: {ref}: size {width}x{height}, above {MAX_IMAGE_PIXELS} pixels"
            image.load()
    except Exception as exc:  # noqa: BLE001 - PIL's decoders raise OSError, ValueError, SyntaxError, EOFError...
        return f"unreadable image: {ref}: not a decodable image ({exc.__class__.__name__})"
    return None
