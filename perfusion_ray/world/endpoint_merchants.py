"""FashionWorld client mode: the simulated merchants use the product API like real ones.

Each simulated request asks the design endpoint for K candidates (POST /v1/designs), looks at them with
the merchant's hidden taste (the oracle), selects by the same Plackett-Luce rule as the simulator, lets
the shoppers click / order / return the listed items, and posts all of it (POST /v1/feedback). The
endpoint writes the impressions and the feedback into the store; ingest and the online rounds read them
from there like any other feedback. Counts every event the endpoint accepted, so a run can check
sent == stored == ingested + quarantined.
"""

from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from perfusion_ray.records import Merchant
from perfusion_ray.serve.design_schemas import FeedbackEvent
from perfusion_ray.serve.schemas import RewardRequestError
from perfusion_ray.world.catalogue import prompt_text
from perfusion_ray.world.oracle import attribute_profile
from perfusion_ray.world.simulator import World, draw_requests, merchant_picks, shopper_events


@dataclass
class ClientCounts:
    """What the simulated merchants did through the API (events counted once the endpoint accepted them)."""

    requests: int = 0
    impressions: int = 0  # candidates returned: the endpoint logged each as an impression
    feedback_events: int = 0  # select / click / order / return events accepted
    rate_limited: int = 0  # 429 answers (waited for Retry-After, then sent again)
    failed: list[str] = field(default_factory=list)  # requests that failed for good (should stay empty)
    utilities: list[float] = field(default_factory=list)  # oracle utility of every returned candidate

    @property
    def events(self) -> int:
        return self.impressions + self.feedback_events


def reactions(utility: np.ndarray, world: World, rng: np.random.Generator) -> list[FeedbackEvent]:
    """The merchant's selections and the shoppers' clicks / orders / returns on one group, as API events."""
    chosen = merchant_picks(utility, world.config.world, rng)
    clicks, orders, returns = shopper_events(utility[chosen], world.config.world.shoppers, rng)
    events = [FeedbackEvent("select", int(p), f"select-{p}") for p in chosen]
    for kind, counts in (("click", clicks), ("order", orders), ("return", returns)):
        events += [FeedbackEvent(kind, int(p), f"{kind}-{p}-{n}") for p, count in zip(chosen, counts)
                   for n in range(int(count))]
    return events


class EndpointMerchants:
    """Drives a designer (serve.design_client.DesignClient over HTTP, or the handle client) with the
    world's seen merchants; `run` sends requests until a count or a stop event, `concurrency` at a time
    (requests of different merchants then share the endpoint's batches)."""

    def __init__(self, world: World, designer, seed: int = 0, concurrency: int = 4, max_retries: int = 20):
        self.world, self.designer, self.seed = world, designer, seed
        self.concurrency, self.max_retries = concurrency, max_retries
        self.counts = ClientCounts()
        self._lock = threading.Lock()

    def request(self, index: int) -> None:
        """One request: design, react, feedback. Seeded by (seed, index): the same index asks the same."""
        rng = np.random.default_rng([self.seed, 21, index])
        population = self.world.merchants
        m = int(rng.choice(population.seen_indices))
        classes, asked = draw_requests(self.world, np.array([m]), rng)
        prompt = prompt_text(int(classes[0]), *[None if a < 0 else int(a) for a in asked[0]])
        merchant = Merchant(population.ids[m], dict(population.features[m]), dict(population.stats[m]))
        result = self._retry(lambda: self.designer.design(merchant, prompt, seed=int(rng.integers(2**31))))
        utility = attribute_profile(result.images) @ population.tastes[m]
        with self._lock:
            self.counts.requests += 1
            self.counts.impressions += len(result.candidates)
            self.counts.utilities += utility.tolist()
        events = reactions(utility, self.world, rng)
        accepted = self._retry(lambda: self.designer.feedback(result, events))
        with self._lock:
            self.counts.feedback_events += len(accepted.accepted) + len(accepted.duplicates)

    def _retry(self, call):
        """Wait out 429s (Retry-After), as a polite client does; anything else is a failure."""
        for _ in range(self.max_retries):
            try:
                return call()
            except RewardRequestError as exc:
                if exc.status != 429:
                    raise
                with self._lock:
                    self.counts.rate_limited += 1
                time.sleep(exc.retry_after_s or 1.0)
        raise RuntimeError(f"still rate limited after {self.max_retries} tries")

    def run(self, requests: int | None = None, stop: threading.Event | None = None, first_index: int = 0) -> ClientCounts:
        """Send requests `first_index`, `first_index + 1`, ... until `requests` were sent or `stop` is set."""
        stop = stop or threading.Event()
        indices = iter(range(first_index, first_index + requests) if requests is not None else itertools.count(first_index))
        lock = threading.Lock()

        def worker() -> None:
            while not stop.is_set():
                with lock:
                    index = next(indices, None)
                if index is None:
                    return
                try:
                    self.request(index)
                except Exception as exc:  # noqa: BLE001 - counted and shown; the run goes on
                    with self._lock:
                        self.counts.failed.append(f"request {index}: {exc!r}"[:300])

        with ThreadPoolExecutor(self.concurrency) as pool:
            for future in [pool.submit(worker) for _ in range(self.concurrency)]:
                future.result()
        return self.counts
