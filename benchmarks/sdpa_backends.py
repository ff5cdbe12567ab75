"""Forward + backward time of each SDPA backend at a model's attention shape (CUDA, bf16, causal, GQA).

    python benchmarks/sdpa_backends.py --shape llama-1b --batch 8
    python benchmarks/sdpa_backends.py --shape smollm2-135m --batch 16

`F.scaled_dot_product_attention` picks a backend itself; this times each one it can run on the shape
(20 calls after 3 warm-up calls), so the choice can be checked. TFLOP/s counts causal attention:
forward 2·B·H·T²·D, backward 2.5× that. Prints a Markdown table and a JSON line.
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
    results = []
    for backend in BACKENDS:
        try:
            with sdpa_kernel(backend):
                for i in range(23):
                    if i == 3:
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=c.n_kv_head != c.n_head)
                    out.backward(torch.ones_like(out))
                torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) / 20 * 1e3
            results.append(dict(backend=backend.name, ms=round(ms, 3), tflops=round(flops / ms / 1e9, 1)))
        except RuntimeError as e:  # no kernel of this backend for the shape
            results.append(dict(backend=backend.name, error=str(e).splitlines()[0][:200]))
    print(f"\n{args.shape}: batch {B}, heads {c.n_head}/{c.n_kv_head}, head size {D}, seq {T}, bf16, "
          f"{device_name(torch.device('cuda'))}, torch {torch.__version__}\n")
    print("| backend | forward + backward (ms) | TFLOP/s |\n|---|---|---|")
    for r in results:
        print(f"| {r['backend']} | {r.get('ms', 'n/a')} | {r.get('tflops', r.get('error'))} |")
    emit(dict(shape=args.shape, batch=B, seq=T, torch=torch.__version__, results=results), args.json)


if __name__ == "__main__":
    main()
