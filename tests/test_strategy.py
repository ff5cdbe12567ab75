"""`training.strategy`: FSDP2's CPU offload survives Lightning's move of the model to the accelerator, and a
strategy or process group that cannot offload is refused with the setting to change.

The accelerator is stood in for by the meta device (this machine has none): Lightning moves the model to
`strategy.root_device`, and a parameter that moved is on meta afterwards."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

from modeldefs import ModelConfig, Transformer
from training.errors import ConfigError
from training.strategy import FSDP2Strategy, check_cpu_offload


@pytest.fixture
def process_group(tmp_path):
    dist.init_process_group("cpu:gloo,cuda:gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


def offloaded_model(mesh) -> Transformer:
    model = Transformer(ModelConfig.from_name("tiny"))
    for block in model.blocks:
        fully_shard(block, mesh=mesh, offload_policy=CPUOffloadPolicy(pin_memory=False))
    fully_shard(model, mesh=mesh, offload_policy=CPUOffloadPolicy(pin_memory=False))
    return model


def on_accelerator(monkeypatch, strategy_type: type, device: str) -> None:
    monkeypatch.setattr(strategy_type, "root_device", property(lambda self: torch.device(device)))


@pytest.mark.parametrize("strategy_type", [FSDP2Strategy, ModelParallelStrategy])
def test_fsdp2_strategy_keeps_offloaded_shards_in_host_memory(process_group, monkeypatch, strategy_type):
    on_accelerator(monkeypatch, strategy_type, "meta")
    strategy = strategy_type()
    strategy.model = offloaded_model(process_group)
    strategy.model_to_device()
    devices = {p.device.type for p in strategy.model.parameters()}
    if strategy_type is FSDP2Strategy:
        assert devices == {"cpu"}
    else:  # Lightning's own strategy moves them, which FSDP2's first forward refuses
        assert devices == {"meta"}


def test_fsdp2_strategy_still_moves_a_model_fsdp2_does_not_shard(monkeypatch):
    on_accelerator(monkeypatch, FSDP2Strategy, "meta")
    strategy = FSDP2Strategy()
    strategy.model = Transformer(ModelConfig.from_name("tiny"))
    strategy.model_to_device()
    assert {p.device.type for p in strategy.model.parameters()} == {"meta"}


def test_cpu_offload_on_an_accelerator_names_the_strategy_and_backend_to_set(process_group, monkeypatch):
    for strategy_type in (FSDP2Strategy, ModelParallelStrategy):
        on_accelerator(monkeypatch, strategy_type, "cuda")
    with pytest.raises(ConfigError, match="trainer.strategy.class_path: training.strategy.FSDP2Strategy"):
        check_cpu_offload(ModelParallelStrategy())
    check_cpu_offload(FSDP2Strategy())  # this group has a CPU backend
    monkeypatch.setattr(dist, "get_backend_config", lambda: "cuda:nccl")
    with pytest.raises(ConfigError, match='process_group_backend: "cuda:nccl,cpu:gloo"'):
        check_cpu_offload(FSDP2Strategy())


def test_fsdp2_strategy_sets_the_lightning_modules_device_it_leaves_unmoved(process_group, monkeypatch):
    """`LightningModule.device` is set by its `.to()`, which FSDP2Strategy skips: it still names the accelerator
    that the batches go to (where `self.log` puts numbers, and a `sync_dist` reduces them), not the CPU."""
    on_accelerator(monkeypatch, FSDP2Strategy, "meta")
    module = L.LightningModule()
    module.model = offloaded_model(process_group)
    fully_shard(module, mesh=process_group, offload_policy=CPUOffloadPolicy(pin_memory=False))
    strategy = FSDP2Strategy()
    strategy.model = module
    strategy.model_to_device()
    assert module.device == torch.device("meta")
    assert {p.device.type for p in module.parameters()} == {"cpu"}
