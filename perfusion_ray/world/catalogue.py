"""The catalogue: real Fashion-MNIST items in every colour, shade and pattern, and the prompts for them."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from perfusion_ray.world.attributes import COLOURS, PATTERNS, SHADES, Attributes, render
from perfusion_ray.models.class_names import CLASS_NAMES
from perfusion_ray.world.fashion_mnist import FashionMNIST

_PLURAL_NOUNS = {"trousers"}


@dataclass(frozen=True)
class Catalogue:
    """Items as parallel arrays; item i is images[i], of class classes[i] in colours[i]/shades[i]/patterns[i]."""

    images: np.ndarray  # uint8 [N, S, S, 3]
    source_index: np.ndarray  # index into the Fashion-MNIST split
    classes: np.ndarray  # int [N]
    colours: np.ndarray  # int [N] into COLOURS
    shades: np.ndarray  # int [N] into SHADES
    patterns: np.ndarray  # int [N] into PATTERNS

    def __len__(self) -> int:
        return len(self.classes)

    def matching(self, cls: int, colour: int | None, shade: int | None, pattern: int | None) -> np.ndarray:
        """Indices of items of class `cls` agreeing with every attribute that is not None."""
        keep = self.classes == cls
        for values, wanted in ((self.colours, colour), (self.shades, shade), (self.patterns, pattern)):
            if wanted is not None:
                keep &= values == wanted
        return np.flatnonzero(keep)


def build_catalogue(dataset: FashionMNIST, items_per_combination: int, image_size: int, seed: int) -> Catalogue:
    """Every (class, colour, shade, pattern) combination, items_per_combination real items each."""
    rng = np.random.default_rng([seed, 2])
    by_class = [np.flatnonzero(dataset.labels == cls) for cls in range(len(CLASS_NAMES))]
    rows = []
    for cls, colour, shade, pattern in itertools.product(
        range(len(CLASS_NAMES)), range(len(COLOURS)), range(len(SHADES)), range(len(PATTERNS))
    ):
        for source in rng.choice(by_class[cls], size=items_per_combination, replace=False):
            rows.append((int(source), cls, colour, shade, pattern))
    source, classes, colours, shades, patterns = (np.array(column) for column in zip(*rows))
    images = np.stack([
        render(dataset.images[s], Attributes(COLOURS[c], SHADES[h], PATTERNS[p]), image_size)
        for s, c, h, p in zip(source, colours, shades, patterns)
    ])
    return Catalogue(images, source, classes, colours, shades, patterns)


def prompt_text(cls: int, colour: int | None = None, shade: int | None = None, pattern: int | None = None) -> str:
    """'a striped dark red dress'; attributes given as None are left out ('a dress', 'plain trousers')."""
    noun = CLASS_NAMES[cls]
    words = [PATTERNS[pattern] if pattern is not None else None, SHADES[shade] if shade is not None else None,
             COLOURS[colour] if colour is not None else None, noun]
    phrase = " ".join(word for word in words if word)
    if noun in _PLURAL_NOUNS:
        return phrase
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


@dataclass(frozen=True)
class RequestAttributes:
    """What a prompt asks for; None = left open."""

    cls: int
    colour: int | None
    shade: int | None
    pattern: int | None

    @property
    def open(self) -> bool:
        return self.colour is None or self.shade is None or self.pattern is None


def parse_prompt(text: str) -> RequestAttributes:
    """The inverse of prompt_text: 'a striped dark red dress' -> its class and the named attributes."""
    words = text.strip().split()
    if words and words[0] in ("a", "an"):
        words = words[1:]
    phrase = " ".join(words)
    nouns = [i for i, name in enumerate(CLASS_NAMES) if phrase == name or phrase.endswith(" " + name)]
    if not nouns:
        raise ValueError(f"{text!r} names no FashionWorld item ({', '.join(CLASS_NAMES)})")
    cls = max(nouns, key=lambda i: len(CLASS_NAMES[i]))  # 'ankle boot' over 'boot'-like suffixes
    rest = phrase[: len(phrase) - len(CLASS_NAMES[cls])].split()

    def named(values: tuple[str, ...]) -> int | None:
        found = [values.index(word) for word in rest if word in values]
        return found[0] if found else None

    return RequestAttributes(cls, named(COLOURS), named(SHADES), named(PATTERNS))
