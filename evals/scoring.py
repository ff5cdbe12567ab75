"""Log-likelihood scoring with lm-evaluation-harness's contract, packed without padding.

`loglikelihood` groups requests by context and lays each group out as a tree in one row: the
context, then every continuation (less its last token) after it. A continuation's tokens attend
to the context and to their own earlier tokens only, and their rotary positions continue from the
context's length, so each one computes what it would alone, while the context runs once for all
of them (CommonsenseQA's five letters cost one context). Short groups share a packed row as long as
the longest group (at most `pack_tokens`; a block-diagonal mask keeps them apart, and attention
spans the row, so rows stay short), rows of similar length share a forward, and the output head
runs only at the positions whose next token is scored. One forward per batch
of rows, no KV cache. Mixture-of-Depths models score exactly too: at inference a routed block
decides token by token, and its routing mask is intersected with the tree mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from evals.model import EvalModel

Group = tuple[tuple[int, ...], list[tuple[int, ...]]]
"""A context and the distinct continuations scored after it in one row."""
HEAD_CHUNK = 512
"""Positions whose vocabulary logits are held at once (512 x 49,152 fp32 logits: 100 MB)."""


def encode_pairs(model: EvalModel, requests: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) of each (context, continuation) as lm-eval's HF backend makes
    them: trailing spaces of the context move to the continuation, and the continuation's ids are the
    tail of the whole string's ids (so a merge across the boundary is tokenised as in running text).
    Each distinct context is tokenised once, and all strings in two batched tokenizer calls."""
    split = []
    for context, continuation in requests:
        spaces = len(context) - len(context.rstrip())
        split.append((context[:-spaces], context[-spaces:] + continuation) if spaces else (context, continuation))
    contexts = list(dict.fromkeys(context for context, _ in split))
    context_ids = dict(zip(contexts, model.encode_batch(contexts)))
    wholes = model.encode_batch([context + continuation for context, continuation in split])
    return [(context_ids[context], whole[len(context_ids[context]):]) for (context, _), whole in zip(split, wholes)]


@torch.inference_mode()
def loglikelihood(model: EvalModel, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                  batch_size: int = 16, progress: bool = False, think: bool = False,
                  pack_tokens: int = 512) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): the summed log-probability of the continuation given
    the context, and whether greedy decoding would produce exactly that continuation.

    An empty context is replaced by the prefix token (BOS, else EOS) and an over-long one keeps its
    last tokens, as in lm-eval. Results come back in request order.

    batch_size: packed rows per forward pass.
    pack_tokens: most tokens per packed row (a context with more continuations than fit is split over
    rows, each repeating the context; a single request longer than this gets a row of its own). Rows
    are as long as the longest context group, up to this.
    think: score with a Quiet-STaR model's thought-mixed logits (`next_token_logits(think=True)`),
    thoughts only at the scored positions, once per distinct context + continuation[:-1] (the five
    one-letter answers of a CommonsenseQA question share one); inputs of equal shape are batched.
    """
    if think and not model.has_thoughts:
        raise ValueError(f"scoring with thoughts needs a Quiet-STaR model; {model.source} is a plain "
                         f"{type(model.net).__name__}")
    if batch_size < 1 or pack_tokens < 1:
        raise ValueError(f"batch_size={batch_size} and pack_tokens={pack_tokens} must both be >= 1")
    # Thinking reads a context plus n_ahead - 1 thought positions: long contexts keep that much less of their start.
    L = model.block_size - (model.net.thought_config.n_ahead - 1 if think else 0)
    normalised = []
    for i, (context, continuation) in enumerate(requests):
        if len(continuation) == 0:
            raise ValueError(f"request {i} has an empty continuation; there is nothing to score")
        if len(continuation) > L:
            raise ValueError(f"request {i}: continuation of {len(continuation)} tokens exceeds block_size="
                             f"{model.block_size}" + (" less the thought positions" if think else ""))
        context = list(context) or [model.prefix_token_id]
        normalised.append((tuple(context[-(L - len(continuation) + 1):]), tuple(continuation)))
    if think:
        return _score_with_thoughts(model, normalised, batch_size, progress)
    if not normalised:  # nothing to pack (e.g. rolling scores of empty texts only)
        return []
    continuations: dict[tuple[int, ...], dict[tuple[int, ...], None]] = {}
    for context, continuation in normalised:
        continuations.setdefault(context, {})[continuation] = None
    groups = _split(continuations, min(pack_tokens, L))
    rows = _pack(groups, max(map(_length, groups)))
    scores: dict[tuple[tuple[int, ...], tuple[int, ...]], tuple[float, bool]] = {}
    for start in tqdm(range(0, len(rows), batch_size), desc="loglikelihood", disable=not progress):
        scores.update(_score_rows(model, rows[start:start + batch_size]))
    return [scores[request] for request in normalised]


def _length(group: Group) -> int:
    """Tokens of a group's row segment: the context, and each continuation without its last token."""
    return len(group[0]) + sum(len(c) - 1 for c in group[1])


