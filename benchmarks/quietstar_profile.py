"""Where a Quiet-STaR training step spends its time: torch.profiler over one step, ops by self CPU time.

    python benchmarks/quietstar_profile.py --n-passes 2    # cpu-small, batch 2 x 128, thought 16 / talk 4, stride 1

The step is `quietstar_cost.py`'s (forward, loss, backward, AdamW); one warm-up and one timed step
run before the profiled one.
"""

from __future__ import annotations

import argparse
import time

import torch

from quietstar_cost import SHAPES, make_step
from modeldefs import ModelConfig, Transformer
from modeldefs.quietstar import QuietStar, ThoughtConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="cpu-small")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--n-ahead", type=int, default=16)
    parser.add_argument("--n-ahead-talk", type=int, default=4)
    parser.add_argument("--n-passes", type=int, default=2)
    parser.add_argument("--rows", type=int, default=25, help="ops listed")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = ModelConfig(**{**SHAPES[args.shape], "block_size": args.seq + args.n_ahead + args.n_ahead_talk})
    thoughts = ThoughtConfig(n_ahead=args.n_ahead, n_ahead_talk=args.n_ahead_talk, n_passes=args.n_passes)
    model = QuietStar(Transformer(config), thoughts, init_token_id=0).train()
    x = torch.randint(0, config.vocab_size, (args.batch, args.seq))
    step = make_step(model, lambda x: model(x).loss, torch.float32, torch.device("cpu"))
    step(x)
    start = time.perf_counter()
    step(x)
    print(f"step {time.perf_counter() - start:.3f} s")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step(x)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
