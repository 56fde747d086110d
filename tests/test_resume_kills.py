"""Resume that always finishes, and checkpoints read as data.

A Ray Train worker of `rm train` is killed before a checkpoint, one of `align train --offline` during one,
one of the online rounds right after one (tests/resume_drills.py; benchmarks/faults.py kills each run at all
three moments); Ray Train restarts the workers from the last
checkpoint it registered and each run finishes with an uninterrupted run's exactly-once counters and a
quality figure within the run-to-run spread; the rounds consume every fresh partition once. Ray Train keeps
the best export however later epochs tie. A pickle payload in a checkpoint file is refused in one line, never
run: by the loader, by DeepSpeed's checkpoint engine in a worker, and by `--resume` before workers start.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import ray.cloudpickle
import torch

from perfusion_ray.errors import PerfusionError
from perfusion_ray.faults import FAULT_ENV, FAULT_EXIT_CODE, FAULT_ONCE_ENV
from perfusion_ray.weights_only import check_torch_files, load_weights_only
from tests import resume_drills as drills
from tests.conftest import free_port

# Ray workers cannot import this module by pytest's name for it: ship its functions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class _OpensAFile:
    """A pickle payload: unpickling it calls open(path, "w") (io.open), so the file appears if the payload ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _poison(path: Path, ran: Path) -> None:
    torch.save({"optimizer_state_dict": _OpensAFile(ran), "weights": torch.zeros(2)}, path)


# ---------------------------------------------------------------- fault points
def test_a_fault_point_with_a_marker_kills_once(tmp_path):
    marker = tmp_path / "killed"
    env = {**os.environ, FAULT_ENV: "drill:moment", FAULT_ONCE_ENV: str(marker)}
    script = "from perfusion_ray.faults import fault_point; fault_point('drill:moment'); print('went on')"
    first = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == FAULT_EXIT_CODE and "went on" not in first.stdout
    assert marker.read_text().startswith("drill:moment pid=")
    again = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "went on" in again.stdout  # the restarted process is not killed again


# ---------------------------------------------------------------- checkpoints read as data
def test_a_pickle_payload_in_a_checkpoint_file_is_refused_not_run(tmp_path):
    ran = tmp_path / "payload-ran"
    _poison(tmp_path / "model_states.pt", ran)
    with pytest.raises(PerfusionError) as refused:
        load_weights_only(tmp_path / "model_states.pt")
    assert not ran.exists()
    message = str(refused.value)
    assert "model_states.pt" in message and "io.open" in message and "\n" not in message
    assert "weights_only" not in refused.value.message  # torch's own advice (load it unsafely) is not repeated


def test_a_file_that_is_not_a_torch_checkpoint_is_refused_in_one_line(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"\x80\x04not a checkpoint")
    with pytest.raises(PerfusionError, match="junk.pt") as refused:
        load_weights_only(tmp_path / "junk.pt")
    assert "\n" not in str(refused.value)
    with pytest.raises(PerfusionError, match="not a torch checkpoint file"):
        check_torch_files(tmp_path)


