"""Cost of a Quiet-STaR training step against a plain one of the same model, side by side in one process.

    python benchmarks/quietstar_cost.py --shape cpu-small --batch 2 --seq 128 --n-passes 1      # CPU
    python benchmarks/quietstar_cost.py --shape mid --batch 2 --seq 128 --n-passes 1            # CPU, wider
    python benchmarks/quietstar_cost.py --shape smollm2-135m --batch 8 --seq 256 --dtype bf16  # GPU

Each step is forward, loss, backward and an AdamW step. For every (n_ahead, n_ahead_talk) pair a
`QuietStar` wraps the same decoder weights; the plain step is next-token cross-entropy on the same
batch, and again on the `n_passes` copies of it that Quiet-STaR processes. The target, step time <=
(n_ahead + n_ahead_talk) x the plain step, counts passes per thought sample, so it is checked against
the plain step over the same number of copies (`plain x{n_passes}`; with --n-passes 1 that is the
plain step on the same batch); "x plain x1" is given too. Timings alternate between
the variants in rounds so drift in the machine's speed hits all alike. Memory: the activations kept
for backward (bytes of distinct tensors saved by autograd, parameters excluded) on any device, and on
CUDA the peak allocated above the resident weights. Prints a Markdown table and a JSON line; the results
so far are saved to --json after each round, so a run stopped part way (out of memory, Ctrl-C, SIGTERM) keeps
and prints the rounds it finished.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from evals.cli import positive_int
from report import Record, device_name, saved_activation_bytes, sync
from modeldefs import ModelConfig, Transformer
from modeldefs.quietstar import QuietStar, ThoughtConfig
from training.parallelize import apply_compile
from training.quietstar_lm import recompute_mlps

SHAPES = {
    "micro": ModelConfig.from_name("micro").to_dict(),
    "cpu-small": dict(name="cpu-small", vocab_size=8192, n_layer=4, n_embd=256, n_head=4, n_kv_head=2,
                      intermediate_size=704, rope_theta=10000.0, tie_embeddings=True, block_size=2048),
    # benchmarks/mod_throughput.py's mid shape (33M params): wider passes, so per-pass overhead weighs less
    "mid": dict(name="mid", vocab_size=8192, n_layer=8, n_embd=512, n_head=8, n_kv_head=8,
                intermediate_size=1376, rope_theta=10000.0, tie_embeddings=False, block_size=2048),
    "smollm2-135m": ModelConfig.from_name("smollm2-135m").to_dict(),
}


def make_step(model: torch.nn.Module, loss_of: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype,
              device: torch.device) -> Callable[[torch.Tensor], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=device.type == "cuda")

    def step(x: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = loss_of(x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def plain_loss(lm: Transformer, copies: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def loss_of(x: torch.Tensor) -> torch.Tensor:
        x = x.repeat_interleave(copies, dim=0)
        logits = lm(x[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())

    return loss_of


def activation_bytes(model: torch.nn.Module, loss_of: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                     dtype: torch.dtype) -> int:
    """Bytes of the distinct tensors autograd keeps for backward in one step (parameters excluded)."""

    def loss() -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            return loss_of(x)

    kept = saved_activation_bytes(loss, model.parameters())
    model.zero_grad(set_to_none=True)
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="cpu-small")
    parser.add_argument("--batch", type=positive_int, default=2)
    parser.add_argument("--seq", type=positive_int, default=128)
    parser.add_argument("--n-ahead", type=int, nargs="+", default=[4, 8, 16], help="thought lengths (incl. start/end)")
    parser.add_argument("--n-ahead-talk", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--n-passes", type=positive_int, default=1,
                        help="thoughts per position (official 2); the bound is per thought sample")
    parser.add_argument("--stride", type=positive_int, default=1, help="think at every stride-th position")
    parser.add_argument("--checkpointing", action="store_true", help="recompute every block's MLP in backward")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast over fp32 weights")
    parser.add_argument("--compile", action="store_true",
                        help="also time a twin of every variant with torch.compile'd blocks (rows '... +compile')")
    parser.add_argument("--steps", type=positive_int, default=2, help="timed steps per round")
    parser.add_argument("--rounds", type=positive_int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    config = ModelConfig(**{**SHAPES[args.shape], "block_size": args.seq + max(args.n_ahead) + max(args.n_ahead_talk)})
    base = Transformer(config)
    x = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)

    variants: dict[str, tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor], dict]] = {}
    for compiled in (False, True) if args.compile else (False,):
        suffix = " +compile" if compiled else ""

        def decoder() -> Transformer:
            lm = copy.deepcopy(base).to(device)
            if args.checkpointing:
                recompute_mlps(lm)
            if compiled:
                apply_compile(lm)
            return lm

        for copies in sorted({1, args.n_passes}):
            lm = decoder().train()
            variants[f"plain x{copies}{suffix}"] = (
                lm, plain_loss(lm, copies), dict(n_ahead=0, n_ahead_talk=0, copies=copies, compiled=compiled))
        for n_ahead, talk in itertools.product(args.n_ahead, args.n_ahead_talk):
            thoughts = ThoughtConfig(n_ahead=n_ahead, n_ahead_talk=talk, n_passes=args.n_passes, stride=args.stride)
            model = QuietStar(decoder(), thoughts, init_token_id=0).train()
            variants[f"thought {n_ahead} / talk {talk}{suffix}"] = (
                model, lambda x, m=model: m(x).loss,
                dict(n_ahead=n_ahead, n_ahead_talk=talk, copies=args.n_passes, compiled=compiled))

    meta = dict(shape=args.shape, params=base.num_params(), batch=args.batch, seq=args.seq, n_passes=args.n_passes,
                stride=args.stride, checkpointing=args.checkpointing, dtype=args.dtype, device=device_name(device),
                threads=torch.get_num_threads(), torch=torch.__version__, steps=0)
    with Record(args.json, meta, table=print_table) as record:
        steps, memory = {}, {}
        for name, (model, loss_of, _) in variants.items():
            steps[name] = make_step(model, loss_of, dtype, device)
            memory[name] = {"activations_mib": activation_bytes(model, loss_of, x, dtype) / 2**20}
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                resident = torch.cuda.memory_allocated()
            for _ in range(args.warmup):
                steps[name](x)
            sync(device)
            if device.type == "cuda":
                memory[name]["peak_above_resident_gib"] = (torch.cuda.max_memory_allocated() - resident) / 2**30
        times = {name: 0.0 for name in steps}
        for r in range(args.rounds):
            for name, step in steps.items():
                sync(device)
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step(x)
                sync(device)
                times[name] += time.perf_counter() - t0
            n = args.steps * (r + 1)
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{name} {times[name] / n:.3f} s" for name in steps),
                  flush=True)
            record.update(steps=n, results=results(variants, {name: t / n for name, t in times.items()}, memory,
                                                   args.n_passes))


def results(variants: dict[str, tuple[torch.nn.Module, Callable, dict]], step_s: dict[str, float],
            memory: dict[str, dict], n_passes: int) -> list[dict]:
    """A row per variant: its step time, against the plain step of its own mode, and its memory."""
    rows = []
    for name, (_, _, info) in variants.items():
        suffix = " +compile" if info["compiled"] else ""  # each row against the plain step of its own mode
        plain, same_copies = (step_s[f"plain x{c}{suffix}"] for c in (1, n_passes))
        bound = info["n_ahead"] + info["n_ahead_talk"] if info["n_ahead"] else None
        rows.append(dict(variant=name, **info, step_s=round(step_s[name], 4), x_plain=round(step_s[name] / plain, 2),
                         x_plain_same_copies=round(step_s[name] / same_copies, 2), bound_x_plain=bound,
                         within_bound=None if bound is None else step_s[name] / same_copies <= bound,
                         **{k: round(v, 2) for k, v in memory[name].items()}))
    return rows


def print_table(record: dict) -> None:
    """The Markdown table of the rounds timed so far."""
    print(f"\n{record['shape']} ({record['params'] / 1e6:.1f}M params), batch {record['batch']} x seq {record['seq']}, "
          f"n_passes {record['n_passes']}, stride {record['stride']}, checkpointing {record['checkpointing']}, "
          f"{record['dtype']}, {record['device']}, torch {record['torch']}, {record['steps']} timed step(s)\n")
    rows = record.get("results", [])
    gpu, copies = any("peak_above_resident_gib" in r for r in rows), record["n_passes"] > 1
    print("| variant | step (s) | × plain x1 |" + (f" × plain x{record['n_passes']} |" if copies else "")
          + " bound (n_ahead + n_ahead_talk) | activations kept (MiB) |" + (" peak above weights (GiB) |" if gpu else "")
          + "\n|---|---|---|---|---|" + ("---|" if copies else "") + ("---|" if gpu else ""))
    for r in rows:
        bound = "" if r["bound_x_plain"] is None else f"{r['bound_x_plain']} ({'within' if r['within_bound'] else 'OVER'})"
        print(f"| {r['variant']} | {r['step_s']:.3f} | {r['x_plain']:.2f} |"
              + (f" {r['x_plain_same_copies']:.2f} |" if copies else "")
              + f" {bound} | {r['activations_mib']:,.1f} |" + (f" {r['peak_above_resident_gib']} |" if gpu else ""))

if __name__ == "__main__":
    main()
