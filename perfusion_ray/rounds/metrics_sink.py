"""Where each round's metrics go: rounds.jsonl, TensorBoard event files, and the live progress bar; and what
each round asked for: requests.jsonl (round, request id, merchant id, prompt).

The run folder is a local path or a URI. On a URI the JSON lines files are rewritten whole each round (object
stores do not append) and the event files are written locally (storage.log_file's folder) and uploaded after
every round."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from perfusion_ray.storage import append_text, is_uri, join, log_file, write_bytes


class MetricsSink:
    def __init__(self, out: str | Path, rounds: int, first: int, tensorboard: bool = True, progress: bool = True):
        self.out, self.tensorboard = str(out), tensorboard
        self._events = Path(self.out) / "tensorboard" if not is_uri(out) else log_file(out, "tensorboard")
        if is_uri(out) and first == 0:  # a fresh run: no event file of an earlier one is uploaded with it
            shutil.rmtree(self._events, ignore_errors=True)
        self._writer = None
        self._bar = None
        if progress:
            from tqdm.auto import tqdm

            from perfusion_ray.console import stream

            self._bar = tqdm(total=rounds, initial=first, desc="online rounds", unit="round", file=stream())

    def record_requests(self, round_index: int, requests) -> None:
        append_text(join(self.out, "requests.jsonl"), "".join(
            json.dumps({"round": round_index, "request_id": request.request_id, "merchant_id": request.merchant.id,
                        "prompt": request.prompt}) + "\n" for request in requests))

    def record(self, metrics: dict) -> None:
        append_text(join(self.out, "rounds.jsonl"), json.dumps(metrics) + "\n")
        if self.tensorboard:
            if self._writer is None:
                from tensorboardX import SummaryWriter

                self._writer = SummaryWriter(str(self._events))
            for name, value in metrics.items():
                if isinstance(value, (int, float)) and name != "round":
                    self._writer.add_scalar(f"online/{name}", value, metrics["round"])
            self._writer.flush()
            if is_uri(self.out):
                for events in self._events.glob("events.out.tfevents.*"):
                    write_bytes(join(self.out, "tensorboard", events.name), events.read_bytes())
        if self._bar is not None:
            self._bar.update(1)
            shown = {name: f"{metrics[name]:.3f}" for name in ("rm_reward", "probe_utility", "loss") if name in metrics}
            self._bar.set_postfix(**shown, fresh=metrics.get("fresh_partitions", 0))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._bar is not None:
            self._bar.close()
