"""`FSDP2Strategy`: Lightning's `ModelParallelStrategy`, leaving a model where FSDP2's `fully_shard` placed it.

Needed for FSDP2's CPU offload on an accelerator. After `configure_model`, Lightning moves the whole
model to the accelerator, but `fully_shard` has already placed every parameter and buffer: on the
accelerator or, under `CPUOffloadPolicy`, the parameter shards in pinned host memory, where FSDP2 requires
them (its first forward refuses shards found on the accelerator).
"""

from __future__ import annotations

import torch.distributed as dist
from lightning.fabric.utilities.device_dtype_mixin import _update_properties
from lightning.pytorch.strategies import ModelParallelStrategy, Strategy
from torch.distributed.fsdp import FSDPModule

from training.errors import ConfigError


class FSDP2Strategy(ModelParallelStrategy):
    """`ModelParallelStrategy` that does not move an FSDP2-sharded model after `configure_model`: `fully_shard`
    moved its buffers and parameters to the accelerator already, except the shards it keeps in host memory."""

    def model_to_device(self) -> None:
        if isinstance(self.model, FSDPModule):
            # What the skipped `.to()` would have set: `LightningModule.device`, where `self.log` puts numbers
            _update_properties(self.model, device=self.root_device)
            return
        super().model_to_device()


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
