"""Training throughput of quietdepth's training path vs plain transformers on the same shape, in one process.

    python benchmarks/train_throughput.py --shape mid                       # CPU: d=512, 8 layers, vocab 49152
    python benchmarks/train_throughput.py --shape mid --variants hf qd-fusedce-fusedadamw qd-fusedce qd qd+compile
    python benchmarks/train_throughput.py --shape smollm2-135m --dtype bf16 --batch 16 --seq 2048 \\
        --variants hf hf+compile qd+compile mod+compile
    python benchmarks/train_throughput.py --shape llama-1b --dtype bf16 --seq 2048 --max-batch  # per AC policy

A variant is a base and modifiers:
  hf    transformers LlamaForCausalLM (same weights, exported by `to_hf_model`), SDPA attention,
        logits then F.cross_entropy; `+compile` compiles the model and the loss as one function.
  qd    quietdepth's training path as `CausalLM` runs it: `Transformer.hidden`, the fused chunked
        head + cross-entropy (`training.loss`, `--loss-chunk` tokens per chunk), fused AdamW;
        `+compile` compiles each block (`training.parallelize`) and the loss's per-chunk softmax and
        gradient; `-fusedce` computes full logits + F.cross_entropy instead; `-fusedadamw` uses the
        default (foreach) AdamW; `-acselective` / `-acblock` checkpoint activations
        (`training.parallelize`, before compiling, as `CausalLM` does); `-bf16res` casts the embedding
        output to the autocast dtype, so the residual stream between blocks is bf16 (as under FSDP's
        bf16 parameter policy) instead of fp32.
  mod   qd with Mixture-of-Depths (capacity 0.125, every other block routed) and its auxiliary losses.
Every variant steps fused AdamW unless `-fusedadamw`. The variants run in alternating rounds so drift
in the machine's speed hits all alike (`--steps 1 --rounds N` interleaves them step by step, the
fairest on a drifting CPU; `--sequential`: one at a time, each freed before the next, for shapes where
not all fit in memory). On a CPU, freed memory stays in the process
(`report.keep_freed_memory`), so no variant pays page faults for memory another one freed;
`--default-heap` keeps glibc's default instead, where paths that allocate large tensors (full logits)
pay to map them afresh every step. Prints a Markdown table and a JSON line; what is finished (each variant
under `--sequential`, else each round) is saved to --json at once, so a run stopped part way (out of memory,
Ctrl-C, SIGTERM) keeps and prints it.

`--max-batch` instead finds, for each activation-checkpointing policy (none / selective / block),
the largest batch of `qd` that fits: on a GPU by running steps until out-of-memory; on a CPU
(no allocator limit) against `--memory-budget-gib` of weights + gradients + AdamW state + the
tensors autograd saves for backward (counted by saved-tensor hooks; checkpointed blocks' inputs,
one B x T x C tensor each, are not counted).
"""

from __future__ import annotations

import argparse
import gc
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from evals.cli import positive_int
from report import PeakMemory, Record, add_heap_option, device_name, print_profile, steady_heap, sync
from modeldefs import ModelConfig, Transformer
from modeldefs.pretrained import to_hf_model
from training.loss import linear_cross_entropy
from training.parallelize import apply_activation_checkpointing, apply_compile
from training.routing import routing_losses

SHAPES = {
    # The CPU comparison shape; the SmolLM2 vocabulary makes the head about half the FLOPs.
    "mid": dict(name="mid", vocab_size=49152, n_layer=8, n_embd=512, n_head=8, n_kv_head=8,
                intermediate_size=1376, tie_embeddings=False, block_size=2048),
    "smollm2-135m": ModelConfig.from_name("smollm2-135m").to_dict(),
    "llama-1b": ModelConfig.from_name("llama-1b").to_dict(),
    "micro": ModelConfig.from_name("micro").to_dict(),  # a smoke-test shape (vocab 256)
}
MOD = dict(mod_capacity=0.125, mod_route_every=2, mod_exempt_last=False)
MODIFIERS = ("+compile", "-fusedce", "-fusedadamw", "-acselective", "-acblock", "-bf16res")  # see the docstring


