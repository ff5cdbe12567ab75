"""Left-padded batches for KV-cached forward passes: ids, rotary positions, attention masks, cache rows.

All rows of a batch share the KV-cache slots (one `input_pos` for the batch), so shorter sequences
are padded on the left: every row's last token sits in the same slot and decoding appends in
lockstep. Padding is masked out as a key, never routed by Mixture-of-Depths (`valid`), and each
row's rotary positions start at 0 at its first real token, so a padded row computes what it would
alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def left_pad(seqs: Sequence[Sequence[int]], device: torch.device, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, T), valid (B, T) bool) for token lists of different lengths, padded on the left."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    valid = torch.zeros(len(seqs), T, dtype=torch.bool)
    for row, s in enumerate(seqs):
        if s:
            ids[row, T - len(s):] = torch.as_tensor(s, dtype=torch.long)
            valid[row, T - len(s):] = True
    return ids.to(device), valid.to(device)


def positions(valid: torch.Tensor) -> torch.Tensor:
    """Rotary positions (B, T): 0 at each row's first real token (padding gets 0 too)."""
    return (valid.long().cumsum(-1) - 1).clamp(min=0)


def prefill_mask(valid: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool: causal attention to real keys; a padding query sees only itself so its
    (discarded) output stays finite."""
    T = valid.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=valid.device).tril()
    diagonal = torch.eye(T, dtype=torch.bool, device=valid.device)
    return ((causal & valid[:, None, :]) | diagonal).unsqueeze(1)


def select_cache_rows(cache: list[torch.nn.Module], rows: torch.Tensor) -> None:
    """Keep (or repeat) batch rows `rows` of every layer's cache buffers (keys, values, routing), in place."""
    for layer in cache:
        for name, buffer in list(layer.named_buffers(recurse=False)):
            setattr(layer, name, buffer.index_select(0, rows))
