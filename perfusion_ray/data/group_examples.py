"""Group examples as model inputs: image refs resolved to pixels, labels to a [B, K] array, merchant
maps to plain dicts. One transform serves Ray Data map_batches (training) and in-process evaluation."""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from perfusion_ray.data.image_store import ImageStore
from perfusion_ray.data.store import StoreLayout


@lru_cache(maxsize=100_000)
def _image(store_root: str, ref: str) -> np.ndarray:
    return ImageStore(store_root).load(ref)  # images are immutable: cache per process


def to_model_batch(table: pa.Table, store_root: str) -> dict[str, np.ndarray]:
    """A group table -> numpy columns: request_id, merchant_id, merchant_json (features + stats), prompt,
    images uint8 [B, K, H, W, 3], labels float32 [B, K]. Strings and maps become plain numpy object or
    JSON columns, which Ray Data's numpy batches and iter_batches carry without a collate function."""
    refs = table["image_refs"].to_pylist()
    images = np.stack([np.stack([_image(store_root, ref) for ref in group]) for group in refs]) if refs else \
        np.zeros((0, 0, 0, 0, 3), np.uint8)
    features = table["merchant_features"].to_pylist()
    stats = table["merchant_stats"].to_pylist()
    return {
        "request_id": np.array(table["request_id"].to_pylist(), dtype=object),
        "merchant_id": np.array(table["merchant_id"].to_pylist(), dtype=object),
        "merchant_json": np.array([json.dumps([dict(f or []), dict(s or [])]) for f, s in zip(features, stats)],
                                  dtype=object),
        "prompt": np.array([p or "" for p in table["prompt"].to_pylist()], dtype=object),
        "images": images,
        "labels": np.array(table["labels"].to_pylist(), dtype=np.float32),
    }


def merchant_records(batch: dict[str, np.ndarray]) -> list[dict]:
    """Per-group merchant dicts (merchant_id, merchant_features, merchant_stats) from a model batch."""
    records = []
    for merchant_id, encoded in zip(batch["merchant_id"], batch["merchant_json"]):
        features, stats = json.loads(encoded)
        records.append({"merchant_id": merchant_id, "merchant_features": features, "merchant_stats": stats})
    return records


def candidate_rows(batch: dict[str, np.ndarray]) -> tuple[list[dict], list[str], np.ndarray]:
    """One row per candidate (B*K, group-major): merchant records, prompts, and images [B*K, H, W, 3]."""
    groups, k = batch["labels"].shape
    merchants = [record for record in merchant_records(batch) for _ in range(k)]
    prompts = [prompt for prompt in batch["prompt"] for _ in range(k)]
    return merchants, prompts, batch["images"].reshape(groups * k, *batch["images"].shape[2:])


def read_groups(root: str, split: str) -> pa.Table:
    """Every committed group example of a split (for evaluation sized data; training streams instead)."""
    layout = StoreLayout(root, split)
    files = layout.output_files("groups")
    tables = [pq.read_table(path, filesystem=layout.filesystem) for path in files]
    return pa.concat_tables([t for t in tables if t.num_rows]) if tables else pa.table({})


def distinct_merchants(files: list[str], keep=None) -> tuple[list[dict], list[str], int]:
    """The distinct merchants of group files (for a model's known ids and stat scale), the stat names, and
    the number of groups; `keep(request_id)` limits all three to some requests (e.g. a training fold)."""
    merchants: dict[str, dict] = {}
    groups = 0
    for path in files:
        table = pq.read_table(path, columns=["request_id", "merchant_id", "merchant_features", "merchant_stats"])
        for row in table.to_pylist():
            if keep is not None and not keep(row["request_id"]):
                continue
            groups += 1
            merchants.setdefault(row["merchant_id"], {
                "merchant_id": row["merchant_id"], "merchant_features": dict(row["merchant_features"] or []),
                "merchant_stats": dict(row["merchant_stats"] or [])})
    stat_names = sorted({name for m in merchants.values() for name in m["merchant_stats"]})
    return list(merchants.values()), stat_names, groups


def committed_group_files(root: str, split: str) -> tuple[StoreLayout, list[str]]:
    """The split's committed group files, or an error saying how to make some."""
    from perfusion_ray.errors import PerfusionError

    layout = StoreLayout(root, split)
    files = layout.output_files("groups")
    if not files or sum(pq.read_metadata(f, filesystem=layout.filesystem).num_rows for f in files) == 0:
        raise PerfusionError(f"no group examples under {layout.ingest}",
                             hint="run `perfusion world simulate` and `perfusion data ingest` first")
    return layout, files
