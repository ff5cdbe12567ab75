"""isoFLOP comparison: dense vs Mixture-of-Depths trained from scratch with the same training FLOPs.

    python benchmarks/mod_isoflop.py                      # CPU scale: d=192, 8 layers, byte-level, ~8 minutes
    python benchmarks/mod_isoflop.py --n-embd 512 --n-layer 12 --n-head 8 --seq 512 --batch 32 \\
        --dense-steps 500 --lr 1e-3 --dtype bf16         # a GPU (benchmarks/RESULTS.md's H100 run)

Text: GSM8K and CommonsenseQA training documents (formatted as in training), as UTF-8 bytes, so the
vocabulary (256) leaves the compute to the blocks. Each model trains on the same token stream in
the same order for as many steps as the FLOP budget (dense steps x dense FLOPs per step) allows,
then is evaluated on held-out documents: with top-k routing, and with the causal rule that
inference uses. FLOPs per token come from `Transformer.flops_per_token` (routed blocks count their
capacity share). Prints a Markdown table and a JSON line; each model's result is saved to --json as soon as
it is trained, so a run stopped part way (out of memory, Ctrl-C, SIGTERM) keeps and prints the models it finished.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from evals.cli import positive_int
from report import Record, device_name
from modeldefs import ModelConfig, Transformer
from training.data import jsonl_records
from training.formatting import format_csqa, format_gsm8k
from training.routing import routing_losses
from training.schedule import warmup_cosine

SHARED = Path(os.environ.get("QUIETDEPTH_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def byte_stream(paths_and_formats: list[tuple[Path, callable]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) byte tokens; every 20th document is held out. Documents end with a 0 byte."""
    train, val = bytearray(), bytearray()
    n = 0
    for path, fmt in paths_and_formats:
        for _, record in jsonl_records(str(path)):
            (val if n % 20 == 0 else train).extend(fmt(record).encode() + b"\0")
            n += 1
    return torch.frombuffer(train, dtype=torch.uint8).long(), torch.frombuffer(val, dtype=torch.uint8).long()


def batches(tokens: torch.Tensor, batch: int, seq: int, seed: int):
    """Endless random windows (same sequence of windows for every model)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(tokens) - seq - 1, (batch,), generator=generator)
        window = torch.stack([tokens[s : s + seq + 1] for s in starts.tolist()])
        yield window[:, :-1], window[:, 1:]


@torch.no_grad()
def evaluate(model: Transformer, val: torch.Tensor, seq: int, device: torch.device, top_k: bool) -> float:
    model.train(top_k)  # train mode routes by top-k, eval mode by the causal rule
    n = (len(val) - 1) // seq
    x = val[: n * seq].view(n, seq).to(device)
    y = val[1 : n * seq + 1].view(n, seq).to(device)
    losses = [F.cross_entropy(model(x[i : i + 16]).flatten(0, 1).float(), y[i : i + 16].flatten())
              for i in range(0, n, 16)]
    return float(torch.stack(losses).mean())


def train(name: str, config: ModelConfig, budget: float, train_tokens: torch.Tensor, val: torch.Tensor,
          args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    model = Transformer(config).to(device)
    flops_per_step = model.flops_per_token(args.seq) * args.batch * args.seq
    steps = int(budget // flops_per_step)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, warmup_steps=steps // 20, max_steps=steps, min_lr_ratio=0.1))
    data = batches(train_tokens, args.batch, args.seq, seed=1)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        x, y = (t.to(device) for t in next(data))
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        if model.routed_blocks:
            loss = loss + routing_losses(model)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        if step % max(1, steps // 5) == 0:
            print(f"  {name} step {step}/{steps} loss {loss.item():.3f}", flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    result = dict(model=name, params=model.num_params(), steps=steps, train_flops=steps * flops_per_step,
                  wall_s=round(seconds, 1), val_loss_topk=round(evaluate(model, val, args.seq, device, True), 4))
    result["val_loss_causal"] = (round(evaluate(model, val, args.seq, device, False), 4)
                                 if model.routed_blocks else result["val_loss_topk"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-embd", type=positive_int, default=192)
    parser.add_argument("--n-layer", type=positive_int, default=8)
    parser.add_argument("--n-head", type=positive_int, default=6)
    parser.add_argument("--seq", type=positive_int, default=256)
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--dense-steps", type=positive_int, default=200, help="sets the FLOP budget")
    parser.add_argument("--capacity", type=float, default=0.125)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    sources = [(SHARED / "gsm8k" / "train.jsonl", format_gsm8k),
               (SHARED / "commonsense_qa" / "train_rand_split.jsonl", format_csqa)]
    for path, _ in sources:
        if not path.is_file():
            raise SystemExit(f"{path} not found: set QUIETDEPTH_SHARED_DATA to the folder holding gsm8k/ and commonsense_qa/")
    train_tokens, val = byte_stream(sources)
    shape = dict(vocab_size=256, n_embd=args.n_embd, n_layer=args.n_layer, n_head=args.n_head, n_kv_head=args.n_head,
                 intermediate_size=int(8 / 3 * args.n_embd), tie_embeddings=False, block_size=args.seq)
    dense = ModelConfig(name="dense", **shape)
    mod = dict(mod_capacity=args.capacity, mod_exempt_last=False)
    variants = {
        "dense": dense,
        f"MoD {args.capacity:g}, same shape": ModelConfig(name="mod", **shape, **mod),
        f"MoD {args.capacity:g}, {int(args.n_layer * 1.5)} layers": ModelConfig(
            name="mod-deep", **{**shape, "n_layer": int(args.n_layer * 1.5)}, **mod),
    }
    budget = args.dense_steps * Transformer(dense).flops_per_token(args.seq) * args.batch * args.seq
    print(f"budget {budget:.3g} training FLOPs; {len(train_tokens):,} train / {len(val):,} val bytes")
    meta = dict(device=device_name(device),
                threads=torch.get_num_threads(), torch=torch.__version__, budget_flops=budget, **vars(args))
    with Record(args.json, meta, table=print_table) as record:
        for name, config in variants.items():
            result = train(name, config, budget, train_tokens, val, args, device, dtype)
            print(f"  {name}: val loss {result['val_loss_topk']} (top-k), {result['val_loss_causal']} (causal rule)",
                  flush=True)
            record.add("results", result)


def print_table(record: dict) -> None:
    """The Markdown table of the models trained so far."""
    print(f"\nisoFLOP {record['budget_flops']:.3g} FLOPs: d={record['n_embd']}, seq {record['seq']}, batch "
          f"{record['batch']}, {record['dtype']}, byte-level GSM8K+CSQA text, {record['device']}, "
          f"torch {record['torch']}\n")
    print("| model | params | steps | wall time (s) | val loss (top-k) | val loss (causal rule) | val bits/byte (causal) |")
    print("|---|---|---|---|---|---|---|")
    for r in record.get("results", []):
        print(f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['steps']} | {r['wall_s']} | {r['val_loss_topk']:.4f} | "
              f"{r['val_loss_causal']:.4f} | {r['val_loss_causal'] / math.log(2):.3f} |")

if __name__ == "__main__":
    main()
