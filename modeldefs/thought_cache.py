"""The keys/values of Quiet-STaR's parallel thought forward, and the mask that says which a thought may read.

Slot layout (`QuietStar.think`): pass 0 fills slots 0..T-1 with the sequence; thought pass j >= 1 adds one
slot per thought chain, slots T+(j-1)P .. T+jP-1. The chain at position t may read the prefix s <= t
and its own slot in every pass, nothing of another chain.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class ThoughtKVCache:
    """The keys/values of one layer in the parallel thought forward, attended to compactly.

    Pass 0 (slots 0..T-1) is ordinary causal attention; its keys/values are kept. Thought pass j
    (slots T+(j-1)P .. T+jP-1, one per chain) attends, for the chain at t, to the T pass-0 keys and to
    the chain's own j keys only: scores are P x (T + j), not the P x (T + jP) of one dense mask over
    every slot, most of which would be masked out. The caller's mask is still given over all slots
    (it carries Mixture-of-Depths routing); its entries for other chains are never read. Keys and
    values are kept as autograd tensors, never written in place, so gradients flow through them.
    """

    def __init__(self, batch_size: int, seq_len: int, n_chains: int, max_len: int, device: torch.device) -> None:
        self.seq_len, self.n_chains = seq_len, n_chains
        self.prefix: tuple[torch.Tensor, torch.Tensor] | None = None
        self.chain: tuple[torch.Tensor, torch.Tensor] | None = None  # (B, Hkv, P, passes so far, D) keys, values
        self.routed = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # for routed blocks

    def repeat_rows(self, copies: int) -> None:
        """After pass 0 over one row per example, give each of its `copies` thought samples its rows
        (adjacent), so pass 0 is computed once per example, not once per sample."""
        if self.prefix is not None:
            self.prefix = tuple(t.repeat_interleave(copies, dim=0) for t in self.prefix)
        self.routed = self.routed.repeat_interleave(copies, dim=0)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int,
               mask: torch.Tensor | None) -> torch.Tensor:
        """As `KVCache.attend`: q, k, v (B, heads, T or P, D) of pass 0 (start_pos 0) or of the thought pass whose
        slots start at `start_pos`, under `mask` (required for thought passes: the thought mask over all slots)."""
        T, P = self.seq_len, self.n_chains
        if start_pos == 0:  # pass 0: causal unless a routed layer gives its mask
            self.prefix = (k, v)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                  enable_gqa=k.size(1) != q.size(1))
        if self.prefix is None:  # a routed layer skipped pass 0 (one token, not routed): those keys are
            self.prefix = (k.new_zeros(k.size(0), k.size(1), T, k.size(3)),) * 2  # masked out, any value does
        done = 0 if self.chain is None else self.chain[0].size(3)  # thought passes cached so far
        this = (start_pos - T) // P + 1  # this pass's number
        if (start_pos - T) % P or this <= done or q.size(2) != P or mask is None:
            raise ValueError("ThoughtKVCache takes pass 0, then one slot per chain per pass, in order, with the"
                             " thought mask")
        new = (k.unsqueeze(3), v.unsqueeze(3))
        if this > done + 1:  # a routed layer skipped passes (no row routed): their keys are masked out
            # as unrouted, any value does
            new = tuple(torch.cat([t.new_zeros(*t.shape[:3], this - done - 1, t.size(4)), t], 3) for t in new)
        # One tensor grown by concatenation: never written in place, so gradients flow through every pass's
        # keys, and a compiled block sees a size that grows (one dynamic graph), not a list that lengthens.
        self.chain = new if self.chain is None else tuple(torch.cat(t, 3) for t in zip(self.chain, new))
        kc, vc = self.chain                                                               # (B, Hkv, P, j, D)
        j = kc.size(3)
        B, H, _, D = q.shape
        Hkv = k.size(1)
        G = H // Hkv  # query heads per key/value head
        q = q.reshape(B, Hkv, G, P, D)
        k0, v0 = (t.unsqueeze(2) for t in self.prefix)                                   # (B, Hkv, 1, T, D)
        # own-chain scores as one matmul batched over chains: (B, Hkv, P, G, D) @ (B, Hkv, P, D, j)
        own_scores = (q.transpose(2, 3) @ kc.transpose(-1, -2)).transpose(2, 3)         # (B, Hkv, G, P, j)
        scores = torch.cat([q @ k0.transpose(-1, -2), own_scores], -1) * D ** -0.5
        # the mask's prefix columns and each chain's own column in every pass
        m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))                    # (b, h, P, T + jP)
        own = m[..., T:].unflatten(-1, (j, P)).diagonal(dim1=-3, dim2=-1)               # (b, h, j, P)
        keep = torch.cat([m[..., :T], own.transpose(-1, -2)], -1)                       # (b, h, P, T + j)
        keep = keep.unsqueeze(2) if keep.size(1) == 1 else keep.unflatten(1, (Hkv, G))
        scores = scores.masked_fill(~keep, float("-inf"))
        probs = scores.float().softmax(-1).to(q.dtype)
        y = probs[..., :T] @ v0 + (probs[..., T:].transpose(2, 3) @ vc).transpose(2, 3)  # (B, Hkv, G, P, D)
        return y.reshape(B, H, P, D)


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
