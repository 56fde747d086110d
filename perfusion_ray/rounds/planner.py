"""What one round works on: the fresh feedback past the watermark and the round's on-policy requests.

Fresh feedback is the oldest committed ingest run that no round has consumed (a crashed round's, or the
one prefetched while the previous round trained), else a new ingest of at most online.partitions_per_round
partition files. Once a round is planned, the next round's ingest starts in the background, so Ray Data
works while the workers generate and optimize.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from perfusion_ray.config import PerfusionConfig
from perfusion_ray.data.store import StoreLayout
from perfusion_ray.environment import RequestSource
from perfusion_ray.faults import fault_point
from perfusion_ray.records import Request
from perfusion_ray.rounds.state import RoundState


@dataclass(frozen=True)
class RoundPlan:
    round: int
    fresh_runs: list[str]  # ingest runs this round consumes
    fresh_partitions: list[str]  # their feedback partition files (relative to the feedback root)
    fresh_group_files: list[str]
    requests: list[Request]


def _quiet_ray_data() -> None:
    """No Ray Data progress bars from the rounds' small ingests (they would drown the round view)."""
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False


class RoundPlanner:
    def __init__(self, config: PerfusionConfig, requests: RequestSource):
        self.config, self.request_source = config, requests
        self.layout = StoreLayout(config.data.root, "train")
        self._prefetch: threading.Thread | None = None
        self._prefetch_error: BaseException | None = None
        _quiet_ray_data()

    def plan(self, state: RoundState) -> RoundPlan:
        r = state.round
        self._finish_prefetch()
        fresh = self._unconsumed_runs(set(state.consumed_runs) | set(state.baseline_runs))[:1]
        if not fresh:
            fresh = [run for run in [self._ingest(r)] if run]
        partitions = sorted(name for run in fresh for name in self._manifest(run)["files"])
        if r + 1 < self.config.online.rounds:
            self._prefetch = threading.Thread(target=self._ingest_in_background, args=(r + 1,), daemon=True)
            self._prefetch.start()
        requests = self.request_source.requests(r, self.config.online.requests_per_round)
        return RoundPlan(r, fresh, partitions, self.layout.output_files("groups", fresh), requests)

    def committed_runs(self) -> list[str]:
        return self.layout.committed_runs()

    def _manifest(self, run: str) -> dict:
        from perfusion_ray.data.ingest import run_manifest

        return run_manifest(self.layout, run)

    def _unconsumed_runs(self, known: set[str]) -> list[str]:
        """Committed runs no round consumed, oldest feedback first."""
        runs = [run for run in self.layout.committed_runs() if run not in known]
        return sorted(runs, key=lambda run: min(self._manifest(run)["files"], default=""))

    def _ingest(self, round_index: int) -> str | None:
        from perfusion_ray.data.ingest import ingest

        report = ingest(self.config, "train", "ray", max_files=self.config.online.partitions_per_round)
        fault_point(f"online:round{round_index}:ingested")
        return report.run_id

    def _ingest_in_background(self, round_index: int) -> None:
        try:
            self._ingest(round_index)
        except BaseException as exc:  # noqa: BLE001 - raised by the next plan(), in the controller's thread
            self._prefetch_error = exc

    def _finish_prefetch(self) -> None:
        if self._prefetch is not None:
            self._prefetch.join()
            self._prefetch = None
        if self._prefetch_error is not None:
            error, self._prefetch_error = self._prefetch_error, None
            raise error
