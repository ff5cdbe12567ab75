"""KV-cache rows for continuous batching: prefill one prompt, copy it into a row, compact, shift.

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


def prefill_prompt(lm: torch.nn.Module, prompt: Sequence[int], chunk: int,
                   spare_slots: int = 0) -> tuple[list[torch.nn.Module], torch.Tensor]:
    """A one-row KV cache holding `prompt` (run `chunk` tokens per forward, no padding) in its first
    slots, with `spare_slots` free ones after it, and the final hidden state (C,) of the last token."""
    if not prompt:
        raise ValueError("a prompt is empty; generation needs at least one token")
    own = lm.make_kv_cache(1, len(prompt) + spare_slots)
    ids = torch.tensor([list(prompt)], device=lm.embed.weight.device)
    for start in range(0, len(prompt), chunk):
        hidden = lm.hidden(lm.embed(ids[:, start:start + chunk]), kv_cache=own, start_pos=start)
    return own, hidden[0, -1]


def copy_into_row(own: list[torch.nn.Module], cache: list[torch.nn.Module], row: int, first_slot: int,
                  length: int) -> None:
    """Copy the first `length` slots of a one-row cache (`prefill_prompt`) into row `row` of `cache`,
    from slot `first_slot` on."""
    for mine, shared in zip(own, cache):
        for name, buffer in mine.named_buffers(recurse=False):
            axis = _slot_axis(buffer)
            getattr(shared, name)[row:row + 1].narrow(axis, first_slot, length).copy_(buffer.narrow(axis, 0, length))


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
