"""Dense vs Mixture-of-Depths training throughput on one shape, in one process.

    python benchmarks/mod_throughput.py --shape mid                          # CPU: d=512, 8 layers, seq 512, fp32
    python benchmarks/mod_throughput.py --shape smollm2-135m --dtype bf16 --batch 16 --seq 2048 --compile

Each variant (dense, then MoD at each capacity, every other block routed from layer 1, the last
layer included) is built with the same seed, warmed up, then timed on full training steps: forward,
cross-entropy plus the MoD auxiliary losses, backward, AdamW. One variant is resident at a time, so
the peak memory is its own. `--rounds` repeats the whole sweep, every other round in reverse order,
so neither one-off costs of the process nor drift of the machine favour the variants timed first;
tokens/s is the fastest round's. Forward FLOPs per token are counted by torch's FlopCounterMode on a
real forward pass (top-k routing). Prints a Markdown table and a JSON line.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from report import device_name, emit, sync
from modeldefs import ModelConfig, Transformer
from training.routing import routing_losses

SHAPES = {
    "mid": dict(name="mid", vocab_size=8192, n_layer=8, n_embd=512, n_head=8, n_kv_head=8,
                intermediate_size=1376, tie_embeddings=False, block_size=2048),
    "smollm2-135m": ModelConfig.from_name("smollm2-135m").to_dict(),
    "llama-1b": ModelConfig.from_name("llama-1b").to_dict(),
    "micro": ModelConfig.from_name("micro").to_dict(),
}


def measure(config: ModelConfig, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    model = Transformer(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)
    y = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    forward_flops = counter.get_total_flops() / x.numel()
    if args.compile:
        for block in model.blocks:
            block.compile()

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        if model.routed_blocks:
            loss = loss + routing_losses(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    if args.profile:
        activities = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(2):
                step()
            sync(device)
        sort_by = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=sort_by, row_limit=args.profile, max_name_column_width=48))
    del model, optimizer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return dict(tokens_per_s=args.steps * x.numel() / seconds, forward_gflops_per_token=forward_flops / 1e9,
                peak_mem_gib=peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="mid")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast over fp32 weights")
    parser.add_argument("--vocab", type=int, help="override the shape's vocabulary size (the output head is dense)")
    parser.add_argument("--capacities", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.125])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="sweeps over the variants, alternating their order")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block")
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS",
                        help="after timing, profile two steps of each variant and print the top ROWS operators")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    base = {**SHAPES[args.shape], "block_size": max(args.seq, SHAPES[args.shape]["block_size"])}
    if args.vocab:
        base["vocab_size"] = args.vocab
    variants = {"dense": ModelConfig(**base)}
    for capacity in args.capacities:
        variants[f"MoD {capacity:g}"] = ModelConfig(**{**base, "mod_capacity": capacity, "mod_exempt_last": False})
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for r in range(args.rounds):
        for name in (list(variants) if r % 2 == 0 else list(reversed(variants))):
            runs[name].append(measure(variants[name], args, device, dtype))
            print(f"round {r + 1}, {name}: {runs[name][-1]['tokens_per_s']:,.0f} tokens/s", flush=True)
    results = []
    for name, measured in runs.items():
        rates = [m["tokens_per_s"] for m in measured]
        results.append({"variant": name, "capacity": variants[name].mod_capacity, **measured[-1],
                        "tokens_per_s": max(rates), "tokens_per_s_rounds": rates})
    dense = results[0]
    for r in results:
        r["speedup_vs_dense"] = round(r["tokens_per_s"] / dense["tokens_per_s"], 3)
        r["flop_ratio_dense_over_this"] = round(dense["forward_gflops_per_token"] / r["forward_gflops_per_token"], 3)
    meta = dict(shape=args.shape, n_layer=base["n_layer"], n_embd=base["n_embd"], vocab=base["vocab_size"],
                routed_layers=list(Transformer(variants[list(variants)[-1]]).routed_blocks) if args.capacities else [],
                batch=args.batch, seq=args.seq, dtype=args.dtype, compile=args.compile, rounds=args.rounds,
                device=device_name(device),
                threads=torch.get_num_threads(), torch=torch.__version__)
    print(f"\n{args.shape}: {meta['n_layer']} layers, d={meta['n_embd']}, vocab {meta['vocab']}, routed layers "
          f"{meta['routed_layers']}; batch {args.batch} x seq {args.seq}, {args.dtype}"
          f"{', compiled' if args.compile else ''}, {meta['device']}, torch {torch.__version__}\n")
    print("| variant | forward GFLOPs/token | dense/this FLOPs | tokens/s | speed-up vs dense | peak memory (GiB) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        mem = "n/a" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.2f}"
        print(f"| {r['variant']} | {r['forward_gflops_per_token']:.3f} | {r['flop_ratio_dense_over_this']:.2f}x | "
              f"{r['tokens_per_s']:,.0f} | {r['speedup_vs_dense']:.2f}x | {mem} |")
    record = {**meta, "results": results}
    emit(record, args.json)


if __name__ == "__main__":
    main()
