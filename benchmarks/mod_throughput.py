"""Dense vs Mixture-of-Depths training throughput on one shape, in one process.

    python benchmarks/mod_throughput.py --shape mid --interleave --steps 12  # CPU: d=512, 8 layers, seq 512, fp32
    python benchmarks/mod_throughput.py --shape smollm2-135m --dtype bf16 --batch 16 --seq 2048 --compile

Each variant (dense, then MoD at each capacity, every other block routed from layer 1, the last
layer included) is built with the same seed, warmed up, then timed on full training steps as
`CausalLM` runs them: forward, the fused chunked head + cross-entropy (`training.loss`) plus the MoD
auxiliary losses, backward, fused AdamW; `--compile` compiles as `compile: true` does (each block,
and the loss's chunks). Two ways to time them:
- by default one variant is resident at a time (what a GPU at the large shapes can hold) and
  `--rounds` repeats the whole sweep, every other round in reverse order, so one-off costs of the
  process do not favour the variants timed first; a variant's figures are its fastest round's;
- `--interleave` keeps every variant resident and runs one step of each in turn. On a machine whose
  speed drifts by tens of percent within a minute (a shared 2-core CPU), this is what makes the
  ratios mean something: every variant is timed in the same stretches of time.
tokens/s is steps x tokens over the summed step times; the median step's speed-up is printed beside
it. Peak memory is each variant's own (built and warmed up), above what was allocated before it was built
(on a CPU from the profiler's allocation events, `report.PeakMemory`). Forward
FLOPs per token are counted by torch's FlopCounterMode on a real forward pass (top-k routing).
On a CPU, freed memory stays in the process (`report.keep_freed_memory`; `--default-heap` opts out),
so page faults do not depend on which variant ran before. Prints a Markdown table and a JSON line; the
results so far are saved to --json after each timed part, so a run stopped part way (out of memory, Ctrl-C,
SIGTERM) keeps and prints what it measured.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from evals.cli import positive_int
from report import PeakMemory, Record, add_heap_option, device_name, print_profile, steady_heap, sync
from modeldefs import ModelConfig, Transformer
from training.loss import linear_cross_entropy
from training.parallelize import apply_compile
from training.routing import routing_losses

SHAPES = {
    "mid": dict(name="mid", vocab_size=8192, n_layer=8, n_embd=512, n_head=8, n_kv_head=8,
                intermediate_size=1376, tie_embeddings=False, block_size=2048),
    "smollm2-135m": ModelConfig.from_name("smollm2-135m").to_dict(),
    "llama-1b": ModelConfig.from_name("llama-1b").to_dict(),
    "micro": ModelConfig.from_name("micro").to_dict(),
}


def build(config: ModelConfig, args: argparse.Namespace, device: torch.device,
          dtype: torch.dtype) -> tuple[Callable[[], None], float]:
    """Build the model and count its forward FLOPs per token. Returns its training step (forward,
    cross-entropy plus the MoD auxiliary losses, backward, AdamW) and the FLOPs."""
    torch.manual_seed(0)
    model = Transformer(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)
    y = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    if args.compile:
        apply_compile(model)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            hidden = model.hidden(model.embed(x))
            loss = linear_cross_entropy(hidden, model.lm_head.weight, y, args.loss_chunk, compiled=args.compile)
        if model.routed_blocks:
            loss = loss + routing_losses(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, counter.get_total_flops() / x.numel()


def prepare(config: ModelConfig, args: argparse.Namespace, device: torch.device,
            dtype: torch.dtype) -> tuple[Callable[[], None], dict]:
    """Build the model and warm it up. Returns its training step and its FLOPs and peak memory."""
    with PeakMemory(device) as memory:  # above the variants built before
        step, forward_flops = build(config, args, device, dtype)
        for _ in range(args.warmup):
            step()
        sync(device)
    return step, dict(forward_gflops_per_token=forward_flops / 1e9, peak_mem_gib=memory.gib)


def timed(step: Callable[[], None], device: torch.device) -> float:
    """Seconds one training step takes, queued GPU work included."""
    t0 = time.perf_counter()
    step()
    sync(device)
    return time.perf_counter() - t0


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def results(variants: dict[str, ModelConfig], runs: dict[str, dict], tokens_per_step: int) -> list[dict]:
    """A result row for each variant with a timed step so far, its speed-ups against dense's."""
    rows = [{"variant": name, "capacity": variants[name].mod_capacity, **run,
             "tokens_per_s": len(run["step_seconds"]) * tokens_per_step / sum(run["step_seconds"]),
             "median_step_s": statistics.median(run["step_seconds"])}
            for name, run in runs.items() if run["step_seconds"]]
    dense = next((r for r in rows if r["variant"] == "dense"), None)
    for r in rows if dense else []:
        r["speedup_vs_dense"] = round(r["tokens_per_s"] / dense["tokens_per_s"], 3)
        r["speedup_median_step"] = round(dense["median_step_s"] / r["median_step_s"], 3)
        r["flop_ratio_dense_over_this"] = round(dense["forward_gflops_per_token"] / r["forward_gflops_per_token"], 3)
    return rows


