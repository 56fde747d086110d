"""The online alignment rounds (`perfusion align`): a single controller on the driver, veRL-style.

The driver serves the RM, starts one TorchTrainer whose workers stay alive for every round
(train/round_worker.py), and runs the `RoundController`, which owns the round state (rounds/state.py) and,
per round:
  1. plans: fresh feedback partitions past the watermark -> Ray Data ingest -> their group files, and the
     round's requests from the environment's request source (rounds/planner.py);
  2. every online.rm_refresh_every rounds refreshes the RM on the groups consumed since the last refresh and
     rolls the reward endpoint to it (rounds/rollouts.py);
  3. has the workers generate K images per request with the current policy, and score them through the
     Serve deployment handle (on-policy); P/N come from the RM's ranking;
  4. has the workers take online.steps_per_round group-objective steps on a mix of on-policy and logged groups;
  5. probes the averaged policy on fixed held-out requests with fixed noise (rounds/probe.py): gold utility
     by the oracle, else the judge, and the serving RM's reward (the proxy); keeps the best probe policy, and
     stops early when the proxy rises while the gold falls (rounds/guard.py);
  6. publishes the averaged policy to the design endpoint every online.publish_every rounds;
  7. checkpoints the round on the workers (engine, averaged and best policy, state) and records its metrics
     (rounds/metrics_sink.py).
The environment's oracle, when it has one, also reports the utility of each round's own groups; nothing needs it.
A worker failure makes Ray Train restart the workers from the last round checkpoint; the controller then
continues from the state they restored, and the exactly-once bookkeeping of RoundState keeps every
partition consumed once.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from perfusion_ray.config import PerfusionConfig
from perfusion_ray.environment import Environment, build_environment
from perfusion_ray.errors import PerfusionError
from perfusion_ray.rounds.metrics_sink import MetricsSink
from perfusion_ray.rounds.guard import should_stop
from perfusion_ray.rounds.planner import RoundPlanner
from perfusion_ray.rounds.probe import PROBE_SEED, Probe, build_probe
from perfusion_ray.rounds.rollouts import EndpointRollouts
from perfusion_ray.rounds.state import RoundState
from perfusion_ray.storage import join
from perfusion_ray.train.worker_group import WorkerGroup, WorkerGroupRestarted

CHANNEL_NAME = "perfusion-round-channel"
RUN_NAME = "align-online"


class RoundController:
    def __init__(self, config: PerfusionConfig, environment: Environment, group: WorkerGroup, state: RoundState,
                 sink: MetricsSink, rollouts: EndpointRollouts, probe: Probe | None = None):
        self.config, self.environment, self.group = config, environment, group
        self.state, self.sink, self.rollouts, self.probe = state, sink, rollouts, probe
        self.planner = RoundPlanner(config, environment.request_source)
        self.initial = dataclasses.replace(state)

    def run(self) -> RoundState:
        while self.state.round < self.config.online.rounds and not self.state.stopped:
            try:
                self.run_round()
            except WorkerGroupRestarted as restart:
                self.state = restart.restored or self.initial
                self.state.rm_version = self.rollouts.ensure_rm(self.state.rm_dir)
        return self.state

    def run_round(self) -> None:
        from perfusion_ray.train.on_policy import reward_labels

        online, state = self.config.online, self.state
        r = state.round
        times: dict[str, float] = {}
        clock = time.perf_counter()
        plan = self.planner.plan(state)
        self.group.call("add_logged", plan.fresh_group_files)
        pending = state.pending_refresh_runs + plan.fresh_runs
        times["plan_seconds"] = _lap(clock)

        clock = time.perf_counter()
        rm_dir, rm_version = state.rm_dir, state.rm_version
        if online.rm_refresh_every and (r + 1) % online.rm_refresh_every == 0 and pending:
            refreshed = self.group.call("refresh_rm", self.planner.layout.output_files("groups", pending), rm_dir, r)
            if refreshed is not None:
                rm_dir, rm_version, pending = refreshed, self.rollouts.ensure_rm(refreshed), []
        times["rm_refresh_seconds"] = _lap(clock)

        clock = time.perf_counter()
        groups = self.group.call("generate", plan.requests, online.seed * 7919 + r)
        times["generate_seconds"] = _lap(clock)
        clock = time.perf_counter()
        scores = self.group.call("score", groups)
        groups.labels = reward_labels(scores, online.split, online.top_m, online.margin)
        times["score_seconds"] = _lap(clock)
        monitored = self._monitor(groups)

        steps = self.group.call("train_steps", groups, r)
        metrics = {"round": r, "rm_reward": float(scores.mean()), **monitored, **steps, **times,
                   "steps": state.steps + online.steps_per_round, "fresh_partitions": len(plan.fresh_partitions),
                   "fresh_runs": len(plan.fresh_runs), "rm_version": rm_version}
        best_round, best_utility, stopped = state.best_probe_round, state.best_probe_utility, ""
        if self.probe is not None:
            clock = time.perf_counter()
            metrics.update(self._run_probe())
            if best_utility is None or metrics["probe_utility"] > best_utility:
                best_round, best_utility = r, metrics["probe_utility"]
                self.group.call("keep_best")
            history = state.history + [metrics]
            if should_stop([m["probe_proxy"] for m in history], [m["probe_utility"] for m in history],
                           online.guard_rounds, online.guard_tolerance):
                stopped = (f"over-optimization guard: for {online.guard_rounds} rounds up to round {r} the probe's "
                           f"gold utility stayed more than {online.guard_tolerance:g} below round {best_round}'s while "
                           f"its RM reward stayed above it; shipping round {best_round}")
            metrics["probe_seconds"] = _lap(clock)
        final = r + 1 >= online.rounds or bool(stopped)
        if online.publish_every and (r + 1) % online.publish_every == 0 and not final:
            clock = time.perf_counter()
            target = join(online.out, "policy", f"round-{r:04d}")
            metrics["policy_version"] = self.rollouts.publish_policy(self.group.call("export_policy", target)) or ""
            metrics["publish_seconds"] = _lap(clock)
        metrics["round_seconds"] = sum(value for name, value in metrics.items() if name.endswith("_seconds")
                                       and name != "round_seconds")
        new_state = RoundState(round=r + 1, steps=metrics["steps"], consumed_runs=state.consumed_runs + plan.fresh_runs,
                               consumed_partitions=state.consumed_partitions + plan.fresh_partitions,
                               baseline_runs=state.baseline_runs, pending_refresh_runs=pending, rm_dir=rm_dir,
                               rm_version=rm_version, history=state.history + [metrics], best_probe_round=best_round,
                               best_probe_utility=best_utility, stopped=stopped)
        self.group.call("checkpoint", new_state, metrics, final)
        self.state = new_state
        self.sink.record_requests(r, plan.requests)
        self.sink.record(metrics)

    def _run_probe(self) -> dict[str, float]:
        """The averaged policy on the probe set: gold utility (oracle or judge) and the serving RM's reward."""
        groups = self.group.call("probe", self.probe.requests, self.config.online.seed * 7919 + PROBE_SEED)
        return {**self.probe.gold_utility(groups), "probe_proxy": float(self.group.call("score", groups).mean()),
                "probe_judge": self.probe.gold.name}

    def _monitor(self, groups) -> dict[str, float]:
        """What the environment's oracle says of the round's own groups (nothing when it has none)."""
        oracle = self.environment.oracle
        if oracle is None:
            return {}
        merchants, _, images = groups.candidates()
        return {"oracle_utility": float(np.mean(oracle.utility(merchants, images)))}


