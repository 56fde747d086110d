"""One object that hides DeepSpeed (OpenRLHF-style): build the engine, step, checkpoint, export.

Engines load their checkpoints with torch.load(weights_only=True) (train/checkpoint_engine.py).

CPU runs use the gloo process group Ray Train creates, a torch AdamW (DeepSpeed's own Adam would
JIT-compile ops for a minute), and the shared-memory comm op switched off; GPU runs use the same
code with use_gpu and bf16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from perfusion_ray.runtime import disable_deepspeed_shm_op
from perfusion_ray.train.checkpoint_engine import use_weights_only_loading


@dataclass
class DeepSpeedStrategy:
    zero_stage: int = 2
    lr: float = 3e-4
    micro_batch: int = 8
    bf16: bool = False
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warm-up of the learning rate, then constant
    total_steps: int = 0  # > 0: after the warm-up, cosine decay to zero at this step (0: constant)

    def ds_config(self, world_size: int) -> dict:
        return {
            "train_micro_batch_size_per_gpu": self.micro_batch,
            "train_batch_size": self.micro_batch * world_size,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": self.grad_clip,
            "zero_optimization": {"stage": self.zero_stage},
            "zero_allow_untested_optimizer": True,  # a torch optimizer: nothing to compile
            "bf16": {"enabled": self.bf16},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }

    def prepare(self, model: torch.nn.Module):
        """The DeepSpeed engine around `model`, optimizing only its trainable parameters."""
        import deepspeed
        import torch.distributed as dist

        disable_deepspeed_shm_op()
        if not dist.is_initialized():  # a single process outside Ray Train (tests, notebooks)
            deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
        world_size = dist.get_world_size()
        parameters = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=self.lr, weight_decay=self.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                          config=self.ds_config(world_size))
        use_weights_only_loading(engine)  # resume reads checkpoint files as data, never as code
        return engine

    def lr_factor(self, step: int) -> float:
        """Multiplier of the learning rate at an optimizer step: linear warm-up, then constant or cosine."""
        warmup = max(self.warmup_steps, 1)
        if step < warmup or self.total_steps <= 0:
            return min(1.0, (step + 1) / warmup)
        progress = min(1.0, (step - warmup) / max(1, self.total_steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    @staticmethod
    def step(engine, loss: torch.Tensor) -> None:
        engine.backward(loss)
        engine.step()

    @staticmethod
    def trainable_state_dict(engine) -> dict[str, torch.Tensor]:
        """The trainable parameters in full, on every rank, on the CPU (ZeRO-3 shards are gathered first): what
        changes during training, so what an average of policies needs to keep."""
        import deepspeed

        named = [(name, p) for name, p in engine.module.named_parameters() if p.requires_grad]
        if engine.zero_optimization_stage() == 3:
            with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
                return {name: p.detach().clone().cpu() for name, p in named}
        return {name: p.detach().clone().cpu() for name, p in named}

    @staticmethod
    def full_state_dict(engine) -> dict[str, torch.Tensor]:
        """Every parameter and buffer in full, on every rank (ZeRO-3 shards are gathered first)."""
        import deepspeed

        module = engine.module
        if engine.zero_optimization_stage() == 3:
            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                return {name: tensor.detach().clone().cpu() for name, tensor in module.state_dict().items()}
        return {name: tensor.detach().cpu() for name, tensor in module.state_dict().items()}
