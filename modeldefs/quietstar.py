"""Quiet-STaR (Zelikman et al., 2024, arXiv 2403.09629): the model learns to think before each token.

At every position t (or every `stride`-th) the decoder writes a short *thought* — a learned
<start> vector, `n_ahead - 3` sampled tokens, a learned <end> vector — then a mixing head blends the
hidden state after the thought with the plain hidden state at t, and the blend predicts the next
`n_ahead_talk` true tokens (teacher-forced after the thought). Thoughts that make those tokens more
likely than the plain model does are reinforced (REINFORCE with the mean over `n_passes` thoughts
at the same position as baseline).

All thoughts of a sequence are computed in parallel, one token per position per pass, through a
KV cache: pass 0 is the ordinary forward over the T tokens (cache slots 0..T-1); pass j >= 1 appends
one token to each of the P thought chains (slots T+(j-1)P .. T+jP-1, rotary position t+j). The chain
at t sees the prefix keys s <= t of pass 0 and its own slots in passes 1..j, nothing of any other
chain (`thought_attention_mask`: the prefix, then an identity block per pass). `ThoughtKVCache`
computes exactly those scores, P x (T + j) per pass, instead of the dense P x (T + jP) of the official
code's mask. Compute is ~T + n_passes (J - 1) P token-forwards per sequence for J = n_ahead +
n_ahead_talk - 1 passes: pass 0 and the plain LM loss run once per example, the thought passes once
per sample.

Mixture-of-Depths: every pass of a routed model, pass 0 included, routes by the model's causal rule
(the inference rule: router or predictor logit > 0), never top-k. Thought tokens read the prefix
through the cache, and top-k over a sequence looks at future tokens, which would break causality
and the match between training and (KV-cached) generation. So Quiet-STaR training gives routers no
top-k targets for MoD's auxiliary losses; they keep learning through the 2*sigmoid(logit) scale.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from modeldefs.logprob import token_log_prob
from modeldefs.model import Transformer
from modeldefs.thought_cache import ThoughtKVCache, thought_attention_mask
from modeldefs.thought_config import ThoughtConfig
from modeldefs.thought_loss import ThoughtOutput, reinforce_loss
from modeldefs.thought_mixing import ThoughtMixingHead

# The names callers import from here, including those defined in the modules beside it.
__all__ = [
    "QuietStar", "ThoughtConfig", "ThoughtKVCache", "ThoughtMixingHead", "ThoughtOutput", "reinforce_loss",
    "thought_attention_mask",
]


class QuietStar(nn.Module):
    """A decoder (dense or Mixture-of-Depths) that thinks before it speaks; see the module docstring."""

    def __init__(self, lm: Transformer, config: ThoughtConfig, init_token_id: int) -> None:
        """`init_token_id`: the embedding row <start>/<end> start from (official: the first token of "---")."""
        super().__init__()
        if not 0 <= init_token_id < lm.config.vocab_size:
            raise ValueError(f"init_token_id={init_token_id} is outside the vocabulary (size {lm.config.vocab_size})")
        self.lm = lm
        self.thought_config = config
        row = lm.embed.weight.detach()[init_token_id].clone() / config.meta_token_scale
        self.start_thought = nn.Parameter(row.clone())
        self.end_thought = nn.Parameter(row.clone())
        self.mixing_head = ThoughtMixingHead(lm.config.n_embd).to(row.device, row.dtype)

    # ---- the pieces -------------------------------------------------------------------------------

    def mix(self, h_base: torch.Tensor, h_thought: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, w): lm_head((1 - w) h_base + w h_thought) and the mixing weight (..., 1)."""
        w = self.mixing_head(h_base, h_thought)
        if self.thought_config.mixing_bound == "sigmoid":
            w = torch.sigmoid(w + self.thought_config.mixing_logit_offset)
        return self.lm.lm_head((1 - w) * h_base + w * h_thought), w

    def meta_embedding(self, which: Literal["start", "end"], shape: tuple[int, ...]) -> torch.Tensor:
        """The <start> or <end> input vector, scaled back up, copied to `shape` + (n_embd,) (a stride-0
        broadcast would give compiled blocks an input layout, and a graph, of its own)."""
        vector = self.start_thought if which == "start" else self.end_thought
        return (vector * self.thought_config.meta_token_scale).expand(*shape, -1).contiguous()

    def sample_thought(self, logits: torch.Tensor, temperature: float,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """Token ids from logits (..., V): argmax at temperature 0, else a draw from
        softmax(logits / temperature), the distribution of the official hard Gumbel-softmax's
        argmax(logits + Gumbel noise). Drawn by inverse CDF: one uniform number per row instead of
        Gumbel noise (two logarithms) per vocabulary entry, which cost more than the output head's
        matmul in a thought pass."""
        logits = logits.detach().float()
        if temperature == 0:
            return logits.argmax(-1)
        cdf = (logits / temperature).softmax(-1).cumsum_(-1)
        u = torch.rand(*cdf.shape[:-1], 1, generator=generator, device=cdf.device) * cdf[..., -1:]
        # right=True: the first entry whose cdf exceeds u, so a zero-probability token is never drawn
        return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=cdf.size(-1) - 1)

    def _check_length(self, T: int, passes: int) -> None:
        limit = self.lm.config.block_size
        if T + passes - 1 > limit:
            raise ValueError(f"sequence length {T} + {passes - 1} thought/talk positions exceeds block_size={limit};"
                             " shorten the sequence, n_ahead or n_ahead_talk")

    def think(self, ids: torch.Tensor, positions: torch.Tensor, talk_ids: torch.Tensor, temperature: float,
              generator: torch.Generator | None = None, copies: int = 1
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The parallel thought forward.

        ids (B, T), one row per example; copies: thoughts sampled per position, in N = B * copies rows
        (an example's copies adjacent); positions (P,) where chains start; talk_ids (N, P, K-1) the
        tokens fed after <end> (x_{t+1} .. x_{t+K-1}). Returns base hidden (B, T, C) (pass 0 runs once
        per example: it is the same for every copy), the hidden states after <end> and after each talk
        token (N, P, K, C), the sampled thought ids (N, P, n_sampled) and their log-probabilities at
        reinforce_temperature (N, P, n_sampled), the REINFORCE actions.
        """
        c, lm = self.thought_config, self.lm
        B, T = ids.shape
        N, P, dev = B * copies, positions.numel(), ids.device
        n_passes = c.n_ahead + talk_ids.size(-1)  # pass 0 + (n_ahead - 1) thought tokens + K - 1 talk tokens
        self._check_length(T, n_passes)
        mask = thought_attention_mask(T, positions, n_passes)
        cache = [ThoughtKVCache(B, T, P, mask.size(1), dev) for _ in lm.blocks]

        h0 = lm.hidden(lm.embed(ids), kv_cache=cache)  # causal
        if copies > 1:
            for layer in cache:
                layer.repeat_rows(copies)
        x = self.meta_embedding("start", (N, P))
        talk, sampled, log_p = [], [], []
        # Pass j feeds x and gives h, the hidden state after it. Fed: <start> (j = 1), the sampled tokens
        # (j = 2 .. n_ahead - 2), <end> (j = n_ahead - 1), the talk tokens (j >= n_ahead). Used: h of passes
        # 1 .. n_sampled samples the next thought token; h from <end> on (j >= n_ahead - 1) are the talk states.
        for j in range(1, n_passes):
            # contiguous: a column slice's strides differ from pass to pass, and compiled blocks would not share a graph
            h = lm.hidden(x, positions + j, mask[:, : T + j * P].contiguous(), cache, start_pos=T + (j - 1) * P)
            if j <= c.n_sampled:
                logits = lm.lm_head(h)
                token = self.sample_thought(logits, temperature, generator)
                sampled.append(token)
                log_p.append(token_log_prob(logits, token, c.reinforce_temperature))
                x = lm.embed(token)
            elif j == c.n_ahead - 2:
                x = self.meta_embedding("end", (N, P))
            else:
                talk.append(h)
                n_fed = j - (c.n_ahead - 1)  # talk tokens fed so far
                if n_fed < talk_ids.size(-1):
                    x = lm.embed(talk_ids[:, :, n_fed])
        return h0, torch.stack(talk, 2), torch.stack(sampled, 2), torch.stack(log_p, 2)

    # ---- public API ------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, generator: torch.Generator | None = None) -> ThoughtOutput:
        """The Quiet-STaR training objective on token ids (B, T); see `ThoughtOutput`.

        Thoughts are taken at positions 0, stride, ... that still have n_ahead_talk true tokens after
        them; the plain LM loss covers every next-token prediction.
        """
        c = self.thought_config
        T = input_ids.size(1)
        K = c.n_ahead_talk
        if T <= K:
            raise ValueError(f"sequence length {T} must exceed n_ahead_talk={K}"
                             f" (thoughts need {K} true tokens after them)")
        dev = input_ids.device
        positions = torch.arange(0, T - K, c.stride, device=dev)
        talk_positions = positions[:, None] + torch.arange(1, K + 1, device=dev)  # (P, K): x_{t+1} .. x_{t+K}

        def per_sample(t: torch.Tensor) -> torch.Tensor:  # (B, ...) per example -> (N, ...) per thought sample
            return t.repeat_interleave(c.n_passes, dim=0)

        targets = per_sample(input_ids[:, talk_positions])                        # (N, P, K)

        h0, h_talk, sampled, log_p = self.think(input_ids, positions, targets[..., :-1], c.thought_temperature,
                                                generator, copies=c.n_passes)
        base_logits = self.lm.lm_head(h0)                                         # once per example
        # NLLs as -token_log_prob: backward keeps the logits (returned anyway), not an fp32 log-softmax
        token_nll = -token_log_prob(base_logits[:, :-1], input_ids[:, 1:])       # (B, T - 1)
        base_talk_nll = per_sample(token_nll[:, talk_positions - 1])              # (N, P, K)
        mixed_logits, w = self.mix(per_sample(h0[:, talk_positions - 1]), h_talk)
        mixed_nll = -token_log_prob(mixed_logits, targets)                        # (N, P, K)

        reward = (base_talk_nll - mixed_nll).detach().sum(-1)                     # (N, P)
        policy = reinforce_loss(reward, log_p, c)

        lm_nll, mixed_mean = token_nll.mean(), mixed_nll.mean()
        loss = c.base_loss_weight * lm_nll + c.mixed_loss_weight * mixed_mean + c.policy_loss_weight * policy
        return ThoughtOutput(
            loss=loss, lm_nll=lm_nll, base_nll=base_talk_nll.mean(), mixed_nll=mixed_mean, policy_loss=policy,
            mixing_weight=w.squeeze(-1).detach(), reward=reward, thought_tokens=sampled, positions=positions,
            base_logits=base_logits, mixed_logits=mixed_logits,
        )

    def next_token_logits(self, input_ids: torch.Tensor, think: bool = True,
                          generator: torch.Generator | None = None,
                          positions: torch.Tensor | None = None) -> torch.Tensor:
        """Inference logits (B, T, V) at every position: after a thought at that position (sampled at
        eval_thought_temperature, greedy by default) mixed by the head, or with think=False the plain LM's. A
        Mixture-of-Depths model routes by its causal rule either way, in train mode too.

        positions: (P,) only these positions (logits (B, P, V)); a thought at t reads tokens <= t only,
        so this equals the full result at those positions and skips the other thoughts' compute.
        """
        if positions is None:
            positions = torch.arange(input_ids.size(1), device=input_ids.device)
        if not think:
            # In train mode a Mixture-of-Depths model routes by top-k, which looks ahead, except through a KV cache:
            # one gives it the causal rule, as the thought path has (eval mode has it without one)
            cache = self.lm.make_kv_cache(*input_ids.shape) if self.lm.routed_blocks and self.lm.training else None
            return self.lm.lm_head(self.lm.hidden(self.lm.embed(input_ids), kv_cache=cache)[:, positions])
        no_talk = input_ids.new_empty(input_ids.size(0), positions.numel(), 0)
        h0, h_thought, _, _ = self.think(input_ids, positions, no_talk, self.thought_config.eval_thought_temperature,
                                         generator)
        return self.mix(h0[:, positions], h_thought[:, :, 0])[0]
