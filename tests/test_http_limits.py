"""The request-parsing path and the replica-loss plumbing, without a cluster: JSON limits, strict fields,
one bad job failing alone in a batch, the retry schedule, and the proxy middleware's answers."""

from __future__ import annotations

import asyncio
import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from starlette.requests import Request

from perfusion_ray.serve.batching import each_alone, unwrap
from perfusion_ray.serve.design_schemas import DesignRequest, FeedbackRequest
from perfusion_ray.serve.fields import check_text
from perfusion_ray.serve.http import MAX_JSON_DEPTH, check_content_type, json_depth, parse_object
from perfusion_ray.serve.proxy_middleware import ProxyMiddleware
from perfusion_ray.serve.retry import RetryPolicy, call_with_retries
from perfusion_ray.serve.schemas import RewardRequestError, ScoreRequest

REQUEST_ID = "d" + "0" * 32


def _refusal(body: bytes) -> tuple[int, str]:
    with pytest.raises(RewardRequestError) as refused:
        parse_object(body)
    return refused.value.status, refused.value.reason


# ---------------------------------------------------------------- JSON limits
@pytest.mark.parametrize("body, reason", [
    (b"[" * 100_000 + b"]" * 100_000, "deeper than"),
    (b'{"seed": ' + b"9" * 5000 + b"}", "5000 characters"),
    (b'{"stats": {"a": NaN}}', "NaN is not JSON"),
    (b'{"stats": {"a": -Infinity}}', "-Infinity is not JSON"),
    (b'{"prompt": "a", "prompt": "b"}', "'prompt' appears twice"),
    (b'{"prompt": "\xff"}', "not UTF-8"),
    (b'{"prompt": ', "not valid JSON"),
])
def test_hostile_json_is_a_400_naming_why(body, reason):
    status, text = _refusal(body)
    assert status == 400 and reason in text


def test_depth_limit_admits_every_shape_the_apps_take():
    deepest = {"merchant": {"id": "m0", "features": {"a": "b"}, "stats": {"x": 1.0}}, "prompt": "p"}
    assert parse_object(json.dumps(deepest).encode()) == deepest
    assert _refusal(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH)[0] == 422  # at the limit: parsed (not an object)
    assert _refusal(b'{"a": ' + b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH + b"}")[0] == 400  # one level more


json_text = st.text(alphabet=st.sampled_from('ab"\\[]{}\n\u00e9\U0001f600'), max_size=8)
json_values = st.recursive(st.none() | st.integers() | json_text,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(json_text, inner, max_size=3),
                           max_leaves=30)


def _depth(value) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


@settings(max_examples=300, deadline=None)
@given(json_values, st.booleans())
def test_json_depth_counts_brackets_outside_strings_only(value, ascii_only):
    """Strings full of brackets, quotes and backslashes never change the depth it reads."""
    assert json_depth(json.dumps(value, ensure_ascii=ascii_only).encode()) == _depth(value)


# ---------------------------------------------------------------- strict fields
BASE_SCORE = {"prompt": "a dress", "images": ["AAAA"]}
BASE_DESIGN = {"merchant": {"id": "m0"}, "prompt": "a dress"}


@pytest.mark.parametrize("model, body, where", [
    (ScoreRequest, {**BASE_SCORE, "merchant_features": {"region": "so\ud800uth"}}, "merchant_features.region"),
    (ScoreRequest, {**BASE_SCORE, "merchant_features": {"re\ud800gion": "south"}}, "merchant_features"),
    (ScoreRequest, {**BASE_SCORE, "merchant_stats": {"pri\x00ce": 1.0}}, "merchant_stats"),
    (ScoreRequest, {**BASE_SCORE, "merchant_stats": {"price": True}}, "merchant_stats.price"),
    (ScoreRequest, {**BASE_SCORE, "merchant_stats": {"price": "1.5"}}, "merchant_stats.price"),
    (ScoreRequest, {**BASE_SCORE, "prompt": "a\x00dress"}, "prompt"),
    (ScoreRequest, {**BASE_SCORE, "merchant_id": "m\ud800"}, "merchant_id"),
    (DesignRequest, {**BASE_DESIGN, "seed": False}, "seed"),
    (DesignRequest, {**BASE_DESIGN, "seed": True}, "seed"),
    (DesignRequest, {**BASE_DESIGN, "k": 4.0}, "k"),
    (DesignRequest, {**BASE_DESIGN, "n": "8"}, "n"),
    (DesignRequest, {"merchant": {"id": "m0", "features": {"a": "\ud83d"}}, "prompt": "x"}, "merchant.features.a"),
    (FeedbackRequest, {"request_id": REQUEST_ID[:-1] + "\x00", "token": "t",
                       "events": [{"event_id": "e", "type": "select", "position": 0}]}, "request_id"),
    (FeedbackRequest, {"request_id": REQUEST_ID, "token": "t",
                       "events": [{"event_id": "e", "type": "select", "position": False}]}, "events.0.position"),
])
def test_strict_fields_refuse_what_would_break_downstream(model, body, where):
    with pytest.raises(ValidationError) as refused:
        model.model_validate(body)
    assert any(".".join(map(str, e["loc"])).startswith(where) for e in refused.value.errors()), refused.value


