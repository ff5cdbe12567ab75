"""`quietdepth-generate`: continue prompts with any model source (nanoGPT's sample.py, for every source).

    quietdepth-generate --model runs/smoke/checkpoints/last.ckpt --prompt "Natalia sold clips to"
    quietdepth-generate --chat --prompt "What is 12 * 7?" --temperature 0.8 --top-k 50 --num-samples 3

A Quiet-STaR checkpoint thinks before every token (`--no-thoughts` decodes with its plain LM); a
Mixture-of-Depths model routes token by token by its causal rule, and the summary says which share of
the tokens each routed layer processed.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time

import torch

from evals.cli import check_device, positive_int
from evals.model import DTYPES, EvalModel, ModelLoadError, load_eval_model
from modeldefs.generate import generate
from modeldefs.thought_generate import generate_with_thoughts


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quietdepth-generate", description="Continue prompts with a model.")
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="a quietdepth .ckpt (file or sharded folder), an HF directory or hub id, a .gguf file, or "
                        "smollm2-135m-instruct (offline default)")
    p.add_argument("--tokenizer", default=None, help="tokenizer source (default: the model's; for a .ckpt its training data's)")
    p.add_argument("--prompt", action="append", default=None, help="a prompt (repeat for several)")
    p.add_argument("--prompt-file", default=None, help="a text file read whole as one more prompt")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn in the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 decodes greedily (the default)")
    p.add_argument("--top-k", type=positive_int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--num-samples", type=positive_int, default=1, help="completions per prompt (sampled: --temperature > 0)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--no-thoughts", action="store_true", help="a Quiet-STaR model decodes without thinking")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    return p


def check_args(args: argparse.Namespace) -> None:
    """Refuse settings that would be ignored or cannot run here (a ValueError naming them)."""
    if not args.prompt and args.prompt_file is None:
        raise ValueError("give a prompt: --prompt TEXT (repeatable) or --prompt-file PATH")
    if args.temperature <= 0 and (args.top_k is not None or args.top_p is not None):
        raise ValueError("--top-k/--top-p filter what sampling draws from; greedy decoding (--temperature 0, the "
                         "default) ignores them: set --temperature > 0 (e.g. 0.8)")
    if args.num_samples > 1 and args.temperature <= 0:
        raise ValueError(f"--num-samples {args.num_samples} with greedy decoding gives {args.num_samples} equal "
                         "completions: set --temperature > 0 (e.g. 0.8)")
    check_device(args.device)


def prompts(args: argparse.Namespace, model: EvalModel) -> list[tuple[str, str]]:
    """(text as given, text the model reads) per prompt: the second is wrapped in the chat template with --chat."""
    texts = list(args.prompt or [])
    if args.prompt_file is not None:
        with open(args.prompt_file, encoding="utf-8") as f:
            texts.append(f.read())
    if not args.chat:
        return [(t, t) for t in texts]
    if model.tokenizer.chat_template is None:
        raise ValueError(f"--chat: the tokenizer of {model.source} has no chat template; drop --chat")
    return [(t, model.tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                                    add_generation_prompt=True)) for t in texts]


class RoutingCount:
    """Per routed layer, the tokens it processed and the tokens it saw, counted by forward hooks (the
    processed count stays on the device until read: no host sync per decoding step)."""

    def __init__(self, model: EvalModel) -> None:
        blocks = model.lm.routed_blocks
        self.routed = {i: torch.zeros((), dtype=torch.long, device=model.device) for i in blocks}
        self.seen = dict.fromkeys(blocks, 0)
        for i, block in blocks.items():
            block.register_forward_hook(functools.partial(self._count, i))

    def _count(self, layer: int, block: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        self.routed[layer] += block.routing.selected.sum()
        self.seen[layer] += block.routing.selected.numel()

    def lines(self) -> list[str]:
        return [f"  routed layer {i}: processed {int(self.routed[i])} of {self.seen[i]} tokens"
                f" ({int(self.routed[i]) / max(self.seen[i], 1):.0%})" for i in self.routed]


def complete(model: EvalModel, tokens: list[int], args: argparse.Namespace,
             generator: torch.Generator) -> list[list[int]]:
    """`args.num_samples` completions of the prompt `tokens` as token ids, cut at the end-of-sequence token."""
    if not tokens:
        raise ValueError("a prompt is empty: give text to continue")
    ids = torch.tensor([tokens] * args.num_samples, device=model.device)
    if model.has_thoughts and not args.no_thoughts:
        out = generate_with_thoughts(model.net, ids, args.max_new_tokens, args.temperature, eos_id=model.eos_id,
                                     generator=generator)
    else:
        out = generate(model.lm, ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                       eos_id=model.eos_id, generator=generator)
    rows = out[:, ids.size(1):].tolist()
    return [row[:row.index(model.eos_id)] if model.eos_id in row else row for row in rows]


def completion_text(model: EvalModel, prompt: list[int], completion: list[int]) -> str:
    """The text `completion` adds to `prompt`: both decoded together, then the prompt's text taken off (a
    SentencePiece-style tokenizer drops the space before the first token it decodes, so the completion
    decoded alone would lose the space between prompt and completion)."""
    before = model.decode(prompt, skip_special_tokens=True)
    whole = model.decode(prompt + completion, skip_special_tokens=True)
    return whole[len(before):] if whole.startswith(before) else model.decode(completion, skip_special_tokens=True)


def run(args: argparse.Namespace) -> None:
    check_args(args)
    model = load_eval_model(args.model, args.tokenizer, args.device, DTYPES[args.dtype])
    if model.has_thoughts and not args.no_thoughts and (args.top_k is not None or args.top_p is not None):
        raise ValueError("--top-k/--top-p: thinking decodes sample by --temperature only; drop them or add --no-thoughts")
    texts = prompts(args, model)
    routing = RoutingCount(model)
    generator = torch.Generator(model.device).manual_seed(args.seed)
    bold, plain = ("\033[1m", "\033[0m") if sys.stdout.isatty() else ("", "")  # the completion stands out
    start, produced = time.perf_counter(), 0
    for i, (shown, text) in enumerate(texts):
        tokens = model.encode(text)
        for j, completion in enumerate(complete(model, tokens, args, generator)):
            produced += len(completion)
            sample = f", sample {j + 1}" if args.num_samples > 1 else ""
            joint = "\n" if args.chat else ""  # a chat answer starts its own turn
            print(f"--- prompt {i + 1}{sample} ---\n{shown}{joint}{bold}"
                  f"{completion_text(model, tokens, completion)}{plain}\n")
    seconds = time.perf_counter() - start
    thinking = " with thoughts" if model.has_thoughts and not args.no_thoughts else ""
    print(f"{produced} tokens{thinking} in {seconds:.1f} s ({produced / seconds:.1f} tokens/s), {args.model}, "
          f"{args.dtype} on {args.device}")
    for line in routing.lines():
        print(line)


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    try:
        run(args)
    except (ModelLoadError, FileNotFoundError, ValueError) as error:
        p.exit(2, f"{p.prog}: error: {error}\n")


if __name__ == "__main__":
    main()
