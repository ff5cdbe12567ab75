"""`ModelConfig`: every architectural choice of the decoder, serializable to YAML/JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal


@dataclass
class ModelConfig:
    """Hyperparameters of a Llama-family decoder (Llama, Mistral, Qwen2, SmolLM2 shapes)."""

    name: str = "custom"
    vocab_size: int = 49152
    """Rows of the token embedding (and of the output head)."""
    n_layer: int = 2
    n_embd: int = 64
    """Width of the residual stream (HF: hidden_size)."""
    n_head: int = 4
    n_kv_head: int = 2
    """Key/value heads; fewer than `n_head` is grouped-query attention."""
    head_dim: int | None = None
    """Defaults to n_embd // n_head."""
    intermediate_size: int = 128
    """Hidden width of the SwiGLU MLP."""
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    qkv_bias: bool = False
    """Bias on the query/key/value projections (Qwen2 has it, Llama does not)."""
    block_size: int = 2048
    """Longest sequence the model accepts (RoPE tables are built for this length)."""
    init_std: float = 0.02

    # Mixture-of-Depths (modeldefs/mod.py); mod_capacity None is a dense model.
    mod_capacity: float | None = None
    """Share of each sequence's tokens that a routed block processes (paper's best: 0.125)."""
    mod_route_every: int = 2
    """Route every n-th block (layers n-1, 2n-1, ...); 2 interleaves routed and dense blocks."""
    mod_exempt_first: bool = True
    """Keep the first layer dense."""
    mod_exempt_last: bool = True
    """Keep the last layer dense."""
    mod_scale_by_router: bool = True
    """Scale routed updates by 2*sigmoid(router logit), which is what gives the router an LM-loss
    gradient; False (ablation) leaves the updates unscaled."""
    mod_causal_rule: Literal["router", "predictor"] = "router"
    """What decides routing at inference, token by token: the router's logit > 0 (trained towards
    the top-k choice by the auxiliary BCE loss) or the auxiliary predictor's logit > 0."""
    mod_aux_weight: float = 0.01
    """Weight of the BCE loss on router logits with top-k membership as targets (0: off)."""
    mod_predictor: bool = True
    """Train the auxiliary predictor MLP (on the detached router input; no effect on the LM loss)."""
    mod_predictor_hidden: int = 64
    """Hidden width of the predictor MLP."""

    def __post_init__(self) -> None:
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; set head_dim")
            self.head_dim = self.n_embd // self.n_head
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.mod_capacity is not None and (isinstance(self.mod_capacity, bool)
                                              or not isinstance(self.mod_capacity, (int, float))
                                              or not 0 < self.mod_capacity <= 1):
            raise ValueError(f"mod_capacity={self.mod_capacity!r} must be in (0, 1], or None for a dense model")
        if not isinstance(self.mod_route_every, int) or self.mod_route_every < 1:
            raise ValueError(f"mod_route_every={self.mod_route_every!r} must be an integer >= 1")
        if self.mod_causal_rule not in ("router", "predictor"):
            raise ValueError(f"mod_causal_rule={self.mod_causal_rule!r} must be 'router' or 'predictor'")
        if not self.mod_aux_weight >= 0:  # also refuses NaN
            raise ValueError(f"mod_aux_weight={self.mod_aux_weight} must be >= 0 (0 switches the router's BCE loss off)")
        if self.mod_predictor and (not isinstance(self.mod_predictor_hidden, int) or self.mod_predictor_hidden < 1):
            raise ValueError(f"mod_predictor_hidden={self.mod_predictor_hidden!r} must be an integer >= 1 "
                             "(or mod_predictor=False for no predictor)")
        if self.mod_causal_rule == "predictor" and not self.mod_predictor:
            raise ValueError("mod_causal_rule='predictor' needs mod_predictor=True")
        if self.mod_capacity is not None and not any(map(self.is_routed, range(self.n_layer))):
            raise ValueError(f"mod_capacity={self.mod_capacity} routes none of the {self.n_layer} layers "
                             f"(mod_route_every={self.mod_route_every}, mod_exempt_first={self.mod_exempt_first}, "
                             f"mod_exempt_last={self.mod_exempt_last}); lower mod_route_every, exempt fewer layers "
                             "or add layers")

    def is_routed(self, layer: int) -> bool:
        """Whether decoder layer `layer` is a Mixture-of-Depths routed block."""
        if self.mod_capacity is None or layer % self.mod_route_every != self.mod_route_every - 1:
            return False
        return not (layer == 0 and self.mod_exempt_first) and not (layer == self.n_layer - 1 and self.mod_exempt_last)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named config (see `NAMED_CONFIGS`), with fields overridden."""
        if name not in NAMED_CONFIGS:
            raise ValueError(f"unknown model config {name!r}; choose one of {sorted(NAMED_CONFIGS)}")
        return dataclass_from_dict(cls, {**NAMED_CONFIGS[name], **overrides})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Build from a plain dict, naming any unknown key."""
        return dataclass_from_dict(cls, values)

    def to_dict(self) -> dict[str, Any]:
        """Every field as a plain dict (what checkpoints store as `model_config`; `from_dict` reads it back)."""
        return asdict(self)


def check_fields(cls: type, values: dict[str, Any]) -> None:
    """Raise a ValueError naming the keys of `values` that are not fields of the dataclass `cls`, and the known fields."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known fields: {sorted(known)}")


def dataclass_from_dict(cls: type, values: dict[str, Any]) -> Any:
    """`cls(**values)` for a config dataclass, with an error that names unknown keys and the known fields."""
    check_fields(cls, values)
    return cls(**values)


NAMED_CONFIGS: dict[str, dict[str, Any]] = {
    # HuggingFaceTB/SmolLM2-135M(-Instruct)
    "smollm2-135m": dict(
        name="smollm2-135m", vocab_size=49152, n_layer=30, n_embd=576, n_head=9, n_kv_head=3,
        intermediate_size=1536, rope_theta=100000.0, norm_eps=1e-5, tie_embeddings=True, block_size=8192,
    ),
    # HuggingFaceTB/SmolLM2-360M(-Instruct)
    "smollm2-360m": dict(
        name="smollm2-360m", vocab_size=49152, n_layer=32, n_embd=960, n_head=15, n_kv_head=5,
        intermediate_size=2560, rope_theta=100000.0, norm_eps=1e-5, tie_embeddings=True, block_size=8192,
    ),
    # The ~1B benchmark shape (TinyLlama-1.1B: 22 layers, d=2048, GQA 32/4).
    "llama-1b": dict(
        name="llama-1b", vocab_size=32000, n_layer=22, n_embd=2048, n_head=32, n_kv_head=4,
        intermediate_size=5632, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=False, block_size=2048,
    ),
    # Tiny configs for tests and CPU smoke runs; the vocab matches the SmolLM2 tokenizer.
    "tiny": dict(
        name="tiny", vocab_size=49152, n_layer=4, n_embd=64, n_head=4, n_kv_head=2,
        intermediate_size=192, rope_theta=10000.0, tie_embeddings=True, block_size=1024,
    ),
    "micro": dict(
        name="micro", vocab_size=256, n_layer=2, n_embd=32, n_head=4, n_kv_head=2,
        intermediate_size=64, rope_theta=10000.0, tie_embeddings=False, block_size=128,
    ),
}
