"""Training throughput of quietdepth's decoder vs plain transformers on the same shape, in one process.

    python benchmarks/train_throughput.py --shape mid                       # CPU: d=512, 8 layers, seq 512, fp32
    python benchmarks/train_throughput.py --shape smollm2-135m --dtype bf16 --batch 16 --seq 2048 --compile

Both models hold the same weights (ours exported through `to_hf_model`); each step is forward,
cross-entropy, backward and an AdamW step (fused on CUDA). The two run in alternating rounds so
drift in the machine's speed hits both alike. Prints a Markdown table and a JSON line.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from report import device_name, emit, sync
from modeldefs import ModelConfig, Transformer
from modeldefs.pretrained import to_hf_model

SHAPES = {
    "mid": dict(name="mid", vocab_size=32000, n_layer=8, n_embd=512, n_head=8, n_kv_head=8,
                intermediate_size=1376, tie_embeddings=False, block_size=2048),
    "smollm2-135m": ModelConfig.from_name("smollm2-135m").to_dict(),
    "llama-1b": ModelConfig.from_name("llama-1b").to_dict(),
    "tiny": ModelConfig.from_name("micro").to_dict(),
}


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's peak dense FLOP/s as Lightning knows it (None for CPUs)."""
    from lightning.fabric.utilities.throughput import get_available_flops

    return get_available_flops(device, dtype) if device.type == "cuda" else None


def make_step(model: torch.nn.Module, logits_of, dtype: torch.dtype, device: torch.device):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = logits_of(x)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="mid")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast over fp32 weights")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    config = ModelConfig(**{**SHAPES[args.shape], "block_size": max(args.seq, SHAPES[args.shape]["block_size"])})
    ours = Transformer(config)
    hf = to_hf_model(ours)
    hf.config._attn_implementation = "sdpa"
    ours, hf = ours.to(device).train(), hf.to(device).train()
    if args.compile:
        for block in ours.blocks:
            block.compile()
        hf = torch.compile(hf)
    steps = {
        "transformers": make_step(hf, lambda x: hf(x).logits, dtype, device),
        "quietdepth": make_step(ours, ours, dtype, device),
    }
    x = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)
    y = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)
    times = {name: 0.0 for name in steps}
    peak_mem = {}
    for name, step in steps.items():
        # Both models' weights stay resident, so memory is counted above what is allocated before this
        # model's first step: its gradients, optimizer state and activations.
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            resident = torch.cuda.memory_allocated()
        for _ in range(args.warmup):
            step(x, y)
        sync(device)
        if device.type == "cuda":
            peak_mem[name] = (torch.cuda.max_memory_allocated() - resident) / 2**30
    for _ in range(args.rounds):
        for name, step in steps.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(x, y)
            sync(device)
            times[name] += time.perf_counter() - t0

    tokens = args.batch * args.seq * args.steps * args.rounds
    flops_per_token = ours.flops_per_token(args.seq)
    peak = peak_flops(device, dtype)
    results = []
    for name in steps:
        tps = tokens / times[name]
        results.append(dict(impl=name, tokens_per_s=round(tps, 1), mfu=None if peak is None else round(tps * flops_per_token / peak, 4),
                            peak_mem_above_weights_gib=None if name not in peak_mem else round(peak_mem[name], 2)))
    speedup = results[1]["tokens_per_s"] / results[0]["tokens_per_s"]
    meta = dict(shape=args.shape, params=ours.num_params(), batch=args.batch, seq=args.seq, dtype=args.dtype,
                compile=args.compile, device=device_name(device),
                threads=torch.get_num_threads(), torch=torch.__version__, speedup_quietdepth_over_transformers=round(speedup, 3))
    print(f"\n{args.shape} ({meta['params'] / 1e6:.1f}M params), batch {args.batch} x seq {args.seq}, {args.dtype}"
          f"{', compiled' if args.compile else ''}, {meta['device']}, torch {torch.__version__}\n")
    print("| implementation | tokens/s | MFU | peak memory above resident weights (GiB) |\n|---|---|---|---|")
    for r in results:
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        mem = "n/a" if r["peak_mem_above_weights_gib"] is None else r["peak_mem_above_weights_gib"]
        print(f"| {r['impl']} | {r['tokens_per_s']:,.0f} | {mfu} | {mem} |")
    print(f"\nquietdepth / transformers: {speedup:.2f}x")
    record = {**meta, "results": results}
    emit(record, args.json)


if __name__ == "__main__":
    main()
