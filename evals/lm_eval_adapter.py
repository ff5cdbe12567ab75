"""quietdepth models as an lm-evaluation-harness model type, so lm-eval can run any of its tasks on them.

    python -m evals.lm_eval_adapter --model quietdepth --model_args pretrained=runs/x/checkpoints/last.ckpt \\
        --tasks hellaswag --batch_size 32

takes every `lm_eval` argument; this module only has to be imported before lm-eval resolves
`--model quietdepth`, which is what running it as `__main__` does (in Python:
`import evals.lm_eval_adapter` and then `lm_eval.simple_evaluate(model="quietdepth", ...)`).
Requests go through `evals.scoring` (prefix-shared, batched log-likelihoods) and `evals.decoding`
(batched KV-cached greedy generation); contexts are tokenised as lm-eval's `hf` backend does, so
scores are comparable with `--model hf` on the same weights.
"""

from __future__ import annotations

import inspect
import sys
import warnings
from typing import Any

try:
    import lm_eval.models  # noqa: F401  (lm-eval's own model types: its registry loads them only while empty)
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as error:  # lm-eval is an optional extra
    raise ImportError("the lm-eval adapter needs lm-evaluation-harness: pip install -e '.[lmeval]' "
                      "(or pip install lm_eval==0.4.13)") from error
import torch

from evals import decoding, scoring
from evals.decoding import DecodingConfig
from evals.model import DTYPES, EvalModel, load_eval_model


def _device(requested: str | None) -> str:
    """The device to load on: `requested`, or the CPU where it is a CUDA device this machine lacks."""
    available = "cuda" if torch.cuda.is_available() else "cpu"
    if requested is None:
        return available
    if requested.startswith("cuda") and available == "cpu":
        warnings.warn(f"device={requested!r} but CUDA is not available: running on the CPU", stacklevel=3)
        return "cpu"
    return requested


