"""Torch checkpoint files read as data, never as code.

A torch.save file is a pickle: loaded with weights_only=False, whoever can write the checkpoint store can run
code in every process that resumes from it. Every torch file this package reads goes through
torch.load(weights_only=True), which rebuilds tensors, containers and plain values only, plus the few
classes a caller names (DeepSpeed's checkpoints hold three, train/checkpoint_engine.py). A file that asks for
anything else is refused with a one-line PerfusionError naming the file and what it asked for.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from perfusion_ray.errors import PerfusionError

_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation", "(1)", "(2)")


def load_weights_only(path: str | Path, allowed: Iterable[type] = (), map_location="cpu"):
    """torch.load(path, weights_only=True) with `allowed` classes besides torch's own safe types."""
    import torch

    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError (bad zip), EOFError, ...
        raise PerfusionError(f"refused to load {path}: {_reason(exc)}",
                             hint="checkpoints are read as data only; rewrite the file from a trusted run") from None


def refused_globals(path: str | Path, allowed_names: Iterable[str] = ()) -> list[str]:
    """The classes and functions a torch file would ask the unpickler for beyond torch's safe types and
    `allowed_names`, read statically (nothing is loaded or run). A file torch.save did not write is refused."""
    import torch

    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as exc:  # noqa: BLE001 - not a zip, truncated, torchscript, ...
        raise PerfusionError(f"refused to load {path}: not a torch checkpoint file ({_reason(exc)})",
                             hint="checkpoints are read as data only; rewrite the file from a trusted run") from None
    return sorted(set(found) - set(allowed_names))


def check_torch_files(folder: str | Path, allowed_names: Iterable[str] = (), pattern: str = "*.pt") -> int:
    """Refuse (PerfusionError) the first torch file under `folder` that asks for code beyond `allowed_names`;
    returns how many files were checked. For a driver to fail in one line before workers load the files."""
    allowed_names = set(allowed_names)
    files = sorted(Path(folder).rglob(pattern)) if Path(folder).is_dir() else []
    for path in files:
        refused = refused_globals(path, allowed_names)
        if refused:
            raise PerfusionError(f"refused to load {path}: it asks to run {', '.join(refused[:3])}, which a "
                                 f"checkpoint never needs",
                                 hint="checkpoints are read as data only; delete the run's checkpoints or rerun "
                                      "without --resume")
    return len(files)


def _reason(exc: BaseException) -> str:
    """The informative line of torch's error, without its advice (which includes loading with weights_only=False:
    not ours to repeat)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    marked = [line.split("WeightsUnpickler error:", 1)[1].strip() for line in lines if "WeightsUnpickler error:" in line]
    useful = [line for line in marked if line] or [line for line in lines if not line.startswith(_BOILERPLATE)]
    text = (useful or lines or [type(exc).__name__])[0]
    return text.split(" Please use", 1)[0][:300]
