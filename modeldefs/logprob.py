"""Log-probabilities of chosen tokens that keep the logits, not an fp32 log-softmax, for backward.

`(logits.float() / t).log_softmax(-1).gather(tokens)`, and `F.cross_entropy` likewise, keep a
(..., V) fp32 log-softmax until backward. Quiet-STaR takes one per sampled thought token and scores
every talk token and every plain next token. `token_log_prob` keeps the logits in their own dtype
(bf16 under autocast: half the bytes; the same tensor where the caller keeps the logits anyway) and
a log-normaliser per row, and recomputes the softmax in backward: the same arithmetic, no extra matmul.
"""

from __future__ import annotations

from typing import Any

import torch


def token_log_prob(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[tokens], computed in fp32: logits (..., V), tokens (...) -> (...)."""
    return _TokenLogProb.apply(logits, tokens, temperature)


class _TokenLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
        scaled = logits.float() / temperature
        log_norm = scaled.logsumexp(-1, keepdim=True)
        ctx.save_for_backward(logits, tokens, log_norm)
        ctx.temperature = temperature
        return (scaled.gather(-1, tokens.unsqueeze(-1)) - log_norm).squeeze(-1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        logits, tokens, log_norm = ctx.saved_tensors
        grad = grad.unsqueeze(-1) / ctx.temperature
        # d out / d logits = (one_hot(token) - softmax(logits / t)) / t
        grad_logits = (logits.float() / ctx.temperature - log_norm).exp_().mul_(-grad)
        grad_logits.scatter_add_(-1, tokens.unsqueeze(-1), grad)
        return grad_logits.to(logits.dtype), None, None
