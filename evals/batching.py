"""KV-cache rows for continuous batching: prefill prompts, copy one into a row, compact, shift.

All rows of the decoding cache share its slots: each step writes every row's new token into the same
slot. A prompt joins a row right-aligned so that it ends just before that slot; the slots in front of
it, left by the row's earlier occupants, are masked out as keys, and its rotary positions start at 0
at its first token, so a row computes what it would alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def _slot_axis(buffer: torch.Tensor) -> int:
    """Keys/values are (rows, heads, slots, dim); Mixture-of-Depths routing flags are (rows, slots)."""
    return 2 if buffer.dim() == 4 else 1


def prefill_prompts(lm: torch.nn.Module, prompts: Sequence[Sequence[int]], chunk: int,
                    spare_slots: int = 0) -> tuple[list[torch.nn.Module], torch.Tensor]:
    """A KV cache with one row per prompt, each prompt in its row's first slots (right-padded to the
    longest, so causal attention never lets a prompt's tokens see the padding), `spare_slots` free
    slots after the longest, and the final hidden states (P, C) of the prompts' last tokens. Runs
    `chunk` tokens per row per forward."""
    if not all(prompts):
        raise ValueError("a prompt is empty; generation needs at least one token")
    longest = max(map(len, prompts))
    own = lm.make_kv_cache(len(prompts), longest + spare_slots)
    device = lm.embed.weight.device
    ids = torch.tensor([list(p) + [0] * (longest - len(p)) for p in prompts], device=device)
    hidden = torch.cat([lm.hidden(lm.embed(ids[:, start:start + chunk]), kv_cache=own, start_pos=start)
                        for start in range(0, longest, chunk)], dim=1)
    last = torch.tensor([len(p) - 1 for p in prompts], device=device)
    return own, hidden[torch.arange(len(prompts), device=device), last]


def copy_into_row(own: list[torch.nn.Module], source: int, cache: list[torch.nn.Module], row: int,
                  first_slot: int, length: int) -> None:
    """Copy the first `length` slots of row `source` of a prefill cache (`prefill_prompts`) into row
    `row` of `cache`, from slot `first_slot` on."""
    for mine, shared in zip(own, cache):
        for name, buffer in mine.named_buffers(recurse=False):
            axis = _slot_axis(buffer)
            getattr(shared, name)[row:row + 1].narrow(axis, first_slot, length).copy_(
                buffer[source:source + 1].narrow(axis, 0, length))


def _replace_buffers(cache: list[torch.nn.Module], new: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Replace every layer's cache buffers (keys, values, routing flags) by `new(buffer)`."""
    for layer in cache:
        for name, buffer in list(layer.named_buffers(recurse=False)):
            setattr(layer, name, new(buffer))


def compact_cache_rows(cache: list[torch.nn.Module], alive: Sequence[int]) -> list[int]:
    """Keep only batch rows `alive` (ascending) of every layer's cache buffers: the alive rows past the
    first len(alive) move into the finished rows among them, then each buffer becomes a view of its
    first len(alive) rows. A step that finishes f rows copies at most f rows. Returns, per new row,
    the old row now in it."""
    n = len(alive)
    holes = sorted(set(range(n)) - set(alive))
    movers = [j for j in alive if j >= n]
    order = list(range(n))
    for hole, mover in zip(holes, movers):
        order[hole] = mover
    device = next(cache[0].buffers()).device
    src, dst = torch.tensor(movers, device=device), torch.tensor(holes, device=device)

    def keep(buffer: torch.Tensor) -> torch.Tensor:
        if movers:
            buffer.index_copy_(0, dst, buffer.index_select(0, src))
        return buffer[:n]

    _replace_buffers(cache, keep)
    return order


def shift_cache_slots(cache: list[torch.nn.Module], first: int, end: int) -> None:
    """Move slots first .. end - 1 of every row to slots 0 .. end - first - 1, in place (the slots in
    front of `first` are no longer attended to by any row)."""
    def shift(buffer: torch.Tensor) -> torch.Tensor:
        axis = _slot_axis(buffer)
        buffer.narrow(axis, 0, end - first).copy_(buffer.narrow(axis, first, end - first).clone())
        return buffer

    _replace_buffers(cache, shift)