def sweep_in_rounds(variants: dict[str, ModelConfig], args: argparse.Namespace, device: torch.device,
                    dtype: torch.dtype, record: Record) -> None:
    """One variant resident at a time (its peak memory alone); `--rounds` sweeps, every other one in
    reverse order. A variant's step times are those of its fastest round; the results so far are
    saved after each variant's round."""
    measured: dict[str, list[dict]] = {name: [] for name in variants}
    tokens = args.steps * args.batch * args.seq
    for r in range(args.rounds):
        for name in (list(variants) if r % 2 == 0 else list(reversed(variants))):
            step, info = prepare(variants[name], args, device, dtype)
            seconds = [timed(step, device) for _ in range(args.steps)]
            measured[name].append({**info, "step_seconds": seconds})
            print(f"round {r + 1}, {name}: {tokens / sum(seconds):,.0f} tokens/s", flush=True)
            record.update(results=results(variants, {
                name: {**min(ms, key=lambda m: sum(m["step_seconds"])),  # the fastest round
                       "tokens_per_s_rounds": [tokens / sum(m["step_seconds"]) for m in ms]}
                for name, ms in measured.items() if ms}, args.batch * args.seq))
            if args.profile and r == args.rounds - 1:
                print_profile(f"{name}:", step, device, args.profile, steps=2, self_time=False)
            del step
            release(device)


def interleaved(variants: dict[str, ModelConfig], args: argparse.Namespace, device: torch.device,
                dtype: torch.dtype, record: Record) -> None:
    """Every variant resident; each timed step runs every variant once, in reverse order every other
    step, so a machine whose speed drifts slows all of them alike. The results so far are saved after
    each step."""
    steps, runs = {}, {}
    for name, config in variants.items():
        steps[name], runs[name] = prepare(config, args, device, dtype)
        runs[name]["step_seconds"] = []
    for s in range(args.steps):
        for name in (list(variants) if s % 2 == 0 else list(reversed(variants))):
            runs[name]["step_seconds"].append(timed(steps[name], device))
        print(f"step {s + 1}/{args.steps}: " + ", ".join(
            f"{name} {runs[name]['step_seconds'][-1]:.2f} s" for name in variants), flush=True)
        record.update(results=results(variants, runs, args.batch * args.seq))
    if args.profile:
        for name, step in steps.items():
            print_profile(f"{name}:", step, device, args.profile, steps=2, self_time=False)


def print_table(record: dict) -> None:
    """The Markdown table of the variants timed so far."""
    print(f"\n{record['shape']}: {record['n_layer']} layers, d={record['n_embd']}, vocab {record['vocab']}, "
          f"routed layers {record['routed_layers']}; batch {record['batch']} x seq {record['seq']}, {record['dtype']}"
          f"{', compiled' if record['compile'] else ''}, {record['device']}, torch {record['torch']}\n")
    print("| variant | forward GFLOPs/token | dense/this FLOPs | tokens/s | speed-up vs dense "
          "| speed-up, median step | peak memory (GiB) |")
    print("|---|---|---|---|---|---|---|")
    for r in record.get("results", []):
        mem = f"{r['peak_mem_gib']:.2f}"
        ratios = (f"{r['flop_ratio_dense_over_this']:.2f}x", f"{r['speedup_vs_dense']:.2f}x",
                  f"{r['speedup_median_step']:.2f}x") if "speedup_vs_dense" in r else ("n/a",) * 3
        print(f"| {r['variant']} | {r['forward_gflops_per_token']:.3f} | {ratios[0]} | "
              f"{r['tokens_per_s']:,.0f} | {ratios[1]} | {ratios[2]} | {mem} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="mid")
    parser.add_argument("--batch", type=positive_int, default=4)
    parser.add_argument("--seq", type=positive_int, default=512)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast over fp32 weights")
    parser.add_argument("--vocab", type=int, help="override the shape's vocabulary size (the output head is dense)")
    parser.add_argument("--capacities", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.125])
    parser.add_argument("--steps", type=positive_int, default=3, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=positive_int, help="sweeps over the variants, alternating their order "
                        "(default 2; one variant resident at a time)")
    parser.add_argument("--interleave", action="store_true",
                        help="keep every variant resident and run them in turn, step by step (for a machine whose "
                        "speed drifts, like a shared CPU; needs the memory of all of them)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block and the loss's chunks")
    parser.add_argument("--loss-chunk", type=positive_int, default=1024,
                        help="tokens per chunk of the fused head + cross-entropy (CausalLM's loss_chunk_size)")
    add_heap_option(parser)
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS",
                        help="after timing, profile two steps of each variant and print the top ROWS operators")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.interleave and args.rounds:
        parser.error("--rounds sweeps one variant at a time; with --interleave, set --steps instead")
    args.rounds = args.rounds or 2

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    heap_kept = steady_heap(args, device)
    base = {**SHAPES[args.shape], "block_size": max(args.seq, SHAPES[args.shape]["block_size"])}
    if args.vocab:
        base["vocab_size"] = args.vocab
    variants = {"dense": ModelConfig(**base)}
    for capacity in args.capacities:
        variants[f"MoD {capacity:g}"] = ModelConfig(**{**base, "mod_capacity": capacity, "mod_exempt_last": False})
    with torch.device("meta"):
        routed_layers = list(Transformer(variants[list(variants)[-1]]).routed_blocks) if args.capacities else []
    meta = dict(shape=args.shape, n_layer=base["n_layer"], n_embd=base["n_embd"], vocab=base["vocab_size"],
                routed_layers=routed_layers,
                batch=args.batch, seq=args.seq, dtype=args.dtype, compile=args.compile, loss_chunk=args.loss_chunk,
                timing="interleaved" if args.interleave else f"{args.rounds} rounds", steps=args.steps,
                device=device_name(device), cpu_heap_kept=heap_kept,
                threads=torch.get_num_threads(), torch=torch.__version__)
    with Record(args.json, meta, table=print_table) as record:
        (interleaved if args.interleave else sweep_in_rounds)(variants, args, device, dtype, record)


if __name__ == "__main__":
    main()
