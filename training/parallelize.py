"""Speed and memory transforms of a `modeldefs.Transformer`, applied in `CausalLM.configure_model`.

In torchtitan's order: activation checkpointing, then `torch.compile` per decoder block, then FSDP2
`fully_shard` per block and once at the root (what holds the embedding, final norm and head). The model file knows
nothing of this; none of it changes parameter names or module types, so checkpoints and
`isinstance` checks (Mixture-of-Depths' `RoutedBlock`) are the same with and without it.
"""

from __future__ import annotations

from functools import partial
from types import MethodType
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard, register_fsdp_forward_method
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from modeldefs import Transformer
from training.errors import ConfigError

ActivationCheckpointing = Literal["none", "block", "selective"]
DType = Literal["float32", "bfloat16", "float16"]

# Selective checkpointing keeps what is expensive to recompute (matmul and attention outputs) and
# recomputes the rest of the block (norms, rotary embedding, SiLU, residual adds), which is cheap in
# FLOPs but holds most of a block's activation memory.
_SAVED_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _selective_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def checkpointed(module: nn.Module, **options: Any) -> Callable[..., Any]:
    """`module`'s own forward (its class's), its activations recomputed in backward (non-reentrant
    `torch.utils.checkpoint`, `options` passed on), to be set as `module.forward`. A method bound to `module`, so a
    copy of the module (`copy.deepcopy`: a reference model, an EMA teacher) is bound to the copy and runs the copy's
    weights, not the original's (a pickled copy runs its class's forward, without recomputation). Not
    `functools.partial(checkpoint, forward)`: a compiled module whose forward is that partial starts in `checkpoint`'s
    own frame, which dynamo skips (nothing is compiled), and a partial or callable object reached as a module
    attribute is guarded by identity (one graph per layer). This function's frame is traced once and shared by
    every layer."""

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return checkpoint(type(self).forward, self, *args, use_reentrant=False, **options, **kwargs)

    return MethodType(forward, module)


def apply_activation_checkpointing(model: Transformer, policy: ActivationCheckpointing) -> None:
    """Recompute each block's activations in backward: all of them ("block") or all but matmul and
    attention outputs ("selective"). The block's own `forward` is wrapped (no wrapper module), so
    parameter names and block types stay as they are."""
    if policy == "none":
        return
    if policy not in ("block", "selective"):
        raise ValueError(f"activation_checkpointing={policy!r}: choose 'none', 'block' or 'selective'")
    for block in model.blocks:
        options: dict[str, Any] = {}
        if policy == "selective":
            options["context_fn"] = partial(create_selective_checkpoint_contexts, _selective_policy)
        block.forward = checkpointed(block, **options)


def apply_compile(model: Transformer) -> None:
    """`torch.compile` each decoder block: one graph per block, reused by every layer of the same kind.

    A block kind runs in several modes, each with a few graphs of its own: training, validation (no
    grad), KV-cached decoding and, in Quiet-STaR, pass 0, the first thought passes and one dynamic graph
    for the rest (9 graphs of `Block` and 11 of `RoutedBlock` in a Quiet-STaR-over-MoD fit that
    validates and samples thoughts). Dynamo's default of 8 per code object would run the last ones
    eager, so the limit is raised to 32, still a stop for graphs that multiply without bound.
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    for block in model.blocks:
        block.compile()


def data_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The data-parallel dimension of Lightning's `ModelParallelStrategy` mesh, refusing tensor parallelism."""
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise ConfigError(
            f"quietdepth shards with FSDP only, but the device mesh has tensor_parallel_size="
            f"{mesh['tensor_parallel'].size()}: set trainer.strategy.init_args.tensor_parallel_size: 1 and "
            "data_parallel_size: <devices x num_nodes>"
        )
    return mesh["data_parallel"] if "data_parallel" in names else mesh


def apply_fsdp(blocks: Iterable[nn.Module], root: nn.Module, mesh: DeviceMesh, param_dtype: DType = "bfloat16",
               reduce_dtype: DType = "float32", root_methods: Sequence[str] = (), cpu_offload: bool = False) -> None:
    """FSDP2: shard each decoder block's parameters, then the rest of `root`'s (embedding, norm, head), over `mesh`.

    A block's parameters are all-gathered in `param_dtype` just before it runs and freed after;
    gradients are reduce-scattered in `reduce_dtype`; the optimizer updates fp32 shards.
    `root_methods` are methods of `root` other than `forward` that run the model (they get the
    root's all-gather and reduce-scatter hooks). With no `blocks`, `root` is one unit. `cpu_offload`
    keeps the parameter shards, their gradients and the optimizer step in host memory (copied to the
    device for each all-gather):
    for models whose sharded state does not fit the accelerators, at the cost of host-device copies.
    """
    policy = MixedPrecisionPolicy(param_dtype=getattr(torch, param_dtype), reduce_dtype=getattr(torch, reduce_dtype))
    # Pinned host memory makes the copies asynchronous; it needs an accelerator to pin for.
    offload = CPUOffloadPolicy(pin_memory=mesh.device_type != "cpu") if cpu_offload else OffloadPolicy()
    blocks = list(blocks)
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        fully_shard(block, mesh=mesh, mp_policy=policy, offload_policy=offload, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(root, mesh=mesh, mp_policy=policy, offload_policy=offload)
    for name in root_methods:
        register_fsdp_forward_method(root, name)
