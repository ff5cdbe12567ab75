"""SwiGLU feed-forward: down(silu(gate(x)) * up(x)), gate and up fused in one matmul."""

import torch
import torch.nn.functional as F
from torch import nn

from modeldefs.config import ModelConfig


class SwiGLU(nn.Module):
    """Llama's feed-forward block (see the module docstring)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up = nn.Linear(config.n_embd, 2 * config.intermediate_size, bias=False)
        self.down = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)
