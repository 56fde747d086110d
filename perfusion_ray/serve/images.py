"""Images in and out of the endpoint: base64 PNG -> uint8 RGB arrays of the RM's size, or a refusal.

Policy (serve.image_policy) for an image whose mode is not RGB or whose size is not the RM's:
  convert: PIL converts the mode to RGB (alpha is dropped, palette expanded) and resizes bicubically;
  refuse:  422 wrong_image_mode / wrong_image_size, naming the image's index, its mode or size and the
           expected one.
Whatever the policy, only PNG is accepted, and an image larger than serve.max_image_side on either
side is refused from its header, before any pixel is decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Literal, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from perfusion_ray.serve.schemas import reject

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
Policy = Literal["convert", "refuse"]


def decode_base64(text: str, index: int) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise reject(422, "bad_base64", f"images[{index}]: not valid base64 ({exc})") from None


def open_png(data: bytes, index: int, max_side: int) -> Image.Image:
    """A fully decoded PIL image, or 422 not_an_image / image_too_large."""
    if not data.startswith(PNG_MAGIC):
        raise reject(422, "not_an_image", f"images[{index}]: not a PNG file (starts with {data[:8]!r})")
    try:
        image = Image.open(io.BytesIO(data), formats=["PNG"])
        width, height = image.size
        if width > max_side or height > max_side:
            raise reject(422, "image_too_large", f"images[{index}]: {width}x{height} exceeds the "
                                                 f"{max_side} px limit per side")
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise reject(422, "not_an_image", f"images[{index}]: PNG does not decode ({exc})") from None
    return image


def conform(image: Image.Image, index: int, size: int, policy: Policy) -> np.ndarray:
    """uint8 [size, size, 3] RGB, converted or refused as the policy says."""
    if image.mode != "RGB":
        if policy == "refuse":
            raise reject(422, "wrong_image_mode", f"images[{index}]: mode {image.mode}, the reward model takes "
                                                  f"RGB (serve.image_policy=refuse)")
        image = image.convert("RGB")
    if image.size != (size, size):
        if policy == "refuse":
            raise reject(422, "wrong_image_size", f"images[{index}]: {image.size[0]}x{image.size[1]}, the reward "
                                                  f"model takes {size}x{size} (serve.image_policy=refuse)")
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


def decode_images(encoded: Sequence[str], size: int, policy: Policy, max_side: int) -> np.ndarray:
    """base64 PNG strings -> uint8 [N, size, size, 3]."""
    arrays = [conform(open_png(decode_base64(text, i), i, max_side), i, size, policy) for i, text in enumerate(encoded)]
    return np.stack(arrays)


def array_images(images, size: int, policy: Policy, max_side: int) -> np.ndarray:
    """Arrays from an in-cluster caller ([N, H, W, 3|4] or [N, H, W] uint8, or a list of such images, or PNG
    bytes) -> uint8 [N, size, size, 3] under the same policy as HTTP."""
    if isinstance(images, np.ndarray) and images.ndim in (3, 4):
        items: list = list(images)
    else:
        items = list(images)
    out = []
    for i, item in enumerate(items):
        if isinstance(item, (bytes, bytearray)):
            out.append(conform(open_png(bytes(item), i, max_side), i, size, policy))
            continue
        array = np.asarray(item)
        if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
            raise reject(422, "not_an_image", f"images[{i}]: expected uint8 [H, W], [H, W, 3] or [H, W, 4], got "
                                              f"{array.dtype} {list(array.shape)}")
        if max(array.shape[:2]) > max_side:
            raise reject(422, "image_too_large", f"images[{i}]: {array.shape[1]}x{array.shape[0]} exceeds the "
                                                 f"{max_side} px limit per side")
        if array.ndim == 3 and array.shape[2] == 3 and array.shape[:2] == (size, size):
            out.append(array)  # the common case, no PIL round trip
            continue
        out.append(conform(Image.fromarray(array), i, size, policy))
    if not out:
        raise reject(422, "invalid_request", "images: at least one image is required")
    return np.stack(out)


def encode_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def to_base64_png(array: np.ndarray) -> str:
    return base64.b64encode(encode_png(array)).decode("ascii")


def decode_png_array(data: bytes) -> np.ndarray:
    """PNG bytes (from a trusted producer, e.g. our own endpoint) -> uint8 [H, W, 3]."""
    with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
