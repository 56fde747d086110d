"""The classes the embedded base model and its classifier know: Fashion-MNIST's labels, and the class a
prompt asks for (light: no torch, so the data tools can import it)."""

from __future__ import annotations

CLASS_NAMES = ("t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")


def requested_class(prompt: str) -> int:
    """The class a prompt names ('a dark red dress' -> 3), or -1 when it names none of CLASS_NAMES. The
    longest name wins, so 't-shirt' is not read as 'shirt'."""
    words = " " + " ".join(prompt.lower().replace(",", " ").split()) + " "
    named = [i for i, name in enumerate(CLASS_NAMES) if f" {name} " in words or f" {name}s " in words]
    return max(named, key=lambda i: len(CLASS_NAMES[i])) if named else -1
