"""Log-probabilities of chosen tokens that keep the logits, not an fp32 log-softmax, for backward.

`(logits.float() / t).log_softmax(-1).gather(tokens)`, and `F.cross_entropy` likewise, keep a
(..., V) fp32 log-softmax until backward. Quiet-STaR takes one per sampled thought token and scores
every talk token and every plain next token. `token_log_prob` keeps the logits in their own dtype
(bf16 under autocast: half the bytes; the same tensor where the caller keeps the logits anyway) and
recomputes the softmax in backward: the same arithmetic, no extra matmul. Both directions are ATen's fused
kernels (`log_softmax`, `softmax`): `logsumexp` and `exp(x - lse)` took 1.3-2.4x as long on the CPU
(benchmarks/RESULTS.md, Quiet-STaR cost).
"""

from __future__ import annotations

from typing import Any

import torch


def token_log_prob(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[tokens], computed in fp32: logits (..., V), tokens (...) -> (...)."""
    return _TokenLogProb.apply(logits, tokens, temperature)


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature in fp32; fp32 logits at temperature 1 themselves, not a copy."""
    return logits.float() if temperature == 1 else logits.float() / temperature


class _TokenLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
        ctx.save_for_backward(logits, tokens)
        ctx.temperature = temperature
        return _scaled(logits, temperature).log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        logits, tokens = ctx.saved_tensors
        grad = grad.unsqueeze(-1) / ctx.temperature
        # d out / d logits = (one_hot(token) - softmax(logits / t)) / t
        grad_logits = _scaled(logits, ctx.temperature).softmax(-1).mul_(-grad)
        grad_logits.scatter_add_(-1, tokens.unsqueeze(-1), grad)
        return grad_logits.to(logits.dtype), None, None
