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


def forward_chunk(lm: torch.nn.Module, ids: torch.Tensor, position_ids: torch.Tensor, key_valid: torch.Tensor,
                  start: int, cache: list[torch.nn.Module], valid: torch.Tensor | None = None) -> torch.Tensor:
    """Final hidden states (B, c, n_embd) of tokens `ids` (B, c) written to cache slots start..start+c-1.

    key_valid: (B, >= start + c) bool, False at padding slots. Each query attends causally to the
    real keys; a padding query sees only itself, so its (discarded) output stays finite.
    """
    end = start + ids.size(1)
    slots = torch.arange(start, end, device=ids.device)
    keys = torch.arange(end, device=ids.device)
    mask = (key_valid[:, None, :end] & (keys <= slots[:, None])) | (keys == slots[:, None])
    return lm.hidden(lm.embed(ids), position_ids=position_ids, mask=mask.unsqueeze(1), kv_cache=cache, input_pos=slots,
                     valid=valid)


def prefill(lm: torch.nn.Module, ids: torch.Tensor, valid: torch.Tensor, cache: list[torch.nn.Module],
            chunk: int) -> torch.Tensor:
    """Run left-padded prompts (B, T) into `cache` `chunk` tokens at a time; last-position logits (B, V).

    Only the last position goes through the output head (the others' logits would be vocabulary-sized
    per token, GBs for few-shot prompts); chunks bound the attention and MLP activations.
    """
    pos = positions(valid)
    for start in range(0, ids.size(1), chunk):
        end = start + chunk
        hidden = forward_chunk(lm, ids[:, start:end], pos[:, start:end], valid, start, cache, valid[:, start:end])
    return lm.lm_head(hidden[:, -1])


def select_cache_rows(cache: list[torch.nn.Module], rows: torch.Tensor) -> None:
    """Keep (or repeat) batch rows `rows` of every layer's cache buffers (keys, values, routing), in place."""
    for layer in cache:
        for name, buffer in list(layer.named_buffers(recurse=False)):
            setattr(layer, name, buffer.index_select(0, rows))
