"""Model definitions: a Llama-family decoder, its config, generation and weight conversion."""

from modeldefs.config import ModelConfig
from modeldefs.model import Transformer

__all__ = ["ModelConfig", "Transformer"]
