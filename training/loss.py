"""Next-token cross-entropy fused with the output projection, chunked over tokens.

With a 32k–49k vocabulary the logits of a training batch are the largest tensor of the step
(batch 4 x 512 tokens x 49152 x fp32 = 400 MB) and `lm_head` + cross-entropy are a third to a half
of a small model's FLOPs. `linear_cross_entropy` never materialises them whole: per chunk of tokens
it computes the logits, the loss and, in the same pass, the gradients of the hidden states and of
the projection weight (softmax - one-hot, times the inputs), which backward then only scales.
Peak memory falls by the logits and their gradient; the FLOPs are those of the unfused loss. On the
2-core CPU at the mid shape it made the step 17% faster, from not materialising the logits
(benchmarks/RESULTS.md, CPU ablation).

Between a chunk's two matmuls lies memory-bound work: eager, one fused `log_softmax` over an fp32 copy
of the chunk's logits, then its `exp_` in place as the gradient (half the time of `logsumexp`, which
ATen runs as five passes and a full-size temporary, followed by `x - lse`; benchmarks/RESULTS.md).
`compiled=True` runs that part as one `torch.compile`d function, which reads the logits twice and
writes the gradient once (what the model's `compile` option turns on).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk_size: int = 1024, ignore_index: int = -100, compiled: bool = False) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `labels`, without the full logits tensor.

    hidden (..., C), weight (V, C), labels (...) with `ignore_index` where no loss is taken.
    Equals `F.cross_entropy((hidden @ weight.T).float().flatten(0, -2), labels.flatten())` (fp32
    softmax; matmuls in the autocast dtype where autocast is on). `compiled`: fuse each chunk's
    softmax, loss and gradient with `torch.compile`.
    """
    hidden, labels = hidden.flatten(0, -2), labels.flatten()
    if not torch.is_grad_enabled() or not (hidden.requires_grad or weight.requires_grad):
        return _chunked_loss(hidden, weight, labels, chunk_size, ignore_index)
    return _LinearCrossEntropy.apply(hidden, weight, labels, chunk_size, ignore_index, compiled)


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


def _chunked_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int,
                  ignore_index: int) -> torch.Tensor:
    """Forward only (evaluation): the same loss, chunk by chunk."""
    dtype = _compute_dtype(hidden, weight)
    total = hidden.new_zeros((), dtype=torch.float32)
    for h, y in zip(hidden.split(chunk_size), labels.split(chunk_size)):
        logits = (h.to(dtype) @ weight.to(dtype).T).float()
        total = total + F.cross_entropy(logits, y, ignore_index=ignore_index, reduction="sum")
    return total / (labels != ignore_index).sum()


def _loss_and_grad(logits: torch.Tensor, labels: torch.Tensor,
                   keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A chunk's summed loss over the kept rows, and d(row loss)/d(logits) = softmax - one_hot in the
    logits' dtype (fp32 in between)."""
    log_probs = logits.float().log_softmax(dim=-1)
    loss = -(log_probs.gather(1, labels[:, None]).squeeze(1) * keep).sum()
    grad = log_probs.exp_()
    grad.scatter_add_(1, labels[:, None], -torch.ones_like(grad[:, :1]))
    return loss, grad.to(logits.dtype)


@functools.cache
def _compiled_loss_and_grad() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    return torch.compile(_loss_and_grad)  # on first use: importing this module stays free of dynamo


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int,
                ignore_index: int, compiled: bool) -> torch.Tensor:
        dtype = _compute_dtype(hidden, weight)
        w = weight.to(dtype)
        keep = labels != ignore_index
        # Dividing each chunk's gradient by the count makes this the mean; clamp: a batch of only
        # ignored labels gives 0/1 gradients and a NaN loss, as F.cross_entropy does.
        count = keep.sum()
        inv_count = 1.0 / count.clamp(min=1).float()
        safe_labels = torch.where(keep, labels, 0)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        total = hidden.new_zeros((), dtype=torch.float32)
        loss_and_grad = _compiled_loss_and_grad() if compiled else _loss_and_grad
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.size(0), chunk_size):
                h = hidden[start:start + chunk_size].to(dtype)
                y, k = safe_labels[start:start + chunk_size], keep[start:start + chunk_size]
                loss, grad = loss_and_grad(h @ w.T, y, k)
                total += loss
                # d loss / d logits = (softmax - one_hot) * k / count: the per-row factor k is applied to
                # the (chunk, C) operands, not to the (chunk, V) gradient. 1 / count is not: in fp16 it would
                # push the products into the subnormal range (a 16k-token batch lost ~1.4% of grad_hidden, 2%
                # of its entries to zero) before backward's incoming gradient brings GradScaler's loss scale.
                kept = k[:, None].to(dtype)
                grad_hidden[start:start + chunk_size] = grad @ w * kept
                if dtype == torch.float32:
                    grad_weight.addmm_(grad.T, h * kept)
                else:  # an fp32 accumulator takes the bf16/fp16 product without an fp32 copy of it
                    grad_weight += grad.T @ (h * kept)
        ctx.save_for_backward(grad_hidden, (grad_weight * inv_count).to(weight.dtype), inv_count)
        return total / count

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weight, inv_count = ctx.saved_tensors
        return grad_hidden * (grad_loss * inv_count), grad_weight * grad_loss, None, None, None, None
