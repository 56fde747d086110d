"""Adapters from Pick-a-Pic v2 and PickaPic-rankings files to group examples (no Ray)."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from perfusion_ray.data.adapters import AdapterReport, adapt_file
from perfusion_ray.data.image_store import ImageStore, sha256_hex
from perfusion_ray.data.schemas import GROUP_EXAMPLE_SCHEMA, QUARANTINE_SCHEMA
from perfusion_ray.errors import PerfusionError

V2_SCHEMA = pa.schema([
    pa.field("user_id", pa.int64()),
    pa.field("ranking_id", pa.int64()),
    pa.field("caption", pa.string()),
    pa.field("jpg_0", pa.binary()),
    pa.field("jpg_1", pa.binary()),
    pa.field("label_0", pa.float64()),
    pa.field("label_1", pa.float64()),
    pa.field("model_0", pa.string()),  # real files carry more columns than the adapter reads
])


def image_bytes(color: tuple[int, int, int], fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format=fmt)
    return buffer.getvalue()


JPEG_RED = image_bytes((200, 10, 10), "JPEG")
PNG_BLUE = image_bytes((10, 10, 200), "PNG")


def v2_row(ranking_id: int, label_0: float = 1.0, label_1: float = 0.0, **overrides) -> dict:
    row = {"user_id": 7, "ranking_id": ranking_id, "caption": f"a dress {ranking_id}", "jpg_0": JPEG_RED,
           "jpg_1": PNG_BLUE, "label_0": label_0, "label_1": label_1, "model_0": "sdxl"}
    return {**row, **overrides}


def rankings_row(best: str, **overrides) -> dict:
    row = {"user_id": 3, "image_0_uid": "u0", "image_1_uid": "u1", "image_2_uid": "u2", "image_3_uid": "u3",
           "best_image_uid": best}
    return {**row, **overrides}


def write_parquet(path, rows: list[dict], schema: pa.Schema | None = None) -> str:
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return str(path)


def run(tmp_path, kind, rows, schema=None, **kwargs) -> tuple[AdapterReport, pa.Table, pa.Table]:
    source = write_parquet(tmp_path / "input.parquet", rows, schema)
    report = adapt_file(kind, source, str(tmp_path / "out"), str(tmp_path / "images"), **kwargs)
    out = tmp_path / "out"
    return report, pq.read_table(out / "groups.parquet"), pq.read_table(out / "quarantine.parquet")


def assert_accounted(report: AdapterReport) -> None:
    assert report.rows_read == report.groups_written + report.ties_dropped + report.rows_rejected
    assert report.rows_rejected == sum(report.reasons.values())


def test_pickapic_row_becomes_group_of_two_with_the_chosen_image_labelled(tmp_path):
    report, groups, quarantine = run(tmp_path, "pickapic_v2", [v2_row(1), v2_row(2, 0.0, 1.0)], V2_SCHEMA)

    assert groups.schema == GROUP_EXAMPLE_SCHEMA and quarantine.schema == QUARANTINE_SCHEMA
    assert (report.rows_read, report.groups_written, quarantine.num_rows) == (2, 2, 0)
    first, second = groups.to_pylist()
    assert first["labels"] == [1.0, 0.0] and second["labels"] == [0.0, 1.0]
    assert first["request_id"] == "pickapic_v2:1" and first["merchant_id"] == "pickapic:7"
    assert first["prompt"] == "a dress 1" and first["source"] == "pickapic_v2"
    assert first["event_time"] is None and first["merchant_features"] == [] and first["merchant_stats"] == []
    assert len(first["image_refs"]) == len(first["image_sha256"]) == 2


def test_pickapic_images_round_trip_through_the_store(tmp_path):
    _, groups, _ = run(tmp_path, "pickapic_v2", [v2_row(1)], V2_SCHEMA)

    store = ImageStore(str(tmp_path / "images"))
    group = groups.to_pylist()[0]
    for ref, digest, original in zip(group["image_refs"], group["image_sha256"], [JPEG_RED, PNG_BLUE]):
        stored = store.read_bytes(ref)
        assert stored == original and sha256_hex(stored) == digest
        assert store.load(ref).shape == (8, 8, 3)


def test_pickapic_tie_becomes_group_with_equal_labels(tmp_path):
    report, groups, _ = run(tmp_path, "pickapic_v2", [v2_row(1), v2_row(2, 0.5, 0.5)], V2_SCHEMA)

    assert groups.column("labels").to_pylist() == [[1.0, 0.0], [0.5, 0.5]]
    assert (report.ties, report.ties_dropped, report.groups_written) == (1, 0, 2)
    assert_accounted(report)


def test_pickapic_tie_is_dropped_and_counted_when_asked(tmp_path):
    report, groups, quarantine = run(tmp_path, "pickapic_v2", [v2_row(1), v2_row(2, 0.5, 0.5)], V2_SCHEMA,
                                     ties="drop")

    assert groups.column("request_id").to_pylist() == ["pickapic_v2:1"]
    assert (report.ties, report.ties_dropped, report.groups_written, quarantine.num_rows) == (1, 1, 1, 0)
    assert_accounted(report)


def test_pickapic_bad_rows_are_quarantined_with_reasons_never_dropped(tmp_path):
    rows = [
        v2_row(1),
        v2_row(2, 1.0, 1.0),
        v2_row(3, jpg_1=None),
        v2_row(4, user_id=None),
        v2_row(5, jpg_0=b"not an image"),
        v2_row(6, jpg_0=image_bytes((1, 2, 3), "GIF")),
    ]
    report, groups, quarantine = run(tmp_path, "pickapic_v2", rows, V2_SCHEMA, batch_rows=4)

    assert groups.column("request_id").to_pylist() == ["pickapic_v2:1"]
    assert_accounted(report)
    assert report.rows_rejected == quarantine.num_rows == 5
    by_request = {record["request_id"]: record for record in quarantine.to_pylist()}
    assert by_request["pickapic_v2:2"]["reason"] == "label pair (1.0, 1.0) is not (1, 0), (0, 1) or (0.5, 0.5)"
    assert by_request["pickapic_v2:3"]["reason"] == "missing jpg_1"
    assert by_request["pickapic_v2:4"]["reason"] == "missing user_id"
    assert by_request["pickapic_v2:5"]["reason"] == "jpg_0: not an image"
    assert by_request["pickapic_v2:6"]["reason"] == "jpg_0: a GIF image, expected JPEG or PNG"
    assert report.reasons["missing jpg_1"] == 1
    row = json.loads(by_request["pickapic_v2:4"]["row_json"])
    assert row["ranking_id"] == 4 and row["model_0"] == "sdxl" and "jpg_0" not in row and "jpg_1" not in row
    assert set(quarantine.column("source_file").to_pylist()) == {str(tmp_path / "input.parquet")}


def test_rankings_best_image_gets_the_only_positive_label(tmp_path):
    rows = [rankings_row("u2", ranking_id=10, caption="red coat"), rankings_row("u0", ranking_id=11, caption=None)]
    report, groups, _ = run(tmp_path, "pickapic_rankings", rows)

    first, second = groups.to_pylist()
    assert first["labels"] == [0.0, 0.0, 1.0, 0.0] and second["labels"] == [1.0, 0.0, 0.0, 0.0]
    assert first["image_refs"] == ["u0", "u1", "u2", "u3"] and first["image_sha256"] == [""] * 4
    assert first["request_id"] == "pickapic_rankings:10" and first["merchant_id"] == "pickapic:3"
    assert first["prompt"] == "red coat" and second["prompt"] == ""
    assert first["source"] == "pickapic_rankings" and (report.ties, report.groups_written) == (0, 2)


def test_rankings_without_ranking_id_are_named_by_row_number_across_batches(tmp_path):
    rows = [rankings_row("u1"), rankings_row("u9"), rankings_row("u3")]
    report, groups, quarantine = run(tmp_path, "pickapic_rankings", rows, batch_rows=1)

    assert groups.column("request_id").to_pylist() == ["pickapic_rankings:0", "pickapic_rankings:2"]
    assert quarantine.to_pylist()[0]["request_id"] == "pickapic_rankings:1"


def test_rankings_best_image_not_among_the_four_is_rejected(tmp_path):
    rows = [rankings_row("u1", ranking_id=1), rankings_row("elsewhere", ranking_id=2),
            rankings_row("u1", ranking_id=3, image_2_uid="u1"), rankings_row("u1", ranking_id=None)]
    report, groups, quarantine = run(tmp_path, "pickapic_rankings", rows)

    assert groups.num_rows == report.groups_written == 1
    assert quarantine.column("reason").to_pylist() == [
        "best_image_uid is none of the four image uids", "image uids are not distinct", "missing ranking_id"]
    assert quarantine.column("request_id").to_pylist() == ["pickapic_rankings:2", "pickapic_rankings:3", None]
    assert_accounted(report)


def test_missing_columns_error_names_them_and_the_file(tmp_path):
    source = write_parquet(tmp_path / "thin.parquet", [{"user_id": 1, "caption": "x", "label_0": 1.0}])

    with pytest.raises(PerfusionError) as raised:
        adapt_file("pickapic_v2", source, str(tmp_path / "out"), str(tmp_path / "images"))

    assert "missing column(s) ranking_id, jpg_0, jpg_1, label_1" in raised.value.message
    assert source in raised.value.message
    assert not (tmp_path / "out").exists()


def test_empty_file_writes_empty_outputs(tmp_path):
    report, groups, quarantine = run(tmp_path, "pickapic_v2", [], V2_SCHEMA)

    assert report == AdapterReport()
    assert groups.schema == GROUP_EXAMPLE_SCHEMA and groups.num_rows == quarantine.num_rows == 0


def test_pickapic_rows_without_a_judgement_are_refused(tmp_path):
    schema = V2_SCHEMA.append(pa.field("has_label", pa.bool_()))
    rows = [v2_row(1, has_label=True), v2_row(2, has_label=False), v2_row(3, 0.5, 0.5, has_label=False),
            v2_row(4, has_label=None)]
    report, groups, quarantine = run(tmp_path, "pickapic_v2", rows, schema)

    assert groups.column("request_id").to_pylist() == ["pickapic_v2:1"]
    assert quarantine.column("request_id").to_pylist() == ["pickapic_v2:2", "pickapic_v2:3", "pickapic_v2:4"]
    assert set(quarantine.column("reason").to_pylist()) == {"has_label is not true: the pair carries no judgement"}
    assert_accounted(report)


def test_pickapic_identical_images_cannot_carry_a_preference(tmp_path):
    rows = [v2_row(1, jpg_1=JPEG_RED), v2_row(2, 0.5, 0.5, jpg_1=JPEG_RED), v2_row(3)]
    report, groups, quarantine = run(tmp_path, "pickapic_v2", rows, V2_SCHEMA)

    assert groups.column("request_id").to_pylist() == ["pickapic_v2:2", "pickapic_v2:3"]  # a tie says nothing false
    assert quarantine.to_pylist()[0]["reason"] == "jpg_0 and jpg_1 are the same image but labelled a preference"
    assert_accounted(report)


@pytest.mark.parametrize("kind, rows, schema, first_labels", [
    ("pickapic_v2", [v2_row(5), v2_row(5, 0.0, 1.0), v2_row(6)], V2_SCHEMA, [1.0, 0.0]),
    ("pickapic_rankings", [rankings_row("u1", ranking_id=5), rankings_row("u2", ranking_id=5)], None,
     [0.0, 1.0, 0.0, 0.0]),
])
def test_a_repeated_ranking_id_gives_one_group(tmp_path, kind, rows, schema, first_labels):
    report, groups, quarantine = run(tmp_path, kind, rows, schema, batch_rows=1)

    ids = groups.column("request_id").to_pylist()
    assert len(ids) == len(set(ids)) and groups.to_pylist()[0]["labels"] == first_labels  # the first row is kept
    assert quarantine.column("reason").to_pylist() == ["duplicate ranking_id: an earlier row with it is kept"]
    assert_accounted(report)


@pytest.mark.parametrize("content", [b"user_id,caption\n1,a dress\n", b"", b"PAR1" + b"\0" * 64])
def test_an_input_that_is_not_parquet_is_a_one_line_error(tmp_path, content):
    source = tmp_path / "input.parquet"
    source.write_bytes(content)

    with pytest.raises(PerfusionError) as raised:
        adapt_file("pickapic_v2", str(source), str(tmp_path / "out"), str(tmp_path / "images"))

    assert raised.value.message.startswith(f"{source}: not a readable parquet file")
    assert "\n" not in raised.value.message and not (tmp_path / "out").exists()


def test_a_missing_input_is_a_one_line_error(tmp_path):
    with pytest.raises(PerfusionError, match="no such file"):
        adapt_file("pickapic_v2", str(tmp_path / "absent.parquet"), str(tmp_path / "out"), str(tmp_path / "images"))
