"""The reward endpoint on the session's Ray cluster, over real HTTP on 127.0.0.1: scores equal in-process
scoring, every refusal is a 4xx with a reason, cold-start merchants take the documented path, a new RM
version rolls out under load with no failed request, and nothing binds beyond loopback without a token.

Two apps are deployed from cluster/serve_reward.yaml at module start: `reward` (image_policy convert,
bearer token on) and `strict` at /strict (image_policy refuse, no token)."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
import yaml
from PIL import Image

from perfusion_ray.config import REPO_ROOT, load_config
from perfusion_ray.errors import PerfusionError
from perfusion_ray.models.clip_towers import load_clip
from perfusion_ray.models.reward_model import PerFusionRM, RewardModelConfig, load_reward_model, save_reward_model
from perfusion_ray.serve.client import RewardClient, RewardHandleClient
from perfusion_ray.serve.images import encode_png, to_base64_png
from perfusion_ray.records import Merchant
from perfusion_ray.serve.schemas import RewardRequestError
from perfusion_ray.serve.security import check_bind
from tests.conftest import free_port, under_load

pytestmark = pytest.mark.ray

TOKEN = "test-token-5f1c"
SERVE_YAML = REPO_ROOT / "cluster" / "serve_reward.yaml"
FEATURES = {"region": "south", "tier": "small"}
STATS = {"price_level": 1.5}



def _make_rm(folder: Path, version: str, seed: int) -> Path:
    torch.manual_seed(seed)
    rm = PerFusionRM(load_clip(), RewardModelConfig(version=version, towers="frozen", stat_names=["price_level"],
                                                    known_ids=["m0", "m1"]))
    for plugin in (rm.text_plugin, rm.image_plugin):  # as if trained: the merchant moves scores
        torch.nn.init.normal_(plugin.projection.weight, std=0.1)
    return save_reward_model(rm, folder)


def _images(n: int, seed: int = 0, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


class Service:
    def __init__(self, url: str, models: dict[str, Path]):
        self.url, self.models = url, models
        self.rm = {name: load_reward_model(path) for name, path in models.items()}
        self.client = RewardClient(url, token=TOKEN)

    def expected(self, name: str, merchant: Merchant | None, prompt: str, images: np.ndarray) -> np.ndarray:
        m = merchant or Merchant()
        n = len(images)
        batch = [m] * n
        return self.rm[name].score(batch, [prompt] * n, images)


@pytest.fixture(scope="module")
def service(ray_cluster, tmp_path_factory):
    from ray import serve

    from perfusion_ray.serve import reward_app
    from perfusion_ray.serve.model_store import model_version

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("serve")
    models = {"v1": _make_rm(root / "v1", "v1", 0), "v2": _make_rm(root / "v2", "v2", 1)}
    port = free_port()
    template = yaml.safe_load(SERVE_YAML.read_text())["applications"][0]
    common = [f"serve.port={port}", "serve.max_images_per_request=8", "serve.max_body_bytes=65536"]
    apps = {
        "reward": common + [f"serve.bearer_token={TOKEN}"],
        "strict": common + ["serve.app_name=strict", "serve.route_prefix=/strict", "serve.image_policy=refuse",
                            "serve.max_replicas=1"],
    }
    config = load_config(None, apps["reward"])
    reward_app.start_serve(config)
    entries = []
    for name, overrides in apps.items():
        entry = json.loads(json.dumps(template))  # the shipped file, pointed at this test's models and port
        entry["name"] = name
        entry["route_prefix"] = load_config(None, overrides).serve.route_prefix
        entry["args"] = {"config": template["args"]["config"], "set": overrides}
        entry["deployments"][0]["user_config"] = {"model_dir": str(models["v1"])}
        entries.append(entry)
    live = reward_app.live_declarative_apps()
    reward_app._apply({**live, **{e["name"]: e for e in entries}})
    for entry in entries:
        reward_app.wait_running(entry["name"], timeout_s=120)
    svc = Service(f"http://127.0.0.1:{port}", models)
    svc.versions = {name: model_version(path) for name, path in models.items()}
    yield svc
    svc.client.close()
    serve.shutdown()


# ---------------------------------------------------------------- scores and versions
def test_http_scores_equal_in_process_scores_and_name_the_version(service):
    images = _images(5)
    merchant = Merchant("m0", FEATURES, STATS)
    result = service.client.score("a striped dark red dress", images, merchant)
    assert result.model_version == service.versions["v1"]
    assert result.scores.shape == (5,)
    np.testing.assert_allclose(result.scores, service.expected("v1", merchant, "a striped dark red dress", images),
                               rtol=1e-5, atol=1e-5)


def test_handle_client_has_the_same_signature_and_answers(service):
    images = _images(3, seed=1)
    merchant = Merchant("m1", FEATURES, STATS)
    over_http = service.client.score("a coat", images, merchant)
    over_handle = RewardHandleClient("reward").score("a coat", images, merchant)
    assert over_handle.model_version == over_http.model_version
    assert over_handle.merchant_path == over_http.merchant_path == "known"
    np.testing.assert_allclose(over_handle.scores, over_http.scores, rtol=1e-5, atol=1e-5)


def test_handle_refusals_raise_the_same_error_type(service):
    with pytest.raises(RewardRequestError) as refused:
        RewardHandleClient("reward").score("a coat", _images(9))
    assert refused.value.status == 422 and refused.value.kind == "too_many_images"


def test_unknown_merchant_is_scored_on_side_features_alone(service):
    images = _images(4, seed=2)
    a = service.client.score("a bag", images, Merchant("never-seen-1", FEATURES, STATS))
    b = service.client.score("a bag", images, Merchant("never-seen-2", FEATURES, STATS))
    known = service.client.score("a bag", images, Merchant("m0", FEATURES, STATS))
    assert a.merchant_path == b.merchant_path == "cold_start" and known.merchant_path == "known"
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-6)  # the id adds nothing it was not trained on
    assert not np.allclose(a.scores, known.scores)


def test_request_without_merchant_takes_the_empty_merchant_path(service):
    images = _images(2, seed=3)
    result = service.client.score("a shirt", images)
    assert result.merchant_path == "no_merchant"
    np.testing.assert_allclose(result.scores, service.expected("v1", None, "a shirt", images), rtol=1e-5, atol=1e-5)


def test_wrong_size_and_mode_are_converted_under_convert(service):
    rgba = np.random.default_rng(4).integers(0, 256, (48, 40, 4), dtype=np.uint8)
    grey = np.random.default_rng(5).integers(0, 256, (32, 32), dtype=np.uint8)
    pngs = [encode_png(rgba), encode_png(grey)]
    result = service.client.score("a dress", pngs)
    converted = np.stack([np.asarray(Image.open(io.BytesIO(p)).convert("RGB").resize((32, 32), Image.Resampling.BICUBIC))
                          for p in pngs])
    np.testing.assert_allclose(result.scores, service.expected("v1", None, "a dress", converted), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- refusals
def _body(**fields) -> bytes:
    body = {"merchant_id": "m0", "prompt": "a dress", "images": [to_base64_png(_images(1)[0])], **fields}
    return json.dumps(body).encode()


BAD_REQUESTS = {
    "malformed JSON": (b'{"prompt": "a dress", "images": [', 400, "malformed_json", "not valid JSON"),
    "not an object": (b"[1, 2]", 422, "invalid_request", "JSON object"),
    "unknown field": (_body(merchant_features={"region": "x"}, colour="red"), 422, "invalid_request",
                      "colour: unknown field"),
    "missing prompt": (json.dumps({"images": []}).encode(), 422, "invalid_request", "prompt"),
    "stat not finite": (_body(merchant_stats={"price_level": "nan"}), 422, "invalid_request", "merchant_stats"),
    "bad base64": (_body(images=["not*base64!"]), 422, "bad_base64", "images[0]"),
    "bytes not an image": (_body(images=[base64.b64encode(b"hello, not a png").decode()]), 422, "not_an_image",
                           "images[0]"),
    "truncated PNG": (_body(images=[base64.b64encode(encode_png(_images(1)[0])[:60]).decode()]), 422,
                      "not_an_image", "images[0]"),
    "too many images": (_body(images=[to_base64_png(i) for i in _images(9)]), 422, "too_many_images", "limit is 8"),
    "oversized body": (_body(prompt="x" * 70_000), 413, "body_too_large", "65536"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_answers_4xx_with_a_reason(service, case):
    body, status, kind, reason = BAD_REQUESTS[case]
    response = service.client.post_raw(body)
    assert response.status_code == status, response.text
    assert response.json()["error"] == kind
    assert reason in response.json()["reason"]


@pytest.mark.parametrize("image, kind", [(np.zeros((48, 48, 3), np.uint8), "wrong_image_size"),
                                         (np.zeros((32, 32, 4), np.uint8), "wrong_image_mode"),
                                         (np.zeros((32, 32), np.uint8), "wrong_image_mode")])
def test_wrong_size_or_mode_is_refused_under_refuse(service, image, kind):
    response = requests.post(f"{service.url}/strict/v1/score", timeout=30,
                             json={"prompt": "a dress", "images": [to_base64_png(image)]})
    assert response.status_code == 422 and response.json()["error"] == kind
    assert "images[0]" in response.json()["reason"] and "image_policy=refuse" in response.json()["reason"]
    ok = requests.post(f"{service.url}/strict/v1/score", timeout=30,
                       json={"prompt": "a dress", "images": [to_base64_png(_images(1)[0])]})
    assert ok.status_code == 200


def test_token_is_required_on_score_and_version_but_not_healthz(service):
    anonymous = RewardClient(service.url)
    with pytest.raises(RewardRequestError) as refused:
        anonymous.score("a dress", _images(1))
    assert refused.value.status == 401 and refused.value.kind == "unauthorized"
    wrong = requests.get(f"{service.url}/v1/version", headers={"Authorization": "Bearer nope"}, timeout=30)
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert anonymous.healthy()
    assert service.client.version() == service.versions["v1"]


# ---------------------------------------------------------------- binding
@pytest.mark.parametrize("host", ["0.0.0.0", "", "10.1.2.3", "example.com", "::"])
def test_non_loopback_bind_without_token_is_refused(host):
    with pytest.raises(PerfusionError, match="without a bearer token"):
        check_bind(host, None)
    check_bind(host, "secret")  # with a token it may


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_needs_no_token(host):
    check_bind(host, None)


@pytest.mark.parametrize("override", ["serve.host=0.0.0.0", "cluster.serve_ingress=haproxy"])
def test_cli_refuses_to_bind_elsewhere_before_starting_anything(tmp_path, override):
    env = {k: v for k, v in os.environ.items() if k not in ("PERFUSION_SERVE_TOKEN", "RAY_ADDRESS")}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "perfusion_ray.cli", "serve", "--set", override,
                             "--model", str(tmp_path / "none")], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: refusing to serve the reward endpoint on '0.0.0.0' without a bearer token")
    assert "Traceback" not in result.stderr and time.monotonic() - started < 30


def test_app_builder_refuses_a_non_loopback_host_without_token():
    from perfusion_ray.serve.reward_app import build_app

    with pytest.raises(PerfusionError, match="without a bearer token"):
        build_app({"config": "configs/fashionworld.yaml", "set": ["serve.host=0.0.0.0"]})


def test_haproxy_ingress_needs_a_token_even_with_a_loopback_host(monkeypatch):
    from perfusion_ray.serve.reward_app import build_app

    monkeypatch.delenv("PERFUSION_SERVE_TOKEN", raising=False)
    # HAProxy ingress has the replicas take HTTP on their own ports, on every interface.
    with pytest.raises(PerfusionError, match="on '0.0.0.0' without a bearer token"):
        build_app({"config": "configs/fashionworld.yaml", "set": ["cluster.serve_ingress=haproxy"]})


HAPROXY_PROBE = """
import json, sys
from perfusion_ray.config import load_config
from perfusion_ray.runtime import init_ray

