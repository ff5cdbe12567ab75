"""Grouped-query causal self-attention through `scaled_dot_product_attention`, with a KV cache."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from modeldefs.config import ModelConfig
from modeldefs.rope import apply_rope


class AttentionCache(Protocol):
    """What an attention layer needs from a KV cache: `KVCache`, `RoutedKVCache` and Quiet-STaR's
    `ThoughtKVCache` (which keeps the thought passes compactly) all have it."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int,
               mask: torch.Tensor | None) -> torch.Tensor:
        """Keep the new keys/values k, v (B, Hkv, T, D) from slot `start_pos`; return q (B, H, T, D)'s
        attention output (B, H, T, D) over the cache under `mask`."""
        ...


class KVCache(nn.Module):
    """Preallocated keys/values of one attention layer for incremental decoding."""

    def __init__(self, batch_size: int, n_kv_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | None = None) -> None:
        super().__init__()
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v (B, H, T, D) at cache slots start_pos .. start_pos + T - 1; return the cache up to
        the last slot written. Slots are host integers, so decoding never waits on the device for them."""
        end = start_pos + k.size(2)
        if end > self.k.size(2):
            raise ValueError(f"writing {k.size(2)} tokens at slot {start_pos} overflows the KV cache's"
                             f" {self.k.size(2)} slots; make the cache with a larger max_len")
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int,
               mask: torch.Tensor | None) -> torch.Tensor:
        """Write the new k/v from slot `start_pos`, then attend q (B, H, T, D) over the cache up to the
        last slot written under `mask`. None: causal when T > 1 (the new tokens are the whole cache, slots
        0..T-1), every cached key for one new token. A cache with structure it knows better
        (Quiet-STaR's thought chains) overrides this."""
        k, v = self.update(start_pos, k, v)
        T = q.size(2)
        group = q.size(1) // k.size(1)  # query heads per key/value head
        if T == 1 and group > 1 and (mask is None or (mask.dim() == 4 and mask.size(1) == 1)):
            # One new token (a decoding step): a group's query heads attend as `group` queries of its one
            # key/value head. Same result as the grouped-query path, which on the CPU took 4.1 ms where
            # this takes 2.6 (28 rows, 1,300 cached slots; evals/RESULTS.md).
            y = F.scaled_dot_product_attention(rearrange(q, "b (h g) 1 d -> b h g d", g=group), k, v, attn_mask=mask)
            return rearrange(y, "b h g d -> b (h g) 1 d")
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                              enable_gqa=group > 1)


class CausalSelfAttention(nn.Module):
    """Causal grouped-query self-attention with rotary positions (SDPA), optionally through a `KVCache`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        qkv_dim = (config.n_head + 2 * config.n_kv_head) * config.head_dim
        self.qkv = nn.Linear(config.n_embd, qkv_dim, bias=config.qkv_bias)
        self.proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None, kv_cache: AttentionCache | None = None,
                start_pos: int = 0) -> torch.Tensor:
        """x (B, T, C). `mask` (bool, True = may attend, broadcastable to (B, H, T, S)) replaces the
        causal rule when given; with `kv_cache`, the new keys are written from slot `start_pos` first."""
        T = x.size(1)
        q, k, v = self.qkv(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=-1
        )
        q, k, v = (rearrange(t, "b t (h d) -> b h t d", d=self.head_dim) for t in (q, k, v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            y = kv_cache.attend(q, k, v, start_pos, mask)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                enable_gqa=self.n_kv_head != self.n_head,
            )
        return self.proj(rearrange(y, "b h t d -> b t (h d)"))
