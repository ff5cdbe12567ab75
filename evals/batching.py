"""Left-padded batches for KV-cached decoding: the valid-slot mask, the prefill, cache rows.

All rows of a batch share the KV-cache slots (one start slot for the batch), so shorter prompts
are right-aligned: every row's last prompt token sits in the same slot and decoding appends in
lockstep. The padding slots in front are masked out as keys, and each row's rotary positions start
at 0 at its first real token, so a row computes what it would alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def valid_slots(prompts: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """(B, T) bool, T the longest prompt: True at the slots a right-aligned prompt occupies."""
    T = max(len(p) for p in prompts)
    lengths = torch.tensor([len(p) for p in prompts])
    return (torch.arange(T) >= T - lengths[:, None]).to(device)


def prefill(lm: torch.nn.Module, prompts: Sequence[Sequence[int]], cache: list[torch.nn.Module],
            chunk: int) -> torch.Tensor:
    """Run each prompt into its row of `cache`, right-aligned at the longest prompt's length, `chunk`
    tokens per forward; last-position logits (B, V).

    Rows run one at a time into a one-row cache that is then copied over, so no padding is computed
    (a batch of few-shot prompts of mixed lengths is up to a third padding), and only the last
    position goes through the output head.
    """
    device = lm.embed.weight.device
    T = max(len(p) for p in prompts)
    last = []
    for row, prompt in enumerate(prompts):
        n = len(prompt)
        if n == 0:
            raise ValueError(f"prompt {row} of the batch is empty; generation needs at least one token")
        own = lm.make_kv_cache(1, n)
        ids = torch.tensor([list(prompt)], device=device)
        for start in range(0, n, chunk):
            hidden = lm.hidden(lm.embed(ids[:, start:start + chunk]), kv_cache=own, start_pos=start)
        last.append(hidden[0, -1])
        for mine, shared in zip(own, cache):
            for name, buffer in mine.named_buffers(recurse=False):
                slot_axis = 2 if buffer.dim() == 4 else 1  # keys/values (B, heads, slots, dim); routing flags (B, slots)
                getattr(shared, name)[row:row + 1].narrow(slot_axis, T - n, n).copy_(buffer)
    return lm.lm_head(torch.stack(last))


def _replace_buffers(cache: list[torch.nn.Module], new: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Replace every layer's cache buffers (keys, values, routing flags) by `new(buffer)`."""
    for layer in cache:
        for name, buffer in list(layer.named_buffers(recurse=False)):
            setattr(layer, name, new(buffer))


def select_cache_rows(cache: list[torch.nn.Module], rows: torch.Tensor) -> None:
    """Keep (or repeat) batch rows `rows` of every layer's cache buffers (keys, values, routing), in place."""
    _replace_buffers(cache, lambda buffer: buffer.index_select(0, rows))


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
