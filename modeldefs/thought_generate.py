"""KV-cached decoding in which every produced token is preceded by a hidden Quiet-STaR thought.

The cache holds the sequence in slots 0..n-1 (slot = rotary position). To predict token n, the
thought <start>, s_1 .. s_{n_ahead-3}, <end> is written one token at a time into slots n, n+1, ...
at positions n, n+1, ...: plain causal attention over the cache then gives exactly the training
mask (the prefix <= n-1 plus the thought's own earlier tokens). The head mixes the hidden state
after <end> with the plain one at n-1, a token is chosen, and it is written into slot n, which
throws the thought away (later steps never read slots past their own). Per token this costs
n_ahead single-token forwards (n_ahead - 1 thought tokens + the token), with no recomputation of
the sequence.
"""

from __future__ import annotations

import torch

from modeldefs.attention import KVCache
from modeldefs.generate import check_request, sample_next
from modeldefs.quietstar import QuietStar


def _step(model: QuietStar, x: torch.Tensor, cache: list[KVCache], slot: int, positions: torch.Tensor | None = None,
          key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Hidden state (B, C) of one input vector per row (B, C) written at cache slot `slot`: at rotary
    position `slot`, attending to every slot up to it, or at `positions` (B,), attending to the slots
    that `key_valid` (B, S) marks."""
    position_ids = None if positions is None else positions[:, None]
    mask = None if key_valid is None else key_valid[:, None, None, :slot + 1]
    return model.lm.hidden(x[:, None], position_ids=position_ids, mask=mask, kv_cache=cache, start_pos=slot)[:, -1]


def thought_hidden(model: QuietStar, cache: list[KVCache], slot: int, generator: torch.Generator | None = None,
                   positions: torch.Tensor | None = None, key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Think after the token in slot `slot - 1`, in slots `slot` .. `slot + n_ahead - 2` of the cache;
    returns the hidden state after <end> (B, C). The slots it used are free for the next real token.

    Rows that share a cache at different positions (evals' continuous batching) pass `positions` (B,),
    the rotary position of each row's <start>, and `key_valid` (B, S), the slots each row may attend
    to: each thought token's slot is marked there as it is written (slots past the newest token are
    read only after the next token or thought writes them).
    """
    c = model.thought_config
    B = cache[0].k.size(0)
    x = model.meta_embedding("start", (B,))
    for i in range(c.n_ahead - 1):
        if key_valid is not None:
            key_valid[:, slot + i] = True
        h = _step(model, x, cache, slot + i, None if positions is None else positions + i, key_valid)
        if i < c.n_sampled:
            token = model.sample_thought(model.lm.lm_head(h), c.eval_thought_temperature, generator)
            x = model.lm.embed(token)
        else:
            x = model.meta_embedding("end", (B,))
    return h


@torch.inference_mode()
def generate_with_thoughts(model: QuietStar, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                           eos_id: int | None = None, think: bool = True,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """Continue `prompt` (B, T) by up to `max_new_tokens`, thinking before each token; returns (B, T + n).

    Same contract as `modeldefs.generate.generate` (rows that produced `eos_id` are padded with it);
    `temperature` is for the produced tokens, thoughts use the model's eval_thought_temperature.
    think=False decodes with the plain LM (identical to `generate`).
    """
    if not isinstance(model, QuietStar):
        raise TypeError(f"generate_with_thoughts needs a QuietStar model; a {type(model).__name__} decodes with "
                        "modeldefs.generate.generate")
    check_request(prompt, max_new_tokens, temperature)
    B, T = prompt.shape
    total = T + max_new_tokens
    scratch = model.thought_config.n_ahead - 2 if think else 0  # thought slots past the last token
    limit = model.lm.config.block_size
    if total + scratch > limit:
        raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) + thought ({scratch}) exceeds"
                         f" block_size={limit}")
    cache = model.lm.make_kv_cache(B, total + scratch)
    out = torch.empty(B, total, dtype=prompt.dtype, device=prompt.device)
    out[:, :T] = prompt
    finished = torch.zeros(B, dtype=torch.bool, device=prompt.device)
    h = model.lm.hidden(model.lm.embed(prompt), kv_cache=cache)[:, -1]
    for pos in range(T, total):
        if think:
            logits = model.mix(h, thought_hidden(model, cache, pos, generator))[0]
        else:
            logits = model.lm.lm_head(h)
        token = sample_next(logits, temperature, generator=generator)
        if eos_id is not None:
            token = token.masked_fill(finished, eos_id)
            finished |= token == eos_id
        out[:, pos] = token
        if (eos_id is not None and bool(finished.all())) or pos == total - 1:
            return out[:, : pos + 1]
        h = _step(model, model.lm.embed(token), cache, pos)
    return out
