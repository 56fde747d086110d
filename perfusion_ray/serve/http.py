"""HTTP plumbing every perfusion deployment shares: the bearer check, a body read under a size limit, a
JSON object parsed from it, refusals as JSON bodies, and the proxy's bind address for the loopback check.

A refusal is a RewardRequestError(status, kind, reason) raised anywhere in a route; `refusal_response`
turns it into {"error": kind, "reason": reason} with the right status (and WWW-Authenticate on 401).
"""

# No `from __future__ import annotations`: FastAPI-facing helpers take a real Request.
import json

from fastapi import Request
from fastapi.responses import JSONResponse

from perfusion_ray.serve.schemas import RewardRequestError, reject
from perfusion_ray.serve.security import ALL_INTERFACES, authorized


def serving_host() -> str | None:
    """The address HTTP reaches this replica's app on: the host Serve's proxies bind, as the controller knows
    it, or every interface when HAProxy fronts replicas that listen themselves (cluster.serve_ingress)."""
    import os

    import ray
    from ray.serve.context import _get_global_client

    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        return ALL_INTERFACES
    config = ray.get(_get_global_client()._controller.get_http_config.remote())
    return config.host


def authorize(request: Request, token: str | None) -> None:
    if not authorized(request.headers.get("authorization"), token):
        raise reject(401, "unauthorized", "missing or wrong bearer token (Authorization: Bearer <token>)")


async def read_body(request: Request, limit: int, setting: str) -> bytes:
    """The body, or 413 body_too_large naming the `setting` that sets `limit` (checked while streaming)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise reject(413, "body_too_large", f"body of {declared} bytes exceeds {limit} ({setting})")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise reject(413, "body_too_large", f"body exceeds {limit} bytes ({setting})")
    return bytes(body)


def parse_object(body: bytes) -> dict:
    """A JSON object, or 400 malformed_json / 422 invalid_request."""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise reject(400, "malformed_json", f"body is not valid JSON ({exc})") from None
    if not isinstance(payload, dict):
        raise reject(422, "invalid_request", f"body must be a JSON object, got {type(payload).__name__}")
    return payload


def refusal_response(exc: RewardRequestError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    if exc.status == 429 and exc.retry_after_s is not None:
        headers = {"Retry-After": str(max(1, int(-(-exc.retry_after_s // 1))))}
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def health_response(served) -> JSONResponse:
    """GET /healthz: 200 {"status": "ok"} once a model is loaded, else 503 loading (open even with a token)."""
    if served is None:
        return JSONResponse({"status": "loading"}, status_code=503)
    return JSONResponse({"status": "ok"})
