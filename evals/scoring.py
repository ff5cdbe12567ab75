"""Log-likelihood scoring with lm-evaluation-harness's contract, batched and prefix-shared.

`loglikelihood` groups requests by context: each distinct context runs once (left-padded in a
batch of contexts, longest first), its last logits give every continuation's first token, and the
KV cache is copied per continuation for the remaining continuation tokens. For CommonsenseQA's
five one-token letters, one context forward scores all five.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from evals.batching import forward_chunk, left_pad, prefill, select_cache_rows
from evals.model import EvalModel


def encode_pair(model: EvalModel, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's HF backend makes them: trailing spaces of the
    context move to the continuation, and the continuation's ids are the tail of the whole string's
    ids (so a merge across the boundary is tokenised as in running text)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = model.encode(context + continuation)
    context_ids = model.encode(context)
    return context_ids, whole[len(context_ids):]


@torch.inference_mode()
def loglikelihood(model: EvalModel, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                  batch_size: int = 16, progress: bool = False, think: bool = False,
                  chunk: int = 256) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): the summed log-probability of the continuation given
    the context, and whether greedy decoding would produce exactly that continuation.

    An empty context is replaced by the prefix token (BOS, else EOS) and an over-long one keeps its
    last tokens, as in lm-eval. Results come back in request order.

    batch_size: distinct contexts per forward pass (their continuations ride along; a batch's longest
    context plus longest continuation fits block_size).
    chunk: tokens per forward along the sequence (bounds the (rows, chunk, vocab) logits in memory).
    think: score with a Quiet-STaR model's thought-mixed logits (`next_token_logits(think=True)`,
    a full forward per request: thoughts have no shared-prefix cache).
    """
    if think and not model.has_thoughts:
        raise ValueError(f"scoring with thoughts needs a Quiet-STaR model; {model.source} is a plain "
                         f"{type(model.net).__name__}")
    L = model.block_size
    normalised = []
    for i, (context, continuation) in enumerate(requests):
        if len(continuation) == 0:
            raise ValueError(f"request {i} has an empty continuation; there is nothing to score")
        if len(continuation) > L:
            raise ValueError(f"request {i}: continuation of {len(continuation)} tokens exceeds block_size={L}")
        context = list(context) or [model.prefix_token_id]
        normalised.append((tuple(context[-(L - len(continuation) + 1):]), tuple(continuation)))
    if think:
        return [_score_with_thoughts(model, c, k) for c, k in tqdm(normalised, desc="loglikelihood (thoughts)",
                                                                      disable=not progress)]
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (context, _) in enumerate(normalised):
        groups.setdefault(context, []).append(i)
    # Longest first: similar lengths share a batch (little padding) and memory peaks at the start.
    order = sorted(groups, key=lambda c: -(len(c) + max(len(normalised[i][1]) for i in groups[c])))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(normalised)
    extra = {c: max(len(normalised[i][1]) for i in groups[c]) - 1 for c in order}
    batches: list[list[tuple[int, ...]]] = [[]]
    for c in order:  # a batch's padded context plus its longest continuation must fit the cache
        batch = batches[-1]
        grown = (*batch, c)
        if batch and (len(batch) == batch_size or max(map(len, grown)) + max(extra[b] for b in grown) > L):
            batches.append(batch := [])
        batch.append(c)
    for contexts in tqdm(batches, desc="loglikelihood", disable=not progress):
        members = [(row, i) for row, c in enumerate(contexts) for i in groups[c]]
        scores = _score_batch(model, contexts, [(row, normalised[i][1]) for row, i in members], chunk)
        for (_, i), score in zip(members, scores):
            results[i] = score
    return results


def _score_batch(model: EvalModel, contexts: list[tuple[int, ...]], continuations: list[tuple[int, tuple[int, ...]]],
                 chunk: int) -> list[tuple[float, bool]]:
    """Scores of continuations, each given as (row of its context in `contexts`, ids)."""
    lm, device = model.lm, model.device
    ids, valid = left_pad(contexts, device)
    B, T = ids.shape
    R = len(continuations)
    extra = max(len(c) for _, c in continuations) - 1  # continuation tokens fed after the context
    cache = lm.make_kv_cache(B, T + extra)
    rows = torch.tensor([row for row, _ in continuations], device=device)
    targets = torch.zeros(R, extra + 1, dtype=torch.long)
    for r, (_, c) in enumerate(continuations):
        targets[r, :len(c)] = torch.as_tensor(c)
    targets = targets.to(device)
    lengths = torch.tensor([len(c) for _, c in continuations], device=device)
    real = torch.arange(extra + 1, device=device) < lengths[:, None]
    totals = torch.zeros(R, device=device)
    greedy = torch.ones(R, dtype=torch.bool, device=device)

    def accumulate(logits: torch.Tensor, first: int) -> None:  # logits (R, c, V) predict targets[:, first:first+c]
        nonlocal totals, greedy
        logprobs = logits.float().log_softmax(-1)
        target, keep = targets[:, first:first + logits.size(1)], real[:, first:first + logits.size(1)]
        totals = totals + (logprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1) * keep).sum(-1)
        greedy = greedy & ((logprobs.argmax(-1) == target) | ~keep).all(-1)

    accumulate(prefill(lm, ids, valid, cache, chunk).index_select(0, rows).unsqueeze(1), 0)
    if extra:
        select_cache_rows(cache, rows)
        key_valid = torch.cat([valid.index_select(0, rows), torch.ones(R, extra, dtype=torch.bool, device=device)], 1)
        context_lengths = valid.sum(-1).index_select(0, rows)
        for first in range(0, extra, chunk):
            step = torch.arange(first, min(first + chunk, extra), device=device)
            hidden = forward_chunk(lm, targets[:, step], context_lengths[:, None] + step, key_valid, T + first, cache,
                                   valid=step < (lengths[:, None] - 1))
            accumulate(lm.lm_head(hidden), first + 1)
    return list(zip(totals.tolist(), greedy.tolist()))


def _score_with_thoughts(model: EvalModel, context: tuple[int, ...], continuation: tuple[int, ...]) -> tuple[float, bool]:
    ids = torch.tensor([[*context, *continuation[:-1]]], device=model.device)
    logprobs = model.net.next_token_logits(ids, think=True)[0, len(context) - 1:].float().log_softmax(-1)
    target = torch.tensor(continuation, device=model.device)
    return logprobs.gather(-1, target[:, None]).sum().item(), bool((logprobs.argmax(-1) == target).all())


def loglikelihood_rolling(model: EvalModel, token_lists: Sequence[Sequence[int]], batch_size: int = 16,
                          progress: bool = False, chunk: int = 256) -> list[float]:
    """Total log-probability of each token list, from the prefix token on (lm-eval's rolling
    log-likelihood, for perplexity): disjoint windows of up to block_size predicted tokens, each
    conditioned on as much preceding text as fits."""
    L = model.block_size
    requests, owner = [], []
    for i, tokens in enumerate(token_lists):
        full = [model.prefix_token_id, *tokens]
        for s in range(0, len(tokens), L):
            end = min(s + L, len(tokens))
            first = max(0, end - L)  # the window's input full[first:end] fits the context
            requests.append((full[first:s + 1], full[s + 1:end + 1]))
            owner.append(i)
    totals = [0.0] * len(token_lists)
    for i, (logprob, _) in zip(owner, loglikelihood(model, requests, batch_size, progress, chunk=chunk)):
        totals[i] += logprob
    return totals
