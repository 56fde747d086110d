"""Both apps under hostile HTTP, over real HTTP on 127.0.0.1: schemathesis fuzzes every operation from the app's
own OpenAPI document, hypothesis drops hostile values (lone surrogates, control characters, huge numbers,
deep nesting, booleans for numbers) into otherwise valid bodies, and the hand cases that used to answer 500
answer 4xx. No answer may be a 5xx, and valid requests sent together with a bad one all succeed.

Apps, from cluster/serve_reward.yaml and cluster/serve_design.yaml on a free port:
  zreward at /zreward  (bearer token, batch wait 50 ms so concurrent requests share batches, 1 MiB bodies)
  zdesign at /zdesign  (no token, no rate limit, 2 sampling steps, 1 MiB bodies: the depth limit answers first)
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from hypothesis import HealthCheck, Phase, given, settings

from perfusion_ray.config import load_config
from tests.conftest import free_port
from tests.hostile_requests import (DEEP, DESIGN_PATHS, LONG_INT, NUL_FEEDBACK, SCORE_PATHS, SURROGATE_DESIGN,
                                    SURROGATE_SCORE, design_body, hostile_bodies, schemathesis_cases, score_body)
from tests.serve_apps import DESIGN_YAML, REWARD_YAML, app_entry, deploy_all, tiny_reward_model

pytestmark = pytest.mark.ray

TOKEN = "fuzz-token-3b7d"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON = {"Content-Type": "application/json"}
FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck),
                phases=[Phase.explicit, Phase.generate], derandomize=True)
FUZZ_OPERATIONS = settings(FUZZ, max_examples=150)


class Served:
    def __init__(self, url: str):
        self.url = url
        self.reward, self.design = f"{url}/zreward", f"{url}/zdesign"
        self.session = requests.Session()

    def post(self, url: str, body: bytes | dict, headers: dict | None = None) -> requests.Response:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.session.post(url, data=data, headers={**JSON, **(headers or {})}, timeout=120)


@pytest.fixture(scope="module")
def served(ray_cluster, tmp_path_factory, tiny_pipelines):
    from ray import serve

    from perfusion_ray.serve import apps

    root = tmp_path_factory.mktemp("fuzz")
    port = free_port()
    common = [f"serve.port={port}", "serve.max_replicas=1", "policy.num_inference_steps=2"]
    reward = common + ["serve.app_name=zreward", "serve.route_prefix=/zreward", f"serve.bearer_token={TOKEN}",
                       "serve.max_images_per_request=8", "serve.max_body_bytes=1048576", "serve.batch_wait_timeout_s=0.05"]
    design = common + ["design.app_name=zdesign", "design.route_prefix=/zdesign", f"data.root={root / 'store'}",
                       "design.rate_limit_per_minute=0", "serve.app_name=zreward", "design.batch_wait_timeout_s=0.2",
              "design.max_body_bytes=1048576"]
    apps.start_serve(load_config(None, design))
    deploy_all([app_entry(REWARD_YAML, "zreward", reward, {"model_dir": str(tiny_reward_model(root / "rm"))}),
                app_entry(DESIGN_YAML, "zdesign", design, {"pipeline_dir": str(tiny_pipelines["v1"])})])
    yield Served(f"http://127.0.0.1:{port}")
    serve.shutdown()


def _assert_4xx(response: requests.Response, status: int | None = None) -> dict:
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:500])
    if status is not None:
        assert response.status_code == status, response.text[:500]
    body = response.json()
    assert body["error"] and body["reason"]
    return body


# ---------------------------------------------------------------- schemathesis, from the apps' own OpenAPI
def _fuzz_operations(base: str, headers: dict) -> None:
    """Every operation of the served document, with bodies, paths and headers valid by it and not."""
    @given(schemathesis_cases(base, headers))
    @FUZZ_OPERATIONS
    def fuzz(case):
        response = case.call(base_url=base, headers=headers, timeout=120)
        assert response.status_code < 500, (response.status_code, response.text[:500], case.as_curl_command())

    fuzz()


def test_reward_app_never_answers_5xx_to_schemathesis(served):
    _fuzz_operations(served.reward, AUTH)


def test_design_app_never_answers_5xx_to_schemathesis(served):
    _fuzz_operations(served.design, {})


# ---------------------------------------------------------------- hostile values in valid bodies
@given(body=hostile_bodies(score_body(), SCORE_PATHS))
@FUZZ
def test_hostile_values_in_a_score_request_answer_4xx(served, body):
    response = served.post(f"{served.reward}/v1/score", body, AUTH)
    assert response.status_code < 500, (response.status_code, response.text[:500], body)


@given(body=hostile_bodies(design_body(), DESIGN_PATHS))
@FUZZ
def test_hostile_values_in_a_design_request_answer_4xx(served, body):
    response = served.post(f"{served.design}/v1/designs", body)
    assert response.status_code < 500, (response.status_code, response.text[:500], body)


# ---------------------------------------------------------------- the hand cases
@pytest.mark.parametrize("app, route", [("reward", "/v1/score"), ("design", "/v1/designs"), ("design", "/v1/feedback")])
@pytest.mark.parametrize("body", [DEEP, LONG_INT], ids=["100000 levels deep", "5000-digit integer"])
def test_deep_json_and_long_integers_answer_400(served, app, route, body):
    assert _assert_4xx(served.post(getattr(served, app) + route, body, AUTH), 400)["error"] == "malformed_json"


@pytest.mark.parametrize("app, route, body, field", [("reward", "/v1/score", SURROGATE_SCORE, "merchant_features.region"),
                                                     ("design", "/v1/designs", SURROGATE_DESIGN, "merchant.features.region")])
def test_a_lone_surrogate_in_a_map_value_answers_422(served, app, route, body, field):
    refused = _assert_4xx(served.post(getattr(served, app) + route, body, AUTH), 422)
    assert refused["reason"].startswith(field) and "unicode" in refused["reason"]


def test_a_nul_byte_in_request_id_answers_422(served):
    assert "request_id" in _assert_4xx(served.post(f"{served.design}/v1/feedback", NUL_FEEDBACK), 422)["reason"]


@pytest.mark.parametrize("app, route, body", [("reward", "/v1/score", score_body()),
                                              ("design", "/v1/designs", design_body())])
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_a_body_not_declared_as_json_answers_415(served, app, route, body, content_type):
    headers = {**AUTH, "Content-Type": content_type} if content_type else AUTH
    response = served.session.post(getattr(served, app) + route, data=json.dumps(body).encode(), timeout=60,
                                   headers=headers)
    if content_type is None:  # requests sends none for bytes
        assert "content-type" not in {k.lower() for k in response.request.headers}
    assert _assert_4xx(response, 415)["error"] == "unsupported_media_type"


def test_seed_false_is_refused_not_taken_as_zero(served):
    assert "seed" in _assert_4xx(served.post(f"{served.design}/v1/designs", design_body(seed=False)), 422)["reason"]
    assert served.post(f"{served.design}/v1/designs", design_body(seed=0)).json()["seed"] == 0


# ---------------------------------------------------------------- a bad request fails alone
def test_valid_score_requests_sent_with_a_bad_one_all_succeed(served):
    good, bad = score_body(), SURROGATE_SCORE

    def send(index: int) -> int:
        with requests.Session() as session:
            data = bad if index == 80 else json.dumps(good).encode()
            return session.post(f"{served.reward}/v1/score", data=data, headers={**JSON, **AUTH}, timeout=120).status_code

    with ThreadPoolExecutor(32) as pool:
        statuses = list(pool.map(send, range(161)))
    assert statuses[80] == 422
    assert statuses[:80] + statuses[81:] == [200] * 160


def test_valid_design_requests_sent_with_a_bad_one_all_succeed(served):
    def send(index: int) -> int:
        with requests.Session() as session:
            data = SURROGATE_DESIGN if index == 9 else json.dumps(design_body(seed=index)).encode()
            return session.post(f"{served.design}/v1/designs", data=data, headers=JSON, timeout=300).status_code

    with ThreadPoolExecutor(19) as pool:
        statuses = list(pool.map(send, range(19)))
    assert statuses[9] == 422
    assert statuses[:9] + statuses[10:] == [200] * 18


# ---------------------------------------------------------------- the documents and who may read them
def test_openapi_documents_every_request_body(served):
    for base, routes, headers in ((served.reward, {"/v1/score": "ScoreRequest"}, AUTH),
                                  (served.design, {"/v1/designs": "DesignRequest", "/v1/feedback": "FeedbackRequest"},
                                   {})):
        document = requests.get(f"{base}/openapi.json", headers=headers, timeout=30).json()
        for route, model in routes.items():
            body = document["paths"][route]["post"]["requestBody"]["content"]["application/json"]["schema"]
            assert body == {"$ref": f"#/components/schemas/{model}"}
            assert document["components"]["schemas"][model]["properties"]
    score = requests.get(f"{served.reward}/openapi.json", headers=AUTH, timeout=30).json()
    assert set(score["components"]["schemas"]["ScoreRequest"]["required"]) == {"prompt", "images"}


@pytest.mark.parametrize("path", ["/openapi.json", "/docs"])
def test_a_tokened_app_asks_for_the_token_on_its_documents_too(served, path):
    assert requests.get(f"{served.reward}{path}", timeout=30).status_code == 401
    assert requests.get(f"{served.reward}{path}", headers=AUTH, timeout=30).status_code == 200
    assert requests.get(f"{served.design}{path}", timeout=30).status_code == 200  # no token on this app
