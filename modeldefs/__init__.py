"""Model definitions: a Llama-family decoder and its config, Mixture-of-Depths routed blocks, the Quiet-STaR
thinking wrapper, generation (with and without thoughts) and weight conversion."""

from modeldefs.config import ModelConfig
from modeldefs.model import Transformer

__all__ = ["ModelConfig", "Transformer"]