model, token, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
config = load_config(None, overrides)
ray = init_ray(config.cluster)
from ray import serve
from perfusion_ray.serve import reward_app
from perfusion_ray.serve.client import RewardClient, RewardHandleClient
from perfusion_ray.records import Merchant
import numpy as np, requests

try:
    reward_app.start_serve(config)
    reward_app.deploy(reward_app.application_entry(config, None, overrides, model_dir=model), timeout_s=240)
    url = f"http://127.0.0.1:{config.serve.port}"
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    merchant = Merchant("m0", {"region": "south", "tier": "small"}, {"price_level": 1.5})
    http = RewardClient(url, token=token).score("a striped dark red dress", images, merchant)
    handle = RewardHandleClient(config.serve.app_name).score("a striped dark red dress", images, merchant)
    anonymous = requests.post(f"{url}/v1/score", json={"prompt": "a coat", "images": []}, timeout=30)
    print("RESULT " + json.dumps({"http": http.scores.tolist(), "handle": handle.scores.tolist(),
                                  "anonymous": anonymous.status_code}))
finally:
    serve.shutdown()
    ray.shutdown()
"""


def test_haproxy_ingress_serves_the_same_scores_over_http_and_the_handle(tmp_path):
    """Serve's high-throughput ingress needs its environment when the cluster starts, so the probe runs in
    its own process with its own local cluster: HTTP through HAProxy with the token, a synchronous handle
    call (as the rounds' Train workers make), and a refusal without the token."""
    model = _make_rm(tmp_path / "rm", "v1", 0)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PERFUSION_SERVE_TOKEN")}
    overrides = ["cluster.serve_ingress=haproxy", f"serve.port={free_port()}", "cluster.num_cpus=2",
                 f"serve.bearer_token={TOKEN}", "serve.min_replicas=1", "serve.max_replicas=1"]
    probe = subprocess.run([sys.executable, "-c", HAPROXY_PROBE, str(model), TOKEN, *overrides], env=env,
                           capture_output=True, text=True, timeout=400)
    lines = [line for line in probe.stdout.splitlines() if line.startswith("RESULT ")]
    assert probe.returncode == 0 and lines, (probe.stdout + probe.stderr)[-4000:]
    answer = json.loads(lines[-1].removeprefix("RESULT "))
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    n = len(images)
    expected = load_reward_model(model).score([Merchant("m0", FEATURES, STATS)] * n,
                                              ["a striped dark red dress"] * n, images)
    np.testing.assert_allclose(answer["http"], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(answer["handle"], expected, rtol=1e-5, atol=1e-5)
    assert answer["anonymous"] == 401


# ---------------------------------------------------------------- the config file and the CLI
def test_autoscaling_and_batching_come_from_the_config_file(service):
    from perfusion_ray.serve.reward_app import _client

    deployment = _client().get_serve_details()["applications"]["reward"]["deployments"]["RewardModel"]
    options = deployment["deployment_config"]
    defaults = load_config().serve
    assert options["autoscaling_config"]["max_replicas"] == defaults.max_replicas
    assert options["autoscaling_config"]["target_ongoing_requests"] == defaults.target_ongoing_requests
    assert options["max_ongoing_requests"] == defaults.max_ongoing_requests
    assert options["ray_actor_options"]["num_cpus"] == defaults.replica_cpus


def test_perfusion_serve_deploys_beside_running_apps(service, subprocess_env):
    from ray import serve

    port = service.url.rsplit(":", 1)[1]
    args = [sys.executable, "-m", "perfusion_ray.cli", "serve", "--detach", "--model", str(service.models["v2"]),
            "--set", f"serve.port={port}", "--set", "serve.app_name=cli", "--set", "serve.route_prefix=/cli",
            "--set", "serve.max_replicas=1"]
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=180, env=subprocess_env)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"serving reward model {service.versions['v2']}" in result.stdout
        answer = requests.get(f"{service.url}/cli/v1/version", timeout=30).json()
        assert answer["model_version"] == service.versions["v2"]
        assert service.client.version() == service.versions["v1"]  # the other apps are untouched
    finally:
        serve.delete("cli")


# ---------------------------------------------------------------- rollout (last: it changes the live version)
def test_new_version_rolls_out_under_load_with_no_failed_request(service):
    from perfusion_ray.serve import reward_app

    images = _images(4, seed=7)
    merchant = Merchant("m0", FEATURES, STATS)
    expected = {service.versions[name]: service.expected(name, merchant, "a dress", images) for name in ("v1", "v2")}
    clients = [RewardClient(service.url, token=TOKEN) for _ in range(4)]

    def request(worker: int) -> str:
        result = clients[worker].score("a dress", images, merchant)
        # each answer is scored by exactly the version it names
        assert np.allclose(result.scores, expected[result.model_version], rtol=1e-5, atol=1e-5), \
            f"scores do not match {result.model_version}"
        return result.model_version

    run = under_load(request, lambda: reward_app.rollout(service.models["v2"], "reward"), workers=4)
    for client in clients:
        client.close()
    assert run.result == service.versions["v2"]
    assert run.failures == []
    before, after = run.versions()
    assert before == {service.versions["v1"]} and after == {service.versions["v2"]}
    assert run.finished - run.started < 30
    # the other declarative app was left alone
    assert requests.get(f"{service.url}/strict/v1/version", timeout=30).json()["model_version"] == service.versions["v1"]
