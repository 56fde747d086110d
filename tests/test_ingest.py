"""Ingest: every bad row is quarantined with its reason, nothing is lost, files that are not parquet
are quarantined whole, and the Ray Data path gives what the single-process path gives."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from perfusion_ray.config import load_config
from perfusion_ray.data.image_store import ImageStore, image_problem
from perfusion_ray.data.ingest import ingest
from perfusion_ray.data.schemas import FEEDBACK_EVENT_SCHEMA
from perfusion_ray.data.store import StoreLayout, list_partition_files
from perfusion_ray.world.simulator import simulate
from tests.conftest import TINY_OVERRIDES
from tests.partition_mutations import (BOMB_TEXT_PNG, BROKEN_CHUNK_PNG, HUGE_HEADER_PNG, NAMED, impossible_positions,
                                       with_ids)


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


# ---------------------------------------------------------------- files that once stopped an ingest
@pytest.fixture(scope="module")
def simulated_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("base") / "data"
    simulate(load_config(None, TINY_OVERRIDES + [f"data.root={root}"]), "train", progress=False)
    return root


@pytest.fixture
def store(simulated_base, tmp_path):
    """A copy of the simulated store: (config, layout, the first partition's rows under ids of their own)."""
    root = tmp_path / "data"
    shutil.copytree(simulated_base, root)
    config = load_config(None, TINY_OVERRIDES + [f"data.root={root}"])
    layout = StoreLayout(str(root), "train")
    first = pq.read_table(os.path.join(layout.feedback, list_partition_files(layout)[0]))
    return config, layout, with_ids(first, "-x")


def _write(layout: StoreLayout, hour_offset: int, name: str, data: bytes) -> None:
    folder = Path(layout.feedback) / f"event_hour=2026-01-05T{hour_offset:02d}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)


def _table_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _reasons(layout: StoreLayout, run_id: str) -> list[str]:
    return [r or "" for f in layout.output_files("quarantine", [run_id]) for r in pq.read_table(f)["reason"].to_pylist()]


def _groups(layout: StoreLayout, run_id: str) -> list[dict]:
    return [g for f in layout.output_files("groups", [run_id]) for g in pq.read_table(f).to_pylist()]


SIMULATED_GROUPS = 60  # 3 hours x 20 requests, every one a group

# What ingest must make of each named shape: reasons it must give (on the file, or on its rows), or None
# when every mutated row must be grouped.
EXPECTED = {
    "overwritten_data_page": ["not a readable parquet file"],
    "nanosecond_times": None,
    "integers_out_of_range": ["position missing or outside 0..3", "request has impressions outside positions 0..3"],
    "huge_png_header": ["size 12000x12000, expected 32x32"],
    "png_chunk_errors": ["not a decodable image"],
    "invalid_utf8": ["invalid UTF-8 in "],
    "wrong_map_value_type": ["schema: column merchant_"],
    "colliding_column": None,
    "non_finite_stats": ["merchant_stats holds a missing, NaN or infinite value"],
    "impossible_positions": ["position missing or outside 0..3", "request has impressions outside positions 0..3"],
    "implausible_times": ["event_time before 2000-01-01: implausible", "event_time before the impression"],
    "copied_events": ["duplicate event_id"],
    "late_feedback": ["late feedback: more than 1 h after its request's impressions"],
}


@pytest.mark.parametrize("shape", sorted(EXPECTED))
def test_a_damaged_file_is_quarantined_and_the_rest_ingests(store, shape):
    config, layout, rows = store
    files = NAMED[shape](rows, np.random.default_rng(1), ImageStore(layout.images_uri).put)
    for number, (offset, data) in enumerate(files):
        _write(layout, offset, f"part-damaged-{number}.parquet", data)

    report = ingest(config, "train", engine="local")

    counts = report.counts
    assert counts.rows_read == counts.rows_grouped + counts.rows_quarantined
    reasons = _reasons(layout, report.run_id)
    assert len([r for r in reasons if r]) == counts.rows_quarantined + counts.files_quarantined
    groups = _groups(layout, report.run_id)
    assert sum(not g["request_id"].endswith("-x") for g in groups) == SIMULATED_GROUPS  # the good files, untouched
    if EXPECTED[shape] is None:
        assert counts.rows_quarantined == counts.files_quarantined == 0
    for expected in EXPECTED[shape] or []:
        assert any(expected in reason for reason in reasons), (expected, sorted(set(reasons))[:5])
    assert all(math.isfinite(v) for g in groups for _, v in g["merchant_stats"] or [])
    assert not ingest(config, "train", engine="local").run_id  # consumed: a rerun has nothing new


@pytest.mark.parametrize("column", FEEDBACK_EVENT_SCHEMA.names)
def test_a_column_of_null_type_reads_as_missing_values(store, column):
    config, layout, rows = store
    rows = rows.set_column(rows.schema.get_field_index(column), column, pa.nulls(rows.num_rows))
    _write(layout, 0, "part-nulls.parquet", _table_bytes(rows))

    report = ingest(config, "train", engine="local")

    if column in ("merchant_features", "merchant_stats"):  # no side features: the merchant is its id
        assert report.counts.rows_quarantined == 0 and report.counts.groups == SIMULATED_GROUPS + 20
    else:
        assert report.counts.rows_quarantined == rows.num_rows and report.counts.groups == SIMULATED_GROUPS
        assert all(column in reason for reason in _reasons(layout, report.run_id))


@pytest.mark.parametrize("image", [HUGE_HEADER_PNG, BROKEN_CHUNK_PNG, BOMB_TEXT_PNG], ids=["huge", "chunk", "bomb"])
@pytest.mark.parametrize("size", [32, None])
def test_an_image_that_pil_refuses_is_a_reason_not_an_exception(tmp_path, image, size):
    ref, digest = ImageStore(str(tmp_path)).put(image)
    assert image_problem(str(tmp_path), ref, digest, size).startswith(f"unreadable image: {ref}: ")


def test_the_same_events_under_a_new_name_in_a_later_run_are_duplicates(store):
    config, layout, _ = store
    first = ingest(config, "train", engine="local")
    name = list_partition_files(layout)[0]
    copy = Path(layout.feedback) / name.replace(".parquet", "-resent.parquet")
    shutil.copy(Path(layout.feedback) / name, copy)

    again = ingest(config, "train", engine="local")

    assert first.counts.groups == SIMULATED_GROUPS
    assert again.counts.groups == 0 and again.counts.rows_quarantined == again.counts.rows_read > 0
    assert set(_reasons(layout, again.run_id)) == {"duplicate event_id (grouped by an earlier ingest run)"}


def test_grouped_ids_are_kept_for_the_duplicate_window_then_deleted(store):
    config, layout, _ = store
    config.data.duplicate_window_hours = 1
    first = ingest(config, "train", engine="local")
    manifest_path = Path(layout.run_dir(first.run_id)) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["committed_at"] = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=2)).isoformat()
    manifest_path.write_text(json.dumps(manifest))
    name = list_partition_files(layout)[0]
    shutil.copy(Path(layout.feedback) / name, Path(layout.feedback) / name.replace(".parquet", "-resent.parquet"))

    again = ingest(config, "train", engine="local")

    assert again.counts.groups == SIMULATED_GROUPS // 3  # beyond the window a copy is not recognised
    assert not (Path(layout.run_dir(first.run_id)) / "event_ids").exists()
    assert json.loads(manifest_path.read_text())["event_ids_deleted"] is True
    assert (Path(layout.run_dir(again.run_id)) / "event_ids").is_dir()