def _lap(started: float) -> float:
    return time.perf_counter() - started


# ---------------------------------------------------------------- driver
@dataclass
class OnlineReport:
    pipeline_dir: Path | str  # a local folder, or the URI it was published to
    rounds: int
    resumed_from_round: int
    consumed_partitions: list[str]
    history: list[dict]
    rm_version: str
    seconds: float
    best_probe_round: int = -1  # the round whose policy ships (online.ship=best_probe), -1 without a probe
    stopped: str = ""  # why the rounds ended early, if they did


def _initial_rm(config: PerfusionConfig, rm_dir: str | Path | None) -> str:
    from perfusion_ray.serve.reward_app import default_model_dir
    from perfusion_ray.storage import absolute, is_file

    path = absolute(rm_dir or default_model_dir(config))
    if not is_file(join(path, "config.json")):
        raise PerfusionError(f"no reward model at {path}", hint="train one with `perfusion rm train` first")
    return path


def export_initial_policy(config: PerfusionConfig, folder: str | Path) -> Path:
    """The policy the rounds start from (the base model: the branch's joins are zero) as a PerFusionPipeline,
    e.g. for the design endpoint to serve before the first round publishes."""
    import tempfile

    from perfusion_ray.storage import absolute, path_or_uri, publish_directory
    from perfusion_ray.train.align_offline import export_pipeline, policy_merchants

    folder = absolute(folder)
    with tempfile.TemporaryDirectory() as staging:
        export_pipeline(config, policy_merchants(config), None, Path(staging) / "pipeline")
        publish_directory(Path(staging) / "pipeline", folder)
    return path_or_uri(folder)


