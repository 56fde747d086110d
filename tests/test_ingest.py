"""Ingest: every bad row is quarantined with its reason, nothing is lost, files that are not parquet
are quarantined whole, and the Ray Data path gives what the single-process path gives."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from perfusion_ray.data.image_store import ImageStore
from perfusion_ray.data.ingest import ingest
from perfusion_ray.data.schemas import FEEDBACK_EVENT_SCHEMA
from perfusion_ray.data.store import StoreLayout, list_partition_files
from perfusion_ray.world.simulator import simulate


def _read_outputs(layout: StoreLayout, kind: str) -> pa.Table:
    files = layout.output_files(kind)
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else pa.table({})


def _first_partition(layout: StoreLayout) -> list[dict]:
    return pq.read_table(os.path.join(layout.feedback, list_partition_files(layout)[0])).to_pylist()


def _requests(rows: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for row in rows:
        grouped.setdefault(row["request_id"], []).append(row)
    return grouped


def _bad_partition(layout: StoreLayout) -> tuple[list[dict], dict[str, str]]:
    """Rows of one simulated hour with one defect of each kind; returns (rows, expected reason by event_id)."""
    rows = _first_partition(layout)
    by_request = list(_requests(rows).values())
    store = ImageStore(layout.images_uri)
    garbage_ref, garbage_digest = store.put(b"these bytes are not an image")
    expected: dict[str, str] = {}

    def spoil(row: dict, reason: str, **changes) -> None:
        row.update(changes)
        expected[row["event_id"]] = reason

    request = iter(by_request)
    spoil(next(request)[0], "malformed event_id", event_id="not an id!")
    spoil(next(request)[1], "missing request_id", request_id=None)
    spoil(next(request)[1], "malformed merchant_id", merchant_id="m 1")
    spoil(next(request)[0], "unknown event_type 'like'", event_type="like")
    spoil(next(request)[0], "unparseable event_time 'yesterday'", event_time="yesterday")
    spoil(next(request)[0], "event_time in the future", event_time="2099-01-01T00:00:00Z")
    spoil(next(request)[0], "position missing or outside 0..3", position=7)
    spoil(next(request)[0], "value is missing, NaN or infinite", value=math.nan)
    spoil(next(request)[0], "missing prompt", prompt=None)
    spoil(next(request)[0], "unreadable image", image_ref="ab/missing.png")
    spoil(next(request)[0], "unreadable image", image_sha256="0" * 64)
    spoil(next(request)[0], "unreadable image", image_ref=garbage_ref, image_sha256=garbage_digest)
    spoil(next(request)[0], "malformed image_sha256", image_sha256="xyz")
    # A row with an event id missing altogether.
    missing_id = next(request)[0]
    missing_id["event_id"] = None
    # Group-level defects: a dropped impression, a duplicated event, feedback with no served group,
    # feedback naming another image than the impression, and two merchants on one request.
    short = next(request)
    short_imp = next(r for r in short if r["event_type"] == "impression")
    rows.remove(short_imp)
    for row in short:
        if row is not short_imp:
            expected[row["event_id"]] = "group of the wrong size"
    duplicated = dict(next(request)[-1])
    rows.append(duplicated)
    expected_duplicate = duplicated["event_id"]
    orphan = next(request)
    for row in [r for r in orphan if r["event_type"] == "impression"]:
        rows.remove(row)
    for row in orphan:
        if row["event_type"] != "impression":
            expected[row["event_id"]] = "no impression for request"
    mismatch = next(r for r in next(request) if r["event_type"] != "impression")
    spoil(mismatch, "image_ref differs from the impression", image_ref=short_imp["image_ref"],
          image_sha256=short_imp["image_sha256"])
    two_merchants = next(request)
    two_merchants[-1]["merchant_id"] = "m9999"
    for row in two_merchants:
        expected[row["event_id"]] = "merchant_id differs within request"
    return rows, {**expected, "__missing_id__": "missing event_id", "__duplicate__": expected_duplicate}


@pytest.fixture
def spoiled_store(tiny_config):
    simulate(tiny_config, "train", progress=False)
    layout = StoreLayout(tiny_config.data.root, "train")
    rows, expected = _bad_partition(layout)
    os.remove(os.path.join(layout.feedback, list_partition_files(layout)[0]))
    bad_path = Path(layout.feedback) / "event_hour=2026-01-05T00" / "part-spoiled.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=FEEDBACK_EVENT_SCHEMA), bad_path)
    (Path(layout.feedback) / "event_hour=2026-01-05T01" / "part-notes.txt").write_text("not parquet at all")
    return tiny_config, layout, expected


def _total_rows(layout: StoreLayout) -> int:
    total = 0
    for name in list_partition_files(layout):
        try:
            total += pq.read_metadata(os.path.join(layout.feedback, name)).num_rows
        except pa.ArrowInvalid:
            pass
    return total


def test_every_bad_row_kind_is_quarantined_with_its_reason(spoiled_store):
    config, layout, expected = spoiled_store
    report = ingest(config, "train", engine="local")
    quarantine = _read_outputs(layout, "quarantine").to_pylist()
    reasons = {}
    for row in quarantine:
        reasons.setdefault(row["event_id"], []).append(row["reason"] or "")
    missing_id, duplicate = expected.pop("__missing_id__"), expected.pop("__duplicate__")
    for event_id, reason in expected.items():
        assert any(r.startswith(reason) for r in reasons.get(event_id, [])), (event_id, reason, reasons.get(event_id))
    assert any(r["reason"].startswith(missing_id) and r["event_id"] is None and r["row_json"] for r in quarantine)
    assert reasons[duplicate] == ["duplicate event_id"]  # the first copy is kept in its group
    assert all(r["row_json"] for r in quarantine if r["reason"] != "" and "part-notes" not in r["source_file"])
    assert report.counts.files_quarantined == 1
    assert any(r["reason"].startswith("not a readable parquet file") and r["source_file"].endswith("part-notes.txt")
               for r in quarantine)
    copied = Path(layout.run_dir(report.run_id)) / "quarantine" / "files" / "event_hour=2026-01-05T01" / "part-notes.txt"
    assert copied.read_text() == "not parquet at all"


def test_accepted_plus_quarantined_equals_rows_read(spoiled_store):
    config, layout, _ = spoiled_store
    report = ingest(config, "train", engine="local")
    counts = report.counts
    groups = _read_outputs(layout, "groups")
    quarantined_rows = sum(1 for r in _read_outputs(layout, "quarantine").to_pylist() if r["row_json"] is not None)
    assert counts.rows_read == _total_rows(layout)
    assert counts.rows_grouped + counts.rows_quarantined == counts.rows_read
    assert quarantined_rows == counts.rows_quarantined
    assert groups.num_rows == counts.groups
    assert all(len(refs) == config.data.group_size for refs in groups["image_refs"].to_pylist())


def test_schema_mismatch_file_is_quarantined_whole(tiny_config):
    layout = StoreLayout(tiny_config.data.root, "train")
    path = Path(layout.feedback) / "event_hour=2026-01-05T00" / "part-odd.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(pa.table({"event_id": ["e1"], "something": [1]}), path)
    report = ingest(tiny_config, "train", engine="local")
    assert report.counts.files_quarantined == 1 and report.counts.rows_read == 0
    reason = _read_outputs(layout, "quarantine")["reason"][0].as_py()
    assert reason.startswith("schema: missing column(s) event_time")


def test_timestamp_typed_event_time_is_accepted(tiny_config):
    simulate(tiny_config, "train", progress=False)
    layout = StoreLayout(tiny_config.data.root, "train")
    name = list_partition_files(layout)[0]
    table = pq.read_table(os.path.join(layout.feedback, name))
    typed = table.set_column(1, "event_time", table["event_time"].cast(pa.timestamp("us", tz="UTC")))
    pq.write_table(typed, os.path.join(layout.feedback, name))
    report = ingest(tiny_config, "train", engine="local")
    assert report.counts.rows_quarantined == 0 and report.counts.rows_grouped == report.counts.rows_read


@pytest.mark.ray
def test_ray_data_ingest_matches_single_process(spoiled_store, ray_cluster, tmp_path):
    config, layout, _ = spoiled_store
    local_config = config.model_copy(deep=True)
    local_config.data.root = str(tmp_path / "copy")
    import shutil

    shutil.copytree(config.data.root, local_config.data.root)
    on_ray = ingest(config, "train", engine="ray")
    local = ingest(local_config, "train", engine="local")
    assert on_ray.counts == local.counts
    assert on_ray.counts.groups > 0 and on_ray.counts.rows_quarantined > 0
    ray_groups = _read_outputs(layout, "groups").sort_by("request_id")
    local_groups = _read_outputs(StoreLayout(local_config.data.root, "train"), "groups").sort_by("request_id")
    assert ray_groups.drop_columns(["source"]).equals(local_groups.drop_columns(["source"]))