@register_model("quietdepth")
class QuietdepthLM(LM):
    """lm-eval `LM` over a quietdepth model (dense, Mixture-of-Depths or Quiet-STaR).

    Model args (`--model_args k=v,...`): `pretrained` (a .ckpt, HF directory or hub id, .gguf, or
    `smollm2-135m-instruct`; in Python also an already loaded `EvalModel`), `tokenizer` (defaults as in
    `evals.model.load_eval_model`), `dtype` (float32, bfloat16, float16), `decoding` (greedy; thoughts:
    a Quiet-STaR model thinks when it generates and when it scores), `max_gen_toks` (the default when a
    task sets none), `pack_tokens` (log-likelihood scoring: most tokens per packed row, see
    `evals.scoring.loglikelihood`), `cuda_graph` (default true: on a GPU, each decoding step of a plain
    model replays as one CUDA graph, `evals.decode_step`). `--batch_size` is the number of prompts (generation) or packed
    rows (scoring) per forward pass; `--device` is honoured, except that a CUDA device on a machine
    without one falls back to the CPU with a warning, as lm-eval's `hf` backend does (lm-eval's default
    device is cuda:0). `max_batch_size`, which lm-eval passes to every model type, has no use here.
    """

    def __init__(self, pretrained: str | EvalModel = "smollm2-135m-instruct", tokenizer: str | None = None,
                 device: str | None = None, dtype: str = "float32",
                 batch_size: int | str = DecodingConfig.batch_size, decoding: str = "greedy",
                 max_gen_toks: int = DecodingConfig.max_new_tokens,
                 pack_tokens: int = DecodingConfig.pack_tokens, cuda_graph: bool | str = True,
                 max_batch_size: int | None = None, **unknown: Any) -> None:
        if unknown:  # Python's own TypeError names the first unknown arg only, and not the accepted ones
            known = [name for name in inspect.signature(QuietdepthLM.__init__).parameters
                     if name not in ("self", "unknown")]
            raise TypeError(f"unknown model arg(s) {', '.join(sorted(unknown))} for --model quietdepth; it takes "
                            f"{', '.join(known)}")
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: use one of {sorted(DTYPES)}")
        if decoding not in ("greedy", "thoughts"):
            raise ValueError(f"decoding={decoding!r}: use greedy, or thoughts for a Quiet-STaR model "
                             "(CoT-decoding needs a task's answer format: use quietdepth-eval)")
        if str(cuda_graph).lower() not in ("true", "false"):
            raise ValueError(f"cuda_graph={cuda_graph!r}: give true or false")
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"batch_size={batch_size!r}: give a positive number (automatic sizing is not supported)")
        if isinstance(pretrained, EvalModel):
            self.model = pretrained
        else:
            self.model = load_eval_model(pretrained, tokenizer, _device(device), DTYPES[dtype])
        if decoding == "thoughts" and not self.model.has_thoughts:
            raise ValueError(f"decoding=thoughts needs a Quiet-STaR checkpoint; {self.model.source} is a plain model")
        self.batch_size = int(batch_size)
        self.decoding = decoding
        self.max_gen_toks = int(max_gen_toks)
        self.pack_tokens = int(pack_tokens)
        self.cuda_graph = str(cuda_graph).lower() == "true"

    @property
    def tokenizer_name(self) -> str:
        return self.model.tokenizer.name_or_path.replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.model.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                        add_generation_prompt=add_generation_prompt,
                                                        continue_final_message=not add_generation_prompt)

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = scoring.encode_pairs(self.model, [request.args for request in requests])
        return self._cached(requests, "loglikelihood",
                            scoring.loglikelihood(self.model, pairs, self.batch_size, progress=not disable_tqdm,
                                                  think=self.decoding == "thoughts", pack_tokens=self.pack_tokens))

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        if self.decoding == "thoughts":
            raise ValueError("decoding=thoughts scores continuations and generates with thoughts; rolling "
                             "log-likelihood (perplexity tasks) has no thought path: use decoding=greedy")
        tokens = self.model.encode_batch([request.args[0] for request in requests])
        return self._cached(requests, "loglikelihood_rolling",
                            scoring.loglikelihood_rolling(self.model, tokens, self.batch_size, progress=not disable_tqdm,
                                                          pack_tokens=self.pack_tokens))

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        # One decoding call per distinct (stop strings, length); a task's requests share them.
        groups: dict[tuple[tuple[str, ...], int], list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(self._generation_args(request.args[1]), []).append(i)
        out: list[str] = [""] * len(requests)
        for (until, max_new), index in groups.items():
            prompts = self.model.encode_batch([requests[i].args[0] for i in index])
            if self.decoding == "thoughts":
                texts = decoding.generate_thoughts(self.model, prompts, max_new, until, self.batch_size,
                                                   progress=not disable_tqdm)
            else:
                texts = decoding.generate(self.model, prompts, max_new, until, self.batch_size,
                                          progress=not disable_tqdm, fixed_step=None if self.cuda_graph else False)
            for i, text in zip(index, texts):
                out[i] = text
        return self._cached(requests, "generate_until", out)

    def _generation_args(self, kwargs: dict[str, Any]) -> tuple[tuple[str, ...], int]:
        """(stop strings, max new tokens) of a request's generation kwargs; sampling is refused."""
        if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) > 0.0:
            raise ValueError(f"the quietdepth model type decodes greedily; this task asks for sampling ({kwargs}): "
                             "override with --gen_kwargs do_sample=False,temperature=0")
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else [s for s in until if s]
        # lm-eval's hf backend reads max_gen_toks, and also the max_new_tokens / max_tokens aliases
        length = next((kwargs[k] for k in ("max_gen_toks", "max_new_tokens", "max_tokens") if k in kwargs),
                      self.max_gen_toks)
        return tuple(until), int(length)

    def _cached(self, requests: list[Any], kind: str, results: list[Any]) -> list[Any]:
        """Hand results to lm-eval's request cache (`--use_cache`), then return them."""
        for request, result in zip(requests, results):
            self.cache_hook.add_partial(kind, request.args, result)
        return results


def main() -> None:
    """`lm_eval`'s command line with the `quietdepth` model type registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv[0] = "lm_eval"
    cli_evaluate()


if __name__ == "__main__":
    main()
