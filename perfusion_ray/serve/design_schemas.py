"""The design endpoint's contract: design and feedback requests (pydantic, unknown fields refused) and the
typed results both clients return.

    POST /v1/designs  {merchant: {id, features, stats}, prompt, k?, n?, seed?}
                      -> {request_id, token, model_version, seed, k, n, reward_version,
                          candidates: [{position, image (base64 PNG), url, sha256, score}]}
    POST /v1/feedback {request_id, token, events: [{event_id, type, position, value?}]}
                      -> {request_id, accepted: [event_id], duplicates: [event_id]}

The merchant id is required (every stored event names its merchant; an id the policy never saw takes
the cold-start path). The token returned by /v1/designs is the only key to post feedback on that
request. Client event ids are idempotency keys, unique within a request.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from perfusion_ray.records import Merchant
from perfusion_ray.serve.fields import FiniteFloat, Text, WholeNumber
from perfusion_ray.serve.schemas import MAX_MERCHANT_FEATURES, MAX_PROMPT_CHARS, MerchantFeatures, MerchantStats

# The ingest's id rule (data/validation.py ID_PATTERN) less "/", which joins request and client event ids.
MERCHANT_ID_PATTERN = r"^[A-Za-z0-9._:@+=-]{1,128}$"
CLIENT_EVENT_ID_PATTERN = r"^[A-Za-z0-9._:@+=-]{1,64}$"
# What POST /v1/designs issues (design_feedback.py): a request id, and its token (secrets.token_urlsafe).
REQUEST_ID_PATTERN = r"^d[0-9a-f]{32}$"
TOKEN_PATTERN = r"^[A-Za-z0-9_-]{1,256}$"
FeedbackType = Literal["select", "click", "order", "return"]
FEEDBACK_TYPES: tuple[str, ...] = FeedbackType.__args__


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MerchantIn(_Strict):
    id: str = Field(..., pattern=MERCHANT_ID_PATTERN, description="the merchant's id (unseen ids: cold start)")
    features: MerchantFeatures = Field(default_factory=dict, max_length=MAX_MERCHANT_FEATURES,
                                       description="observable categorical side features")
    stats: MerchantStats = Field(default_factory=dict, max_length=MAX_MERCHANT_FEATURES,
                                 description="observable numeric side features (finite numbers)")

    def as_merchant(self) -> Merchant:
        return Merchant(self.id, dict(self.features), dict(self.stats))


class DesignRequest(_Strict):
    merchant: MerchantIn
    prompt: Text = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS)
    k: WholeNumber | None = Field(None, ge=1, description="candidates returned; default data.group_size")
    n: WholeNumber | None = Field(None, ge=1, description="images generated (best-of-n, n >= k); default "
                                                          "design.best_of_n")
    seed: WholeNumber | None = Field(None, ge=0, lt=2**63, description="same seed, model and request: same images "
                                                                      "(a resend with its seed is safe to retry)")


class FeedbackEventIn(_Strict):
    event_id: str = Field(..., pattern=CLIENT_EVENT_ID_PATTERN, description="idempotency key within the request")
    type: FeedbackType
    position: WholeNumber = Field(..., ge=0)
    value: FiniteFloat = Field(1.0, ge=0, description="e.g. an order amount; 1 when the event has no magnitude")


class FeedbackRequest(_Strict):
    request_id: str = Field(..., pattern=REQUEST_ID_PATTERN, description="as POST /v1/designs returned it")
    token: str = Field(..., pattern=TOKEN_PATTERN, description="the token POST /v1/designs returned with it")
    events: list[FeedbackEventIn] = Field(..., min_length=1)


@dataclass(frozen=True)
class FeedbackEvent:
    """One merchant or shopper reaction to a candidate: select / click / order / return."""

    type: str
    position: int
    event_id: str = ""  # empty: the clients draw a fresh one (a resend must reuse the id it was sent with)
    value: float = 1.0


@dataclass(frozen=True)
class Candidate:
    position: int
    image: np.ndarray  # uint8 [H, W, 3]
    sha256: str
    url: str
    score: float | None = None  # the reward app's score under best-of-n


@dataclass(frozen=True)
class DesignResult:
    """K candidates for one request, in position order (best first under best-of-n)."""

    request_id: str
    token: str
    model_version: str
    seed: int
    candidates: list[Candidate]
    reward_version: str | None = None  # the RM version that ranked them, under best-of-n
    n: int = 0  # images generated

    @property
    def images(self) -> np.ndarray:
        return np.stack([c.image for c in self.candidates])

    @classmethod
    def from_json(cls, body: dict) -> "DesignResult":
        from perfusion_ray.serve.images import decode_png_array

        def png(image: str | bytes) -> bytes:  # base64 over HTTP, bytes through a handle
            return base64.b64decode(image) if isinstance(image, str) else bytes(image)

        candidates = [Candidate(c["position"], decode_png_array(png(c["image"])), c["sha256"], c["url"], c.get("score"))
                      for c in body["candidates"]]
        return cls(body["request_id"], body["token"], body["model_version"], body["seed"], candidates,
                   body.get("reward_version"), body.get("n", len(candidates)))


@dataclass(frozen=True)
class FeedbackResult:
    """Which events this call stored, and which had been stored before (resends: nothing written twice)."""

    request_id: str
    accepted: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)

    @classmethod
    def from_json(cls, body: dict) -> "FeedbackResult":
        return cls(body["request_id"], list(body["accepted"]), list(body["duplicates"]))
