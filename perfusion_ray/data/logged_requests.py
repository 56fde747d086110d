"""The default request source of any store: recent logged requests of the train split.

A round's on-policy requests are drawn from the committed group examples whose request time lies within
`window_hours` of the newest one, each logged request equally likely, so merchants and prompts come in
proportion to their traffic. Draws are seeded by (seed, round): a resumed round asks the same as long as
the store has not moved on.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from perfusion_ray.data.store import StoreLayout
from perfusion_ray.errors import PerfusionError
from perfusion_ray.records import Merchant, Request

COLUMNS = ["request_id", "merchant_id", "merchant_features", "merchant_stats", "prompt", "event_time"]


class LoggedRequests:
    def __init__(self, root: str, window_hours: float, seed: int = 0):
        self.layout = StoreLayout(root, "train")
        self.window = dt.timedelta(hours=window_hours)
        self.seed = seed
        self._tables: dict[str, pa.Table] = {}  # group file -> its request columns (committed files never change)

    def _logged(self) -> pa.Table:
        files = self.layout.output_files("groups")
        for path in files:
            if path not in self._tables:
                self._tables[path] = pq.read_table(path, columns=COLUMNS, filesystem=self.layout.filesystem)
        tables = [self._tables[path] for path in files if self._tables[path].num_rows]
        if not tables:
            raise PerfusionError(f"no logged requests under {self.layout.ingest} to draw on-policy requests from",
                                 hint="ingest the store's feedback first (`perfusion data ingest`)")
        return pa.concat_tables(tables)

    def pool(self) -> list[dict]:
        """The logged requests within the recency window, oldest first."""
        table = self._logged()
        times = table["event_time"].to_pylist()
        newest = max(times)
        rows = [row for row, time in zip(table.to_pylist(), times) if time >= newest - self.window]
        return sorted(rows, key=lambda row: (row["event_time"], row["request_id"]))

    def requests(self, round_index: int, count: int) -> list[Request]:
        pool = self.pool()
        rng = np.random.default_rng([self.seed, 19, round_index])
        return [Request(f"online-r{round_index:04d}-{i:04d}", Merchant.from_record(pool[j]), pool[j]["prompt"] or "")
                for i, j in enumerate(rng.integers(0, len(pool), count))]
