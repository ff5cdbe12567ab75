"""Quiet-STaR training step: compact thought attention vs one dense mask over every cache slot.

    flock /tmp/qd-heavy.lock python benchmarks/thought_attention.py                 # SmolLM2-135M shape, CPU
    python benchmarks/thought_attention.py --shape micro --seq 32 --n-ahead 6        # smoke run

`ThoughtKVCache` scores each thought chain against the T prefix keys and its own j keys (P x (T + j)
per pass). The reference here is the official layout: keys of every pass concatenated, attended
through SDPA with the dense P x (T + jP) boolean mask (`thought_attention_mask`), most of it False.
Both give the same loss (checked first: the script refuses to time paths that disagree); it times
forward + backward of `QuietStar.forward` (random weights: cost does not depend on them) and, for scale,
a plain LM step on the same batch. Each time is printed and saved to --json as soon as it is measured.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import modeldefs.quietstar as quietstar
from evals.cli import positive_int
from report import Record, device_name
from modeldefs import ModelConfig, Transformer
from modeldefs.quietstar import QuietStar, ThoughtConfig, ThoughtKVCache


class DenseMaskCache(ThoughtKVCache):
    """The reference: all keys concatenated, SDPA under the full slot mask."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int,
               mask: torch.Tensor | None) -> torch.Tensor:
        if start_pos == 0:
            self.k, self.v = k, v
        else:
            self.k, self.v = torch.cat([self.k, k], 2), torch.cat([self.v, v], 2)
        return F.scaled_dot_product_attention(q, self.k, self.v, attn_mask=mask, is_causal=mask is None,
                                              enable_gqa=k.size(1) != q.size(1))  # None: pass 0, causal

    def repeat_rows(self, copies: int) -> None:
        super().repeat_rows(copies)
        self.k, self.v = (t.repeat_interleave(copies, dim=0) for t in (self.k, self.v))


def time_steps(step: Callable[[], object], steps: int) -> float:
    step()  # warm-up
    samples = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="smollm2-135m", help="a named ModelConfig")
    parser.add_argument("--batch", type=positive_int, default=1)
    parser.add_argument("--seq", type=positive_int, default=64)
    parser.add_argument("--n-ahead", type=int, default=12)
    parser.add_argument("--n-ahead-talk", type=int, default=4)
    parser.add_argument("--steps", type=positive_int, default=2, help="timed steps per variant (median)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    torch.manual_seed(0)
    lm = Transformer(ModelConfig.from_name(args.shape))
    # Greedy thoughts: both paths then think the same tokens (sampling would amplify rounding differences
    # into different thoughts); the cost of a step does not depend on which tokens are thought.
    config = ThoughtConfig(n_ahead=args.n_ahead, n_ahead_talk=args.n_ahead_talk, thought_temperature=0.0)
    model = QuietStar(lm, config, init_token_id=0)
    x = torch.randint(0, lm.config.vocab_size, (args.batch, args.seq))

    def thought_step() -> float:
        model.zero_grad(set_to_none=True)
        out = model(x, generator=torch.Generator().manual_seed(0))
        out.loss.backward()
        return out.loss.item()

    def plain_step() -> None:
        lm.zero_grad(set_to_none=True)
        logits = lm(x)
        F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()).backward()

    compact_loss = thought_step()  # both paths must agree before any time is spent timing them
    quietstar.ThoughtKVCache = DenseMaskCache  # what `think` builds from here on
    dense_loss = thought_step()
    quietstar.ThoughtKVCache = ThoughtKVCache
    print(f"loss compact {compact_loss:.6f} vs dense mask {dense_loss:.6f}", flush=True)
    if abs(compact_loss - dense_loss) > 1e-4 * abs(dense_loss):
        raise SystemExit("the two attention paths disagree: the timing would compare different computations")
    meta = dict(shape=args.shape, batch=args.batch, seq=args.seq, n_ahead=args.n_ahead, n_ahead_talk=args.n_ahead_talk,
                n_passes=config.n_passes, compact_loss=compact_loss, dense_loss=dense_loss,
                device=device_name(torch.device("cpu")), threads=torch.get_num_threads(), torch=torch.__version__)
    results: dict[str, float] = {}
    with Record(args.json, {**meta, "seconds_per_step": results}) as record:
        for name, step in (("plain", plain_step), ("compact", thought_step), ("dense_mask", thought_step)):
            quietstar.ThoughtKVCache = DenseMaskCache if name == "dense_mask" else ThoughtKVCache
            try:
                results[name] = time_steps(step, args.steps)
            finally:
                quietstar.ThoughtKVCache = ThoughtKVCache
            print(f"{name:>10}: {results[name]:7.2f} s/step ({results[name] / results['plain']:.1f}x plain)",
                  flush=True)
            record.update(seconds_per_step=results)
        record.update(speedup=results["dense_mask"] / results["compact"])
        print(f"compact attention takes {results['compact'] / results['dense_mask']:.2f}x the dense mask's time "
              "per step")

if __name__ == "__main__":
    main()
