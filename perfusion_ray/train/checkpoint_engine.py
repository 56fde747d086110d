"""DeepSpeed checkpoints loaded as data: a checkpoint engine whose load is torch.load(weights_only=True).

DeepSpeed's own TorchCheckpointEngine loads with weights_only=False, so a checkpoint store that others can
write would run their code in every worker that resumes. The files DeepSpeed writes for our engines (ZeRO
0-3, fp32 and bf16) hold tensors, plain values and three DeepSpeed classes: the ZeRO stage enum, the loss
scaler (two numbers) and the tensor-fragment address (two integers). Those are allowed; anything else is
refused. Saving is DeepSpeed's own.
"""

from __future__ import annotations

from pathlib import Path

from perfusion_ray.weights_only import check_torch_files, load_weights_only


def deepspeed_checkpoint_classes() -> list[type]:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


def deepspeed_checkpoint_names() -> set[str]:
    return {f"{cls.__module__}.{cls.__qualname__}" for cls in deepspeed_checkpoint_classes()}


def weights_only_engine(config_params=None):
    """A DeepSpeed checkpoint engine that saves as DeepSpeed does and loads with weights_only=True."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return load_weights_only(path, deepspeed_checkpoint_classes(), map_location)

    return WeightsOnlyCheckpointEngine(config_params)


def use_weights_only_loading(engine) -> None:
    """Replace the engine's checkpoint engine (DeepSpeed builds a TorchCheckpointEngine in initialize)."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        # A writer DeepSpeed configured (fast/decoupled/datastates) has its own load: not silently replaced.
        raise RuntimeError(f"unexpected DeepSpeed checkpoint engine {type(engine.checkpoint_engine).__name__}")
    engine.checkpoint_engine = weights_only_engine(engine._config)


def check_deepspeed_checkpoints(folder: str | Path) -> int:
    """Refuse, before any worker starts, a run folder whose DeepSpeed files ask for code (PerfusionError naming
    the file); returns how many files were checked."""
    if not any(Path(folder).rglob("*.pt")):
        return 0  # a fresh run: no DeepSpeed import on the driver
    return check_torch_files(folder, deepspeed_checkpoint_names())
