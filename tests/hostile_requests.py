"""Hostile requests for both apps, shared by tests/test_http_fuzz.py and benchmarks/faults.py: valid bodies,
hypothesis strategies that drop hostile values into them, schemathesis cases from an app's own OpenAPI, and
the hand cases that once answered 500."""

from __future__ import annotations

import json

import numpy as np
from hypothesis import strategies as st

from perfusion_ray.serve.images import to_base64_png


def image() -> str:
    return to_base64_png(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))


def score_body(**fields) -> dict:
    return {"merchant_id": "m0", "merchant_features": {"region": "south"}, "merchant_stats": {"price_level": 1.5},
            "prompt": "a dark red dress", "images": [image()], **fields}


def design_body(**fields) -> dict:
    return {"merchant": {"id": "m0", "features": {"region": "south"}, "stats": {"price_level": 1.5}},
            "prompt": "a dark red dress", "seed": 1, **fields}


# Lone surrogates, control characters, line separators, private use; numbers beyond any id; booleans and
# nulls where numbers go; NaN; nesting where text goes.
hostile_text = st.text(st.characters(categories=["Cs", "Cc", "Zl", "Co", "Lo"]), min_size=1, max_size=6)
hostile = st.recursive(
    hostile_text | st.integers(-(10**60), 10**60) | st.booleans() | st.none() | st.floats(allow_nan=True),
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(hostile_text, inner, max_size=2), max_leaves=6)
hostile_map = st.dictionaries(hostile_text | st.just("region"), hostile, min_size=1, max_size=2)

SCORE_PATHS = [("merchant_id",), ("merchant_features",), ("merchant_stats",), ("prompt",), ("images",), ("images", 0),
               ("colour",)]
DESIGN_PATHS = [("merchant", "id"), ("merchant", "features"), ("merchant", "stats"), ("prompt",), ("k",), ("n",),
                ("seed",), ("merchant",)]
MAP_FIELDS = ("merchant_features", "merchant_stats", "features", "stats")


def with_value(body: dict, path: tuple, value) -> dict:
    """A copy of `body` with `value` at `path`."""
    out = json.loads(json.dumps(body))
    target = out
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return out


@st.composite
def hostile_bodies(draw, base: dict, paths: list[tuple]) -> dict:
    """`base` with one field (a map field: one key and value) made hostile."""
    path = draw(st.sampled_from(paths))
    return with_value(base, path, draw(hostile_map if path[-1] in MAP_FIELDS else hostile))


def schemathesis_cases(base: str, headers: dict):
    """Cases for every operation of the app's served OpenAPI document, valid by it and not."""
    import schemathesis
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(f"{base}/openapi.json", headers=headers)
    return st.one_of(schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE))


DEEP = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
LONG_INT = b'{"prompt": "a", "seed": ' + b"7" * 5000 + b"}"
SURROGATE_SCORE = json.dumps(score_body(merchant_features={"region": "\ud800"})).encode()
SURROGATE_DESIGN = json.dumps(design_body(merchant={"id": "m0", "features": {"region": "\udfff"}})).encode()
NUL_FEEDBACK = json.dumps({"request_id": "d" + "0" * 31 + "\x00", "token": "t",
                           "events": [{"event_id": "e", "type": "select", "position": 0}]}).encode()
# (app, route, body): every hand case, each must answer 4xx
HAND_CASES = [(app, route, body) for app, route in (("reward", "/v1/score"), ("design", "/v1/designs"),
                                                     ("design", "/v1/feedback")) for body in (DEEP, LONG_INT)] + [
    ("reward", "/v1/score", SURROGATE_SCORE), ("design", "/v1/designs", SURROGATE_DESIGN),
    ("design", "/v1/feedback", NUL_FEEDBACK), ("design", "/v1/designs", json.dumps(design_body(seed=False)).encode())]
