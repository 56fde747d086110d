"""The merchant page in a real headless Chromium: choose a merchant, type a prompt, see the K candidates and the
model version, click one to select it and mark it ordered; the feedback rows are then in the store, naming the
image that was shown at that position."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from perfusion_ray.config import REPO_ROOT, load_config
from perfusion_ray.serve.model_store import pipeline_version
from tests.conftest import free_port
from tests.webdriver import Browser

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def page(ray_cluster, tmp_path_factory, tiny_pipelines):
    from ray import serve

    from perfusion_ray.serve import apps

    torch.set_num_threads(1)
    browser = Browser(free_port())  # first: without a browser, nothing is left deployed for the next module
    store = tmp_path_factory.mktemp("browser") / "store"
    port = free_port()
    overrides = [f"serve.port={port}", "policy.num_inference_steps=2", f"data.root={store}",
                 "design.app_name=bdesign", "design.route_prefix=/bdesign"]
    config = load_config(None, overrides)
    apps.start_serve(config)
    entry = yaml.safe_load((REPO_ROOT / "cluster" / "serve_design.yaml").read_text())["applications"][0]
    entry = json.loads(json.dumps(entry))
    entry.update(name="bdesign", route_prefix="/bdesign", args={"config": entry["args"]["config"], "set": overrides})
    entry["deployments"][0]["user_config"] = {"pipeline_dir": str(tiny_pipelines["v1"])}
    apps.deploy(entry, timeout_s=180)
    yield {"url": f"http://127.0.0.1:{port}/bdesign/", "store": store, "browser": browser,
           "version": pipeline_version(tiny_pipelines["v1"])}
    browser.close()
    serve.shutdown()


def _rows(store: Path, request_id: str) -> list[dict]:
    rows = [r for f in sorted((store / "train" / "feedback").rglob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    return [r for r in rows if r["request_id"] == request_id]


def test_clicking_a_design_in_the_browser_stores_the_select_and_order(page, tmp_path):
    browser = page["browser"]
    browser.open(page["url"])
    options = browser.wait_for(lambda: len(browser.find_all("#merchant option")) > 1 and browser.find_all("#merchant option"),
                               what="the merchant list")
    assert len(options) == 13  # the placeholder + the 12 FashionWorld merchants the page offers
    merchant = browser.script("return document.getElementById('merchant').value")
    browser.type(browser.find("#prompt"), "a dark red dress")
    browser.click(browser.find("#generate"))
    cards = browser.wait_for(lambda: browser.find_all(".candidate img"), timeout_s=120, what="the candidates")
    assert len(cards) == 4
    assert browser.text(browser.find("#model-version")) == page["version"]
    request_id = browser.text(browser.find("#request-id")).removeprefix("request ")

    browser.click(cards[1])  # select the second design
    browser.wait_for(lambda: "select saved" in browser.text(browser.find(".candidate[data-position='1'] .state")),
                     what="the select to be saved")
    browser.click(browser.find(".candidate[data-position='1'] button.order"))
    browser.wait_for(lambda: "order saved" in browser.text(browser.find(".candidate[data-position='1'] .state")),
                     what="the order to be saved")
    browser.screenshot(tmp_path / "page.png")

    rows = _rows(page["store"], request_id)
    shown = {r["position"]: r["image_sha256"] for r in rows if r["event_type"] == "impression"}
    feedback = [(r["event_type"], r["position"], r["image_sha256"], r["merchant_id"]) for r in rows
                if r["event_type"] != "impression"]
    assert len(shown) == 4
    assert sorted(feedback) == [("order", 1, shown[1], merchant), ("select", 1, shown[1], merchant)]
    assert browser.script("return document.getElementById('status').className") == ""  # no error shown
