"""Typed clients for the reward endpoint, one signature for both transports:

    client.score(prompt, images, merchant=None) -> ScoreResult(scores, model_version, merchant_path)
    client.version() -> str

`RewardClient` speaks HTTP (requests; images become base64 PNG, lossless). `RewardHandleClient` calls the
deployment through a DeploymentHandle from inside the cluster (images travel as arrays through the
object store, no PNG round trip) and has `score_async` for callers that are coroutines themselves.
Both raise RewardRequestError(status, kind, reason) for a refused request.

images: uint8 [N, H, W, 3] array, or a sequence of [H, W, 3] arrays, or of PNG bytes.
"""

from __future__ import annotations

import base64
from typing import Protocol, Sequence

import numpy as np

from perfusion_ray.serve.images import to_base64_png
from perfusion_ray.records import Merchant
from perfusion_ray.serve.schemas import RewardRequestError, ScoreResult


class RewardScorer(Protocol):
    def score(self, prompt: str, images, merchant: Merchant | None = None) -> ScoreResult: ...

    def version(self) -> str: ...


def _encode(images) -> list[str]:
    items: Sequence = list(images) if isinstance(images, np.ndarray) else images
    return [base64.b64encode(bytes(item)).decode("ascii") if isinstance(item, (bytes, bytearray))
            else to_base64_png(item) for item in items]


class RewardClient:
    """HTTP client. url: the app's root (http://127.0.0.1:8000 by default); token: the bearer token."""

    def __init__(self, url: str = "http://127.0.0.1:8000", token: str | None = None, timeout_s: float = 30.0):
        import requests

        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._session = requests.Session()
        if token:
            self._session.headers["Authorization"] = f"Bearer {token}"

    def _check(self, response) -> dict:
        if response.status_code == 200:
            return response.json()
        try:
            body = response.json()
            kind, reason = body.get("error", "http_error"), body.get("reason") or body.get("detail") or response.text
        except ValueError:
            kind, reason = "http_error", response.text[:500]
        raise RewardRequestError(response.status_code, str(kind), str(reason))

    def score(self, prompt: str, images, merchant: Merchant | None = None) -> ScoreResult:
        body = {**(merchant or Merchant()).as_fields(), "prompt": prompt, "images": _encode(images)}
        response = self._session.post(f"{self.url}/v1/score", json=body, timeout=self.timeout_s)
        return ScoreResult.from_json(self._check(response))

    def post_raw(self, body: bytes | str, headers: dict | None = None):
        """POST arbitrary bytes to /v1/score (for probing the input checks); returns the requests Response."""
        return self._session.post(f"{self.url}/v1/score", data=body, timeout=self.timeout_s,
                                  headers={"Content-Type": "application/json", **(headers or {})})

    def version(self) -> str:
        return self._check(self._session.get(f"{self.url}/v1/version", timeout=self.timeout_s))["model_version"]

    def healthy(self) -> bool:
        try:
            return self._session.get(f"{self.url}/healthz", timeout=self.timeout_s).status_code == 200
        except OSError:
            return False

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> "RewardClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _unwrap(exc: BaseException) -> BaseException:
    """Ray wraps a replica's exception; hand the caller our own RewardRequestError back."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, RewardRequestError):
        return RewardRequestError(cause.status, cause.kind, cause.reason)
    if isinstance(exc, RewardRequestError):
        return RewardRequestError(exc.status, exc.kind, exc.reason)
    return exc


def _result(raw: dict) -> ScoreResult:
    return ScoreResult(np.asarray(raw["scores"], dtype=np.float32), raw["model_version"], raw["merchant_path"])


class RewardHandleClient:
    """DeploymentHandle client for callers inside the cluster (Ray tasks, actors, Train workers, drivers)."""

    def __init__(self, app_name: str = "reward", timeout_s: float = 60.0, handle=None):
        from ray import serve

        from perfusion_ray.serve.reward_app import DEPLOYMENT_NAME

        self.timeout_s = timeout_s
        self._handle = handle or serve.get_deployment_handle(DEPLOYMENT_NAME, app_name)

    @staticmethod
    def _fields(merchant: Merchant | None) -> dict:
        return (merchant or Merchant()).as_fields()

    def _wait(self, response) -> ScoreResult:
        try:
            raw = response.result(timeout_s=self.timeout_s)
        except Exception as exc:  # noqa: BLE001 - re-raised, unwrapped when it is ours
            unwrapped = _unwrap(exc)
            if isinstance(unwrapped, RewardRequestError):
                raise unwrapped from None
            raise
        return _result(raw)

    def score(self, prompt: str, images, merchant: Merchant | None = None) -> ScoreResult:
        return self._wait(self._handle.score.remote(prompt, images, self._fields(merchant)))

    def score_groups(self, prompts: Sequence[str], groups: Sequence, merchants: Sequence[Merchant | None]
                     ) -> list[ScoreResult]:
        """Score several groups at once: every request is in flight together, so the replicas batch them."""
        responses = [self._handle.score.remote(prompt, images, self._fields(merchant))
                     for prompt, images, merchant in zip(prompts, groups, merchants, strict=True)]
        return [self._wait(response) for response in responses]

    async def score_async(self, prompt: str, images, merchant: Merchant | None = None) -> ScoreResult:
        try:
            raw = await self._handle.score.remote(prompt, images, self._fields(merchant))
        except Exception as exc:  # noqa: BLE001
            unwrapped = _unwrap(exc)
            if isinstance(unwrapped, RewardRequestError):
                raise unwrapped from None
            raise
        return _result(raw)

    def version(self) -> str:
        return self._handle.version.remote().result(timeout_s=self.timeout_s)["model_version"]
