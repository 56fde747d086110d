"""The FashionWorld attribute vocabulary and how an attribute combination is drawn onto a real item.

An item is a Fashion-MNIST grey-level image used as a texture mask on black: the pixel colour is
mask * rgb(colour, shade), with stripes multiplied in for the striped pattern. The oracle
(world/oracle.py) reads the same attributes back from pixels alone.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
from PIL import Image

# Hues in degrees. Eight colours far enough apart that a hue vote separates them.
PALETTE: dict[str, float] = {
    "red": 0.0, "orange": 30.0, "yellow": 58.0, "green": 120.0,
    "cyan": 185.0, "blue": 225.0, "purple": 275.0, "pink": 325.0,
}
COLOURS = tuple(PALETTE)
SHADES = ("light", "dark")
PATTERNS = ("plain", "striped")
# Order of the attribute profile the oracle extracts and tastes weigh: colours, shades, patterns.
PROFILE_NAMES = tuple(f"colour:{c}" for c in COLOURS) + tuple(f"shade:{s}" for s in SHADES) + tuple(
    f"pattern:{p}" for p in PATTERNS
)
STRIPE_PERIOD = 4  # rows; horizontal stripes, two rows bright, two rows dim
STRIPE_DIM = 0.3


@dataclass(frozen=True)
class Attributes:
    colour: str
    shade: str
    pattern: str


def shade_rgb(colour: str, shade: str) -> np.ndarray:
    """Light is the pure hue mixed half with white (pastel); dark is the pure hue at 55% value."""
    pure = np.array(colorsys.hsv_to_rgb(PALETTE[colour] / 360.0, 1.0, 1.0))
    return 0.5 * pure + 0.5 if shade == "light" else 0.55 * pure


def stripe_mask(size: int) -> np.ndarray:
    rows = np.arange(size)
    return np.where((rows // (STRIPE_PERIOD // 2)) % 2 == 1, STRIPE_DIM, 1.0)[:, None]


def place_item(grey: np.ndarray, size: int) -> np.ndarray:
    """A 28x28 uint8 item centred on a size x size canvas, as float in [0, 1]."""
    item = grey.astype(np.float32) / 255.0
    if size != 28 + 4:
        item = np.asarray(Image.fromarray(grey).resize((size - 4, size - 4), Image.BILINEAR), np.float32) / 255.0
    canvas = np.zeros((size, size), np.float32)
    canvas[2:-2, 2:-2] = item
    return canvas


def render(grey: np.ndarray, attributes: Attributes, size: int) -> np.ndarray:
    """uint8 [size, size, 3] image of the item in the given colour, shade and pattern."""
    mask = place_item(grey, size)
    if attributes.pattern == "striped":
        mask = mask * stripe_mask(size)
    rgb = mask[..., None] * shade_rgb(attributes.colour, attributes.shade)[None, None, :]
    return np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)
