"""KV-cached autoregressive decoding: greedy or sampled (temperature, top-k, top-p)."""

from __future__ import annotations

import torch

from modeldefs.model import Transformer


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token (B,) from logits (B, V): argmax when temperature is 0."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p  # keep the token that crosses top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def check_request(prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                  top_p: float | None = None) -> None:
    """Refuse a malformed prompt or decoding setting with a ValueError naming it."""
    if prompt.dim() != 2 or prompt.size(1) < 1:
        raise ValueError(f"prompt must hold token ids of shape (batch, length >= 1), got shape {tuple(prompt.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if not temperature >= 0:  # nan too, which would reach the sampler as nan probabilities
        raise ValueError(f"temperature={temperature} must be a number >= 0 (0 decodes greedily)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1 (or None for no top-k filter)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1] (or None for no nucleus filter)")


@torch.inference_mode()
def generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Continue `prompt` (B, T) by up to `max_new_tokens`; returns (B, T + n) with the prompt.

    Rows that produced `eos_id` are padded with it; decoding stops when every row has.
    """
    if not isinstance(model, Transformer):
        raise TypeError(f"generate decodes a Transformer; a {type(model).__name__} decodes with "
                        "modeldefs.thought_generate.generate_with_thoughts")
    check_request(prompt, max_new_tokens, temperature, top_k, top_p)
    B, T = prompt.shape
    total = T + max_new_tokens
    if total > model.config.block_size:
        raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds block_size={model.config.block_size}")
    cache = model.make_kv_cache(B, total)
    out = torch.empty(B, total, dtype=prompt.dtype, device=prompt.device)
    out[:, :T] = prompt
    finished = torch.zeros(B, dtype=torch.bool, device=prompt.device)
    logits = model(prompt, kv_cache=cache)[:, -1]
    for pos in range(T, total):
        token = sample_next(logits, temperature, top_k, top_p, generator)
        if eos_id is not None:
            token = token.masked_fill(finished, eos_id)
            finished |= token == eos_id
        out[:, pos] = token
        if (eos_id is not None and bool(finished.all())) or pos == total - 1:
            return out[:, : pos + 1]
        logits = model(token[:, None], kv_cache=cache, start_pos=pos)[:, -1]
    return out