@dataclass
class Variant:
    name: str
    base: str
    compile: bool = False
    fused_ce: bool = True
    fused_adamw: bool = True
    activation_checkpointing: str = "none"
    bf16_residual: bool = False

    @classmethod
    def parse(cls, name: str) -> Variant:
        """`hf`, `qd` or `mod` followed by any of MODIFIERS, e.g. `qd-fusedce+compile`."""
        base, *modifiers = re.split(r"(?=[-+])", name)
        if base not in ("hf", "qd", "mod"):
            raise ValueError(f"variant {name!r}: the base must be hf, qd or mod")
        unknown = [m for m in modifiers if m not in MODIFIERS]
        if unknown:
            raise ValueError(f"variant {name!r}: unknown modifier {unknown[0]!r}; the modifiers are "
                             f"{', '.join(MODIFIERS)}")
        ac = [m.removeprefix("-ac") for m in modifiers if m.startswith("-ac")]
        if len(set(ac)) > 1:
            raise ValueError(f"variant {name!r}: one of -acselective, -acblock")
        if base == "hf" and ac:
            raise ValueError(f"variant {name!r}: activation checkpointing (-acselective, -acblock) is quietdepth's")
        if base == "hf" and "-bf16res" in modifiers:
            raise ValueError(f"variant {name!r}: -bf16res is quietdepth's")
        return cls(name, base, compile="+compile" in modifiers, fused_ce="-fusedce" not in modifiers and base != "hf",
                   fused_adamw="-fusedadamw" not in modifiers, activation_checkpointing=ac[0] if ac else "none",
                   bf16_residual="-bf16res" in modifiers)


def build(variant: Variant, config: ModelConfig, seq: int, device: torch.device, dtype: torch.dtype,
          loss_chunk: int) -> tuple[torch.nn.Module, Callable[[torch.Tensor, torch.Tensor], None], int]:
    """The model, one training step on (x, y), and the model's training FLOPs per token."""
    torch.manual_seed(0)
    ours = Transformer(ModelConfig(**{**config.to_dict(), **(MOD if variant.base == "mod" else {})}))
    flops_per_token = ours.flops_per_token(seq)
    if variant.base == "hf":
        hf = to_hf_model(ours)
        hf.config._attn_implementation = "sdpa"
        model = hf.to(device).train()

        def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                logits = hf(x).logits
            return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

        if variant.compile:
            loss_of = torch.compile(loss_of)
    else:
        model = ours.to(device).train()
        apply_activation_checkpointing(model, variant.activation_checkpointing)
        if variant.compile:
            apply_compile(model)

        def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                embedded = model.embed(x)
                if variant.bf16_residual:
                    embedded = embedded.to(dtype)
                if variant.fused_ce:
                    loss = linear_cross_entropy(model.hidden(embedded), model.lm_head.weight, y, loss_chunk,
                                                compiled=variant.compile)
                else:
                    loss = F.cross_entropy(model.lm_head(model.hidden(embedded)).flatten(0, 1).float(), y.flatten())
            return loss + routing_losses(model) if model.routed_blocks else loss

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=variant.fused_adamw)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        loss_of(x, y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, step, flops_per_token


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's peak dense FLOP/s as Lightning knows it (None for CPUs)."""
    from lightning.fabric.utilities.throughput import get_available_flops

    return get_available_flops(device, dtype) if device.type == "cuda" else None


def throughput(args: argparse.Namespace, config: ModelConfig, device: torch.device, dtype: torch.dtype,
               record: Record) -> None:
    """Time every variant; each finished variant (`--sequential`) or round is saved to `record`."""
    variants = args.variants
    x = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)
    y = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)
    built: dict[str, tuple] = {}
    times = {v.name: 0.0 for v in variants}
    peak_mem, flops = {}, {}
    peak = peak_flops(device, dtype)
    tokens_per_round = args.batch * args.seq * args.steps

    def warm(v: Variant) -> None:
        with PeakMemory(device) as memory:
            model, step, flops[v.name] = build(v, config, args.seq, device, dtype, args.loss_chunk)
            built[v.name] = (model, step)
            for _ in range(args.warmup):
                step(x, y)
            sync(device)
        peak_mem[v.name] = memory.gib

    def timed(v: Variant) -> None:
        step = built[v.name][1]
        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step(x, y)
        sync(device)
        times[v.name] += time.perf_counter() - t0

    def profile(v: Variant) -> None:
        step = built[v.name][1]
        print_profile(f"profile of one step: {v.name}", lambda: step(x, y), device, args.profile)

    def result(v: Variant, rounds: int) -> dict:
        tps = tokens_per_round * rounds / times[v.name]
        return dict(variant=v.name, tokens_per_s=round(tps, 1),
                    mfu=None if peak is None else round(tps * flops[v.name] / peak, 4),
                    peak_mem_gib=round(peak_mem[v.name], 2))

    if args.sequential:
        for v in variants:
            warm(v)
            for _ in range(args.rounds):
                timed(v)
            print(f"{v.name}: {tokens_per_round * args.rounds / times[v.name]:,.0f} tokens/s"
                  f", peak {peak_mem[v.name]:.1f} GiB", flush=True)
            record.add("results", result(v, args.rounds))
            if args.profile:
                profile(v)
            del built[v.name]
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    else:
        for v in variants:
            warm(v)
        for r in range(args.rounds):
            for v in variants:
                timed(v)
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{v.name} {tokens_per_round * (r + 1) / times[v.name]:,.0f} tokens/s" for v in variants), flush=True)
            record.update(results=[result(v, r + 1) for v in variants])
        if args.profile:
            for v in variants:
                profile(v)


