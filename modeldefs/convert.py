"""Pure mappings between transformers' Llama-family checkpoints and `Transformer`.

Covers `LlamaForCausalLM`, `MistralForCausalLM` and `Qwen2ForCausalLM` state dicts: HF keeps
q/k/v and gate/up as separate matrices, we keep each pair fused, so import concatenates and
export splits; both are exact.
"""

from __future__ import annotations

from typing import Any

import torch

from modeldefs.config import ModelConfig

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


def config_from_hf(hf: Any, name: str = "custom") -> ModelConfig:
    """ModelConfig from a transformers `PretrainedConfig` of a Llama-family model."""
    if hf.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type {hf.model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}")
    rope = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"rope scaling {rope.get('rope_type')!r} is not supported (only default RoPE)")
    theta = rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
    if getattr(hf, "sliding_window", None) and getattr(hf, "use_sliding_window", hf.model_type == "mistral"):
        if hf.sliding_window < hf.max_position_embeddings:
            raise ValueError("sliding-window attention is not supported; set sliding_window=None to import")
    if getattr(hf, "attention_bias", False) or getattr(hf, "mlp_bias", False):
        raise ValueError("Llama attention_bias/mlp_bias (a bias on every projection) is not supported")
    if getattr(hf, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf.hidden_act!r} is not supported (the MLP is SwiGLU: hidden_act='silu')")
    return ModelConfig(
        name=name,
        vocab_size=hf.vocab_size,
        n_layer=hf.num_hidden_layers,
        n_embd=hf.hidden_size,
        n_head=hf.num_attention_heads,
        n_kv_head=hf.num_key_value_heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        intermediate_size=hf.intermediate_size,
        rope_theta=float(theta),
        norm_eps=float(hf.rms_norm_eps),
        tie_embeddings=bool(hf.tie_word_embeddings),
        qkv_bias=hf.model_type == "qwen2",
        block_size=hf.max_position_embeddings,
    )


def hf_config_dict(config: ModelConfig) -> dict[str, Any]:
    """Keyword arguments for `transformers.LlamaConfig` (or Qwen2Config when q/k/v carry a bias)."""
    return dict(
        model_type="qwen2" if config.qkv_bias else "llama",
        vocab_size=config.vocab_size,
        num_hidden_layers=config.n_layer,
        hidden_size=config.n_embd,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.n_kv_head,
        head_dim=config.head_dim,
        intermediate_size=config.intermediate_size,
        rope_theta=config.rope_theta,
        rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings,
        max_position_embeddings=config.block_size,
        hidden_act="silu",
    )


# Per-layer weights that only change name (ours -> HF's, after `blocks.{i}.` / `model.layers.{i}.`); the
# fused q/k/v and gate/up projections are concatenated on import and split on export.
_RENAMED = {
    "attn_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "attn.proj.weight": "self_attn.o_proj.weight",
    "mlp.down.weight": "mlp.down_proj.weight",
}


def state_dict_from_hf(hf_sd: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict from an HF Llama-family one."""
    sd = {"embed.weight": hf_sd["model.embed_tokens.weight"], "norm.weight": hf_sd["model.norm.weight"]}
    sd["lm_head.weight"] = hf_sd["model.embed_tokens.weight"] if config.tie_embeddings else hf_sd["lm_head.weight"]
    for i in range(config.n_layer):
        hf, ours = f"model.layers.{i}.", f"blocks.{i}."
        for name, hf_name in _RENAMED.items():
            sd[ours + name] = hf_sd[hf + hf_name]
        sd[ours + "attn.qkv.weight"] = torch.cat([hf_sd[hf + f"self_attn.{p}_proj.weight"] for p in "qkv"])
        if config.qkv_bias:
            sd[ours + "attn.qkv.bias"] = torch.cat([hf_sd[hf + f"self_attn.{p}_proj.bias"] for p in "qkv"])
        sd[ours + "mlp.gate_up.weight"] = torch.cat([hf_sd[hf + "mlp.gate_proj.weight"], hf_sd[hf + "mlp.up_proj.weight"]])
    return sd


def state_dict_to_hf(sd: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """An HF Llama-family state dict from ours (inverse of `state_dict_from_hf`)."""
    q_dim, kv_dim = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
    hf_sd = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    if not config.tie_embeddings:
        hf_sd["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(config.n_layer):
        hf, ours = f"model.layers.{i}.", f"blocks.{i}."
        for name, hf_name in _RENAMED.items():
            hf_sd[hf + hf_name] = sd[ours + name]
        for p, t in zip("qkv", sd[ours + "attn.qkv.weight"].split([q_dim, kv_dim, kv_dim])):
            hf_sd[hf + f"self_attn.{p}_proj.weight"] = t.clone()
        if config.qkv_bias:
            for p, t in zip("qkv", sd[ours + "attn.qkv.bias"].split([q_dim, kv_dim, kv_dim])):
                hf_sd[hf + f"self_attn.{p}_proj.bias"] = t.clone()
        gate, up = sd[ours + "mlp.gate_up.weight"].chunk(2)
        hf_sd[hf + "mlp.gate_proj.weight"], hf_sd[hf + "mlp.up_proj.weight"] = gate.clone(), up.clone()
    return hf_sd
