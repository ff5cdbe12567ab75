"""Quiet-STaR's hyperparameters (`ThoughtConfig`): thought length, sampling, loss weights, the mixing bound.

Checked on construction, because the CLI's `thoughts:` is a free dict; saved in checkpoints as a plain dict.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from modeldefs.config import dataclass_from_dict


@dataclass
class ThoughtConfig:
    """Quiet-STaR hyperparameters; defaults are the official run's (ezelikman/quiet-star).

    Official switches kept at their paper values rather than exposed: <start>/<end> are used; hard
    samples carry no gradient (gumbel_detach); the mixing head is the concatenated, weighted,
    3-layer "talk head"; the plain LM term covers every position. The reward is the NLL reduction
    on the talk tokens only, as in the paper and the official code, whose per-thinking-pass reward
    (the change in mixed NLL from one thought token to the next) is multiplied by 0 under its
    default `first_and_last_mode = True`.
    """

    n_ahead: int = 12
    """Thought length in the official sense: passes up to and including <end>, so a thought is
    <start> + (n_ahead - 3) sampled tokens + <end> (official: 12 -> 9 sampled tokens)."""
    n_ahead_talk: int = 4
    """True future tokens predicted after each thought (teacher-forced); official 4."""
    n_passes: int = 2
    """Thoughts sampled per position (copies of each example); their mean reward is the REINFORCE
    baseline. Official 2."""
    stride: int = 1
    """Think at every stride-th position (0, stride, 2*stride, ...); official 1 (every position).
    Compute and memory of the thought passes scale with T / stride."""
    thought_temperature: float = 1.0
    """Sampling temperature of thought tokens in training. Official: hard Gumbel-softmax, tau=1,
    which is sampling from softmax(logits) (the hard sample is argmax(logits + Gumbel noise))."""
    eval_thought_temperature: float = 0.0
    """Thought sampling temperature at inference (`next_token_logits`, generation); 0 = greedy.
    The official eval uses hard Gumbel-softmax with tau=0.001, whose argmax does not depend on tau:
    it samples at temperature 1. Greedy makes inference deterministic."""
    reinforce_temperature: float = 3.0
    """Log-probabilities of sampled thought tokens in the REINFORCE loss come from logits / this."""
    base_loss_weight: float = 0.5
    """Weight of the plain next-token NLL over all positions (official original_loss_weight 0.5)."""
    mixed_loss_weight: float = 0.5
    """Weight of the mean NLL of the mixed (post-thought) predictions of the talk tokens (official
    1 - original_loss_weight)."""
    policy_loss_weight: float = 1e6
    """Weight of the REINFORCE loss (official policy_loss_beta 1e6); 0 switches it off."""
    clamp_reward: bool = True
    """Reinforce only thoughts above the baseline: advantage clamped at 0 (official
    remove_negative_rewards)."""
    subtract_baseline: bool = True
    """Subtract the mean reward over the n_passes thoughts at the same position (official
    trice_mode); needs n_passes > 1 to have an effect."""
    meta_token_scale: float = 100.0
    """<start>/<end> vectors are stored divided by this and multiplied by it when used, so under
    Adam they move ~this many times faster than other weights (official embedding_scale 100)."""
    mixing_bound: Literal["sigmoid", "none"] = "sigmoid"
    """"sigmoid": w = sigmoid(head + mixing_logit_offset) in (0, 1), the paper's description.
    "none": w = head output, unbounded, as the official code (w = 0 exactly at initialisation)."""
    mixing_logit_offset: float = -4.0
    """Added to the head's output before the sigmoid, so that w starts near 0 (sigmoid(-4) = 0.018)
    as the official zero-initialised unbounded head does (sigmoid(0) would mix half the thought in
    from the first step). Unused with mixing_bound="none"."""

    def __post_init__(self) -> None:
        # `thoughts:` is a free dict in the CLI's config, so nothing upstream checks these types: a float count
        # (n_ahead: 8.0) failed deep in the forward, a NaN temperature sampled the last vocabulary entry
        # throughout, and a quoted boolean ("false") was true.
        for name in ("n_ahead", "n_ahead_talk", "n_passes", "stride"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name}={value!r} must be an integer")
        for name in ("thought_temperature", "eval_thought_temperature", "reinforce_temperature", "base_loss_weight",
                     "mixed_loss_weight", "policy_loss_weight", "meta_token_scale", "mixing_logit_offset"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"{name}={value!r} must be a finite number")
        for name in ("clamp_reward", "subtract_baseline"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be true or false")
        if self.n_ahead < 4:
            raise ValueError(f"n_ahead={self.n_ahead} must be >= 4 (<start>, at least one sampled token, <end>)")
        if self.n_ahead_talk < 1:
            raise ValueError(f"n_ahead_talk={self.n_ahead_talk} must be >= 1")
        if self.n_passes < 1:
            raise ValueError(f"n_passes={self.n_passes} must be >= 1")
        if self.stride < 1:
            raise ValueError(f"stride={self.stride} must be >= 1")
        for name in ("thought_temperature", "eval_thought_temperature"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0 (0 = greedy)")
        if self.reinforce_temperature <= 0:
            raise ValueError(f"reinforce_temperature={self.reinforce_temperature} must be > 0")
        if self.meta_token_scale <= 0:
            raise ValueError(f"meta_token_scale={self.meta_token_scale} must be > 0")
        for name in ("base_loss_weight", "mixed_loss_weight", "policy_loss_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.mixing_bound not in ("sigmoid", "none"):
            raise ValueError(f"mixing_bound={self.mixing_bound!r} must be 'sigmoid' or 'none'")

    @property
    def n_sampled(self) -> int:
        """Sampled tokens per thought (between <start> and <end>)."""
        return self.n_ahead - 3

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ThoughtConfig:
        """Build from a plain dict, naming any unknown key."""
        return dataclass_from_dict(cls, values)

    def to_dict(self) -> dict[str, Any]:
        """Every field as a plain dict (checkpoints' `thought_config`, thought_config.json); `from_dict` inverts it."""
        return asdict(self)
