"""A pre-norm decoder block: x + attn(norm(x)), then + mlp(norm(x))."""

from __future__ import annotations

import torch
from torch import nn

from modeldefs.attention import AttentionCache, CausalSelfAttention
from modeldefs.config import ModelConfig
from modeldefs.mlp import SwiGLU


class Block(nn.Module):
    """Pre-norm decoder block: attention then SwiGLU MLP, each added to the residual stream."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.mlp_norm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None, kv_cache: AttentionCache | None = None,
                start_pos: int = 0) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, kv_cache, start_pos)
        return x + self.mlp(self.mlp_norm(x))

    def residual_update(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        mask: torch.Tensor | None = None, kv_cache: AttentionCache | None = None,
                        start_pos: int = 0) -> torch.Tensor:
        """f(x) with forward(x) = x + f(x): what the block adds to the residual stream."""
        a = self.attn(self.attn_norm(x), cos, sin, mask, kv_cache, start_pos)
        return a + self.mlp(self.mlp_norm(x + a))