def test_deepspeed_files_load_with_their_three_classes_and_nothing_else(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from perfusion_ray.train.checkpoint_engine import check_deepspeed_checkpoints, weights_only_engine

    state = {"zero_stage": ZeroStageEnum(2), "loss_scaler": LossScaler(1.0),
             "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}], "exp_avg": torch.ones(4)}
    torch.save({"optimizer_state_dict": state}, tmp_path / "optim_states.pt")
    engine = weights_only_engine()
    loaded = engine.load(str(tmp_path / "optim_states.pt"), map_location="cpu")["optimizer_state_dict"]
    assert loaded["zero_stage"] is ZeroStageEnum.gradients and loaded["loss_scaler"].cur_scale == 1.0
    assert loaded["param_slice_mappings"][0]["w"] == fragment_address(numel=4, start=0)
    assert check_deepspeed_checkpoints(tmp_path) == 1

    ran = tmp_path / "payload-ran"
    _poison(tmp_path / "optim_states.pt", ran)
    with pytest.raises(PerfusionError, match="optim_states.pt"):
        engine.load(str(tmp_path / "optim_states.pt"))
    with pytest.raises(PerfusionError, match="asks to run io.open"):
        check_deepspeed_checkpoints(tmp_path)
    assert not ran.exists()


def _engine_round_trip(zero_stage: int, folder: str, port: int) -> dict:
    """In a fresh Ray worker (one rank): a DeepSpeedStrategy engine saves, loads its own checkpoint back, then
    meets a poisoned copy of its optimizer file."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"})
    from perfusion_ray.train.distributed import load_engine
    from perfusion_ray.train.strategy import DeepSpeedStrategy

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    strategy = DeepSpeedStrategy(zero_stage=zero_stage, micro_batch=2, warmup_steps=2, total_steps=10)
    engine = strategy.prepare(model)
    for _ in range(2):
        strategy.step(engine, engine(torch.randn(2, 4)).sum())
    engine.save_checkpoint(folder, tag="engine")
    steps = engine.global_steps
    load_engine(engine, folder, folder)
    outcome = {"engine": type(engine.checkpoint_engine).__name__, "restored_steps": engine.global_steps == steps}
    ran = Path(folder) / "payload-ran"
    for path in Path(folder, "engine").glob("*optim_states.pt"):
        _poison(path, ran)
    try:
        load_engine(engine, folder, folder)
        outcome["refused"] = ""
    except PerfusionError as exc:
        outcome["refused"] = str(exc)
    outcome["payload_ran"] = ran.exists()
    return outcome


@pytest.mark.ray
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_a_training_engine_loads_its_checkpoint_as_data_and_refuses_a_payload(ray_cluster, tmp_path, zero_stage):
    import ray

    from perfusion_ray.runtime import worker_env_vars

    task = ray.remote(num_cpus=0.5, max_calls=1, runtime_env={"env_vars": worker_env_vars()})(_engine_round_trip)
    outcome = ray.get(task.remote(zero_stage, str(tmp_path / "checkpoint"), free_port()), timeout=600)
    assert outcome["engine"] == "WeightsOnlyCheckpointEngine" and outcome["restored_steps"]
    assert "refused to load" in outcome["refused"] and "optim_states.pt" in outcome["refused"]
    assert not outcome["payload_ran"]


# ---------------------------------------------------------------- the best export is never pruned
def _tied_epochs(loop: dict) -> None:
    """Epochs whose validation GAUC ties (and then falls below) the best, reported as rm train reports them."""
    import tempfile

    import ray.train
    from ray.train import Checkpoint

    from perfusion_ray.train.reward_model import early_stopping_update, export_rank

    best, stale = -1.0, 0
    for epoch, validation in enumerate(loop["curve"], start=1):
        improved, best, stale = early_stopping_update(best, stale, validation)
        with tempfile.TemporaryDirectory() as folder:
            if improved:
                (Path(folder) / "model").mkdir()
                (Path(folder) / "model" / "epoch").write_text(str(epoch))
            ray.train.report({"epoch": epoch, "val_gauc": validation, "best_val_gauc": best,
                              "export_rank": export_rank(improved, epoch)}, checkpoint=Checkpoint.from_directory(folder))


@pytest.mark.ray
def test_ray_train_keeps_the_best_export_when_later_epochs_tie_it(ray_cluster, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from perfusion_ray.train.reward_model import best_export, checkpoint_config

    curve = [0.70, 0.80, 0.80, 0.80, 0.79]  # epoch 2 exports; 3-5 tie or fall and export nothing
    trainer = TorchTrainer(_tied_epochs, train_loop_config={"curve": curve},
                           scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
                           run_config=RunConfig(name="tied", storage_path=str(tmp_path),
                                                checkpoint_config=checkpoint_config()))
    result = trainer.fit()
    checkpoint, metrics = best_export(result)
    assert metrics["epoch"] == 2 and metrics["best_val_gauc"] == 0.80
    with checkpoint.as_directory() as folder:
        assert (Path(folder) / "model" / "epoch").read_text() == "2"


# ---------------------------------------------------------------- worker kills: rm train
@pytest.fixture(scope="module")
def rm_store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rm-store")
    drills.prepare_rm_store(folder)
    return folder


@pytest.fixture(scope="module")
def rm_reference(rm_store, ray_cluster, tmp_path_factory) -> drills.Drill:
    reference = drills.rm_drill(rm_store, tmp_path_factory.mktemp("rm-reference"))
    assert reference.finished, reference.error
    return reference


def _assert_resumed_like(drill: drills.Drill, reference: drills.Drill, spread: float) -> None:
    assert drill.killed, f"the kill at {drill.moment} did not fire"
    assert drill.finished, f"{drill.run} killed at {drill.moment} did not finish: {drill.error}"
    assert drill.counts == reference.counts  # exactly once: nothing trained twice or skipped in the state
    assert abs(drill.metric - reference.metric) <= spread, (drill.metric, reference.metric, spread)


@pytest.mark.ray
@pytest.mark.timeout(900)
@pytest.mark.parametrize("moment", [drills.SUITE_MOMENTS["rm"]])
def test_rm_train_finishes_after_a_worker_kill(rm_store, rm_reference, tmp_path, moment):
    drill = drills.rm_drill(rm_store, tmp_path / "rm", moment)
    _assert_resumed_like(drill, rm_reference, drills.RM_GAUC_SPREAD)
    assert 0 <= drill.restored_from <= drills.reported_before_kill(moment)


@pytest.mark.ray
def test_resume_refuses_a_poisoned_checkpoint_in_one_line_before_workers_start(rm_store, rm_reference, tmp_path,
                                                                               capsys):
    from perfusion_ray.cli import main
    from perfusion_ray.train.reward_model import RUN_NAME

    out = tmp_path / "rm"
    shutil.copytree(rm_reference.out, out)
    ran = tmp_path / "payload-ran"
    optimizer_files = sorted(out.glob(f"ray_results/{RUN_NAME}/checkpoint_*/engine/*optim_states.pt"))
    assert optimizer_files
    _poison(optimizer_files[-1], ran)
    args = ["rm", "train", "--resume", "--set", f"data.root={rm_store / 'data'}", "--set", f"rm.out={out}",
            "--set", f"rm.epochs={drills.RM_EPOCHS + 1}", "--set", "rm.batch_groups=8"]
    assert main(args) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[0].startswith("error: refused to load ") and "asks to run io.open" in error[0]
    assert len(error) == 2 and error[1].startswith("hint: ")  # no traceback
    assert not ran.exists()


# ---------------------------------------------------------------- worker kills: align train --offline
@pytest.fixture(scope="module")
def offline_reference(rm_store, ray_cluster, tmp_path_factory) -> drills.Drill:
    reference = drills.offline_drill(rm_store, tmp_path_factory.mktemp("offline-reference"))
    assert reference.finished, reference.error
    return reference


@pytest.mark.ray
@pytest.mark.timeout(900)
@pytest.mark.parametrize("moment", [drills.SUITE_MOMENTS["offline"]])
def test_offline_alignment_finishes_after_a_worker_kill(rm_store, offline_reference, tmp_path, moment):
    drill = drills.offline_drill(rm_store, tmp_path / "align", moment)
    _assert_resumed_like(drill, offline_reference, drills.OFFLINE_LOSS_SPREAD)
    assert 0 <= drill.restored_from <= drills.reported_before_kill(moment)


# ---------------------------------------------------------------- worker kills: the online rounds
@pytest.fixture(scope="module")
def online_store(tmp_path_factory, ray_cluster):
    from ray import serve

    folder = tmp_path_factory.mktemp("online-store") / "template"
    port = free_port()
    fresh = drills.prepare_online_store(folder, port)
    reference = drills.online_drill(folder, fresh, folder.parent / "reference", port)
    assert reference.finished, reference.error
    yield folder, fresh, port, reference
    serve.shutdown()


@pytest.mark.ray
@pytest.mark.timeout(900)
@pytest.mark.parametrize("moment", [drills.SUITE_MOMENTS["online"]])
def test_online_rounds_finish_after_a_worker_kill_and_consume_each_partition_once(online_store, tmp_path, moment):
    template, fresh, port, reference = online_store
    drill = drills.online_drill(template, fresh, tmp_path / "run", port, moment)
    _assert_resumed_like(drill, reference, drills.ONLINE_REWARD_SPREAD)
    assert drill.consumed == reference.consumed == fresh[:drills.ONLINE_ROUNDS]
    assert drill.consumed_twice == drill.lost == 0
