"""Per-token decode time of Quiet-STaR generation: plain vs with a thought before every token.

    flock /tmp/qd-heavy.lock python benchmarks/thought_decode.py                  # SmolLM2-135M-Instruct, CPU
    python benchmarks/thought_decode.py --source micro --n-ahead 8 --new-tokens 16  # random tiny model, smoke run

`generate_with_thoughts` runs each thought on a throw-away branch of the KV cache at the newest
position, so a token costs n_ahead single-token forwards (n_ahead - 1 thought tokens + the token):
the target is at most (thought length + 1)x the plain per-token time. For comparison, the official
code's way — rerunning the whole-sequence parallel thought forward (`next_token_logits`) for every
token — is timed once at the mean sequence length of the run. Per-token decode time excludes the
prompt's prefill: (time for N new tokens - time for 1) / (N - 1), median over --repeats. Each figure is
printed and saved to --json as soon as it is measured.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from evals.cli import positive_int
from report import Record, device_name
from modeldefs import ModelConfig, Transformer
from modeldefs.quietstar import QuietStar, ThoughtConfig
from modeldefs.thought_generate import generate_with_thoughts

PROMPT = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
          "How many clips did Natalia sell altogether in April and May?")


def load(source: str, n_ahead: int) -> tuple[QuietStar, torch.Tensor]:
    """The model (eval mode) and a (1, T) prompt."""
    config = ThoughtConfig(n_ahead=n_ahead, n_passes=1)
    if source == "micro":
        torch.manual_seed(0)
        lm = Transformer(ModelConfig.from_name("micro"))
        return QuietStar(lm, config, init_token_id=0).eval(), torch.randint(0, 256, (1, 32))
    from modeldefs.pretrained import load_pretrained, load_tokenizer

    tokenizer = load_tokenizer(source)
    dash = tokenizer.encode("---", add_special_tokens=False)[0]
    model = QuietStar(load_pretrained(source), config, init_token_id=dash).eval()
    return model, torch.tensor([tokenizer.encode(PROMPT, add_special_tokens=False)])


def per_token_seconds(model: QuietStar, prompt: torch.Tensor, new_tokens: int, think: bool, repeats: int) -> float:
    def run(n: int) -> float:
        t0 = time.perf_counter()
        generate_with_thoughts(model, prompt, n, think=think)
        return time.perf_counter() - t0

    run(2)  # warm-up
    samples = [(run(new_tokens) - run(1)) / (new_tokens - 1) for _ in range(repeats)]
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="smollm2-135m-instruct", help="a pretrained source, or 'micro'")
    parser.add_argument("--n-ahead", type=int, default=12, help="thought length (official meaning; default official)")
    parser.add_argument("--new-tokens", type=int, default=24, help="tokens per timed run (>= 2: the per-token "
                        "time is the difference between this run and a one-token run)")
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.new_tokens < 2:
        parser.error(f"--new-tokens {args.new_tokens}: give at least 2")

    model, prompt = load(args.source, args.n_ahead)
    budget = args.n_ahead + 1
    meta = dict(source=args.source, n_ahead=args.n_ahead, prompt_tokens=prompt.size(1), new_tokens=args.new_tokens,
                target_ratio=budget, device=device_name(torch.device("cpu")), threads=torch.get_num_threads(),
                torch=torch.__version__)
    with Record(args.json, meta) as record, torch.inference_mode():
        plain = per_token_seconds(model, prompt, args.new_tokens, think=False, repeats=args.repeats)
        print(f"plain decode:           {plain * 1e3:8.1f} ms/token ({1 / plain:.2f} tok/s)", flush=True)
        record.update(plain_ms_per_token=plain * 1e3)
        thought = per_token_seconds(model, prompt, args.new_tokens, think=True, repeats=args.repeats)
        print(f"with thoughts (cached): {thought * 1e3:8.1f} ms/token ({1 / thought:.2f} tok/s), "
              f"{thought / plain:.2f}x plain (target <= {budget}x: n_ahead + 1)", flush=True)
        record.update(thought_ms_per_token=thought * 1e3, ratio=thought / plain)
        seq = torch.cat([prompt, prompt[:, : args.new_tokens // 2]], 1)  # the run's mean length
        model.next_token_logits(seq)
        t0 = time.perf_counter()
        model.next_token_logits(seq)
        recompute = time.perf_counter() - t0
        print(f"full recompute per token (official way): {recompute * 1e3:8.1f} ms/token, "
              f"{recompute / plain:.1f}x plain")
        record.update(recompute_ms_per_token=recompute * 1e3, recompute_ratio=recompute / plain)

if __name__ == "__main__":
    main()