def print_throughput(record: dict) -> None:
    """The Markdown table of the variants timed so far."""
    results = record.get("results", [])
    print("| variant | tokens/s | vs first | MFU | peak memory (GiB) |\n|---|---|---|---|---|")
    for r in results:
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        print(f"| {r['variant']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / results[0]['tokens_per_s']:.2f}x | "
              f"{mfu} | {r['peak_mem_gib']} |")


def step_memory(model: torch.nn.Module, step: Callable[[torch.Tensor, torch.Tensor], None], x: torch.Tensor,
                device: torch.device) -> float | None:
    """GiB one training step of `model` needs on the batch `x` (None: out of memory on the GPU)."""
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            step(x, x)  # the first step creates the AdamW state: the second is the steady-state peak
            step(x, x)
            sync(device)
            return torch.cuda.max_memory_allocated() / 2**30
        saved = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal saved
            saved += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            step(x, x)
        state = sum(p.numel() * p.element_size() for p in model.parameters()) * 4  # weights, grads, 2 AdamW moments
        return (state + saved) / 2**30
    except torch.OutOfMemoryError:
        return None
    finally:
        model.zero_grad(set_to_none=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def largest_batch(fits: Callable[[int], float | None], limit: int) -> tuple[int, float | None]:
    """The largest batch <= `limit` for which `fits` gives the GiB used (None: does not fit), and that GiB:
    batches 1, 2, 4, ... until one does not fit, then bisection."""
    lo, lo_gib, hi = 0, None, limit + 1
    while lo < limit:
        b = min(2 * lo, limit) if lo else 1
        if (gib := fits(b)) is None:
            hi = b
            break
        lo, lo_gib = b, gib
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if (gib := fits(mid)) is not None:
            lo, lo_gib = mid, gib
        else:
            hi = mid
    return lo, lo_gib


def policy_max_batch(args: argparse.Namespace, config: ModelConfig, device: torch.device, dtype: torch.dtype,
                     ac: str, budget: float) -> dict:
    """The largest batch of `qd` with activation checkpointing `ac` (one model, `largest_batch`)."""
    model, step, _ = build(Variant(f"qd-ac{ac}", "qd", compile=args.compile, activation_checkpointing=ac),
                           config, args.seq, device, dtype, args.loss_chunk)

    def fits(b: int) -> float | None:
        x = torch.randint(0, config.vocab_size, (b, args.seq), device=device)
        gib = step_memory(model, step, x, device)
        print(f"{ac}: batch {b}: " + ("out of memory" if gib is None else f"{gib:.2f} GiB"), flush=True)
        return gib if gib is not None and gib <= budget else None

    batch, gib = largest_batch(fits, args.batch_limit)
    return dict(activation_checkpointing=ac, max_batch=batch, memory_gib=None if gib is None else round(gib, 3))


def max_batch(args: argparse.Namespace, config: ModelConfig, device: torch.device, dtype: torch.dtype,
              record: Record) -> None:
    """The largest batch of `qd` per activation-checkpointing policy, each saved to `record` when found."""
    budget = args.memory_budget_gib if args.memory_budget_gib is not None else float("inf")
    for ac in ("none", "selective", "block"):
        record.add("max_batch", policy_max_batch(args, config, device, dtype, ac, budget))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def print_max_batch(record: dict, device: torch.device) -> None:
    """The Markdown table of the policies searched so far."""
    what = "peak allocated" if device.type == "cuda" else "state + saved activations (estimate)"
    print(f"| activation checkpointing | largest batch x {record['seq']} | {what} (GiB) |\n|---|---|---|")
    for r in record.get("max_batch", []):
        print(f"| {r['activation_checkpointing']} | {r['max_batch']} | {r['memory_gib']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="mid")
    parser.add_argument("--vocab", type=int, help="override the shape's vocabulary size (the output head)")
    parser.add_argument("--batch", type=positive_int, default=4)
    parser.add_argument("--seq", type=positive_int, default=512)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast over fp32 weights")
    parser.add_argument("--loss-chunk", type=positive_int, default=1024,
                        help="tokens per chunk of qd's fused head + cross-entropy (CausalLM's loss_chunk_size)")
    parser.add_argument("--variants", nargs="+", default=["hf", "hf+compile", "qd", "qd+compile", "mod+compile"])
    parser.add_argument("--steps", type=positive_int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=positive_int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--sequential", action="store_true", help="one variant resident at a time")
    add_heap_option(parser)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--max-batch", action="store_true", help="largest batch per activation-checkpointing policy")
    parser.add_argument("--compile", action="store_true", help="with --max-batch: compile the blocks")
    parser.add_argument("--batch-limit", type=positive_int, default=256,
                        help="with --max-batch: the largest batch tried")
    parser.add_argument("--memory-budget-gib", type=float, help="with --max-batch: the budget (required on a CPU)")
    parser.add_argument("--profile", type=int, default=0, help="print this many top ops of one step per variant")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.compile and not args.max_batch:
        parser.error("--compile only applies to --max-batch; compile throughput variants with +compile, e.g. "
                     "--variants hf+compile qd+compile")
    try:
        args.variants = [Variant.parse(v) for v in args.variants]
    except ValueError as error:
        parser.error(str(error))

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.max_batch and device.type == "cpu" and args.memory_budget_gib is None:
        parser.error("--max-batch on a CPU needs --memory-budget-gib")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    heap_kept = steady_heap(args, device)
    shape = {**SHAPES[args.shape], "block_size": max(args.seq, SHAPES[args.shape]["block_size"])}
    if args.vocab:
        shape["vocab_size"] = args.vocab
    config = ModelConfig(**shape)
    meta = dict(shape=args.shape, vocab=config.vocab_size, params=Transformer(config).num_params(),
                batch=args.batch, seq=args.seq, dtype=args.dtype, loss_chunk=args.loss_chunk, device=device_name(device),
                cpu_heap_kept=heap_kept, threads=torch.get_num_threads(), torch=torch.__version__)
    print(f"\n{args.shape}, vocab {config.vocab_size} ({meta['params'] / 1e6:.1f}M params), batch {args.batch} x "
          f"seq {args.seq}, {args.dtype}, {meta['device']}, {meta['threads']} threads, torch {torch.__version__}\n")
    if args.max_batch:
        with Record(args.json, {**meta, "memory_budget_gib": args.memory_budget_gib},
                    table=lambda record: print_max_batch(record, device)) as record:
            max_batch(args, config, device, dtype, record)
    else:
        with Record(args.json, meta, table=print_throughput) as record:
            throughput(args, config, device, dtype, record)


if __name__ == "__main__":
    main()