def test_strict_fields_keep_what_clients_send():
    score = ScoreRequest.model_validate({**BASE_SCORE, "merchant_stats": {"price": 2}, "prompt": "two\nlines\t!"})
    assert score.merchant_stats == {"price": 2.0} and score.prompt == "two\nlines\t!"
    assert DesignRequest.model_validate({**BASE_DESIGN, "seed": 0, "k": 4}).seed == 0
    assert check_text("é 😀 ß") == "é 😀 ß"


# ---------------------------------------------------------------- one bad job fails alone
def test_a_job_that_breaks_the_batch_fails_alone():
    def run(jobs):
        if "bad" in jobs:
            raise ValueError("cannot score 'bad'")
        return [job.upper() for job in jobs]

    outcomes = each_alone(run, ["a", "bad", "c"])
    assert outcomes[0] == "A" and outcomes[2] == "C"
    with pytest.raises(ValueError, match="'bad'"):
        unwrap(outcomes[1])
    assert each_alone(run, ["a", "b"]) == ["A", "B"]


# ---------------------------------------------------------------- retries
class Lost(Exception):
    def __init__(self, retry_after_s=None):
        super().__init__("lost")
        self.retry_after_s = retry_after_s


def test_backoff_grows_with_jitter_and_follows_retry_after():
    policy, rng = RetryPolicy(base_s=0.2, factor=2.0, max_wait_s=5.0), random.Random(0)
    for attempt, ceiling in ((1, 0.2), (2, 0.4), (3, 0.8), (10, 5.0)):
        assert ceiling / 2 <= policy.wait_s(attempt, None, rng) <= ceiling
    assert policy.wait_s(1, 3.0, rng) == 3.0 and policy.wait_s(1, 60.0, rng) == 5.0


def test_retries_send_again_until_success_and_never_retry_a_refusal():
    calls, waits = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise Lost(retry_after_s=1.0 if len(calls) == 2 else None)
        return "ok"

    assert call_with_retries(flaky, lambda e: isinstance(e, Lost), RetryPolicy(), sleep=waits.append) == "ok"
    assert len(calls) == 3 and waits[1] == 1.0
    refused = []
    with pytest.raises(ValueError):
        call_with_retries(lambda: refused.append(1) or (_ for _ in ()).throw(ValueError("422")),
                          lambda e: isinstance(e, Lost), RetryPolicy(), sleep=waits.append)
    assert len(refused) == 1


def test_retries_stop_at_the_attempts_or_the_deadline():
    now = [0.0]
    sent = []

    def lost():
        sent.append(1)
        raise Lost()

    with pytest.raises(Lost):
        call_with_retries(lost, lambda e: True, RetryPolicy(attempts=4), sleep=lambda s: None)
    assert len(sent) == 4
    sent.clear()
    with pytest.raises(Lost):
        call_with_retries(lost, lambda e: True, RetryPolicy(attempts=100, deadline_s=10.0, base_s=1.0, factor=1.0),
                          sleep=lambda s: now.__setitem__(0, now[0] + s), clock=lambda: now[0])
    assert now[0] <= 10.0 and 10 <= len(sent) <= 21


# ---------------------------------------------------------------- Content-Type
@pytest.mark.parametrize("content_type, ok", [("application/json", True), ("application/json; charset=utf-8", True),
                                              ("Application/JSON;charset=\"UTF-8\"", True), ("text/plain", False),
                                              ("application/json; charset=latin-1", False), (None, False),
                                              ("application/x-www-form-urlencoded", False)])
def test_only_json_bodies_are_read(content_type, ok):
    headers = [(b"content-type", content_type.encode())] if content_type else []
    request = Request({"type": "http", "method": "POST", "path": "/", "headers": headers})
    if ok:
        check_content_type(request)
    else:
        with pytest.raises(RewardRequestError) as refused:
            check_content_type(request)
        assert refused.value.status == 415


# ---------------------------------------------------------------- the proxy middleware
def _through(app, path: str = "/v1/score", token: str | None = None, headers=()) -> list[dict]:
    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.disconnect"}

    scope = {"type": "http", "path": path, "headers": list(headers)}
    asyncio.run(ProxyMiddleware(app, token)(scope, receive, send))
    return sent


async def _no_answer(scope, receive, send):  # what Serve's proxy does when the replica died mid-request
    return None


async def _raises(scope, receive, send):
    raise RuntimeError("actor died")


async def _answers(scope, receive, send):
    await send({"type": "http.response.start", "status": 500, "headers": []})
    await send({"type": "http.response.body", "body": b"replica error"})


@pytest.mark.parametrize("app", [_no_answer, _raises])
def test_a_request_the_proxy_could_not_answer_gets_503_with_retry_after(app):
    start, body = _through(app)
    headers = dict(start["headers"])
    assert start["status"] == 503 and headers[b"retry-after"] == b"1"
    assert json.loads(body["body"])["error"] == "no_answer"


def test_answers_of_the_replica_pass_unchanged():
    assert [m.get("status") for m in _through(_answers)] == [500, None]


def test_the_proxy_route_table_asks_for_the_token_when_the_proxy_has_one():
    assert _through(_answers, "/-/routes", token="s3cret")[0]["status"] == 401
    assert _through(_answers, "/-/routes", token="s3cret", headers=[(b"authorization", b"Bearer s3cret")])[0]["status"] == 500
    assert _through(_answers, "/-/routes")[0]["status"] == 500  # no token configured: open, as Serve's
    assert _through(_answers, "/-/healthz", token="s3cret")[0]["status"] == 500  # liveness stays open
