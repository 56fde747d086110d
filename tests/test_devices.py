"""Device correctness without a GPU: every tensor the objectives build lives on their inputs' device (inputs on
"meta", every operation checked to take tensors of one device, as CUDA requires), Serve replicas pick their
device from what Ray assigned, and a Ray worker's DeepSpeed accelerator is its own node's business, never the
driver's."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from perfusion_ray.objectives.group_preference import VARIANTS, _group_loss
from perfusion_ray.objectives.ranking import _pairwise_logistic, _plackett_luce
from perfusion_ray.runtime import deepspeed_accelerator_env, worker_env_vars
from perfusion_ray.serve.placement import choose_device, choose_dtype

B, K = 3, 4


@pytest.fixture
def strict_rand(monkeypatch):
    """torch.rand as CUDA has it: a generator draws only on its own device (fake tensors do not check this)."""
    real = torch.rand

    def rand(*size, generator=None, device=None, **kwargs):
        if generator is not None and torch.device(device or "cpu").type != generator.device.type:
            raise RuntimeError(f"Expected a '{torch.device(device).type}' device type for generator but found "
                               f"'{generator.device.type}'")
        return real(*size, generator=generator, device=device, **kwargs)

    monkeypatch.setattr(torch, "rand", rand)


class OneDevicePerOperation(TorchDispatchMode):
    """Refuses an operation whose tensors sit on two devices, as CUDA kernels do (a 0-dim CPU tensor may meet
    any device, there too). Meta tensors alone let a CPU index into gather, for one."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        devices = {t.device for t in tree_leaves((args, kwargs))
                   if isinstance(t, torch.Tensor) and not (t.device.type == "cpu" and t.dim() == 0)}
        if len(devices) > 1:
            raise RuntimeError(f"{func}: tensors on more than one device {sorted(map(str, devices))}")
        return func(*args, **kwargs)


def _on_meta(compute):
    """compute(policy_err, ref_err, labels) on [B, K] meta tensors, every operation device-checked."""
    inputs = (torch.rand(B, K, device="meta"), torch.rand(B, K, device="meta"), torch.zeros(B, K, device="meta"))
    with OneDevicePerOperation():
        return compute(*inputs)


@pytest.mark.parametrize("generator", [None, "cpu"], ids=["no_generator", "cpu_generator"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_group_losses_stay_on_the_inputs_device(variant, generator, strict_rand):
    gen = torch.Generator().manual_seed(0) if generator else None
    loss, used = _on_meta(lambda pol, ref, labels: _group_loss(pol, ref, labels, 10.0, variant, gen, 0.5))
    assert loss.device.type == used.device.type == "meta" and loss.shape == ()


@pytest.mark.parametrize("reduce", [True, False])
def test_ranking_losses_stay_on_the_inputs_device(reduce, strict_rand):
    gen = torch.Generator().manual_seed(0)
    for loss_fn in (lambda r, labels: _plackett_luce(r, labels, gen, reduce),
                    lambda r, labels: _pairwise_logistic(r, labels, reduce)):
        loss, used = _on_meta(lambda pol, ref, labels: loss_fn(pol - ref, labels))
        assert loss.device.type == used.device.type == "meta"
        assert loss.shape == (() if reduce else (B,))


def test_the_device_checks_catch_a_tensor_made_on_the_cpu(strict_rand):
    with pytest.raises(RuntimeError, match="device"):
        _on_meta(lambda pol, ref, labels: pol + torch.zeros(B, K))  # a loss that forgot device=
    with pytest.raises(RuntimeError, match="device"):
        _on_meta(lambda pol, ref, labels: torch.gather(pol, 1, torch.zeros(B, K, dtype=torch.long)))
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(RuntimeError, match="device type for generator"):  # the tie-break as it was drawn before
        torch.rand(B, K, generator=gen, device="meta")


# ---------------------------------------------------------------- Serve replicas
def test_a_replica_uses_cuda_only_when_ray_assigned_a_gpu_that_torch_sees():
    assert choose_device(("0",), cuda_available=True)[0] == "cuda"
    device, why = choose_device(("1",), cuda_available=False)
    assert device == "cpu" and "GPU 1" in why and "no CUDA device" in why  # logical GPUs, as in the tests
    device, why = choose_device((), cuda_available=True)
    assert device == "cpu" and "replica_gpus is 0" in why


def test_half_precision_is_kept_where_the_hardware_has_it():
    assert choose_dtype("bfloat16", "cpu", bf16_supported=False) == ("bfloat16", "")
    assert choose_dtype("bfloat16", "cuda", bf16_supported=True) == ("bfloat16", "")
    dtype, note = choose_dtype("bfloat16", "cuda", bf16_supported=False)
    assert dtype == "float16" and "bfloat16" in note
    assert choose_dtype("float16", "cuda", bf16_supported=False)[0] == "float16"
    with pytest.raises(ValueError, match="one of float32, bfloat16, float16"):
        choose_dtype("int8", "cpu", bf16_supported=False)


# ---------------------------------------------------------------- DeepSpeed's accelerator, per worker
def test_the_driver_ships_no_accelerator_to_its_workers(monkeypatch):
    import perfusion_ray.runtime as runtime

    for driver_has_gpu in (False, True):
        monkeypatch.setattr(runtime, "_has_cuda", lambda: driver_has_gpu)
        assert "DS_ACCELERATOR" not in worker_env_vars()


def test_a_process_forces_the_cpu_accelerator_only_on_a_node_without_a_gpu():
    assert deepspeed_accelerator_env(node_has_gpu=False) == {"DS_ACCELERATOR": "cpu"}
    assert deepspeed_accelerator_env(node_has_gpu=True) == {}  # DeepSpeed finds CUDA, or the CPU without one


def test_importing_the_package_decides_the_accelerator_in_that_process():
    # What a Ray worker does when it unpickles a training loop: import perfusion_ray before any deepspeed.
    code = ("import os; assert 'DS_ACCELERATOR' not in os.environ; import perfusion_ray; "
            "import perfusion_ray.runtime as r; print(os.environ.get('DS_ACCELERATOR'), r._has_cuda())")
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         check=True).stdout.split()
    accelerator, node_has_gpu = out[0], out[1] == "True"
    assert accelerator == ("None" if node_has_gpu else "cpu")
