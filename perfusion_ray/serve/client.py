"""Typed clients for the reward endpoint, one signature for both transports:

    client.score(prompt, images, merchant=None) -> ScoreResult(scores, model_version, merchant_path)
    client.version() -> str

`RewardClient` speaks HTTP (requests; images become base64 PNG, lossless). `RewardHandleClient` calls the
deployment through a DeploymentHandle from inside the cluster (images travel as arrays through the
object store, no PNG round trip) and has `score_async` for callers that are coroutines themselves.
Both raise RewardRequestError(status, kind, reason, retry_after_s) for a refused request.

Every call here is idempotent, so both clients send it again when a replica is lost under it (a refused
connection, 502/503/504, a replica actor that died), with backoff and within `retry` (retry.py); a
refusal of the request itself (4xx) is raised at once.

images: uint8 [N, H, W, 3] array, or a sequence of [H, W, 3] arrays, or of PNG bytes.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Protocol, Sequence

import numpy as np

from perfusion_ray.records import Merchant
from perfusion_ray.serve.images import to_base64_png
from perfusion_ray.serve.retry import RETRYABLE_STATUSES, RetryPolicy, call_with_retries, call_with_retries_async
from perfusion_ray.serve.schemas import RewardRequestError, ScoreResult


class RewardScorer(Protocol):
    def score(self, prompt: str, images, merchant: Merchant | None = None) -> ScoreResult: ...

    def version(self) -> str: ...


def _encode(images) -> list[str]:
    items: Sequence = list(images) if isinstance(images, np.ndarray) else images
    return [base64.b64encode(bytes(item)).decode("ascii") if isinstance(item, (bytes, bytearray))
            else to_base64_png(item) for item in items]


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP date: wait by backoff instead


def http_transient(exc: BaseException) -> bool:
    """A failure of the transport or of the replica, not of the request: worth sending again."""
    import requests

    if isinstance(exc, RewardRequestError):
        return exc.status in RETRYABLE_STATUSES
    return isinstance(exc, (requests.ConnectionError, requests.exceptions.ChunkedEncodingError))


class RewardClient:
    """HTTP client. url: the app's root (http://127.0.0.1:8000 by default); token: the bearer token;
    observe: called with the status of every answer received, retried ones included (metrics, drills)."""

    def __init__(self, url: str = "http://127.0.0.1:8000", token: str | None = None, timeout_s: float = 30.0,
                 retry: RetryPolicy = RetryPolicy(), observe: Callable[[int], None] | None = None):
        import requests

        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.retry = retry
        self.observe = observe
        self._session = requests.Session()
        if token:
            self._session.headers["Authorization"] = f"Bearer {token}"

    def _check(self, response) -> dict:
        if response.status_code == 200:
            return response.json()
        try:
            body = response.json()
            kind, reason = body.get("error", "http_error"), body.get("reason") or body.get("detail") or response.text
        except (ValueError, AttributeError):
            kind, reason = "http_error", response.text[:500]
        raise RewardRequestError(response.status_code, str(kind), str(reason),
                                 _retry_after(response.headers.get("Retry-After")))

    def _call(self, method: str, route: str, body: dict | None = None) -> dict:
        """One idempotent call, sent again through a replica loss (see the module's docstring)."""
        def send() -> dict:
            response = self._session.request(method, f"{self.url}{route}", json=body, timeout=self.timeout_s)
            if self.observe is not None:
                self.observe(response.status_code)
            return self._check(response)

        return call_with_retries(send, http_transient, self.retry)

    def score(self, prompt: str, images, merchant: Merchant | None = None) -> ScoreResult:
        body = {**(merchant or Merchant()).as_fields(), "prompt": prompt, "images": _encode(images)}
        return ScoreResult.from_json(self._call("POST", "/v1/score", body))

    def post_raw(self, body: bytes | str, headers: dict | None = None, route: str = "/v1/score"):
        """POST arbitrary bytes to a route, once (for probing the input checks); returns the requests Response."""
        return self._session.post(f"{self.url}{route}", data=body, timeout=self.timeout_s,
                                  headers={"Content-Type": "application/json", **(headers or {})})

    def version(self) -> str:
        return self._call("GET", "/v1/version")["model_version"]

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
    for candidate in (cause, exc):
        if isinstance(candidate, RewardRequestError):
            return RewardRequestError(candidate.status, candidate.kind, candidate.reason, candidate.retry_after_s)
    return exc


def handle_transient(exc: BaseException) -> bool:
    """The replica died or is unreachable, or Serve had no replica to give: worth sending again."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    if isinstance(exc, RewardRequestError):
        return exc.status in RETRYABLE_STATUSES
    lost = (RayActorError, BackPressureError, DeploymentUnavailableError)
    return isinstance(exc, lost) or isinstance(getattr(exc, "cause", None), RayActorError)


class HandleClient:
    """Calls one deployment's methods through a DeploymentHandle: our refusals unwrapped, idempotent calls
    sent again through a replica loss."""

    def __init__(self, deployment: str, app_name: str, timeout_s: float, handle=None,
                 retry: RetryPolicy = RetryPolicy()):
        from ray import serve

        self.timeout_s = timeout_s
        self.retry = retry
        self._handle = handle or serve.get_deployment_handle(deployment, app_name)

    def _wait(self, response):
        try:
            return response.result(timeout_s=self.timeout_s)
        except Exception as exc:  # noqa: BLE001 - re-raised, unwrapped when it is ours
            raise _unwrap(exc) from None

    def _call(self, method: str, *args):
        return call_with_retries(lambda: self._wait(getattr(self._handle, method).remote(*args)), handle_transient,
                                 self.retry)

    def _call_many(self, method: str, calls: Sequence[tuple]) -> list:
        """Every call in flight together (so the replicas batch them); one that a lost replica fails is sent
        again by itself."""
        responses = [getattr(self._handle, method).remote(*args) for args in calls]
        out = []
        for response, args in zip(responses, calls):
            try:
                out.append(self._wait(response))
            except Exception as exc:  # noqa: BLE001
                if not handle_transient(exc):
                    raise
                out.append(self._call(method, *args))
        return out

    async def _call_async(self, method: str, *args):
        async def send():
            try:
                return await getattr(self._handle, method).remote(*args)
            except Exception as exc:  # noqa: BLE001
                raise _unwrap(exc) from None

        return await call_with_retries_async(send, handle_transient, self.retry)


def _result(raw: dict) -> ScoreResult:
    return ScoreResult(np.asarray(raw["scores"], dtype=np.float32), raw["model_version"], raw["merchant_path"])


def _fields(merchant: Merchant | None) -> dict:
    return (merchant or Merchant()).as_fields()


class RewardHandleClient(HandleClient):
    """DeploymentHandle client for callers inside the cluster (Ray tasks, actors, Train workers, drivers)."""

    def __init__(self, app_name: str = "reward", timeout_s: float = 60.0, handle=None,
                 retry: RetryPolicy = RetryPolicy()):
        from perfusion_ray.serve.reward_app import DEPLOYMENT_NAME

        super().__init__(DEPLOYMENT_NAME, app_name, timeout_s, handle, retry)

    def score(self, prompt: str, images, merchant: Merchant | None = None) -> ScoreResult:
        return _result(self._call("score", prompt, images, _fields(merchant)))

    def score_groups(self, prompts: Sequence[str], groups: Sequence, merchants: Sequence[Merchant | None]
                     ) -> list[ScoreResult]:
        """Score several groups at once: every request is in flight together, so the replicas batch them."""
        calls = [(prompt, images, _fields(merchant)) for prompt, images, merchant in zip(prompts, groups, merchants,
                                                                                         strict=True)]
        return [_result(raw) for raw in self._call_many("score", calls)]

    async def score_async(self, prompt: str, images, merchant: Merchant | None = None) -> ScoreResult:
        return _result(await self._call_async("score", prompt, images, _fields(merchant)))

    def version(self) -> str:
        return self._call("version")["model_version"]
