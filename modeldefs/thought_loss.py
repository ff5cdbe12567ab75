"""Quiet-STaR's objective: the REINFORCE loss on sampled thoughts, and the terms a training forward returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modeldefs.thought_config import ThoughtConfig


def reinforce_loss(reward: torch.Tensor, log_p: torch.Tensor, config: ThoughtConfig) -> torch.Tensor:
    """REINFORCE on the sampled thought tokens: -mean(advantage * log p(token)).

    reward (N, P): a thought's NLL reduction on the talk tokens, N = B * n_passes rows with an
    example's n_passes samples adjacent; log_p (N, P, n_sampled). The advantage is the reward minus the
    mean over the n_passes thoughts at the same position (subtract_baseline), clamped at 0 (clamp_reward).
    """
    advantage = reward
    if config.subtract_baseline and config.n_passes > 1:
        per_example = reward.view(-1, config.n_passes, reward.size(-1))                # (B, n_passes, P)
        advantage = (per_example - per_example.mean(1, keepdim=True)).view_as(reward)
    if config.clamp_reward:
        advantage = advantage.clamp(min=0)
    return -(advantage.unsqueeze(-1) * log_p).mean()


@dataclass
class ThoughtOutput:
    """What one Quiet-STaR training forward computed. N = B * n_passes rows (copies of each example
    adjacent), P thought positions, K = n_ahead_talk."""

    loss: torch.Tensor
    """base_loss_weight * lm_nll + mixed_loss_weight * mixed_nll + policy_loss_weight * policy_loss."""
    lm_nll: torch.Tensor
    """Plain next-token NLL of the LM over all positions (the loss's base term)."""
    base_nll: torch.Tensor
    """NLL of the plain LM on the talk tokens (the same tokens as mixed_nll)."""
    mixed_nll: torch.Tensor
    """NLL of the mixed (after-thought) predictions of the talk tokens."""
    policy_loss: torch.Tensor
    """-mean(advantage * log p(sampled thought token))."""
    mixing_weight: torch.Tensor
    """(N, P, K) w per prediction (detached)."""
    reward: torch.Tensor
    """(N, P): sum over the K talk tokens of NLL_base - NLL_mixed, before baseline and clamp (detached)."""
    thought_tokens: torch.Tensor
    """(N, P, n_ahead - 3) sampled thought token ids (the <start>/<end> vectors are not tokens)."""
    positions: torch.Tensor
    """(P,) the positions t at which thoughts were taken."""
    base_logits: torch.Tensor
    """(B, T, V) plain LM logits (the tensor the loss used, not a copy), once per example: the n_passes
    copies share pass 0."""
    mixed_logits: torch.Tensor
    """(N, P, K, V) mixed logits: [n, p, k] predicts token positions[p] + k + 1."""
