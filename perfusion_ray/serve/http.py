"""HTTP plumbing every perfusion deployment shares: one request-parsing path (bearer check, Content-Type,
a body read under a size limit, JSON parsed under depth and number limits, the pydantic model), refusals
as JSON bodies, and the proxy's bind address for the loopback check.

A refusal is a RewardRequestError(status, kind, reason) raised anywhere in a route; `refusal_response`
turns it into {"error": kind, "reason": reason} with the right status (WWW-Authenticate on 401,
Retry-After on 429 and 503).
"""

# No `from __future__ import annotations`: FastAPI-facing helpers take a real Request.
import json

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from perfusion_ray.serve.schemas import RewardRequestError, reject, validated
from perfusion_ray.serve.security import ALL_INTERFACES, authorized

# No request of either app nests deeper than 3 (a merchant's features inside the request); the limit only
# has to stop bodies built to exhaust the parser's stack.
MAX_JSON_DEPTH = 16
# 2**63 has 19 digits; longer numbers are not ids, seeds or counts, and Python refuses to convert an int of
# more than 4,300 digits anyway.
MAX_NUMBER_CHARS = 40
JSON_MEDIA_TYPE = "application/json"


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


def check_content_type(request: Request) -> None:
    """415 unless the body is declared as JSON (application/json, charset utf-8 if one is named)."""
    declared = request.headers.get("content-type", "")
    media_type, *parameters = [part.strip().lower() for part in declared.split(";")]
    charsets = {p.partition("=")[2].strip('"') for p in parameters if p.startswith("charset=")}
    if media_type != JSON_MEDIA_TYPE or not charsets <= {"utf-8"}:
        raise reject(415, "unsupported_media_type", f"Content-Type {declared[:100]!r}: the body must be "
                                                    f"{JSON_MEDIA_TYPE} (UTF-8)")


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


def json_depth(body: bytes) -> int:
    """How deeply arrays and objects nest in a JSON text, without parsing it (vectorised, so a hostile body
    costs one pass): brackets count only outside strings, and a quote opens or closes a string unless an odd
    run of backslashes precedes it. UTF-8 continuation bytes never equal an ASCII byte, so bytes will do."""
    if not body:
        return 0
    b = np.frombuffer(body, np.uint8)
    index = np.arange(b.size)
    last_other = np.maximum.accumulate(np.where(b == ord("\\"), -1, index))
    backslashes_before = np.concatenate(([0], index[:-1] - last_other[:-1]))
    quote = (b == ord('"')) & (backslashes_before % 2 == 0)
    outside = np.cumsum(quote) % 2 == 0
    opens = ((b == ord("[")) | (b == ord("{"))) & outside
    closes = ((b == ord("]")) | (b == ord("}"))) & outside
    return int(np.cumsum(opens.astype(np.int64) - closes).max(initial=0))


def nests_deeper_than(body: bytes, limit: int) -> bool:
    if body.count(b"[") + body.count(b"{") <= limit:
        return False  # the common case, at the cost of two byte counts: too few brackets to nest deeper
    return json_depth(body) > limit


class _Refused(ValueError):
    """Raised by a parse hook; json.loads passes it through."""


def _number(text: str, convert):
    if len(text) > MAX_NUMBER_CHARS:
        raise _Refused(f"a number of {len(text)} characters (at most {MAX_NUMBER_CHARS})")
    return convert(text)


def _constant(name: str):
    raise _Refused(f"{name} is not JSON (numbers must be finite)")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        repeated = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise _Refused(f"key {repeated!r} appears twice in one object")
    return out


def parse_object(body: bytes) -> dict:
    """A JSON object, or 400 malformed_json (not UTF-8 JSON, nested deeper than MAX_JSON_DEPTH, a number
    longer than MAX_NUMBER_CHARS, NaN/Infinity, a key twice in one object) / 422 invalid_request."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise reject(400, "malformed_json", f"body is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if nests_deeper_than(body, MAX_JSON_DEPTH):
        raise reject(400, "malformed_json", f"body nests arrays/objects deeper than {MAX_JSON_DEPTH} levels")
    try:
        payload = json.loads(text, parse_int=lambda s: _number(s, int), parse_float=lambda s: _number(s, float),
                             parse_constant=_constant, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise reject(400, "malformed_json", f"body is not valid JSON ({exc})") from None
    except (_Refused, RecursionError) as exc:
        raise reject(400, "malformed_json", f"body refused: {exc}") from None
    if not isinstance(payload, dict):
        raise reject(422, "invalid_request", f"body must be a JSON object, got {type(payload).__name__}")
    return payload


async def read_request(request: Request, model: type[BaseModel], token: str | None, limit: int,
                       setting: str) -> BaseModel:
    """The one way a POST body becomes a request of either app: bearer token, Content-Type, size limit
    (`setting` names it in the 413), JSON limits, then the pydantic `model` (422 naming every bad field)."""
    authorize(request, token)
    check_content_type(request)
    return validated(model, parse_object(await read_body(request, limit, setting)))


def refusal_response(exc: RewardRequestError) -> Response:
    """The JSON refusal. ASCII-escaped, so a reason quoting a client's broken text still encodes."""
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
    if exc.status in (429, 503) and exc.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, int(-(-exc.retry_after_s // 1))))
    return Response(json.dumps(exc.body()), status_code=exc.status, headers=headers, media_type=JSON_MEDIA_TYPE)


def health_response(served) -> JSONResponse:
    """GET /healthz: 200 {"status": "ok"} once a model is loaded, else 503 loading (open even with a token)."""
    if served is None:
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})
    return JSONResponse({"status": "ok"})
