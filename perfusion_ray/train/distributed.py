"""What the Ray Train loops share: the TorchTrainer for a run section, and small collectives (no-ops in a
single process)."""

from __future__ import annotations

from pathlib import Path

import torch

from perfusion_ray.config import ClusterConfig, DistributedTraining


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sums over every rank (the values themselves outside a process group)."""
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def torch_trainer(loop, loop_config: dict, run: DistributedTraining, cluster: ClusterConfig, name: str,
                  storage: str | Path, datasets: dict, checkpoint_config=None):
    """A TorchTrainer for `run` (workers, GPU or CPU share, gloo or NCCL), restarting once on a worker
    failure from the latest checkpoint, with this package's worker environment. `storage` (a local path or
    a URI) holds the checkpoints; every worker writes its part there, so on several nodes it must be a
    folder all of them reach (an object store or a shared file system). The local checkpoints a resume
    would load are checked first: a file that asks to run code is refused here, in one line (on an object
    store the workers' weights_only loading is the check)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from perfusion_ray.faults import fault_env
    from perfusion_ray.runtime import worker_env_vars
    from perfusion_ray.storage import ray_storage
    from perfusion_ray.train.checkpoint_engine import check_deepspeed_checkpoints

    storage_path, storage_filesystem = ray_storage(storage)
    if storage_filesystem is None:
        check_deepspeed_checkpoints(Path(storage_path) / name)
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=run.num_workers, use_gpu=run.use_gpu,
                                     resources_per_worker=None if run.use_gpu else {"CPU": cluster.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if run.use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=storage_path, storage_filesystem=storage_filesystem,
                             checkpoint_config=checkpoint_config or CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=1),
                             worker_runtime_env={"env_vars": {**worker_env_vars(), **fault_env()}}),
        datasets=datasets,
        dataset_config=DataConfig(execution_options=ordered_ingest_options()),
    )


def ordered_ingest_options():
    """Ray Train's ingest options with the block order kept: every run over the same files hands each rank
    the same batches in the same order, so a rerun or a resumed run trains on what the first run did
    (Ray Data otherwise splits by locality and finish order)."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def materialize_in_order(dataset):
    """`dataset` executed once into the object store, its blocks in the order of its input files."""
    dataset.context.execution_options.preserve_order = True
    return dataset.materialize()


def restore_latest(engine, state: dict, read_extra=None) -> dict:
    """Load Ray Train's latest checkpoint (engine + state.json) into `engine`; its state, else `state`.
    read_extra(folder), when given, reads whatever else the checkpoint holds (see report_with_checkpoint)."""
    import json

    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return state
    with checkpoint.as_directory() as folder:
        load_engine(engine, folder, checkpoint.path)
        if read_extra is not None:
            read_extra(Path(folder))
        return json.loads((Path(folder) / "state.json").read_text())


def load_engine(engine, folder: str | Path, where: str) -> None:
    """The engine's state from a checkpoint folder (files read as data, train/checkpoint_engine.py); a
    checkpoint without one is an error, not a silent fresh start beside a restored state.json."""
    from perfusion_ray.errors import PerfusionError

    load_path, _ = engine.load_checkpoint(str(folder), tag="engine")
    if load_path is None:
        raise PerfusionError(f"the checkpoint {where} holds no DeepSpeed engine state")


def report_with_checkpoint(engine, state: dict, metrics: dict, export=None, moment: str = "") -> None:
    """ray.train.report with a checkpoint: every rank saves the engine (collective), rank 0 adds
    state.json and, when given, `export(folder)` (e.g. the exported model).

    The checkpoint counts once every rank's report reached Ray Train's controller, which polls for them:
    a worker that dies within about a second of its report can take the checkpoint with it, and the run
    then resumes from the one before. Everything a run must do exactly once is therefore in state.json,
    written in the same checkpoint as the engine it goes with. `moment` names the crash points
    (faults.py) <moment>:saved (files written, not reported) and <moment>:reported."""
    import json
    import tempfile

    import ray.train
    from ray.train import Checkpoint

    from perfusion_ray.faults import fault_point

    with tempfile.TemporaryDirectory() as folder:
        engine.save_checkpoint(folder, tag="engine")
        if ray.train.get_context().get_world_rank() == 0:
            (Path(folder) / "state.json").write_text(json.dumps(state))
            if export is not None:
                export(Path(folder))
        if moment:
            fault_point(f"{moment}:saved")
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))
        if moment:
            fault_point(f"{moment}:reported")
