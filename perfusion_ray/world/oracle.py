"""The pixel oracle: deterministic attribute extraction from pixels, and utility(merchant, image).

Never learned and never shown to the models: it is the ground truth every result is measured by.
Works on any RGB image, catalogue renders and generated samples alike.
"""

from __future__ import annotations

import numpy as np

from perfusion_ray.world.attributes import COLOURS, PALETTE, STRIPE_PERIOD

ITEM_THRESHOLD = 0.08  # max channel above this is item, below is background
_HUES = np.array([PALETTE[c] for c in COLOURS])


def _rgb_float(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected RGB images [N, H, W, 3], got shape {images.shape}")
    return images.astype(np.float32) / (255.0 if images.dtype == np.uint8 else 1.0)


def _hue_degrees(rgb: np.ndarray, high: np.ndarray, chroma: np.ndarray) -> np.ndarray:
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(high == r, ((g - b) / safe) % 6.0, np.where(high == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    return hue * 60.0


def colour_probabilities(images: np.ndarray) -> np.ndarray:
    """[N, 8]: share of item chroma whose hue is nearest each named colour (uniform when colourless)."""
    rgb = _rgb_float(images)
    high, low = rgb.max(-1), rgb.min(-1)
    chroma = high - low
    hue = _hue_degrees(rgb, high, chroma)
    distance = np.abs((hue[..., None] - _HUES + 180.0) % 360.0 - 180.0)  # [N, H, W, 8]
    nearest = distance.argmin(-1)
    weight = np.where(high > ITEM_THRESHOLD, chroma, 0.0)
    votes = np.stack([(weight * (nearest == k)).sum((1, 2)) for k in range(len(COLOURS))], axis=1)
    total = votes.sum(1, keepdims=True)
    return np.where(total > 1e-6, votes / np.maximum(total, 1e-6), 1.0 / len(COLOURS))


def light_probability(images: np.ndarray) -> np.ndarray:
    """[N]: how pastel the item is. Light items have min/max channel near 0.5, dark ones near 0."""
    rgb = _rgb_float(images)
    high, low = rgb.max(-1), rgb.min(-1)
    item = high > ITEM_THRESHOLD
    whiteness = (np.where(item, low / np.maximum(high, 1e-6), 0.0).sum((1, 2))) / np.maximum(item.sum((1, 2)), 1)
    return 1.0 / (1.0 + np.exp(-(whiteness - 0.25) / 0.05))


def stripe_probability(images: np.ndarray) -> np.ndarray:
    """[N]: how far the vertical luminance spectrum peaks at the stripe frequency, squashed to [0, 1].

    A peak over the neighbouring frequencies, not a share of all energy: small items (sandals,
    sneakers) have strong vertical structure of their own but no narrow peak.
    """
    rgb = _rgb_float(images)
    luminance = rgb.max(-1)
    rows = luminance.shape[1]
    spectrum = (np.abs(np.fft.rfft(luminance - luminance.mean(1, keepdims=True), axis=1)) ** 2).sum(2)  # [N, F]
    peak = rows // STRIPE_PERIOD
    neighbours = spectrum[:, [peak - 2, peak - 1, peak + 1, peak + 2]].mean(1)
    log_ratio = np.log((spectrum[:, peak] + 1e-9) / (neighbours + 1e-9))
    return 1.0 / (1.0 + np.exp(-(log_ratio - 0.45) / 0.2))


def attribute_profile(images: np.ndarray) -> np.ndarray:
    """[N, 12] in PROFILE_NAMES order: colour shares, (light, dark), (plain, striped)."""
    colours = colour_probabilities(images)
    light = light_probability(images)
    striped = stripe_probability(images)
    return np.concatenate([colours, np.stack([light, 1 - light], 1), np.stack([1 - striped, striped], 1)], 1)


def utility(tastes: np.ndarray, profiles: np.ndarray) -> np.ndarray:
    """Utility of each image for each merchant: [M, 12] tastes x [N, 12] profiles -> [M, N]."""
    return np.asarray(tastes, np.float64) @ np.asarray(profiles, np.float64).T
