"""A decoding step with fixed shapes, replayed as a CUDA graph on a GPU.

At a few hundred million parameters one decoding step is bound by launching its ~1,000 kernels, not by
running them (gpt-fast's observation). A CUDA graph replays the recorded kernels in one launch, but only
on the same shapes and memory, so this step has fixed shapes: `SlotKVCache` writes the new token's keys
and values at a slot held in a device tensor and attends over all its slots under the rows' key mask
(slots past the newest are masked out), where `KVCache` attends over the slice up to the newest slot.
Fixed shapes also spare the attention backend a new kernel plan for every key length. On a CPU the same
step runs eagerly (tests compare it with the sliced step).
"""

from __future__ import annotations

import torch

from modeldefs.attention import KVCache
from modeldefs.model import Transformer


class SlotKVCache(KVCache):
    """A `KVCache` that writes at `slot` (a (1,) long device tensor, shared by the layers and set before each
    step) and returns every slot: the same shapes at each step. Its attention needs a key mask."""

    def __init__(self, batch_size: int, n_kv_head: int, max_len: int, head_dim: int, dtype: torch.dtype,
                 slot: torch.Tensor) -> None:
        super().__init__(batch_size, n_kv_head, max_len, head_dim, dtype, slot.device)
        self.slot = slot  # not a buffer: the row and slot moves of evals.batching touch keys and values only

    def update(self, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v (B, H, T, D) from slot `self.slot` on (`start_pos` is not used); return the whole cache."""
        index = self.slot + torch.arange(k.size(2), device=k.device)
        self.k.index_copy_(2, index, k)
        self.v.index_copy_(2, index, v)
        return self.k, self.v


def slot_kv_cache(lm: Transformer, batch_size: int, max_len: int, slot: torch.Tensor) -> list[SlotKVCache]:
    """One `SlotKVCache` per block of a plain (not Mixture-of-Depths) model, in its weights' dtype."""
    c, dtype = lm.config, lm.embed.weight.dtype
    return [SlotKVCache(batch_size, c.n_kv_head, max_len, c.head_dim, dtype, slot) for _ in range(c.n_layer)]


class DecodeStep:
    """Next-token logits (rows, vocab) from each row's `token` (rows,) at rotary position `positions` (rows,),
    written at the caches' slot and attending to the slots `key_valid` (rows, slots) marks. The inputs are
    tensors the caller updates in place between steps. With `graph`, the first call records the step as a
    CUDA graph (after one eager warm-up run) and every call replays it; the logits are then the graph's
    output tensor, overwritten by the next call."""

    def __init__(self, lm: Transformer, cache: list[SlotKVCache], token: torch.Tensor, positions: torch.Tensor,
                 key_valid: torch.Tensor, graph: bool) -> None:
        self.lm, self.cache, self.token, self.positions, self.key_valid = lm, cache, token, positions, key_valid
        self.use_graph = graph
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def run(self) -> torch.Tensor:
        """The step, eagerly."""
        h = self.lm.hidden(self.lm.embed(self.token[:, None]), position_ids=self.positions[:, None],
                           mask=self.key_valid[:, None, None, :], kv_cache=self.cache)
        return self.lm.lm_head(h[:, -1])

    def __call__(self) -> torch.Tensor:
        if not self.use_graph:
            return self.run()
        # On the model's GPU, not the current one: a graph captured on another device's stream records nothing
        # of the model's kernels, and replaying it would repeat the capture-time logits (pytorch#87894).
        with torch.cuda.device(self.token.device):
            if self.graph is None:
                self._capture()
            self.graph.replay()
        return self.logits

    def _capture(self) -> None:
        # The warm-up (on a side stream, as capture requires) picks kernels and allocates workspaces outside the
        # graph; its writes, at this step's slot, are overwritten by the replay that follows.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.run()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):
                self.logits = self.run()
        except RuntimeError as error:
            raise RuntimeError(f"recording the decoding step as a CUDA graph failed ({error}); decode without: "
                               "--no-cuda-graph (quietdepth-eval), cuda_graph=false (lm-eval's --model_args), "
                               "DecodingConfig(cuda_graph=False), fixed_step=False (evals.decoding's functions)"
                               ) from error
