"""Where each round's metrics go: rounds.jsonl, TensorBoard event files, and the live progress bar; and what
each round asked for: requests.jsonl (round, request id, merchant id, prompt)."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsSink:
    def __init__(self, out: Path, rounds: int, first: int, tensorboard: bool = True, progress: bool = True):
        self.out, self.tensorboard = out, tensorboard
        self._writer = None
        self._bar = None
        if progress:
            from tqdm.auto import tqdm

            from perfusion_ray.console import stream

            self._bar = tqdm(total=rounds, initial=first, desc="online rounds", unit="round", file=stream())

    def record_requests(self, round_index: int, requests) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "requests.jsonl", "a") as handle:
            for request in requests:
                handle.write(json.dumps({"round": round_index, "request_id": request.request_id,
                                         "merchant_id": request.merchant.id, "prompt": request.prompt}) + "\n")

    def record(self, metrics: dict) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "rounds.jsonl", "a") as handle:
            handle.write(json.dumps(metrics) + "\n")
        if self.tensorboard:
            if self._writer is None:
                from tensorboardX import SummaryWriter

                self._writer = SummaryWriter(str(self.out / "tensorboard"))
            for name, value in metrics.items():
                if isinstance(value, (int, float)) and name != "round":
                    self._writer.add_scalar(f"online/{name}", value, metrics["round"])
            self._writer.flush()
        if self._bar is not None:
            self._bar.update(1)
            shown = {name: f"{metrics[name]:.3f}" for name in ("rm_reward", "probe_utility", "loss") if name in metrics}
            self._bar.set_postfix(**shown, fresh=metrics.get("fresh_partitions", 0))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._bar is not None:
            self._bar.close()
