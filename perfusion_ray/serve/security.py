"""Who may reach the endpoint: loopback by default; any other bind address only with a bearer token.

The token comes from serve.bearer_token or, better, from the environment variable named by
serve.bearer_token_env (PERFUSION_SERVE_TOKEN), so no secret has to live in a config file. When a token
is set every /v1/* route checks `Authorization: Bearer <token>` (constant-time compare); /healthz stays
open for liveness probes and reveals nothing but "ok".
"""

from __future__ import annotations

import hmac
import ipaddress
import os

from perfusion_ray.errors import PerfusionError

LOOPBACK_NAMES = {"localhost", "ip6-localhost", "ip6-loopback"}
ALL_INTERFACES = "0.0.0.0"


def is_loopback(host: str | None) -> bool:
    if not host:
        return False  # "" binds every interface
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


def resolve_token(bearer_token: str | None, bearer_token_env: str | None) -> str | None:
    """The configured token, else the environment variable's; empty counts as none."""
    token = bearer_token or (os.environ.get(bearer_token_env) if bearer_token_env else None)
    return token or None


def check_bind(host: str | None, token: str | None, env_name: str = "PERFUSION_SERVE_TOKEN",
               what: str = "the reward endpoint") -> None:
    """Refuse a non-loopback bind address without a bearer token."""
    if not is_loopback(host) and not token:
        raise PerfusionError(
            f"refusing to serve {what} on {host!r} without a bearer token: anything but loopback "
            f"(127.0.0.1) needs one",
            hint=f"export {env_name}=<secret> (or set serve.bearer_token), or keep serve.host=127.0.0.1")


def authorized(header: str | None, token: str | None) -> bool:
    """True when no token is configured, or the Authorization header carries exactly that bearer token."""
    if not token:
        return True
    if not header:
        return False
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode(), token.encode())
