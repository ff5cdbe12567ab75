"""`FSDP2Strategy`: Lightning's `ModelParallelStrategy`, for FSDP2's CPU offload on an accelerator.

After `configure_model`, Lightning moves the whole model to the accelerator. `fully_shard` has already
placed every parameter and buffer there, except, under `CPUOffloadPolicy`, the parameter shards it keeps in
pinned host memory, where FSDP2 requires them (its first forward refuses shards found on the accelerator).
"""

from __future__ import annotations

import torch.distributed as dist
from lightning.fabric.utilities.device_dtype_mixin import _update_properties
from lightning.pytorch.strategies import ModelParallelStrategy, Strategy
from torch.distributed.fsdp import FSDPModule

from training.errors import ConfigError


class FSDP2Strategy(ModelParallelStrategy):
    """`ModelParallelStrategy` that leaves the parameter shards FSDP2 keeps in host memory (`CPUOffloadPolicy`)
    there after `configure_model`; any other model moves to the accelerator as Lightning moves it."""

    def model_to_device(self) -> None:
        offloaded = isinstance(self.model, FSDPModule) and any(p.device.type == "cpu" for p in self.model.parameters())
        if not offloaded or self.root_device.type == "cpu":
            super().model_to_device()
            return
        # `fully_shard` put the buffers on the accelerator already. Set what the skipped `.to()` would have:
        # `LightningModule.device`, where `self.log` puts numbers.
        _update_properties(self.model, device=self.root_device)


def check_cpu_offload(strategy: Strategy) -> None:
    """Refuse FSDP2 CPU offload on an accelerator when the strategy would move the host-memory shards to it, or
    when the process group has no CPU backend for the collectives on host-memory gradients (gradient clipping's
    norm)."""
    if strategy.root_device.type == "cpu":
        return
    if not isinstance(strategy, FSDP2Strategy):
        raise ConfigError(
            "model.init_args.fsdp_cpu_offload: true needs trainer.strategy.class_path: training.strategy.FSDP2Strategy "
            f"(as configs/trainer/fsdp.yaml), not {type(strategy).__name__}: Lightning's ModelParallelStrategy moves "
            "the parameter shards that FSDP2 keeps in host memory to the accelerator, which FSDP2 refuses"
        )
    backends = dist.get_backend_config()
    if "cpu:" not in backends:
        raise ConfigError(
            f"model.init_args.fsdp_cpu_offload: true reduces gradients held in host memory, but the process group has "
            f"no CPU backend ({backends}): set trainer.strategy.init_args.process_group_backend: "
            f"\"{strategy.root_device.type}:nccl,cpu:gloo\""
        )