def _split(continuations: dict[tuple[int, ...], dict[tuple[int, ...], None]], limit: int) -> list[Group]:
    """Groups of at most `limit` tokens (or one continuation's group, which fits block_size)."""
    groups: list[Group] = []
    for context, conts in continuations.items():
        group: Group = (context, [])
        for c in conts:
            if group[1] and _length(group) + len(c) - 1 > limit:
                groups.append(group)
                group = (context, [])
            group[1].append(c)
        groups.append(group)
    return groups


def _pack(groups: list[Group], limit: int) -> list[list[Group]]:
    """Rows of groups, longest rows first: first-fit decreasing, so rows fill to `limit` and a batch
    of rows needs little padding."""
    rows: list[list[Group]] = []
    free: list[int] = []
    for group in sorted(groups, key=_length, reverse=True):
        n = _length(group)
        row = next((r for r, space in enumerate(free) if n <= space), None)
        if row is None:
            rows.append([])
            free.append(limit)
            row = len(rows) - 1
        rows[row].append(group)
        free[row] -= n
    return sorted(rows, key=lambda r: sum(map(_length, r)), reverse=True)


def _score_rows(model: EvalModel, rows: list[list[Group]]
                ) -> dict[tuple[tuple[int, ...], tuple[int, ...]], tuple[float, bool]]:
    """Scores of every (context, continuation) in a batch of packed rows, by one forward."""
    lm, device = model.lm, model.device
    N = max(sum(map(_length, row)) for row in rows)
    # Per slot: token, rotary position, group (padding: -1) and branch (0 = context), built as lists.
    ids, pos, branch = ([[0] * N for _ in rows] for _ in range(3))
    group_of = [[-1] * N for _ in rows]
    keys, at, targets = [], [], []  # per scored token: its request, the slot predicting it, the token
    for r, row in enumerate(rows):
        slot = 0
        for g, (context, conts) in enumerate(row):
            n = len(context)
            ids[r][slot:slot + n], pos[r][slot:slot + n] = context, range(n)
            length = _length((context, conts))
            group_of[r][slot:slot + length] = [g] * length
            last = r * N + slot + n - 1
            slot += n
            for b, c in enumerate(conts, 1):
                fed = len(c) - 1
                ids[r][slot:slot + fed], pos[r][slot:slot + fed] = c[:-1], range(n, n + fed)
                branch[r][slot:slot + fed] = [b] * fed
                keys.append((context, c))
                at += [last, *range(r * N + slot, r * N + slot + fed)]
                targets += c
                slot += fed
    owner = torch.tensor([k for k, (_, c) in enumerate(keys) for _ in c], device=device)
    ids, pos, branch = (torch.tensor(t, device=device) for t in (ids, pos, branch))
    group_of = torch.tensor(group_of, device=device)  # padding slots: each a group of its own
    group_of = torch.where(group_of >= 0, group_of, -1 - torch.arange(group_of.numel(), device=device).view_as(group_of))
    slots = torch.arange(N, device=device)
    mask = ((group_of[:, :, None] == group_of[:, None, :]) & (slots[None, :] <= slots[:, None])
            & ((branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])))
    hidden = lm.hidden(lm.embed(ids), position_ids=pos, mask=mask.unsqueeze(1), valid=group_of >= 0).flatten(0, 1)
    at, targets = torch.tensor(at, device=device), torch.tensor(targets, device=device)
    # The five letters of a question are predicted from one slot: the head runs once per distinct slot, and
    # each target's logit is read from that slot's logits (the very values lse and argmax see, in bf16 too).
    unique, inverse = at.unique(return_inverse=True)
    lse, argmax = [], []
    target_logits = torch.zeros(len(at), device=device)
    for start in range(0, len(unique), HEAD_CHUNK):
        logits = lm.lm_head(hidden[unique[start:start + HEAD_CHUNK]]).float()
        lse.append(logits.logsumexp(-1))
        argmax.append(logits.argmax(-1))
        row = inverse - start
        here = (row >= 0) & (row < len(logits))  # targets predicted from this chunk's slots
        target_logits = torch.where(here, logits[row.clamp(0, len(logits) - 1), targets], target_logits)
    lse, argmax = torch.cat(lse)[inverse], torch.cat(argmax)[inverse]
    logprobs = target_logits - lse
    totals = torch.zeros(len(keys), device=device).index_add_(0, owner, logprobs)
    misses = torch.zeros(len(keys), device=device).index_add_(0, owner, (argmax != targets).float())
    return dict(zip(keys, zip(totals.tolist(), (misses == 0).tolist())))


