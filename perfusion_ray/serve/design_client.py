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
"""

from __future__ import annotations

import uuid
from typing import Protocol, Sequence

from perfusion_ray.serve.client import RewardClient, _unwrap
from perfusion_ray.serve.design_schemas import DesignResult, FeedbackEvent, FeedbackResult
from perfusion_ray.records import Merchant
from perfusion_ray.serve.schemas import RewardRequestError


class Designer(Protocol):
    def design(self, merchant: Merchant, prompt: str, k: int | None = None, n: int | None = None,
               seed: int | None = None) -> DesignResult: ...

    def feedback(self, request: DesignResult | str, events: Sequence[FeedbackEvent],
                 token: str | None = None) -> FeedbackResult: ...

    def version(self) -> str: ...


def design_body(merchant: Merchant, prompt: str, k: int | None, n: int | None, seed: int | None) -> dict:
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

    def __init__(self, url: str = "http://127.0.0.1:8000/design", token: str | None = None, timeout_s: float = 120.0):
        super().__init__(url, token, timeout_s)

    def _check(self, response) -> dict:
        try:
            return super()._check(response)
        except RewardRequestError as exc:
            retry = response.headers.get("Retry-After")
            if retry is not None:
                raise RewardRequestError(exc.status, exc.kind, exc.reason, float(retry)) from None
            raise

    def design(self, merchant: Merchant, prompt: str, k: int | None = None, n: int | None = None,
               seed: int | None = None) -> DesignResult:
        response = self._session.post(f"{self.url}/v1/designs", json=design_body(merchant, prompt, k, n, seed),
                                      timeout=self.timeout_s)
        return DesignResult.from_json(self._check(response))

    def feedback(self, request: DesignResult | str, events: Sequence[FeedbackEvent],
                 token: str | None = None) -> FeedbackResult:
        response = self._session.post(f"{self.url}/v1/feedback", json=feedback_body(request, events, token),
                                      timeout=self.timeout_s)
        return FeedbackResult.from_json(self._check(response))

    def post_raw(self, body: bytes | str, headers: dict | None = None, route: str = "/v1/designs"):
        """POST arbitrary bytes to a route (for probing the input checks); returns the requests Response."""
        return self._session.post(f"{self.url}{route}", data=body, timeout=self.timeout_s,
                                  headers={"Content-Type": "application/json", **(headers or {})})


class DesignHandleClient:
    """DeploymentHandle client for callers inside the cluster (Ray tasks, actors, drivers)."""

    def __init__(self, app_name: str = "design", timeout_s: float = 300.0, handle=None):
        from ray import serve

        from perfusion_ray.serve.design_app import DEPLOYMENT_NAME

        self.timeout_s = timeout_s
        self._handle = handle or serve.get_deployment_handle(DEPLOYMENT_NAME, app_name)

    def _wait(self, response) -> dict:
        try:
            return response.result(timeout_s=self.timeout_s)
        except Exception as exc:  # noqa: BLE001 - re-raised, unwrapped when it is ours
            unwrapped = _unwrap(exc)
            if isinstance(unwrapped, RewardRequestError):
                raise unwrapped from None
            raise

    async def _await(self, response) -> dict:
        try:
            return await response
        except Exception as exc:  # noqa: BLE001
            unwrapped = _unwrap(exc)
            if isinstance(unwrapped, RewardRequestError):
                raise unwrapped from None
            raise

    def design(self, merchant: Merchant, prompt: str, k: int | None = None, n: int | None = None,
               seed: int | None = None) -> DesignResult:
        return DesignResult.from_json(self._wait(self._handle.design.remote(design_body(merchant, prompt, k, n, seed))))

    def design_many(self, requests: Sequence[tuple[Merchant, str]], k: int | None = None, n: int | None = None,
                    seeds: Sequence[int | None] | None = None) -> list[DesignResult]:
        """Several requests in flight together (the replica batches them across merchants)."""
        seeds = list(seeds) if seeds is not None else [None] * len(requests)
        responses = [self._handle.design.remote(design_body(merchant, prompt, k, n, seed))
                     for (merchant, prompt), seed in zip(requests, seeds, strict=True)]
        return [DesignResult.from_json(self._wait(response)) for response in responses]

    async def design_async(self, merchant: Merchant, prompt: str, k: int | None = None, n: int | None = None,
                           seed: int | None = None) -> DesignResult:
        body = design_body(merchant, prompt, k, n, seed)
        return DesignResult.from_json(await self._await(self._handle.design.remote(body)))

    def feedback(self, request: DesignResult | str, events: Sequence[FeedbackEvent],
                 token: str | None = None) -> FeedbackResult:
        body = feedback_body(request, events, token)
        return FeedbackResult.from_json(self._wait(self._handle.feedback.remote(body)))

    async def feedback_async(self, request: DesignResult | str, events: Sequence[FeedbackEvent],
                             token: str | None = None) -> FeedbackResult:
        body = feedback_body(request, events, token)
        return FeedbackResult.from_json(await self._await(self._handle.feedback.remote(body)))

    def version(self) -> str:
        return self._wait(self._handle.version.remote())["model_version"]

    def batch_sizes(self) -> list[int]:
        """Images per pipeline call in the replica that answers (tests and benchmarks)."""
        return self._wait(self._handle.batch_sizes.remote())
