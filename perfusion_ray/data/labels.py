"""Graded labels from feedback events under a label policy (pure; shared by ingest and the simulator)."""

from __future__ import annotations

import numpy as np

from perfusion_ray.config import LabelPolicy


def graded_labels(event_counts: dict[str, np.ndarray], policy: LabelPolicy) -> np.ndarray:
    """Label per candidate: the highest grade among its events, plus return_penalty per return.

    event_counts maps an event type to the number of such events per candidate (arrays of one shape).
    Every candidate has had an impression, so the floor is the impression grade.
    """
    shape = next(iter(event_counts.values())).shape
    label = np.full(shape, policy.grades["impression"], dtype=np.float64)
    for event_type, grade in policy.grades.items():
        counts = event_counts.get(event_type)
        if counts is not None:
            label = np.where(counts > 0, np.maximum(label, grade), label)
    returns = event_counts.get("return")
    if returns is not None:
        label = label + policy.return_penalty * returns
    return label.astype(np.float32)


def is_positive(labels: np.ndarray, policy: LabelPolicy) -> np.ndarray:
    """The binary split: P (preferred) where the label is above the policy's threshold."""
    return np.asarray(labels) > policy.positive_threshold