def _score_with_thoughts(model: EvalModel, requests: list[tuple[tuple[int, ...], tuple[int, ...]]],
                         batch_size: int, progress: bool) -> list[tuple[float, bool]]:
    """Thought-mixed scores: one input per distinct (context, continuation[:-1]); inputs of the same
    shape (context and continuation lengths) share a forward, with thoughts at the same positions."""
    requests_of: dict[tuple[tuple[int, ...], tuple[int, ...]], list[int]] = {}
    for i, (context, continuation) in enumerate(requests):
        requests_of.setdefault((context, continuation[:-1]), []).append(i)
    by_shape: dict[tuple[int, int], list[tuple[tuple[int, ...], tuple[int, ...]]]] = {}
    for context, fed in requests_of:
        by_shape.setdefault((len(context), len(fed)), []).append((context, fed))
    batches = [(n, inputs[s:s + batch_size]) for (n, _), inputs in by_shape.items()
               for s in range(0, len(inputs), batch_size)]
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    for n, inputs in tqdm(batches, desc="loglikelihood (thoughts)", disable=not progress):
        ids = torch.tensor([[*context, *fed] for context, fed in inputs], device=model.device)
        scored = torch.arange(n - 1, ids.size(1), device=model.device)
        logprobs = model.net.next_token_logits(ids, think=True, positions=scored).float().log_softmax(-1)
        for row, key in zip(logprobs, inputs):
            for i in requests_of[key]:
                target = torch.tensor(requests[i][1], device=model.device)
                results[i] = (row.gather(-1, target[:, None]).sum().item(), bool((row.argmax(-1) == target).all()))
    return results


def loglikelihood_rolling(model: EvalModel, token_lists: Sequence[Sequence[int]], batch_size: int = 16,
                          progress: bool = False, pack_tokens: int = 512) -> list[float]:
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
    for i, (logprob, _) in zip(owner, loglikelihood(model, requests, batch_size, progress, pack_tokens=pack_tokens)):
        totals[i] += logprob
    return totals
