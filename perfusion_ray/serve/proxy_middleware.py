"""ASGI middleware that Serve's HTTP proxy runs in front of every app (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH,
set for local clusters by runtime.serve_ingress_env and on clusters by their manifests).

1. A request the proxy ends without an answer gets 503 + Retry-After and a JSON refusal. The proxy ends a
   request that way when the replica serving it died before answering (the replica's own errors always
   come back as a response); left alone, uvicorn answers a bare 500, which tells a client nothing about
   whether to retry. The router drops a replica it saw die, so the retry goes to one that lives.
2. With PERFUSION_SERVE_TOKEN in the proxy's environment, the proxy's own route table (/-/routes) asks
   for the same bearer token as the apps; /-/healthz stays open for load balancers.
"""

from __future__ import annotations

import json
import logging
import os

from perfusion_ray.serve.security import authorized

logger = logging.getLogger("ray.serve")

TOKEN_ENV = "PERFUSION_SERVE_TOKEN"  # serve.bearer_token_env's default: the name the manifests export
RETRY_AFTER_S = 1
PROTECTED_PROXY_ROUTES = ("/-/routes",)


async def _answer(send, status: int, kind: str, reason: str, headers: list[tuple[bytes, bytes]]) -> None:
    body = json.dumps({"error": kind, "reason": reason}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class ProxyMiddleware:
    def __init__(self, app, token: str | None = None):
        self.app = app
        self.token = token

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.token and scope.get("path") in PROTECTED_PROXY_ROUTES:
            header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
            if not authorized(header, self.token):
                return await _answer(send, 401, "unauthorized", "missing or wrong bearer token (Authorization: "
                                                                "Bearer <token>)", [(b"www-authenticate", b"Bearer")])
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:  # noqa: BLE001 - answered below unless a response already began
            if started:
                raise
            logger.warning("request %s ended in the proxy without an answer", scope.get("path"), exc_info=True)
        if not started:
            await _answer(send, 503, "no_answer", "the replica serving this request stopped before answering; "
                                                  "send it again", [(b"retry-after", str(RETRY_AFTER_S).encode())])


def middlewares() -> list:
    """The proxy callback: Serve calls it once in each proxy process."""
    from starlette.middleware import Middleware

    return [Middleware(ProxyMiddleware, token=os.environ.get(TOKEN_ENV) or None)]
