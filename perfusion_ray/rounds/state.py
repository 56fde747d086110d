"""The round state the controller owns and every round checkpoint stores (as state.json).

Exactly once: ingest commits each partition file into exactly one ingest run; `consumed_runs` lists the
runs the rounds have consumed. A committed run missing from it (a crash after ingest, before the round's
checkpoint) is consumed by the next round before anything new is ingested, so after a crash at any point
no partition is lost or consumed twice.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


@dataclass
class RoundState:
    round: int = 0  # rounds completed
    steps: int = 0  # optimizer steps taken
    consumed_runs: list[str] = field(default_factory=list)  # ingest runs the rounds consumed (the watermark)
    consumed_partitions: list[str] = field(default_factory=list)  # their partition files, in order
    baseline_runs: list[str] = field(default_factory=list)  # runs ingested before the loop: logged, not fresh
    pending_refresh_runs: list[str] = field(default_factory=list)  # consumed since the last RM refresh
    rm_dir: str = ""  # the reward model the endpoint serves
    rm_version: str = ""
    history: list[dict] = field(default_factory=list)  # one metrics record per round
    best_probe_round: int = -1  # the round whose averaged policy scored best on the probe set (-1: no probe yet)
    best_probe_utility: float | None = None
    stopped: str = ""  # why the rounds stopped before online.rounds (the over-optimization guard), else empty

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "RoundState":
        return cls(**json.loads(text))

    def logged_runs(self) -> list[str]:
        """The runs whose groups are logged feedback for the optimizer: the baseline and every consumed one."""
        return self.baseline_runs + self.consumed_runs
