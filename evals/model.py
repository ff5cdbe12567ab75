"""`EvalModel`: a loaded model with its tokenizer, device and dtype, as every evaluation takes it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from modeldefs.model import Transformer
from modeldefs.pretrained import load_pretrained, load_tokenizer, tokenizer_source
from modeldefs.quietstar import QuietStar

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The dtypes an evaluation can run in, by the name the command lines and the lm-eval adapter take."""


class ModelLoadError(RuntimeError):
    """A model or tokenizer source that could not be loaded (the message names the source and why)."""


@dataclass
class EvalModel:
    """A model in eval mode (`Transformer`, dense or Mixture-of-Depths, or a Quiet-STaR wrapper around
    one) with the tokenizer that goes with it."""

    net: Transformer | QuietStar
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    source: str

    def __post_init__(self) -> None:
        if self.lm.training and self.lm.routed_blocks:
            raise ValueError(f"EvalModel of {self.source}: the Mixture-of-Depths model is in train mode, where its routed "
                             "layers pick training's top-k, which looks ahead at the tokens scored; call .eval() on "
                             "it first (load_eval_model does)")

    @property
    def lm(self) -> Transformer:
        """The plain language model: the model itself, or the LM a Quiet-STaR wrapper thinks with."""
        return self.net.lm if self.has_thoughts else self.net

    @property
    def has_thoughts(self) -> bool:
        """Whether the model is a Quiet-STaR model (it can generate with thoughts)."""
        return isinstance(self.net, QuietStar)

    @property
    def block_size(self) -> int:
        return self.lm.config.block_size

    @property
    def eos_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context is replaced by (lm-eval: BOS if the tokenizer has one, else EOS)."""
        token = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.eos_id
        if token is None:
            raise ValueError(f"tokenizer of {self.source} has neither a BOS nor an EOS token to start an empty context")
        return token

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens added (as lm-eval encodes contexts)."""
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of each text, in one call: a fast tokenizer's backend splits the batch across its threads,
        and skips the character offsets, which nothing here reads (half the time of the tokenizer's own call).
        The backend's own truncation or padding (a tokenizer.json's, or left on by a padded or truncated call),
        or a split_special_tokens it has not yet been told of, is not ours: the tokenizer's call then runs,
        which sets all three as it tokenises."""
        if not texts:
            return []
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        split = getattr(self.tokenizer, "split_special_tokens", False)
        if (backend is None or not hasattr(backend, "encode_batch_fast") or backend.truncation is not None
                or backend.padding is not None or getattr(backend, "encode_special_tokens", False) != split):
            return self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: list[list[int]]) -> list[str]:
        """`decode` of each id list (special tokens kept), in one call to a fast tokenizer's backend where
        decoding is the backend's alone (no clean-up of spaces after it); else one `decode` each."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None or getattr(self.tokenizer, "clean_up_tokenization_spaces", True):
            return [self.decode(ids) for ids in batch]
        return backend.decode_batch(batch, skip_special_tokens=False)


def load_eval_model(source: str, tokenizer: str | None = None, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> EvalModel:
    """Load `source` (anything `modeldefs.pretrained.load_pretrained` takes: a quietdepth .ckpt, an HF
    directory or hub id, a .gguf file, ``smollm2-135m-instruct``) for evaluation.

    tokenizer: tokenizer source; defaults to `source` itself, or for a quietdepth checkpoint to the
    tokenizer of its training data (`modeldefs.pretrained.tokenizer_source`).
    """
    try:
        net = load_pretrained(source)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        hint = "" if os.path.exists(source) else " (no such file or directory; for a hub id the hub must be reachable)"
        raise ModelLoadError(f"cannot load model {source!r}{hint}: {error}") from error
    tokenizer = tokenizer or tokenizer_source(source)
    try:
        tok = load_tokenizer(tokenizer)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ModelLoadError(f"cannot load tokenizer {tokenizer!r} for model {source!r}: {error}; "
                             "pass tokenizer=<source> (--tokenizer on the command line)") from error
    vocab = (net.lm if isinstance(net, QuietStar) else net).config.vocab_size
    if len(tok) > vocab:
        raise ModelLoadError(f"tokenizer {tokenizer!r} has {len(tok)} tokens but model {source!r} only "
                             f"{vocab} embedding rows; pass the tokenizer the model was trained with")
    net = net.to(device=device, dtype=dtype).eval()
    return EvalModel(net=net, tokenizer=tok, device=torch.device(device), dtype=dtype, source=source)
