"""The reward endpoint's contract: what a score request may hold, what comes back, how a refusal reads.

A request scores N images for one (merchant, prompt). The merchant is optional field by field, which
is the documented cold-start path:
  - a merchant_id the RM was trained on: its id embedding plus its side features ("known");
  - an id the RM has not seen: side features and stats alone ("cold_start");
  - no merchant_id at all: an empty id, and whatever features/stats were sent, usually none
    ("no_merchant"); the RM then scores like its non-personalized path.
Unknown fields are refused (422), so a typo in a field name never silently drops a merchant feature.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from perfusion_ray.serve.fields import FeatureValue, FiniteFloat, Key, Text

MerchantPath = Literal["known", "cold_start", "no_merchant"]

MAX_PROMPT_CHARS = 2000
MAX_MERCHANT_FEATURES = 32
MAX_MERCHANT_ID_CHARS = 256

MerchantFeatures = dict[Key, FeatureValue]
MerchantStats = dict[Key, FiniteFloat]


class MerchantFields(BaseModel):
    """The merchant and prompt of a score request; the handle path validates exactly these."""

    model_config = ConfigDict(extra="forbid")

    merchant_id: Text | None = Field(None, max_length=MAX_MERCHANT_ID_CHARS,
                                     description="absent: no merchant (cold start, no id)")
    merchant_features: MerchantFeatures = Field(default_factory=dict, max_length=MAX_MERCHANT_FEATURES,
                                                description="observable categorical side features")
    merchant_stats: MerchantStats = Field(default_factory=dict, max_length=MAX_MERCHANT_FEATURES,
                                          description="observable numeric side features (finite numbers)")
    prompt: Text = Field(..., max_length=MAX_PROMPT_CHARS)


class ScoreRequest(MerchantFields):
    """POST /v1/score body. images: base64 PNG strings (standard alphabet, padding required)."""

    images: list[str] = Field(..., min_length=1, description="base64-encoded PNG files")


class ScoreResponse(BaseModel):
    scores: list[float]
    model_version: str = Field(..., description="the RM version that produced these scores")
    merchant_path: MerchantPath


class VersionResponse(BaseModel):
    model_version: str
    model_dir: str
    image_size: int


@dataclass(frozen=True)
class ScoreResult:
    """One score per image, in request order, and the RM version that produced them."""

    scores: np.ndarray
    model_version: str
    merchant_path: MerchantPath

    @classmethod
    def from_json(cls, body: dict) -> "ScoreResult":
        return cls(np.asarray(body["scores"], dtype=np.float32), body["model_version"], body["merchant_path"])


class RewardRequestError(Exception):
    """A request the endpoint refused: HTTP status, a machine-readable kind and a human reason.

    Raised inside the replica on the handle path and by both clients, so callers catch one type (the
    design endpoint's refusals too). retry_after_s: set on 429 (the HTTP answer's Retry-After).
    """

    def __init__(self, status: int, kind: str, reason: str, retry_after_s: float | None = None):
        super().__init__(f"{status} {kind}: {reason}")
        self.status, self.kind, self.reason, self.retry_after_s = status, kind, reason, retry_after_s

    def __reduce__(self):  # survives pickling through Ray
        return type(self), (self.status, self.kind, self.reason, self.retry_after_s)

    def body(self) -> dict:
        body = {"error": self.kind, "reason": self.reason}
        if self.retry_after_s is not None:
            body["retry_after_s"] = round(self.retry_after_s, 3)
        return body


def reject(status: int, kind: str, reason: str, retry_after_s: float | None = None) -> RewardRequestError:
    return RewardRequestError(status, kind, reason, retry_after_s)


def validated(model: type[BaseModel], payload):
    """`payload` as a `model`, or 422 invalid_request naming every field that is wrong."""
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise reject(422, "invalid_request", describe_validation_error(exc)) from None


def describe_validation_error(exc) -> str:
    """pydantic errors as one line: `field: message` for each, unknown fields named as such."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "(body)"
        message = "unknown field" if error["type"] == "extra_forbidden" else error["msg"]
        parts.append(f"{where}: {message}")
    return "; ".join(parts)