def _one_request(rows: pa.Table) -> tuple[str, pa.Table, pa.Table]:
    request = rows["request_id"][0].as_py()
    mine = pc.equal(rows["request_id"], request)
    return request, rows.filter(mine), rows.filter(pc.invert(mine))


def test_an_infinite_stat_quarantines_its_rows_and_leaves_other_merchants_alone(store):
    config, layout, rows = store
    request, mine, others = _one_request(rows)
    stats = [[(k, math.inf) for k, _ in row] for row in mine["merchant_stats"].to_pylist()]
    mine = mine.set_column(mine.schema.get_field_index("merchant_stats"), "merchant_stats",
                           pa.array(stats, mine.schema.field("merchant_stats").type))
    _write(layout, 0, "part-inf.parquet", _table_bytes(pa.concat_tables([mine, others])))

    report = ingest(config, "train", engine="local")

    groups = {g["request_id"]: g for g in _groups(layout, report.run_id)}
    assert request not in groups and len(groups) == SIMULATED_GROUPS + 19
    assert report.counts.rows_quarantined == mine.num_rows
    assert all(math.isfinite(v) for g in groups.values() for _, v in g["merchant_stats"])


def test_a_request_served_at_positions_0_to_999_is_quarantined_not_cut_to_k(store):
    config, layout, rows = store
    files = impossible_positions(rows, np.random.default_rng(0), ImageStore(layout.images_uri).put)
    _write(layout, 0, "part-wide.parquet", files[0][1])

    report = ingest(config, "train", engine="local")

    request = rows["request_id"][0].as_py()
    assert request not in {g["request_id"] for g in _groups(layout, report.run_id)}
    quarantine = pa.concat_tables([pq.read_table(f) for f in layout.output_files("quarantine", [report.run_id])])
    mine = quarantine.filter(pc.equal(quarantine["request_id"], request))
    assert mine.num_rows == 1000 + (rows.filter(pc.equal(rows["request_id"], request)).num_rows - 4)
    assert report.counts.groups == SIMULATED_GROUPS + 19


