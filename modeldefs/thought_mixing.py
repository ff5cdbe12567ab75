"""Quiet-STaR's mixing head: how much of the post-thought hidden state replaces the plain one (`QuietStar.mix`)."""

from __future__ import annotations

import torch
from torch import nn


class ThoughtMixingHead(nn.Module):
    """[h_base; h_thought] (2d) -> mixing logit; the last layer starts at zero (w = 0, or near it)."""

    def __init__(self, n_embd: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2 * n_embd, n_embd), nn.ReLU(),
            nn.Linear(n_embd, n_embd), nn.ReLU(),
            nn.Linear(n_embd, 1, bias=False),
        )
        nn.init.zeros_(self.net[-1].weight)

    def forward(self, h_base: torch.Tensor, h_thought: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([h_base, h_thought], dim=-1))
