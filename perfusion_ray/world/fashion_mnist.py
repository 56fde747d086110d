"""Locate and load the real Fashion-MNIST images (idx files, gzipped or not).

Search order: $FASHION_MNIST_DIR, the config's world.fashion_mnist_dir, the Debian package
dataset-fashion-mnist, then torchvision-layout folders (<root>/FashionMNIST/raw).
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from perfusion_ray.errors import PerfusionError
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
INSTALL_COMMAND = "sudo apt-get install -y dataset-fashion-mnist"
_SPLIT_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


@dataclass(frozen=True)
class FashionMNIST:
    images: np.ndarray  # uint8 [N, 28, 28], white item on black
    labels: np.ndarray  # int64 [N], 0..9 (models/class_names.py: CLASS_NAMES)


def _idx_file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _has_dataset(folder: Path) -> bool:
    return all(_idx_file(folder, stem) for pair in _SPLIT_FILES.values() for stem in pair)


def candidate_dirs(configured: Path | None = None) -> list[Path]:
    candidates = []
    if os.environ.get("FASHION_MNIST_DIR"):
        candidates.append(Path(os.environ["FASHION_MNIST_DIR"]))
    if configured is not None:
        candidates.append(Path(configured))
    candidates.append(DEBIAN_DIR)
    for root in (Path("data"), Path.home() / ".cache" / "torchvision", Path.home() / "data"):
        candidates.append(root / "FashionMNIST" / "raw")
    # A torchvision root given directly (FASHION_MNIST_DIR=/data) also works.
    return [sub for folder in candidates for sub in (folder, folder / "FashionMNIST" / "raw")]


def locate(configured: Path | None = None) -> Path:
    """The first folder holding all four idx files, or a PerfusionError with the install command."""
    searched = candidate_dirs(configured)
    for folder in searched:
        if _has_dataset(folder):
            return folder
    shown = ", ".join(str(folder) for folder in searched[::2])
    raise PerfusionError(
        f"Fashion-MNIST images not found (searched {shown})",
        hint=f"install them with `{INSTALL_COMMAND}`, or set FASHION_MNIST_DIR to a folder with the four idx files",
    )


def _read_idx(path: Path, header_bytes: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < header_bytes:
        raise PerfusionError(f"{path} is truncated ({len(raw)} bytes)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_bytes)


@lru_cache(maxsize=4)
def load(split: str = "train", configured: Path | None = None) -> FashionMNIST:
    """Load a split ('train': 60k, 'test': 10k)."""
    folder = locate(configured)
    image_stem, label_stem = _SPLIT_FILES[split]
    images = _read_idx(_idx_file(folder, image_stem), 16)
    labels = _read_idx(_idx_file(folder, label_stem), 8).astype(np.int64)
    if images.size != labels.size * 28 * 28:
        raise PerfusionError(f"{folder}: {split} images and labels disagree ({images.size} pixels, {labels.size} labels)")
    return FashionMNIST(images.reshape(-1, 28, 28), labels)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check that the Fashion-MNIST images can be found.")
    parser.add_argument("--check", action="store_true", help="print where the images are, or how to install them")
    parser.parse_args(argv)
    try:
        print(locate())
    except PerfusionError as exc:
        print(f"error: {exc.message}\nhint: {exc.hint}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