def test_implausible_times_are_row_reasons(store):
    config, layout, rows = store
    request, mine, others = _one_request(rows)
    kinds = mine["event_type"].to_pylist()
    times = mine["event_time"].to_pylist()
    impression_at, click_at = kinds.index("impression"), next(i for i, k in enumerate(kinds) if k != "impression")
    times[impression_at] = "1900-01-01T00:00:00Z"
    times[click_at] = "2026-01-05T00:00:00.000000Z"  # before any impression of the hour
    mine = mine.set_column(1, "event_time", pa.array(times, pa.string()))
    _write(layout, 0, "part-times.parquet", _table_bytes(pa.concat_tables([mine, others])))

    report = ingest(config, "train", engine="local")

    reasons = _reasons(layout, report.run_id)
    assert "event_time before 2000-01-01: implausible" in reasons
    assert any(r.startswith("group of the wrong size: 3 impressions") for r in reasons)
    assert report.counts.groups == SIMULATED_GROUPS + 19


def test_feedback_within_the_late_window_joins_its_group_and_later_feedback_is_kept_as_late(store):
    config, layout, rows = store
    feedback = pc.not_equal(rows["event_type"], "impression")
    requests = pc.unique(rows["request_id"]).to_pylist()
    on_time, late = requests[0], requests[1]
    moved_on_time = pc.and_(feedback, pc.equal(rows["request_id"], on_time))
    moved_late = pc.and_(feedback, pc.equal(rows["request_id"], late))
    staying = pc.invert(pc.or_(moved_on_time, moved_late))
    _write(layout, 0, "part-split.parquet", _table_bytes(rows.filter(staying)))
    _write(layout, 1, "part-split.parquet", _table_bytes(rows.filter(moved_on_time)))
    _write(layout, 2, "part-split.parquet", _table_bytes(rows.filter(moved_late)))
    together = tmp_ingest_of(config, layout, rows)

    report = ingest(config, "train", engine="local")

    groups = {g["request_id"]: g for g in _groups(layout, report.run_id)}
    assert groups[on_time]["labels"] == together[on_time]["labels"]  # the click an hour later still counts
    late_rows = rows.filter(moved_late).num_rows
    assert late in groups and report.counts.rows_late == late_rows > 0
    assert _reasons(layout, report.run_id).count("late feedback: more than 1 h after its request's impressions") \
        == late_rows


def tmp_ingest_of(config, layout: StoreLayout, rows: pa.Table) -> dict[str, dict]:
    """The groups of these rows ingested on their own, in one file (a scratch store beside this one)."""
    scratch = Path(layout.root).parent / "scratch"
    scratch_layout = StoreLayout(str(scratch), "train")
    scratch.mkdir()
    (scratch / "images").symlink_to(Path(layout.root) / "images")
    folder = Path(scratch_layout.feedback) / "event_hour=2026-01-05T00"
    folder.mkdir(parents=True)
    (folder / "part-all.parquet").write_bytes(_table_bytes(rows))
    report = ingest(config.model_copy(update={"data": config.data.model_copy(update={"root": str(scratch)})}),
                    "train", engine="local")
    return {g["request_id"]: g for g in _groups(scratch_layout, report.run_id)}
