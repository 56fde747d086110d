"""The typed records that travel end to end: a merchant is one hashable value from the event columns to the
models, and a batch of groups splits and joins for a worker group without losing or reordering a group."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from perfusion_ray.records import GroupBatch, Merchant, Request


def _batch(n: int, k: int = 4) -> GroupBatch:
    requests = [Request(f"r{i}", Merchant(f"m{i % 3}", {"tier": "a"}, {"gmv": float(i)}), f"prompt {i}")
                for i in range(n)]
    images = np.arange(n * k * 2 * 2 * 3, dtype=np.int64).reshape(n, k, 2, 2, 3).astype(np.uint8)
    return GroupBatch.from_requests(requests, images, np.eye(n, k, dtype=np.float32))


def test_a_merchant_from_arrow_map_pairs_equals_one_from_dicts_and_hashes_alike():
    from_pairs = Merchant.from_record({"merchant_id": "m1", "merchant_features": [("tier", "a"), ("city", "b")],
                                       "merchant_stats": [("gmv", 2)]})
    from_dicts = Merchant("m1", {"city": "b", "tier": "a"}, {"gmv": 2.0})
    assert from_pairs == from_dicts and hash(from_pairs) == hash(from_dicts)
    assert Merchant.from_record({"merchant_id": None, "merchant_features": None, "merchant_stats": None}) == Merchant()
    assert Merchant("", {}, {}).as_fields() == {"merchant_features": {}, "merchant_stats": {}}
    assert Merchant.coerce(from_dicts.record()) == from_dicts


def test_chunks_cover_every_group_once_in_order_and_concat_restores_the_batch():
    batch = _batch(7)
    parts = batch.chunk(3)
    assert [len(p) for p in parts] == [2, 3, 2]
    joined = GroupBatch.concat(parts)
    assert joined.request_ids == batch.request_ids and joined.merchants == batch.merchants
    assert np.array_equal(joined.images, batch.images) and np.array_equal(joined.labels, batch.labels)


def test_take_repeats_rows_and_candidates_are_group_major():
    batch = _batch(3).take([2, 2, 0])
    assert batch.request_ids == ["r2", "r2", "r0"]
    merchants, prompts, images = batch.candidates()
    assert len(merchants) == len(prompts) == len(images) == 12
    assert prompts[:4] == ["prompt 2"] * 4 and prompts[-1] == "prompt 0"
    assert np.array_equal(images[8], batch.images[2, 0])


def test_to_device_gives_tensors_and_inconsistent_lengths_are_refused():
    moved = _batch(2).to("cpu")
    assert isinstance(moved.images, torch.Tensor) and moved.images.dtype == torch.uint8
    assert moved.labels.dtype == torch.float32
    assert len(GroupBatch.concat([moved, moved])) == 4
    with pytest.raises(ValueError, match="one request id, merchant, prompt"):
        GroupBatch(["r0"], [], ["p"], np.zeros((1, 4, 2, 2, 3), np.uint8), np.zeros((1, 4)))
    with pytest.raises(ValueError, match="every batch is empty"):
        GroupBatch.concat([_batch(2).take([])])
