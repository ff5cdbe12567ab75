"""Forward + backward time of each SDPA backend at a model's attention shape (CUDA, bf16, causal, GQA).

    python benchmarks/sdpa_backends.py --shape llama-1b --batch 8
    python benchmarks/sdpa_backends.py --shape smollm2-135m --batch 16
    python benchmarks/sdpa_backends.py --shape smollm2-135m --batch 16 --mask   # a bool mask, as masked paths pass

`F.scaled_dot_product_attention` picks a backend itself; this times each one it can run on the shape
(20 calls after 3 warm-up calls), so the choice can be checked. TFLOP/s counts causal attention:
forward 2·B·H·T²·D, backward 2.5× that. Prints a Markdown table and a JSON line.

`--mask` passes the causal rule as a bool (T, T) mask instead of `is_causal`, as Quiet-STaR's thought
passes, MoD's causal rule, evals' packed scoring and chunked prefill do, and adds the math backend and
rows with the key/value heads repeated to the query heads (no `enable_gqa`): the memory-efficient
kernel takes masks but not grouped-query attention (on an H100 with torch 2.11 cuDNN takes both: RESULTS.md).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from report import device_name, emit
from modeldefs import ModelConfig

BACKENDS = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-1b", help="a ModelConfig name (its heads and head size)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--mask", action="store_true", help="a bool causal mask instead of is_causal")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("sdpa_backends.py times CUDA kernels: run it on a GPU")

    c = ModelConfig.from_name(args.shape)
    B, T, D = args.batch, args.seq, c.head_dim
    q = torch.randn(B, c.n_head, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, c.n_kv_head, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    flops = 3.5 * 2 * B * c.n_head * T * T * D
    mask = torch.ones(T, T, device="cuda", dtype=torch.bool).tril() if args.mask else None
    group = c.n_head // c.n_kv_head
    cases = [(backend, False) for backend in BACKENDS]
    if args.mask:
        cases = [(backend, repeat) for backend in (*BACKENDS, SDPBackend.MATH) for repeat in (False, True)]
    results = []
    for backend, repeat in cases:
        name = backend.name + (", heads repeated" if repeat else "")
        try:
            with sdpa_kernel(backend):
                for i in range(23):
                    if i == 3:
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                    keys, values = (k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)) if repeat else (k, v)
                    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=mask is None,
                                                         enable_gqa=not repeat and group > 1)
                    out.backward(torch.ones_like(out))
                torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) / 20 * 1e3
            results.append(dict(backend=name, ms=round(ms, 3), tflops=round(flops / ms / 1e9, 1)))
        except RuntimeError as e:  # no kernel of this backend for the shape
            results.append(dict(backend=name, error=str(e).splitlines()[0][:200]))
    print(f"\n{args.shape}: batch {B}, heads {c.n_head}/{c.n_kv_head}, head size {D}, seq {T}, bf16, "
          + ("bool mask, " if args.mask else "") +
          f"{device_name(torch.device('cuda'))}, torch {torch.__version__}\n")
    print("| backend | forward + backward (ms) | TFLOP/s |\n|---|---|---|")
    for r in results:
        print(f"| {r['backend']} | {r.get('ms', 'n/a')} | {r.get('tflops', r.get('error'))} |")
    emit(dict(shape=args.shape, batch=B, seq=T, mask=args.mask, torch=torch.__version__, results=results), args.json)


if __name__ == "__main__":
    main()
