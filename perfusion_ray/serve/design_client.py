"""Typed clients for the design endpoint, one signature for both transports:

    client.design(merchant, prompt, k=None, n=None, seed=None) -> DesignResult(request_id, token, model_version,
                                                                             seed, candidates, reward_version, n)
    client.feedback(result_or_request_id, events, token=None) -> FeedbackResult(request_id, accepted, duplicates)
    client.version() -> str

`DesignClient` speaks HTTP (requests; candidates come back as base64 PNG, decoded to uint8 arrays).
`DesignHandleClient` calls the deployment through a DeploymentHandle from inside the cluster (no bearer
token, no base64) and has `design_async` / `feedback_async` for callers that are coroutines. Both raise
RewardRequestError(status, kind, reason, retry_after_s) for a refused request (429: retry_after_s set).

events: FeedbackEvent(type, position, event_id="", value=1.0); an empty event_id gets a fresh uuid, so
to resend an event safely (idempotent), give it an id and send the same id again.

Both clients make every call idempotent and send it again through a replica loss (client.py): a design
request without a seed gets one drawn here, so a resend asks for the same images, and feedback events
get their ids before the first send, so a resend stores nothing twice.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Callable
from typing import Protocol, Sequence

from perfusion_ray.records import Merchant
from perfusion_ray.serve.client import HandleClient, RewardClient
from perfusion_ray.serve.design_schemas import DesignResult, FeedbackEvent, FeedbackResult
from perfusion_ray.serve.retry import RetryPolicy


class Designer(Protocol):
    def design(self, merchant: Merchant, prompt: str, k: int | None = None, n: int | None = None,
               seed: int | None = None) -> DesignResult: ...

    def feedback(self, request: DesignResult | str, events: Sequence[FeedbackEvent],
                 token: str | None = None) -> FeedbackResult: ...

    def version(self) -> str: ...


def design_body(merchant: Merchant, prompt: str, k: int | None, n: int | None, seed: int | None) -> dict:
    """The request body; always with a seed (drawn here when None), so that sending it twice is safe."""
    seed = secrets.randbits(63) if seed is None else seed
    body: dict = {"merchant": {"id": merchant.id, "features": dict(merchant.features), "stats": dict(merchant.stats)},
                  "prompt": prompt}
    for name, value in (("k", k), ("n", n), ("seed", seed)):
        if value is not None:
            body[name] = int(value)
    return body


def feedback_body(request: DesignResult | str, events: Sequence[FeedbackEvent], token: str | None) -> dict:
    if isinstance(request, DesignResult):
        request_id, token = request.request_id, token or request.token
    else:
        request_id = request
    if not token:
        raise ValueError("feedback needs the request's token: pass the DesignResult, or token=")
    return {"request_id": request_id, "token": token,
            "events": [{"event_id": e.event_id or uuid.uuid4().hex, "type": e.type, "position": int(e.position),
                        "value": float(e.value)} for e in events]}


class DesignClient(RewardClient):
    """HTTP client. url: the design app's root (http://127.0.0.1:8000/design by default); token: the bearer
    token of the proxy (config.serve), not a request's token."""

    def __init__(self, url: str = "http://127.0.0.1:8000/design", token: str | None = None, timeout_s: float = 120.0,
                 retry: RetryPolicy = RetryPolicy(), observe: Callable[[int], None] | None = None):
        super().__init__(url, token, timeout_s, retry, observe)

    def design(self, merchant: Merchant, prompt: str, k: int | None = None, n: int | None = None,
               seed: int | None = None) -> DesignResult:
        return DesignResult.from_json(self._call("POST", "/v1/designs", design_body(merchant, prompt, k, n, seed)))

    def feedback(self, request: DesignResult | str, events: Sequence[FeedbackEvent],
                 token: str | None = None) -> FeedbackResult:
        return FeedbackResult.from_json(self._call("POST", "/v1/feedback", feedback_body(request, events, token)))

    def post_raw(self, body: bytes | str, headers: dict | None = None, route: str = "/v1/designs"):
        """POST arbitrary bytes to a route, once (for probing the input checks); returns the requests Response."""
        return super().post_raw(body, headers, route)


class DesignHandleClient(HandleClient):
    """DeploymentHandle client for callers inside the cluster (Ray tasks, actors, drivers)."""

    def __init__(self, app_name: str = "design", timeout_s: float = 300.0, handle=None,
                 retry: RetryPolicy = RetryPolicy()):
        from perfusion_ray.serve.design_app import DEPLOYMENT_NAME

        super().__init__(DEPLOYMENT_NAME, app_name, timeout_s, handle, retry)

    def design(self, merchant: Merchant, prompt: str, k: int | None = None, n: int | None = None,
               seed: int | None = None) -> DesignResult:
        return DesignResult.from_json(self._call("design", design_body(merchant, prompt, k, n, seed)))

    def design_many(self, requests: Sequence[tuple[Merchant, str]], k: int | None = None, n: int | None = None,
                    seeds: Sequence[int | None] | None = None) -> list[DesignResult]:
        """Several requests in flight together (the replica batches them across merchants)."""
        seeds = list(seeds) if seeds is not None else [None] * len(requests)
        calls = [(design_body(merchant, prompt, k, n, seed),) for (merchant, prompt), seed in zip(requests, seeds,
                                                                                                  strict=True)]
        return [DesignResult.from_json(raw) for raw in self._call_many("design", calls)]

    async def design_async(self, merchant: Merchant, prompt: str, k: int | None = None, n: int | None = None,
                           seed: int | None = None) -> DesignResult:
        return DesignResult.from_json(await self._call_async("design", design_body(merchant, prompt, k, n, seed)))

    def feedback(self, request: DesignResult | str, events: Sequence[FeedbackEvent],
                 token: str | None = None) -> FeedbackResult:
        return FeedbackResult.from_json(self._call("feedback", feedback_body(request, events, token)))

    async def feedback_async(self, request: DesignResult | str, events: Sequence[FeedbackEvent],
                             token: str | None = None) -> FeedbackResult:
        return FeedbackResult.from_json(await self._call_async("feedback", feedback_body(request, events, token)))

    def version(self) -> str:
        return self._call("version")["model_version"]

    def batch_sizes(self) -> list[int]:
        """Images per pipeline call in the replica that answers (tests and benchmarks)."""
        return self._call("batch_sizes")
