"""Decoding for evaluation: batched greedy generation, CoT-decoding, and generation with thoughts.

All three stop at the tokenizer's EOS and at stop strings, and cut the returned text at the first
stop string (lm-eval's `generate_until`). All three batch continuously: a fixed number of rows share
one KV cache, waiting prompts are prefilled together in a cache of their own, and a row whose
continuation ends takes the next prompt at once (copied from there), so the batch stays full until
the prompts run out (then finished rows leave it). Stop strings are checked once per step on the
tokens just produced: that check is the only host synchronisation per token.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from tqdm.auto import tqdm

from evals.batching import compact_cache_rows, copy_into_row, prefill_prompts, shift_cache_slots
from evals.decode_step import DecodeStep, slot_kv_cache
from evals.model import EvalModel
from modeldefs.quietstar import QuietStar
from modeldefs.thought_generate import thought_hidden

Variant = Literal["greedy", "cot", "thoughts"]
AnswerSpan = Callable[[str], "tuple[int, int] | None"]


@dataclass
class DecodingConfig:
    """How completions are decoded (one row of the leaderboard per variant)."""

    variant: Variant = "greedy"
    """greedy; cot (CoT-decoding, Wang & Zhou 2024); thoughts (Quiet-STaR generation, needs a QuietStar model)."""
    max_new_tokens: int = 256
    """Generated tokens per completion at most (lm-eval's GSM8K default)."""
    batch_size: int = 16
    """Rows per forward pass: continuations being generated (a CoT-decoding prompt's cot_k branches are
    cot_k continuations); in log-likelihood scoring, packed rows."""
    prefill_chunk: int = 2048
    """Prompt tokens per forward when filling the KV cache: the next waiting prompts are prefilled
    together, as many as fit padded to the longest of them; a longer prompt runs in chunks (bounds the
    activation memory). A prompt within one chunk runs as plain causal attention, the fastest kernel;
    later chunks attend to the cache under a mask."""
    pack_tokens: int = 512
    """Log-likelihood scoring: most tokens per packed row (contexts each followed by all their
    continuations); rows are only as long as the longest context group, since attention spans the
    whole row."""
    cot_k: int = 10
    """CoT-decoding: branches, one per top-k first token (the paper's default is 10)."""
    cot_aggregate: bool = False
    """CoT-decoding: pick the answer with the largest summed confidence over branches (the paper's
    'agg') instead of the single most confident branch ('max')."""
    cuda_graph: bool = True
    """On a GPU, replay each decoding step of a plain model (not Mixture-of-Depths, no thoughts) as one CUDA
    graph (`evals.decode_step`); off, every step launches its kernels one by one."""

    def __post_init__(self) -> None:
        if self.variant not in ("greedy", "cot", "thoughts"):
            raise ValueError(f"decoding variant {self.variant!r} is not one of 'greedy', 'cot', 'thoughts'")
        for name in ("max_new_tokens", "batch_size", "prefill_chunk", "pack_tokens", "cot_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"decoding {name}={getattr(self, name)} must be >= 1")
        if not isinstance(self.cuda_graph, bool):  # the string "false" would switch graphs on
            raise ValueError(f"decoding cuda_graph={self.cuda_graph!r} must be True or False")

    @property
    def fixed_step(self) -> bool | None:
        """`generate_tokens`' fixed_step for `cuda_graph`."""
        return None if self.cuda_graph else False

    @property
    def label(self) -> str:
        """The variant's name in tables: greedy, cot-k10 (cot-k10-agg), thoughts."""
        if self.variant == "cot":
            return f"cot-k{self.cot_k}" + ("-agg" if self.cot_aggregate else "")
        return self.variant


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    for s in stop:
        text = text.split(s)[0]
    return text


def completion(model: EvalModel, tokens: list[int], stop: Sequence[str]) -> str:
    """The text of generated `tokens` as lm-eval's `hf` backend reports it: decoded without special
    tokens, then cut at the first stop string. (During generation, stops are looked for in the text
    with special tokens, as lm-eval's stopping criteria do.)"""
    return cut_at_stop(model.decode(tokens, skip_special_tokens=True), stop)


class _StopChecker:
    """Whether each row's newest token completed a stop string (looks at a short decoded tail only)."""

    def __init__(self, model: EvalModel, stop: Sequence[str]) -> None:
        self.model, self.stop = model, [s for s in stop if s]
        # A token decodes to at least one byte of UTF-8 (a character can take several byte-level tokens), so a
        # stop string ending now lies within this many tokens.
        self.window = max((len(s.encode()) for s in self.stop), default=0) + 1

    def __call__(self, rows: list[list[int]]) -> list[bool]:
        if not self.stop or not rows:
            return [False] * len(rows)
        tails = self.model.decode_batch([tokens[-self.window:] for tokens in rows])  # one tokenizer call a step
        return [any(s in tail for s in self.stop) for tail in tails]


def _prompt_limit(model: EvalModel, max_new_tokens: int, scratch: int) -> int:
    """The longest prompt that leaves room for `max_new_tokens` and `scratch` thought slots in the context."""
    limit = model.block_size - max_new_tokens - scratch
    if limit < 1:
        slots = f" and {scratch} thought slots leave" if scratch else " leaves"
        raise ValueError(f"max_new_tokens={max_new_tokens}{slots} no room for a prompt in block_size={model.block_size}")
    return limit


def _top2_margin(logits: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 probability of each distribution over the last axis (fp32)."""
    top2 = logits.float().softmax(-1).topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def _decode_rows(model: EvalModel, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop: Sequence[str],
                 chunk: int, rows: int, branches: int = 1, thinker: QuietStar | None = None,
                 desc: str = "generate", progress: bool = False, fixed_step: bool | None = None
                 ) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy continuations of every prompt, and per token the top-1 minus top-2 probability of the
    distribution it came from (CoT-decoding only; zeros otherwise).

    Continuous batching (`_Rows`): up to `rows` continuations decode in lockstep, one token each per
    forward. A row whose continuation ends (EOS, a stop string, max_new_tokens) takes the next waiting one
    at once: its prompt, prefilled with the next waiting ones (`chunk` padded tokens per forward), is
    copied in to end just before the slot the step writes.
    Prompts start longest first, so a prompt always fits in front of that slot; when every row's
    prompt starts `max_new_tokens // 2` slots or more into the cache, the rows move to its front.
    branches > 1: every prompt is continued `branches` times, the j-th continuation forced to the j-th
    most likely first token (CoT-decoding); outputs are prompt-major.
    thinker: a Quiet-STaR model whose `lm` is model.lm; each token then comes from its head's mix of the
    plain hidden state and a thought's, the thought written in the slots after the newest token
    (`thought_hidden`), which the next token overwrites.
    Prompts longer than the context leaves room for (block_size - max_new_tokens - a thought's slots)
    keep their last tokens, with a warning.
    fixed_step: decode with `evals.decode_step`'s fixed-shape step, a CUDA graph on a GPU (finished rows
    then stay in the batch to the end, their tokens unused). None: on a GPU for a plain model; True: for a
    plain model on any device (on a CPU eagerly: what tests compare); False: never.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1 (a continuation has at least one token)")
    scratch = 0 if thinker is None else thinker.thought_config.n_ahead - 1  # a thought's slots past the newest token
    limit = _prompt_limit(model, max_new_tokens, scratch)
    cut = sum(len(p) > limit for p in prompts)
    if cut:
        warnings.warn(f"{cut} of {len(prompts)} prompts are longer than the {limit} tokens the context leaves "
                      f"(block_size {model.block_size} - {max_new_tokens} new tokens"
                      f"{f' - {scratch} thought slots' if scratch else ''}) and keep only their last {limit}; fewer "
                      "shots or fewer new tokens keep them whole", stacklevel=3)
    if not prompts:
        return [], []
    with tqdm(total=len(prompts), desc=desc, disable=not progress) as bar:
        batch = _Rows(model, [list(p)[-limit:] for p in prompts], max_new_tokens, stop, chunk, rows, branches,
                      thinker, scratch, bar, fixed_step)
        while batch.step():
            pass
    return batch.tokens, batch.margins


class _Rows:
    """The rows of `_decode_rows`' continuous batching: a KV cache of `width` rows, the continuation each
    row is writing (`owner`), where its prompt starts (`first_slot`), the slot the next forward writes
    (`slot`, the same for every row), and the prompts still waiting (`work`, longest first)."""

    def __init__(self, model: EvalModel, prompts: list[list[int]], max_new_tokens: int, stop: Sequence[str],
                 chunk: int, rows: int, branches: int, thinker: QuietStar | None, scratch: int, bar: tqdm,
                 fixed_step: bool | None = None) -> None:
        self.model, self.prompts, self.n, self.chunk, self.branches = model, prompts, max_new_tokens, chunk, branches
        self.thinker, self.scratch, self.lm, self.device = thinker, scratch, model.lm, model.device
        self.work = deque((i, j) for i in sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
                          for j in range(branches))
        self.width = min(rows, len(self.work))
        self.slot = len(prompts[self.work[0][0]])  # the slot the next forward writes
        # A row alive at slot s started its prompt at s - n + 2 - (longest prompt) or later, so at this capacity
        # every row's prompt starts `shift_at` slots in, and the rows move to the front, before the cache overflows.
        self.shift_at = max(1, max_new_tokens // 2)
        self.capacity = min(self.slot + max_new_tokens + self.shift_at, model.block_size - scratch)
        self.key_valid = torch.zeros(self.width, self.capacity + scratch, dtype=torch.bool, device=self.device)
        self.next_pos = torch.zeros(self.width, dtype=torch.long, device=self.device)
        self.token = torch.zeros(self.width, dtype=torch.long, device=self.device)
        plain, on_gpu = thinker is None and not self.lm.routed_blocks, self.device.type == "cuda"
        self.fixed_step: DecodeStep | None = None
        if plain and (on_gpu if fixed_step is None else fixed_step):
            self.slot_index = torch.zeros(1, dtype=torch.long, device=self.device)
            self.cache = slot_kv_cache(self.lm, self.width, self.capacity, self.slot_index)
            self.fixed_step = DecodeStep(self.lm, self.cache, self.token, self.next_pos, self.key_valid, graph=on_gpu)
        else:
            self.cache = self.lm.make_kv_cache(self.width, self.capacity + scratch)
        self.owner: list[int | None] = [None] * self.width  # per cache row: its output row (prompt * branches + branch)
        self.first_slot = [0] * self.width
        self.tokens: list[list[int]] = [[] for _ in range(len(prompts) * branches)]
        self.margins: list[list[float]] = [[] for _ in self.tokens]
        self.unfinished = [branches] * len(prompts)
        self.stops, self.eos = _StopChecker(model, stop), model.eos_id
        self.bar = bar  # one tick per finished prompt
        # Prefilled prompts not yet started: prompt -> (its prefill cache, its row there, first tokens, margin).
        self.ready: dict[int, tuple[list[torch.nn.Module], int, list[int], float]] = {}

    def next_logits(self, h: torch.Tensor, kv_cache: list[torch.nn.Module], thought_slot: int,
                    positions: torch.Tensor | None = None, keys: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, V) of the next tokens from the hidden states h (B, C) of the newest ones (in slot
        thought_slot - 1): the LM's head, or Quiet-STaR's mix of h and a thought written from thought_slot
        on (`thought_hidden`'s positions and key mask)."""
        if self.thinker is None:
            return self.lm.lm_head(h)
        thought = thought_hidden(self.thinker, kv_cache, thought_slot, positions=positions, key_valid=keys)
        return self.thinker.mix(h, thought)[0]

    def record(self, rows: list[int], produced: list[int], margins: list[float]) -> None:
        """Append each row's new token to its continuation; free the rows whose continuations end."""
        ended, going = [], []
        for row, t, m in zip(rows, produced, margins):
            out = self.owner[row]
            if t != self.eos:
                self.tokens[out].append(t)
                self.margins[out].append(m)
            (ended if t == self.eos or len(self.tokens[out]) == self.n else going).append(row)
        stopped = self.stops([self.tokens[self.owner[row]] for row in going])
        for row in ended + [row for row, stop in zip(going, stopped) if stop]:
            out, self.owner[row] = self.owner[row], None
            self.unfinished[out // self.branches] -= 1
            if not self.unfinished[out // self.branches]:
                self.bar.update()

    def prefill(self, i: int) -> None:
        """Prefill prompt i and the prompts waiting after it, as many as fit `chunk` tokens padded to
        i's length (it is the longest), in one forward, and choose each one's first tokens."""
        prompts, group = self.prompts, [i]
        for k, _ in self.work:
            if k not in group:
                if (len(group) + 1) * len(prompts[i]) > self.chunk:
                    break
                group.append(k)
        own, h = prefill_prompts(self.lm, [prompts[k] for k in group], self.chunk, spare_slots=self.scratch)
        lengths = torch.tensor([len(prompts[k]) for k in group], device=self.device)
        keys = torch.arange(len(prompts[i]) + self.scratch, device=self.device) < lengths[:, None]  # not the padding
        logits = self.next_logits(h, own, len(prompts[i]), lengths, keys)
        if self.branches > 1:  # the first tokens to force, and their distribution's margin: one transfer
            both = torch.cat([logits.topk(self.branches).indices.float(), _top2_margin(logits)[:, None]], 1).tolist()
            for source, (k, chosen) in enumerate(zip(group, both)):
                self.ready[k] = (own, source, [int(t) for t in chosen[:-1]], chosen[-1])
        else:
            for source, (k, t) in enumerate(zip(group, logits.argmax(-1).tolist())):
                self.ready[k] = (own, source, [t], 0.0)

    def start(self, row: int) -> None:
        """Give a free row the next waiting continuation and choose its first token."""
        i, j = self.work.popleft()
        if i not in self.ready:
            self.prefill(i)
        own, source, first, margin = self.ready[i] if j < self.branches - 1 else self.ready.pop(i)
        length = len(self.prompts[i])
        self.first_slot[row] = self.slot - length
        copy_into_row(own, source, self.cache, row, self.first_slot[row], length)
        self.key_valid[row] = False
        self.key_valid[row, self.first_slot[row]:self.slot] = True
        # fill_, not `t[row] = n`: that copies a host scalar into a 0-d slice, which on a GPU is a blocking
        # host-to-device copy, a sync per started continuation
        self.next_pos[row].fill_(length)
        self.owner[row] = i * self.branches + j
        self.record([row], [first[j]], [margin])
        if self.owner[row] is not None:
            self.token[row].fill_(first[j])

    def drop_finished_rows(self, alive: list[int]) -> None:
        """With nothing left to start, the rows whose continuations ended leave the batch."""
        order = compact_cache_rows(self.cache, alive)
        index = torch.tensor(order, device=self.device)
        self.token, self.next_pos, self.key_valid = self.token[index], self.next_pos[index], self.key_valid[index]
        self.owner, self.first_slot = [self.owner[j] for j in order], [self.first_slot[j] for j in order]
        self.width = len(order)

    def shift_to_front(self, front: int) -> None:
        """Drop the `front` cache slots that precede every row's prompt."""
        shift_cache_slots(self.cache, front, self.slot)
        self.key_valid[:, :self.slot - front] = self.key_valid[:, front:self.slot].clone()
        self.key_valid[:, self.slot - front:self.slot] = False  # no slot past the newest is a key
        self.first_slot = [s - front for s in self.first_slot]
        self.slot -= front

    def decode(self) -> torch.Tensor:
        """Logits (rows, V) of every row's next token from its token in `token`, written at `slot`; moves the
        slot and the rows' positions on by one."""
        if self.fixed_step is not None:
            self.slot_index.fill_(self.slot)
            self.slot += 1
            logits = self.fixed_step()
            # A finished row goes on decoding to the end of the batch: its position stays in the rotary table.
            self.next_pos.add_(1).clamp_(max=self.lm.config.block_size - 1)
            return logits
        h = self.lm.hidden(self.lm.embed(self.token[:, None]), position_ids=self.next_pos[:, None],
                           mask=self.key_valid[:, None, None, :self.slot + 1], kv_cache=self.cache,
                           start_pos=self.slot)[:, -1]
        self.slot += 1
        self.next_pos += 1
        return self.next_logits(h, self.cache, self.slot, self.next_pos, self.key_valid)

    def step(self) -> bool:
        """Fill the free rows, then decode one token in every row; False once every continuation has ended."""
        for row in range(self.width):
            while self.owner[row] is None and self.work:
                self.start(row)
        alive = [row for row in range(self.width) if self.owner[row] is not None]
        if not alive:
            return False
        if not self.work and len(alive) < self.width and self.fixed_step is None:  # a fixed step keeps its rows
            self.drop_finished_rows(alive)
            alive = list(range(self.width))
        front = min(self.first_slot[row] for row in alive)
        if front >= self.shift_at or self.slot == self.capacity:
            self.shift_to_front(front)
        self.key_valid[:, self.slot] = True
        logits = self.decode()
        self.token.copy_(logits.argmax(-1))  # in place, as the positions: a fixed step reads them where they are
        if self.branches > 1:  # CoT-decoding's confidence; one transfer for tokens and margins
            both = torch.stack([self.token.float(), _top2_margin(logits)]).tolist()
            produced, margin = [int(t) for t in both[0]], both[1]
        else:
            produced, margin = self.token.tolist(), [0.0] * self.width
        alive = [row for row in range(self.width) if self.owner[row] is not None]
        self.record(alive, [produced[row] for row in alive], [margin[row] for row in alive])
        return True


@torch.inference_mode()
def generate_tokens(model: EvalModel, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    stop: Sequence[str] = (), batch_size: int = 16, progress: bool = False,
                    prefill_chunk: int = 2048, fixed_step: bool | None = None) -> list[list[int]]:
    """Greedy continuations (token ids, without EOS) of each prompt, in prompt order, `batch_size`
    rows at a time. Prompts longer than block_size - max_new_tokens keep their last tokens. fixed_step:
    None: a CUDA graph per step on a GPU (`evals.decode_step`; plain models); True: the same fixed-shape step
    also on a CPU, eagerly; False: the sliced step everywhere."""
    return _decode_rows(model, prompts, max_new_tokens, stop, prefill_chunk, batch_size, progress=progress,
                        fixed_step=fixed_step)[0]


def generate(model: EvalModel, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop: Sequence[str] = (),
             batch_size: int = 16, progress: bool = False, prefill_chunk: int = 2048,
             fixed_step: bool | None = None) -> list[str]:
    """Greedy completions of each prompt, cut at the first stop string (see `DecodingConfig` for the knobs,
    `generate_tokens` for `fixed_step`)."""
    return [completion(model, t, stop) for t in generate_tokens(model, prompts, max_new_tokens, stop, batch_size,
                                                                progress, prefill_chunk, fixed_step)]


@dataclass
class CotResult:
    """The chosen completion of CoT-decoding and every branch it chose from."""

    text: str
    confidence: float
    """The chosen branch's answer confidence (the answer's summed confidence with aggregation)."""
    branches: list[tuple[str, float]] = field(default_factory=list)
    """(completion, confidence) per branch, in order of the first token's probability."""
    generated_tokens: int = 0
    """Tokens generated over all branches."""


def answer_confidence(model: EvalModel, tokens: list[int], margins: list[float], span: tuple[int, int] | None) -> float:
    """Mean top-1/top-2 probability margin over the tokens that overlap the answer's character span
    [start, end) of the completion's text (`completion`); 0 when there is no answer."""
    if span is None:
        return 0.0
    start, end = span
    overlapping, offset = [], 0
    for i in range(len(tokens)):
        # Character offsets of the generated tokens themselves (re-tokenising the text could split it differently).
        token_end = len(model.decode(tokens[:i + 1], skip_special_tokens=True))
        if offset < end and token_end > max(start, offset):  # a special token adds no text: not part of it
            overlapping.append(margins[i])
        offset = token_end
        if offset >= end:
            break
    return sum(overlapping) / len(overlapping) if overlapping else 0.0


@torch.inference_mode()
def cot_decode(model: EvalModel, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop: Sequence[str],
               answer_span: AnswerSpan, k: int = 10, aggregate: bool = False, batch_size: int = 16,
               normalize: Callable[[str], str] = str.strip, progress: bool = False,
               prefill_chunk: int = 2048, fixed_step: bool | None = None) -> list[CotResult]:
    """CoT-decoding (Wang & Zhou 2024): branch on the top-k first tokens, continue each greedily, and
    keep the branch whose answer (located by `answer_span` in the cut completion) the model is most
    sure of — the mean top-1/top-2 probability margin over the answer tokens. With `aggregate`, the
    answer (compared after `normalize`) with the largest summed confidence wins, as its most
    confident branch. Ties go to the earlier branch, so with no answer anywhere it is greedy."""
    tokens, margins = _decode_rows(model, prompts, max_new_tokens, stop, prefill_chunk, batch_size, branches=k,
                                   desc=f"cot-decoding k={k}", progress=progress, fixed_step=fixed_step)
    out = []
    for i in range(len(prompts)):
        branches = []
        for row in range(i * k, (i + 1) * k):
            text = completion(model, tokens[row], stop)
            span = answer_span(text)
            branches.append((text, answer_confidence(model, tokens[row], margins[row], span), span))
        out.append(_choose(branches, aggregate, normalize))
        out[i].generated_tokens = sum(len(t) for t in tokens[i * k:(i + 1) * k])
    return out


def _choose(branches: list[tuple[str, float, tuple[int, int] | None]], aggregate: bool,
            normalize: Callable[[str], str]) -> CotResult:
    listed = [(text, confidence) for text, confidence, _ in branches]
    best = max(range(len(branches)), key=lambda j: (branches[j][1], -j))
    if not aggregate:
        return CotResult(branches[best][0], branches[best][1], listed)
    totals: dict[str, float] = {}
    for text, confidence, span in branches:
        if span is not None:
            answer = normalize(text[span[0]:span[1]])
            totals[answer] = totals.get(answer, 0.0) + confidence
    if not totals:
        return CotResult(branches[best][0], branches[best][1], listed)
    winner = max(totals, key=lambda a: totals[a])  # dicts keep insertion order: ties go to the earlier branch
    chosen = next(j for j in sorted(range(len(branches)), key=lambda j: (-branches[j][1], j))
                  if branches[j][2] is not None and normalize(branches[j][0][slice(*branches[j][2])]) == winner)
    return CotResult(branches[chosen][0], totals[winner], listed)


@torch.inference_mode()
def generate_thoughts_tokens(model: EvalModel, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                             stop: Sequence[str] = (), batch_size: int = 16, progress: bool = False,
                             prefill_chunk: int = 2048) -> list[list[int]]:
    """Continuations (token ids, without EOS) from Quiet-STaR generation, a thought before every token
    (as `modeldefs.thought_generate.generate_with_thoughts`), `batch_size` rows at a time."""
    if not model.has_thoughts:
        raise ValueError(f"decoding variant 'thoughts' needs a Quiet-STaR model (modeldefs.quietstar.QuietStar); "
                         f"{model.source} is a plain {type(model.net).__name__} — use 'greedy' or 'cot'")
    return _decode_rows(model, prompts, max_new_tokens, stop, prefill_chunk, batch_size,
                        thinker=model.net, desc="generate with thoughts", progress=progress)[0]


def generate_thoughts(model: EvalModel, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                      stop: Sequence[str] = (), batch_size: int = 16, progress: bool = False,
                      prefill_chunk: int = 2048) -> list[str]:
    """Completions from Quiet-STaR generation, cut at the first stop string."""
    return [completion(model, t, stop) for t in generate_thoughts_tokens(model, prompts, max_new_tokens, stop,
                                                                         batch_size, progress, prefill_chunk)]


def decode_completions(model: EvalModel, prompts: Sequence[Sequence[int]], config: DecodingConfig,
                       stop: Sequence[str], answer_span: AnswerSpan, progress: bool = False,
                       normalize: Callable[[str], str] = str.strip) -> tuple[list[str], int]:
    """(completions cut at the first stop string, tokens generated) under `config`'s variant;
    `answer_span` locates the answer for CoT-decoding's confidence, and `normalize` makes the answers
    that CoT-decoding's aggregation counts as one (the task's exact-match normalisation)."""
    if config.variant == "cot":
        results = cot_decode(model, prompts, config.max_new_tokens, stop, answer_span, k=config.cot_k,
                             aggregate=config.cot_aggregate, batch_size=config.batch_size, normalize=normalize,
                             progress=progress, prefill_chunk=config.prefill_chunk, fixed_step=config.fixed_step)
        return [r.text for r in results], sum(r.generated_tokens for r in results)
    if config.variant == "thoughts":
        tokens = generate_thoughts_tokens(model, prompts, config.max_new_tokens, stop, config.batch_size, progress,
                                          config.prefill_chunk)
    else:
        tokens = generate_tokens(model, prompts, config.max_new_tokens, stop, config.batch_size, progress,
                                 config.prefill_chunk, config.fixed_step)
    return [completion(model, t, stop) for t in tokens], sum(map(len, tokens))
