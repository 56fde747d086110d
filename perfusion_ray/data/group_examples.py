"""Group examples as model inputs: group files -> `GroupBatch` (records.py), image refs resolved to pixels.

One decode serves Ray Data map_batches (training: `decode_groups` keeps the merchant's map columns and adds
the images as a tensor column) and in-process reads (evaluation, the online workers: `load_groups`).
Group files are named by their path inside the store's filesystem (StoreLayout.output_files), so every
read takes that filesystem: a store on s3:// reads the same way as a local one.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from perfusion_ray.data.image_store import ImageStore
from perfusion_ray.data.store import StoreLayout
from perfusion_ray.records import GroupBatch, Merchant

GROUP_COLUMNS = ["request_id", "merchant_id", "merchant_features", "merchant_stats", "prompt", "labels"]


@lru_cache(maxsize=100_000)
def _image(store_root: str, ref: str) -> np.ndarray:
    return ImageStore(store_root).load(ref)  # images are immutable: cache per process


def group_images(refs: list[list[str]], images_root: str) -> np.ndarray:
    """uint8 [B, K, H, W, 3] for the image refs of B groups."""
    if not refs:
        return np.zeros((0, 0, 0, 0, 3), np.uint8)
    return np.stack([np.stack([_image(images_root, ref) for ref in group]) for group in refs])


def decode_groups(table: pa.Table, images_root: str) -> pa.Table:
    """A group table -> the columns GroupBatch.from_columns reads, images as a tensor column (Ray Data)."""
    from ray.data.extensions import ArrowTensorArray

    images = group_images(table["image_refs"].to_pylist(), images_root)
    return table.select(GROUP_COLUMNS).append_column("images", ArrowTensorArray.from_numpy(images))


def batch_from_table(table: pa.Table, images_root: str) -> GroupBatch:
    """A group table -> GroupBatch, in-process."""
    columns = {name: table[name].to_pylist() for name in GROUP_COLUMNS}
    columns["images"] = group_images(table["image_refs"].to_pylist(), images_root)
    return GroupBatch.from_columns(columns)


def read_group_table(layout: StoreLayout, files: list[str] | None = None) -> pa.Table:
    """The rows of these group files (default: every committed one of the split) as one table."""
    files = layout.output_files("groups") if files is None else files
    tables = [t for t in (pq.read_table(path, filesystem=layout.filesystem) for path in files) if t.num_rows]
    return pa.concat_tables(tables) if tables else pa.table({})


def load_groups(layout: StoreLayout, files: list[str] | None = None) -> GroupBatch | None:
    """The groups of these files (default: every committed one) as one batch; None when there are none."""
    table = read_group_table(layout, files)
    return batch_from_table(table, layout.images_uri) if table.num_rows else None


def distinct_merchants(layout: StoreLayout, files: list[str], keep=None) -> tuple[list[Merchant], list[str], int]:
    """The distinct merchants of group files (for a model's known ids and stat scale), the stat names, and
    the number of groups; `keep(request_id)` limits all three to some requests (e.g. a training fold)."""
    merchants: dict[str, Merchant] = {}
    groups = 0
    for path in files:
        table = pq.read_table(path, columns=["request_id", "merchant_id", "merchant_features", "merchant_stats"],
                              filesystem=layout.filesystem)
        for row in table.to_pylist():
            if keep is not None and not keep(row["request_id"]):
                continue
            groups += 1
            merchants.setdefault(row["merchant_id"], Merchant.from_record(row))
    stat_names = sorted({name for m in merchants.values() for name in m.stats})
    return list(merchants.values()), stat_names, groups


def committed_group_files(root: str, split: str) -> tuple[StoreLayout, list[str]]:
    """The split's committed group files, or an error saying how to make some."""
    from perfusion_ray.errors import PerfusionError

    layout = StoreLayout(root, split)
    files = layout.output_files("groups")
    if not files or sum(pq.read_metadata(f, filesystem=layout.filesystem).num_rows for f in files) == 0:
        raise PerfusionError(f"no group examples under {layout.ingest}",
                             hint="run `perfusion data ingest` on a store that holds feedback partitions first")
    return layout, files
