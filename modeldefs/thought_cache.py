"""The keys/values of Quiet-STaR's parallel thought forward, and the mask that says which a thought may read.

Slot layout (`QuietStar.think`): pass 0 fills slots 0..T-1 with the sequence; thought pass j >= 1 adds one
slot per thought chain, slots T+(j-1)P .. T+jP-1. The chain at position t may read the prefix s <= t
and its own slot in every pass, nothing of another chain.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange


class ThoughtKVCache:
    """The keys/values of one layer in the parallel thought forward, attended to compactly.

    Pass 0 is ordinary causal attention over the T tokens; its keys/values are kept as the prefix.
    Each thought pass adds one key/value per chain. In pass j the chain at t attends to the T prefix
    keys and to its own j keys only: P x (T + j) scores, not the P x (T + jP) of one dense mask over
    every slot, most of it False. The caller's mask is still given over all slots (it carries
    Mixture-of-Depths routing); only its prefix columns and each chain's own columns are read. Keys and
    values are autograd tensors, never written in place, so gradients flow through every pass.
    """

    def __init__(self, batch_size: int, seq_len: int, n_chains: int, max_len: int, device: torch.device) -> None:
        self.seq_len, self.n_chains = seq_len, n_chains
        # pass 0's (keys, values), (B, Hkv, T, D) each
        self.prefix: tuple[torch.Tensor, torch.Tensor] | None = None
        # the thought passes' (keys, values), (B, Hkv, P, passes so far, D) each; [:, :, p, i]: chain p, pass i + 1
        self.chain: tuple[torch.Tensor, torch.Tensor] | None = None
        # (B, slots) bool: the slots a routed (Mixture-of-Depths) layer processed, as in `RoutedKVCache`
        self.routed = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)

    def repeat_rows(self, copies: int) -> None:
        """After pass 0 over one row per example, give each of its `copies` thought samples its rows
        (adjacent), so pass 0 is computed once per example, not once per sample."""
        if self.prefix is not None:
            prefix_k, prefix_v = self.prefix
            self.prefix = (prefix_k.repeat_interleave(copies, dim=0), prefix_v.repeat_interleave(copies, dim=0))
        self.routed = self.routed.repeat_interleave(copies, dim=0)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int,
               mask: torch.Tensor | None) -> torch.Tensor:
        """As `KVCache.attend`: q, k, v (B, heads, T or P, D) of pass 0 (start_pos 0) or of the thought pass whose
        slots start at `start_pos`, under `mask` (required for thought passes: the thought mask over all slots)."""
        T, P = self.seq_len, self.n_chains
        if start_pos == 0:
            self.prefix = (k, v)
            # causal, unless a routed layer gives its mask
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                  enable_gqa=k.size(1) != q.size(1))
        if self.prefix is None:
            # A routed layer skipped pass 0 (one token, not routed): those keys are masked out, any value does.
            zeros = k.new_zeros(k.size(0), k.size(1), T, k.size(3))
            self.prefix = (zeros, zeros)
        stored = 0 if self.chain is None else self.chain[0].size(3)  # thought passes stored so far
        pass_number = (start_pos - T) // P + 1
        if (start_pos - T) % P or pass_number <= stored or q.size(2) != P or mask is None:
            raise ValueError("ThoughtKVCache takes pass 0, then one slot per chain per pass, in order, with the"
                             " thought mask")
        self._append_pass(k, v, skipped=pass_number - stored - 1)
        return self._attend_prefix_and_own_chain(q, mask)

    def _append_pass(self, k: torch.Tensor, v: torch.Tensor, skipped: int) -> None:
        """Store a thought pass's keys and values, k and v (B, Hkv, P, D), one per chain, after `skipped`
        passes that a routed layer did not run (no row routed): their keys are masked out as unrouted, so
        zeros do."""
        new_k, new_v = k.unsqueeze(3), v.unsqueeze(3)                                   # (B, Hkv, P, 1, D)
        if skipped:
            new_k = torch.cat([new_k.new_zeros(*new_k.shape[:3], skipped, new_k.size(4)), new_k], 3)
            new_v = torch.cat([new_v.new_zeros(*new_v.shape[:3], skipped, new_v.size(4)), new_v], 3)
        if self.chain is None:
            self.chain = (new_k, new_v)
        else:
            # One tensor grown by concatenation: never written in place, so gradients flow through every
            # pass's keys, and a compiled block sees a size that grows (one dynamic graph), not a list that lengthens.
            chain_k, chain_v = self.chain
            self.chain = (torch.cat([chain_k, new_k], 3), torch.cat([chain_v, new_v], 3))

    def _attend_prefix_and_own_chain(self, q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attention output (B, H, P, D) of a thought pass's queries q (B, H, P, D): chain p's queries read
        the T prefix keys and chain p's own keys of every thought pass so far."""
        T = self.seq_len
        prefix_k, prefix_v = self.prefix                                                # (B, Hkv, T, D)
        chain_k, chain_v = self.chain                                                   # (B, Hkv, P, j, D)
        D = q.size(-1)
        Hkv, j = chain_k.size(1), chain_k.size(3)
        G = q.size(1) // Hkv  # query heads per key/value head
        q = rearrange(q, "b (hkv g) p d -> b hkv g p d", hkv=Hkv)

        # Every chain reads the same prefix keys: one matmul, the prefix broadcast over the G query heads.
        prefix_scores = q @ prefix_k.unsqueeze(2).transpose(-1, -2)                    # (B, Hkv, G, P, T)
        # Chain p reads only its own keys chain_k[:, :, p]: one matmul batched over chains.
        q_by_chain = q.transpose(2, 3)                                                  # (B, Hkv, P, G, D)
        own_scores = (q_by_chain @ chain_k.transpose(-1, -2)).transpose(2, 3)           # (B, Hkv, G, P, j)
        scores = torch.cat([prefix_scores, own_scores], -1) * D ** -0.5                 # (B, Hkv, G, P, T + j)
        scores = scores.masked_fill(~self._keep(mask, j, Hkv, G), float("-inf"))
        probs = scores.float().softmax(-1).to(q.dtype)
        prefix_probs, own_probs = probs[..., :T], probs[..., T:]
        y_prefix = prefix_probs @ prefix_v.unsqueeze(2)                                 # (B, Hkv, G, P, D)
        y_own = (own_probs.transpose(2, 3) @ chain_v).transpose(2, 3)                   # (B, Hkv, G, P, D)
        return rearrange(y_prefix + y_own, "b hkv g p d -> b (hkv g) p d")

    def _keep(self, mask: torch.Tensor, j: int, Hkv: int, G: int) -> torch.Tensor:
        """Which of the P x (T + j) scores of the compact layout the thought mask (P, T + jP), or
        (b, h, P, T + jP), allows: its prefix columns, then each chain's own column of every pass.
        Shaped to broadcast against the scores (B, Hkv, G, P, T + j)."""
        T, P = self.seq_len, self.n_chains
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))                # (b, h, P, T + jP)
        # Column T + i P + p is chain p's slot in thought pass i + 1: seen as (pass, chain), the thought
        # columns of row p hold its own slots where chain == p, the diagonal of (row, chain).
        by_pass_and_chain = mask[..., T:].unflatten(-1, (j, P))                         # (b, h, P, j, P)
        own = by_pass_and_chain.diagonal(dim1=-3, dim2=-1).transpose(-1, -2)           # (b, h, P, j)
        keep = torch.cat([mask[..., :T], own], -1)                                      # (b, h, P, T + j)
        if keep.size(1) == 1:  # one mask for every head
            return keep.unsqueeze(2)                                                    # (b, 1, 1, P, T + j)
        return keep.unflatten(1, (Hkv, G))                                              # (b, Hkv, G, P, T + j)


def thought_attention_mask(seq_len: int, positions: torch.Tensor, n_passes: int) -> torch.Tensor:
    """Bool (P, T + (n_passes - 1) P), True where a thought query may attend to a key.

    Row p is the chain at t = positions[p]; key columns are the cache slots: the T tokens of pass 0,
    then P slots per thought pass. The chain sees pass-0 keys s <= t and its own slot in every
    thought pass (an identity block per pass). Pass j uses the first T + jP columns.
    """
    P = positions.numel()
    prefix = torch.arange(seq_len, device=positions.device) <= positions[:, None]
    own_chain = torch.eye(P, dtype=torch.bool, device=positions.device).repeat(1, n_passes - 1)
    return torch.cat([prefix, own_chain], dim=1)