def start_reward_endpoint(config: PerfusionConfig, rm_dir: str | Path) -> None:
    """Ray, Serve's proxy, and the reward app serving `rm_dir` unless one is deployed already."""
    from perfusion_ray.runtime import init_ray
    from perfusion_ray.serve.apps import deploy, live_declarative_apps, start_serve
    from perfusion_ray.serve.reward_app import application_entry

    init_ray(config.cluster)
    start_serve(config)
    if config.serve.app_name not in live_declarative_apps():
        deploy(application_entry(config, config.source, model_dir=rm_dir))


def _baseline_runs(config: PerfusionConfig, out: str) -> list[str]:
    """The ingest runs committed before the first round: logged feedback, not fresh (the RM already saw them).
    Recorded when the run starts, so a resume that finds no round checkpoint (a crash during the first round)
    does not take the crashed run's own ingests for baseline."""
    from perfusion_ray.data.store import StoreLayout
    from perfusion_ray.storage import load_json, write_json

    path = join(out, "baseline_runs.json")
    recorded = load_json(path)
    if recorded is None:
        recorded = StoreLayout(config.data.root, "train").committed_runs()
        write_json(path, recorded)
    return list(recorded)


class _Fit(threading.Thread):
    """trainer.fit() in a thread, so the controller drives the workers from the driver's main thread."""

    def __init__(self, trainer):
        super().__init__(daemon=True, name="round-workers")
        self.trainer, self.result, self.error = trainer, None, None

    def run(self) -> None:
        try:
            self.result = self.trainer.fit()
            self.error = self.result.error
        except BaseException as exc:  # noqa: BLE001 - re-raised by the controller's thread
            self.error = exc


def run_online(config: PerfusionConfig, resume: bool = False, rm_dir: str | Path | None = None,
               progress: bool = True) -> OnlineReport:
    """The alignment rounds: serve the RM, start the long-lived workers, run every round from the driver,
    and export the final policy to <online.out>/pipeline."""
    import ray

    from perfusion_ray.storage import delete_tree, path_or_uri, publish_directory
    from perfusion_ray.train.align_offline import policy_merchants
    from perfusion_ray.train.distributed import torch_trainer
    from perfusion_ray.train.round_worker import RoundLoopConfig, RoundWorker, round_loop_per_worker
    from perfusion_ray.train.worker_group import CommandChannel

    started = time.perf_counter()
    config = config.with_absolute_paths()
    online = config.online
    out = online.out  # absolute or a URI (with_absolute_paths)
    if not resume:
        delete_tree(out)
    rm_path = _initial_rm(config, rm_dir)
    environment = build_environment(config)
    start_reward_endpoint(config, rm_path)
    workers = config.align.num_workers
    channel = ray.remote(CommandChannel).options(name=CHANNEL_NAME, num_cpus=0).remote(workers)
    initial = RoundState(baseline_runs=_baseline_runs(config, out), rm_dir=str(rm_path))
    loop = RoundLoopConfig(config.model_dump(mode="json"), policy_merchants(config), CHANNEL_NAME, initial)
    fit = _Fit(torch_trainer(round_loop_per_worker, {"loop": loop}, config.align, config.cluster, RUN_NAME,
                             join(out, "ray_results"), {}))
    fit.start()
    group = WorkerGroup(RoundWorker, channel, workers, fit, lambda: fit.error)
    rollouts = EndpointRollouts(config)
    probe = build_probe(config, environment)
    sink = None
    try:
        state = group.wait_ready() or initial
        resumed_from = state.round
        state.rm_version = rollouts.ensure_rm(state.rm_dir)
        sink = MetricsSink(out, online.rounds, resumed_from, online.tensorboard, progress)
        state = RoundController(config, environment, group, state, sink, rollouts, probe).run()
        group.stop()
        fit.join()
    finally:
        if sink is not None:
            sink.close()
        ray.kill(channel)
    if fit.error:
        raise fit.error
    with fit.result.checkpoint.as_directory() as folder:
        exported = Path(folder) / "pipeline"
        if not exported.is_dir():
            raise PerfusionError(f"the last checkpoint {fit.result.checkpoint.path} has no exported pipeline")
        publish_directory(exported, join(out, "pipeline"))
    return OnlineReport(path_or_uri(join(out, "pipeline")), state.round, resumed_from, state.consumed_partitions, state.history,
                        state.rm_version, time.perf_counter() - started, state.best_probe_round, state.stopped)
