"""Mixture-of-Depths (Raposo et al., 2024): a router picks which tokens a decoder block processes.

Training: in each sequence the k = max(1, floor(capacity * T)) tokens with the largest router logit
go through the block, in their original order and with their original position ids, attending
causally among themselves; the others skip it on the residual path. Output for a selected token:
x + s * f(x), f the block's residual update and s = 2 * sigmoid(router logit). s is 1 at a zero
logit (a new router's logits are small, std init_std * sqrt(n_embd), so a MoD-ified pretrained block
starts near the dense one: s within about 0.6-1.4 at SmolLM2's width), bounded in (0, 2) (raw-logit
scaling is reported to blow up), and on the gradient path so the router learns.

Inference: top-k over a sequence looks ahead, so routing is decided token by token instead — a token
goes through iff the router's logit > 0 (the auxiliary BCE loss trains it towards the top-k choice)
or iff the auxiliary predictor's logit > 0. A token that skipped a routed layer has no key/value
there: later tokens cannot attend to it, in the KV cache too. An inference forward over a whole
sequence runs the block on every token under that mask and discards the skipped tokens' results
(exact, not cheaper); compute is saved when decoding, where a step that no row routes skips the block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from modeldefs.attention import AttentionCache, KVCache
from modeldefs.block import Block
from modeldefs.config import ModelConfig


@dataclass
class Routing:
    """What a routed block decided in its last forward pass."""

    router_logits: torch.Tensor
    """(B, T) fp32."""
    selected: torch.Tensor
    """(B, T) bool: the tokens that went through the block."""
    topk: torch.Tensor | None
    """(B, T) bool: top-k membership (training forward only); the targets of both auxiliary losses."""
    predictor_logits: torch.Tensor | None
    """(B, T) fp32: in training, and at inference when the predictor is the causal rule; else None."""

    def router_bce(self) -> torch.Tensor:
        """BCE of the router logits against top-k membership (the paper's auxiliary loss)."""
        return F.binary_cross_entropy_with_logits(self.router_logits, self.topk.float())

    def predictor_bce(self) -> torch.Tensor:
        """BCE of the predictor logits against top-k membership (trains only the predictor)."""
        return F.binary_cross_entropy_with_logits(self.predictor_logits, self.topk.float())


class RoutedCache(AttentionCache, Protocol):
    """What a routed block needs from its KV cache: `RoutedKVCache` and Quiet-STaR's `ThoughtKVCache` have it."""

    routed: torch.Tensor
    """(B, slots) bool: the slots whose token went through this layer (the block writes it)."""


class RoutedKVCache(KVCache):
    """A KV cache that also records which positions went through its (routed) layer."""

    routed: torch.Tensor  # a buffer, registered below

    def __init__(self, batch_size: int, n_kv_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | None = None) -> None:
        super().__init__(batch_size, n_kv_head, max_len, head_dim, dtype, device)
        self.register_buffer("routed", torch.zeros(batch_size, max_len, dtype=torch.bool, device=device),
                             persistent=False)


class RoutedBlock(Block):
    """A decoder block behind a Mixture-of-Depths router (same parameter names as `Block`, plus the
    router and predictor, so a dense checkpoint loads into it)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.capacity = config.mod_capacity
        self.causal_rule = config.mod_causal_rule
        self.scale_by_router = config.mod_scale_by_router
        self.router = nn.Linear(config.n_embd, 1)
        self.predictor = None
        if config.mod_predictor:
            self.predictor = nn.Sequential(
                nn.Linear(config.n_embd, config.mod_predictor_hidden), nn.SiLU(),
                nn.Linear(config.mod_predictor_hidden, 1),
            )
        self.routing: Routing | None = None

    def capacity_k(self, seq_len: int) -> int:
        """Tokens per sequence that go through the block in training."""
        return max(1, math.floor(self.capacity * seq_len + 1e-9))  # 0.7 * 90 is 62.999...

    def router_scale(self, logits: torch.Tensor) -> torch.Tensor:
        """The factor on a routed token's update: 2 * sigmoid(logit), or 1 with scaling switched off."""
        return 2 * torch.sigmoid(logits) if self.scale_by_router else torch.ones_like(logits)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None, kv_cache: RoutedCache | None = None,
                start_pos: int = 0, valid: torch.Tensor | None = None) -> torch.Tensor:
        """As `Block.forward`; `valid` (B, T) bool marks real tokens (padding is never routed)."""
        h = F.rms_norm(x, (x.size(-1),))
        router_logits = self.router(h).squeeze(-1).float()
        top_k = self.training and kv_cache is None
        predictor_logits = None  # needed for its loss in training, and at inference only when it decides
        if self.predictor is not None and (top_k or self.causal_rule == "predictor"):
            predictor_logits = self.predictor(h.detach()).squeeze(-1).float()
        if top_k:
            out, selected = self._top_k(x, router_logits, cos, sin, mask, valid)
            self.routing = Routing(router_logits, selected, selected, predictor_logits)
            return out
        rule = predictor_logits if self.causal_rule == "predictor" else router_logits
        selected = rule > 0 if valid is None else (rule > 0) & valid
        self.routing = Routing(router_logits, selected, None, predictor_logits)
        return self._causal(x, router_logits, selected, cos, sin, mask, kv_cache, start_pos)

    def _top_k(self, x: torch.Tensor, logits: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               mask: torch.Tensor | None, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, C = x.shape
        k = self.capacity_k(T)
        scores = logits if valid is None else logits.masked_fill(~valid, float("-inf"))
        idx = scores.topk(k, dim=1, sorted=False).indices.sort(dim=1).values  # (B, k) in sequence order

        def take(t: torch.Tensor) -> torch.Tensor:
            return t.expand(B, T, t.size(-1)).gather(1, idx.unsqueeze(-1).expand(B, k, t.size(-1)))

        if mask is not None:  # keep the caller's mask among the selected tokens
            mask = mask.reshape((1,) * (4 - mask.dim()) + mask.shape).expand(B, -1, T, T)
            rows = mask.gather(2, idx[:, None, :, None].expand(B, mask.size(1), k, T))
            mask = rows.gather(3, idx[:, None, None, :].expand(B, mask.size(1), k, k))
        scale = self.router_scale(logits.gather(1, idx))
        if valid is not None:  # fewer real tokens than k: the padding picked contributes nothing, as update or key
            real = valid.gather(1, idx)
            scale = scale * real
            keys = real[:, None, None, :] | torch.eye(k, dtype=torch.bool, device=x.device)  # each sees itself
            mask = keys & (torch.ones(k, k, dtype=torch.bool, device=x.device).tril() if mask is None else mask)
        update = self.residual_update(take(x), take(cos), take(sin), mask) * scale.unsqueeze(-1).to(x.dtype)
        out = x.scatter_add(1, idx.unsqueeze(-1).expand(B, k, C), update.to(x.dtype))
        selected = torch.zeros(B, T, dtype=torch.bool, device=x.device).scatter_(1, idx, True)
        return out, selected if valid is None else selected & valid

    def _causal(self, x: torch.Tensor, logits: torch.Tensor, selected: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, mask: torch.Tensor | None, kv_cache: RoutedCache | None,
                start_pos: int) -> torch.Tensor:
        B, T, _ = x.shape
        if kv_cache is not None:
            kv_cache.routed[:, start_pos:start_pos + T] = selected
            keys = kv_cache.routed[:, : start_pos + T]
        else:
            keys = selected
        if T == 1 and not bool(selected.any()):  # decoding a token no row routes: skip the block
            return x
        # Keys: earlier tokens that went through this layer. Each query also sees itself, so a query
        # with no routed key left has a defined (and discarded) output.
        key_pos = torch.arange(keys.size(1), device=x.device)
        query_pos = torch.arange(start_pos, start_pos + T, device=x.device)
        attn_mask = ((key_pos <= query_pos[:, None]) & keys[:, None, :]) | (key_pos == query_pos[:, None])
        attn_mask = attn_mask.unsqueeze(1)
        if mask is not None:
            attn_mask = attn_mask & mask
        update = self.residual_update(x, cos, sin, attn_mask, kv_cache, start_pos)
        scale = self.router_scale(logits) * selected
        return x + update * scale.unsqueeze(-1).to(x.dtype)
