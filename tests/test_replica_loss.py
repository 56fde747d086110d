"""One of two reward replicas is killed (SIGKILL) under bounded load: the project's clients, over HTTP and through a
handle, see no failed request; the requests the dying replica held answer 503 (the proxy middleware), never
500; serve.status() shows the loss within seconds; the replacement brings the deployment back to HEALTHY."""

from __future__ import annotations

import pytest

from perfusion_ray.config import load_config
from perfusion_ray.serve.client import RewardClient, RewardHandleClient
from perfusion_ray.serve.replica_drill import StatusTally, drill, score_request
from tests.conftest import free_port
from tests.serve_apps import REWARD_YAML, app_entry, deploy_all, tiny_reward_model

pytestmark = pytest.mark.ray

APP, DEPLOYMENT = "kreward", "RewardModel"
HTTP_WORKERS, HANDLE_WORKERS = 6, 2


@pytest.fixture(scope="module")
def url(ray_cluster, tmp_path_factory):
    from ray import serve

    from perfusion_ray.serve import apps

    port = free_port()
    overrides = [f"serve.port={port}", f"serve.app_name={APP}", f"serve.route_prefix=/{APP}", "serve.min_replicas=2",
                 "serve.max_replicas=2", "serve.batch_wait_timeout_s=0.05"]
    apps.start_serve(load_config(None, overrides))
    model = tiny_reward_model(tmp_path_factory.mktemp("replica-loss") / "rm")
    deploy_all([app_entry(REWARD_YAML, APP, overrides, {"model_dir": str(model)})])
    yield f"http://127.0.0.1:{port}/{APP}"
    serve.shutdown()


def test_killing_one_of_two_replicas_under_load_fails_no_request(url):
    tally, (prompt, images, merchant) = StatusTally(), score_request()
    http = [RewardClient(url, observe=tally) for _ in range(HTTP_WORKERS)]
    handle = RewardHandleClient(APP)

    def call(worker: int) -> None:
        client = http[worker] if worker < HTTP_WORKERS else handle
        assert client.score(prompt, images, merchant).scores.shape == (2,)

    report = drill(APP, DEPLOYMENT, call, concurrency=HTTP_WORKERS + HANDLE_WORKERS, duration_s=20.0, kill_after_s=4.0)
    for client in http:
        client.close()
    assert report.replicas_before == 2
    statuses = tally.counts
    assert report.failed == [], report.failed[:5]
    assert report.requests > 100
    assert set(statuses) <= {200, 503}, statuses  # a request lost with its replica is a 503, never a 500
    assert report.unhealthy_after_s is not None and report.unhealthy_after_s < 5.0, report
    assert report.recovered_after_s is not None, report
    print(f"replica kill: {report.requests} requests, {len(report.failed)} failed, answers {dict(statuses)}, "
          f"loss seen after {report.unhealthy_after_s:.1f}s, recovered after {report.recovered_after_s:.1f}s")
