"""The decoder: token embedding, a stack of blocks, final norm, language-model head."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from modeldefs.attention import AttentionCache, KVCache
from modeldefs.block import Block
from modeldefs.config import ModelConfig
from modeldefs.mod import RoutedBlock, RoutedKVCache
from modeldefs.rope import rope_cache


class Transformer(nn.Module):
    """A decoder-only LM (Llama layout: RoPE, RMSNorm, SwiGLU, grouped-query attention) whose blocks are
    plain `Block`s or, where `config.is_routed`, Mixture-of-Depths `RoutedBlock`s."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(
            RoutedBlock(config) if config.is_routed(i) else Block(config) for i in range(config.n_layer)
        )
        self.norm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_cache(config.head_dim, config.block_size, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # Residual projections start smaller so the stream's variance does not grow with depth (GPT-2).
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp.down):
                nn.init.normal_(proj.weight, std=config.init_std / math.sqrt(2 * config.n_layer))

    @classmethod
    def to_load(cls, config: ModelConfig) -> Transformer:
        """A model for a strict `load_state_dict` to fill: its parameters allocated but not initialised, since the
        random init that `__init__` does would be overwritten (1.5 of the 1.7 s that loading SmolLM2-135M took on
        a 2-core CPU); its RoPE tables (buffers, not in a state dict) computed."""
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device="cpu")  # gives each module its own tensor: the tied head is tied again below
        if config.tie_embeddings:
            model.lm_head.weight = model.embed.weight
        model.rope_cos, model.rope_sin = rope_cache(config.head_dim, config.block_size, config.rope_theta)
        return model

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, position_ids: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, kv_cache: Sequence[AttentionCache] | None = None,
                start_pos: int = 0, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids `idx` (B, T).

        position_ids: (B, T) or (T,) rotary positions; default start_pos .. start_pos + T - 1.
        mask: bool, broadcastable to (B, n_head, T, S), True where a query may attend to a key.
            None means plain causal attention. Routing and thought tokens use this path.
        kv_cache / start_pos: one cache per block (`make_kv_cache`; a routed block's is a `RoutedCache`), and
            the cache slot of the first new token (the new tokens fill start_pos .. start_pos + T - 1).
        valid: (B, T) bool, False at padding; Mixture-of-Depths routers never pick padding.
        """
        return self.lm_head(self.hidden(self.embed(idx), position_ids, mask, kv_cache, start_pos, valid))

    def hidden(self, x: torch.Tensor, position_ids: torch.Tensor | None = None,
               mask: torch.Tensor | None = None, kv_cache: Sequence[AttentionCache] | None = None,
               start_pos: int = 0, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states (B, T, n_embd) for input embeddings `x` (B, T, n_embd).

        `forward` is `lm_head(hidden(embed(idx), ...))`; this entry point takes vectors that are not
        rows of the embedding (Quiet-STaR's thought markers) and returns what comes before the head
        (Quiet-STaR mixes hidden states). Other arguments as in `forward`.
        """
        T = x.size(1)
        if start_pos and kv_cache is None:
            raise ValueError(f"start_pos={start_pos} is a KV-cache slot: pass kv_cache too (or position_ids alone)")
        if T > self.config.block_size:
            raise ValueError(
                f"sequence length {T} exceeds the model's context (block_size={self.config.block_size});"
                " shorten the sequence or raise block_size"
            )
        if position_ids is None:
            position_ids = torch.arange(start_pos, start_pos + T, device=x.device)
        if start_pos and mask is None and T > 1:
            # New tokens after cached ones attend to the cache up to their own slot. Filling slots
            # 0..T-1 needs no mask: that is plain causal attention, the kernels' fastest path.
            slots = torch.arange(start_pos, start_pos + T, device=x.device)
            mask = torch.arange(start_pos + T, device=x.device) <= slots[:, None]
        if position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0)
        cos, sin = self.rope_cos[position_ids], self.rope_sin[position_ids]
        for i, block in enumerate(self.blocks):
            cache = None if kv_cache is None else kv_cache[i]
            if isinstance(block, RoutedBlock):
                x = block(x, cos, sin, mask, cache, start_pos, valid=valid)
            else:
                x = block(x, cos, sin, mask, cache, start_pos)
        return self.norm(x)

    def make_kv_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> list[KVCache]:
        """One empty `KVCache` per block, on the model's device."""
        if max_len > self.config.block_size:
            raise ValueError(f"max_len={max_len} exceeds block_size={self.config.block_size}")
        weight = self.embed.weight
        c = self.config
        return [(RoutedKVCache if c.is_routed(i) else KVCache)(
                    batch_size, c.n_kv_head, max_len, c.head_dim, dtype or weight.dtype, weight.device)
                for i in range(c.n_layer)]

    @property
    def routed_blocks(self) -> dict[int, RoutedBlock]:
        """Mixture-of-Depths blocks by layer index (empty for a dense model)."""
        return {i: b for i, b in enumerate(self.blocks) if isinstance(b, RoutedBlock)}

    def num_params(self) -> int:
        """Parameter count (shared tensors counted once)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int, top_k: bool = True) -> int:
        """Training FLOPs per token (forward + backward = 3x forward), PaLM appendix B accounting.

        With `top_k`, a routed block processes a `capacity` share of the tokens, and its attention spans
        that share of the keys; without it (the causal rule over a whole sequence, as Quiet-STaR's passes
        route), it computes every token and masks the skipped ones' updates. Its router and predictor
        run on every token.
        """
        c = self.config
        forward = 2 * self.lm_head.weight.numel()
        for block in self.blocks:
            block_params = sum(p.numel() for p in block.parameters() if p.dim() == 2)
            routed = isinstance(block, RoutedBlock)
            share = block.capacity_k(seq_len) / seq_len if routed and top_k else 1.0
            routing = 0
            if routed:
                routing = sum(p.numel() for m in (block.router, block.predictor) if m is not None
                              for p in m.parameters() if p.dim() == 2)
                block_params -= routing
            attention = 4 * c.n_head * c.head_dim * seq_len * share  # QK^T and AV, causal half counted fully
            forward += share * (2 * block_params + attention) + 2 * routing
        return int(3 * forward)
