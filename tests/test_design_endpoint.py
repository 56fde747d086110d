"""The design endpoint on the session's Ray cluster, over real HTTP on 127.0.0.1: K candidates named by the
policy version and logged as impressions before the answer, one pipeline call for requests of different
merchants (and one per merchant with batching off), best-of-n ranked by the reward app, feedback validated,
token-checked and idempotent, 429 with Retry-After, requests that outlive their replica, a roll-out under
load with no failed request, and every event stored once and ingested unchanged (sent == stored == grouped).

Apps, deployed from cluster/serve_design.yaml and cluster/serve_reward.yaml at module start on a free port:
  ddesign  at /ddesign  (no rate limit, batch wait 0.3 s, store A, best-of-n ranked by `dreward`)
  dstrict  at /dstrict  (bearer token, batching across merchants off, 6/min burst 2, store B)
  dreward  at /dreward  (a tiny reward model)
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import requests
import torch
import yaml

from perfusion_ray.config import REPO_ROOT, load_config
from perfusion_ray.serve.design_client import DesignClient, DesignHandleClient
from perfusion_ray.serve.design_schemas import FeedbackEvent
from perfusion_ray.serve.model_store import pipeline_version
from perfusion_ray.records import Merchant
from perfusion_ray.serve.schemas import RewardRequestError
from tests.conftest import free_port, under_load

pytestmark = pytest.mark.ray

TOKEN = "design-token-81c2"
STEPS = 2
MERCHANTS = [Merchant(f"m{i}", {"region": "east"}, {"price_level": 1.0 + i}) for i in range(4)]


def _entry(path: Path, name: str, overrides: list[str], user_config: dict) -> dict:
    entry = json.loads(json.dumps(yaml.safe_load(path.read_text())["applications"][0]))  # the shipped file
    entry["name"] = name
    entry["args"] = {"config": entry["args"]["config"], "set": overrides}
    entry["deployments"][0]["user_config"] = user_config
    return entry


def _make_rm(folder: Path) -> Path:
    from perfusion_ray.models.clip_towers import load_clip
    from perfusion_ray.models.reward_model import PerFusionRM, RewardModelConfig, save_reward_model

    torch.manual_seed(3)
    rm = PerFusionRM(load_clip(), RewardModelConfig(version="rank", towers="frozen", stat_names=["price_level"],
                                                    known_ids=["m0"]))
    return save_reward_model(rm, folder)


class Service:
    def __init__(self, url: str, pipelines: dict, stores: dict[str, Path], config):
        self.url, self.pipelines, self.stores, self.config = url, pipelines, stores, config
        self.versions = {name: pipeline_version(path) for name, path in pipelines.items()}
        self.client = DesignClient(f"{url}/ddesign")
        self.sent = 0  # events the store must hold in store A: impressions returned + feedback accepted
        self.lock = threading.Lock()

    def count(self, n: int) -> None:
        with self.lock:
            self.sent += n

    def design(self, merchant: Merchant = MERCHANTS[0], prompt: str = "a dark red dress", **kwargs):
        result = self.client.design(merchant, prompt, **kwargs)
        self.count(len(result.candidates))
        return result

    def feedback(self, result, events, **kwargs):
        answer = self.client.feedback(result, events, **kwargs)
        self.count(len(answer.accepted))
        return answer


@pytest.fixture(scope="module")
def service(ray_cluster, tmp_path_factory, tiny_pipelines):
    from ray import serve

    from perfusion_ray.serve import apps

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("design")
    stores = {"A": root / "store-a", "B": root / "store-b"}
    port = free_port()
    common = [f"serve.port={port}", f"policy.num_inference_steps={STEPS}", "serve.max_replicas=1"]
    overrides = {
        "ddesign": common + ["design.app_name=ddesign", "design.route_prefix=/ddesign", f"data.root={stores['A']}",
                             "design.rate_limit_per_minute=0", "design.batch_wait_timeout_s=0.3",
                             "serve.app_name=dreward", "design.max_body_bytes=4096"],
        "dstrict": common + ["design.app_name=dstrict", "design.route_prefix=/dstrict", f"data.root={stores['B']}",
                             f"serve.bearer_token={TOKEN}", "design.batch_across_merchants=false",
                             "design.rate_limit_per_minute=6", "design.rate_limit_burst=2",
                             "design.batch_wait_timeout_s=0.3"],
        "dreward": common + ["serve.app_name=dreward", "serve.route_prefix=/dreward"],
    }
    config = load_config(None, overrides["ddesign"])
    apps.start_serve(config)
    entries = [_entry(REPO_ROOT / "cluster" / "serve_design.yaml", name, overrides[name],
                      {"pipeline_dir": str(tiny_pipelines["v1"])}) for name in ("ddesign", "dstrict")]
    entries.append(_entry(REPO_ROOT / "cluster" / "serve_reward.yaml", "dreward", overrides["dreward"],
                          {"model_dir": str(_make_rm(root / "rm"))}))
    for entry, name in zip(entries, ("ddesign", "dstrict", "dreward")):
        entry["route_prefix"] = f"/{name}"
    apps._apply({**apps.live_declarative_apps(), **{e["name"]: e for e in entries}})
    for entry in entries:
        apps.wait_running(entry["name"], timeout_s=180)
    svc = Service(f"http://127.0.0.1:{port}", tiny_pipelines, stores, config)
    yield svc
    svc.client.close()
    serve.shutdown()


def _store_rows(root: Path, request_id: str | None = None) -> list[dict]:
    files = sorted((root / "train" / "feedback").rglob("*.parquet"))
    rows = [row for f in files for row in pq.read_table(f).to_pylist()]
    return [r for r in rows if request_id is None or r["request_id"] == request_id]


# ---------------------------------------------------------------- designs
def test_designs_return_k_candidates_named_by_version_and_logged_as_impressions(service):
    result = service.design(seed=1)
    assert result.model_version == service.versions["v1"]
    assert [c.position for c in result.candidates] == [0, 1, 2, 3]  # k defaults to data.group_size
    assert result.images.shape == (4, 32, 32, 3) and result.images.dtype == np.uint8
    rows = _store_rows(service.stores["A"], result.request_id)
    assert sorted((r["position"], r["event_type"], r["image_sha256"]) for r in rows) == \
        [(c.position, "impression", c.sha256) for c in result.candidates]
    assert {r["merchant_id"] for r in rows} == {"m0"} and {r["prompt"] for r in rows} == {"a dark red dress"}
    png = requests.get(f"{service.url}{result.candidates[0].url}", timeout=30)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"


def test_same_seed_gives_the_same_images_alone_or_in_a_batch(service):
    alone = service.design(MERCHANTS[1], "a coat", seed=7)
    handle = DesignHandleClient("ddesign")
    batched = handle.design_many([(m, "a coat") for m in MERCHANTS], seeds=[5, 7, 9, 11])
    service.count(sum(len(r.candidates) for r in batched))
    np.testing.assert_allclose(batched[1].images.astype(int), alone.images.astype(int), atol=2)
    assert not np.array_equal(batched[0].images, batched[1].images)


def test_requests_of_different_merchants_share_one_pipeline_call(service):
    handle = DesignHandleClient("ddesign")
    before = len(handle.batch_sizes())
    results = handle.design_many([(m, "a shirt") for m in MERCHANTS], seeds=[1, 2, 3, 4])
    service.count(sum(len(r.candidates) for r in results))
    calls = handle.batch_sizes()[before:]
    assert sum(calls) == 16 and max(calls) >= 8, calls  # at least two merchants' requests in one call


def test_batching_off_makes_one_pipeline_call_per_merchant(service):
    handle = DesignHandleClient("dstrict")
    before = len(handle.batch_sizes())
    handle.design_many([(MERCHANTS[2], "a bag"), (MERCHANTS[3], "a bag")], seeds=[1, 2])
    assert handle.batch_sizes()[before:] == [4, 4]


def test_best_of_n_returns_the_k_the_reward_app_ranks_highest(service):
    from perfusion_ray.serve.client import RewardHandleClient

    merchant = MERCHANTS[0]
    best = service.design(merchant, "a sneaker", n=6, seed=21)
    assert best.n == 6 and best.reward_version and best.reward_version.startswith("rank@")
    scores = [c.score for c in best.candidates]
    assert scores == sorted(scores, reverse=True)
    rescored = RewardHandleClient("dreward").score("a sneaker", best.images, merchant).scores
    np.testing.assert_allclose(rescored, scores, rtol=1e-4, atol=1e-4)
    # all 6 images of that seed, generated here and scored: the returned 4 are the top 4
    from perfusion_ray.serve import design_app
    from perfusion_ray.serve.design_deployment import DesignSettings, _Job, generate, load_served_pipeline

    served = load_served_pipeline(str(service.pipelines["v1"]))
    settings = DesignSettings(**design_app.settings(service.config))
    (six,) = generate(served, [_Job(merchant, "a sneaker", 6, 21)], settings)
    all_scores = RewardHandleClient("dreward").score("a sneaker", six, merchant).scores
    np.testing.assert_allclose(sorted(all_scores, reverse=True)[:4], scores, rtol=1e-3, atol=1e-3)


REFUSALS = {
    "k above max_k": ({"k": 9}, 422, "k_too_large", "design.max_k"),
    "k not the group size": ({"k": 3}, 422, "k_not_group_size", "data.group_size"),
    "n below k": ({"n": 2}, 422, "n_below_k", "n >= k"),
    "n above max_n": ({"n": 17}, 422, "n_too_large", "design.max_n"),
    "unknown field": ({"colour": "red"}, 422, "invalid_request", "colour: unknown field"),
    "missing merchant id": ({"merchant": {"features": {}}}, 422, "invalid_request", "merchant.id"),
    "merchant id with a slash": ({"merchant": {"id": "a/b"}}, 422, "invalid_request", "merchant.id"),
    "empty prompt": ({"prompt": ""}, 422, "invalid_request", "prompt"),
    "oversized body": ({"prompt": "x" * 5000}, 413, "body_too_large", "design.max_body_bytes"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_bad_design_requests_answer_4xx_naming_what_is_wrong(service, case):
    fields, status, kind, reason = REFUSALS[case]
    body = {"merchant": {"id": "m0"}, "prompt": "a dress", **fields}
    response = service.client.post_raw(json.dumps(body))
    assert response.status_code == status, response.text
    assert response.json()["error"] == kind and reason in response.json()["reason"]


def test_malformed_json_answers_400(service):
    response = service.client.post_raw(b'{"merchant": ', route="/v1/feedback")
    assert response.status_code == 400 and response.json()["error"] == "malformed_json"


# ---------------------------------------------------------------- feedback
def test_feedback_is_stored_then_acknowledged_and_idempotent_by_event_id(service):
    result = service.design(seed=3)
    events = [FeedbackEvent("select", 2, "sel-1"), FeedbackEvent("order", 2, "ord-1", value=19.5)]
    first = service.feedback(result, events)
    assert first.accepted == ["sel-1", "ord-1"] and first.duplicates == []
    again = service.feedback(result, events + [FeedbackEvent("click", 1, "clk-1")])
    assert again.accepted == ["clk-1"] and again.duplicates == ["sel-1", "ord-1"]
    rows = [r for r in _store_rows(service.stores["A"], result.request_id) if r["event_type"] != "impression"]
    assert sorted((r["event_id"], r["event_type"], r["position"], r["value"]) for r in rows) == [
        (f"{result.request_id}/clk-1", "click", 1, 1.0), (f"{result.request_id}/ord-1", "order", 2, 19.5),
        (f"{result.request_id}/sel-1", "select", 2, 1.0)]
    assert {r["image_sha256"] for r in rows if r["position"] == 2} == {result.candidates[2].sha256}


def test_an_event_id_reused_with_other_content_is_refused(service):
    result = service.design(seed=4)
    service.feedback(result, [FeedbackEvent("select", 0, "e1")])
    with pytest.raises(RewardRequestError) as refused:
        service.client.feedback(result, [FeedbackEvent("select", 1, "e1")])
    assert refused.value.status == 409 and refused.value.kind == "event_conflict" and "e1" in refused.value.reason


def test_no_merchant_can_post_feedback_on_another_merchants_request(service):
    mine = service.design(MERCHANTS[0], seed=5)
    theirs = service.design(MERCHANTS[1], seed=6)
    with pytest.raises(RewardRequestError) as refused:
        service.client.feedback(theirs.request_id, [FeedbackEvent("select", 0, "steal")], token=mine.token)
    assert refused.value.status == 403 and refused.value.kind == "wrong_token"
    assert not [r for r in _store_rows(service.stores["A"], theirs.request_id) if r["event_type"] != "impression"]


FEEDBACK_REFUSALS = {
    "unknown request": (lambda r: {"request_id": "d" + "0" * 32}, 404, "unknown_request", "no such request"),
    "position outside the group": (lambda r: {"events": [{"event_id": "x", "type": "select", "position": 4}]},
                                   422, "bad_position", "events[0].position: 4"),
    "unknown event type": (lambda r: {"events": [{"event_id": "x", "type": "like", "position": 0}]}, 422,
                           "invalid_request", "events.0.type"),
    "impression is not feedback": (lambda r: {"events": [{"event_id": "x", "type": "impression", "position": 0}]},
                                   422, "invalid_request", "events.0.type"),
    "event id with a slash": (lambda r: {"events": [{"event_id": "a/b", "type": "select", "position": 0}]}, 422,
                              "invalid_request", "events.0.event_id"),
    "no events": (lambda r: {"events": []}, 422, "invalid_request", "events"),
    "same id twice, different content": (
        lambda r: {"events": [{"event_id": "x", "type": "select", "position": 0},
                              {"event_id": "x", "type": "select", "position": 1}]}, 422, "duplicate_event_id", "'x'"),
}


@pytest.mark.parametrize("case", list(FEEDBACK_REFUSALS))
def test_bad_feedback_answers_4xx_and_stores_nothing(service, case):
    result = service.design(seed=8)
    fields, status, kind, reason = FEEDBACK_REFUSALS[case]
    body = {"request_id": result.request_id, "token": result.token,
            "events": [{"event_id": "ok", "type": "select", "position": 0}], **fields(result)}
    response = service.client.post_raw(json.dumps(body), route="/v1/feedback")
    assert response.status_code == status, response.text
    assert response.json()["error"] == kind and reason in response.json()["reason"]
    assert {r["event_type"] for r in _store_rows(service.stores["A"], result.request_id)} == {"impression"}


# ---------------------------------------------------------------- limits and safety
def test_bearer_token_is_required_when_the_app_has_one(service):
    anonymous = DesignClient(f"{service.url}/dstrict")
    with pytest.raises(RewardRequestError) as refused:
        anonymous.design(MERCHANTS[0], "a dress")
    assert refused.value.status == 401 and refused.value.kind == "unauthorized"
    assert requests.get(f"{service.url}/dstrict/v1/version", timeout=30).status_code == 401
    assert anonymous.healthy()  # /healthz stays open
    assert DesignClient(f"{service.url}/dstrict", token=TOKEN).version() == service.versions["v1"]


def test_a_merchant_over_its_rate_answers_429_with_retry_after(service):
    client = DesignClient(f"{service.url}/dstrict", token=TOKEN)
    merchant = Merchant("rate-limited", {}, {})
    for _ in range(2):  # the burst
        client.design(merchant, "a dress", seed=1)
    response = client._session.post(f"{client.url}/v1/designs", timeout=60,
                                    json={"merchant": {"id": "rate-limited"}, "prompt": "a dress"})
    assert response.status_code == 429 and response.json()["error"] == "rate_limited"
    assert 1 <= int(response.headers["Retry-After"]) <= 10  # 6 per minute: one every 10 s
    assert "design.rate_limit_per_minute" in response.json()["reason"]
    client.design(Merchant("another-merchant", {}, {}), "a dress", seed=1)  # others are not held back


def test_app_builder_refuses_a_non_loopback_host_without_token():
    from perfusion_ray.errors import PerfusionError
    from perfusion_ray.serve.design_app import build_app

    with pytest.raises(PerfusionError, match="refusing to serve the design endpoint on '0.0.0.0' without a bearer"):
        build_app({"config": "configs/fashionworld.yaml", "set": ["serve.host=0.0.0.0"]})


def test_the_page_is_served_by_the_same_ingress(service):
    for path in ("/ddesign", "/ddesign/", "/ddesign/ui"):
        page = requests.get(f"{service.url}{path}", timeout=30)
        assert page.status_code == 200 and "text/html" in page.headers["content-type"], path
        assert 'id="model-version"' in page.text and "/v1/designs" in page.text
    merchants = requests.get(f"{service.url}/ddesign/v1/merchants", timeout=30).json()["merchants"]
    assert merchants and {"id", "features", "stats"} <= set(merchants[0])


# ---------------------------------------------------------------- restarts and roll-outs
def test_a_request_outlives_the_replica_that_served_it(service):
    import ray

    from perfusion_ray.serve import apps

    result = service.design(seed=12)
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if a["namespace"] == "serve" and a["name"].startswith("SERVE_REPLICA::ddesign#DesignModel")]
    assert len(replicas) == 1
    ray.kill(ray.get_actor(replicas[0]["name"], namespace="serve"), no_restart=True)
    time.sleep(1.0)
    apps.wait_running("ddesign", timeout_s=180)
    answer = service.feedback(result, [FeedbackEvent("select", 1, "after-restart")])
    assert answer.accepted == ["after-restart"]
    again = service.feedback(result, [FeedbackEvent("select", 1, "after-restart")])
    assert again.duplicates == ["after-restart"]


def test_rollout_under_concurrent_requests_fails_no_request(service):
    from perfusion_ray.serve import design_app

    clients = [DesignClient(f"{service.url}/ddesign") for _ in range(3)]

    def request(worker: int) -> str:
        result = clients[worker].design(MERCHANTS[worker], "a dress", seed=2)
        service.count(len(result.candidates))
        return result.model_version

    run = under_load(request, lambda: design_app.rollout(service.pipelines["v2"], "ddesign"), workers=3, settle_s=2.0)
    for client in clients:
        client.close()
    assert run.result == service.versions["v2"]
    assert run.failures == []
    before, after = run.versions(margin_s=0.5)
    assert before == {service.versions["v1"]} and after == {service.versions["v2"]}


# ---------------------------------------------------------------- the store, read by ingest (last)
def test_every_event_sent_is_stored_once_and_ingests_unchanged(service):
    from perfusion_ray.data.ingest import ingest

    stored = _store_rows(service.stores["A"])
    assert len(stored) == service.sent
    assert len({r["event_id"] for r in stored}) == len(stored)
    config = load_config(None, [f"data.root={service.stores['A']}"])
    report = ingest(config, "train", engine="local")
    assert report.counts.rows_quarantined == 0 and report.counts.files_quarantined == 0
    assert report.counts.rows_read == report.counts.rows_grouped == service.sent
    groups = pq.read_table(config.data.root + "/train/ingest/run-" + report.run_id + "/groups").to_pylist()
    assert len(groups) == report.counts.groups == sum(1 for r in stored if r["event_type"] == "impression") // 4
    assert max(max(g["labels"]) for g in groups) == 3.0  # the order graded above the select
