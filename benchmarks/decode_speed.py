"""Greedy decoding speed: the fixed-shape step (`evals.decode_step`, replayed as a CUDA graph on a GPU) vs the
sliced step (every kernel launched, attention over the cache up to the newest slot), same model, same prompts,
same process.

    python benchmarks/decode_speed.py --model /tmp/smollm2-hf --dtype bfloat16 --n 128 --batch-size 64

Prompts are GSM8K test questions with k solved training problems before each (lm-eval's prompt and draws),
from `--gsm8k-dir` (the official jsonl files; default ../shared/data/gsm8k). Both variants decode every prompt
`--rounds` times in alternating order; each variant's fastest round counts, the first round is reported too
(only the sliced step's is cold: the fixed step's first round follows it, on the same prompts, in a process and
a prefill already warmed up). Completions are compared token for token: in bf16 the two steps' attention sums
over different key counts, so an occasional near-tie may break the other way. On a CPU the fixed step runs
eagerly (no graphs there).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import torch

from evals import decoding, gsm8k
from evals.cli import positive_int
from evals.model import load_eval_model
from report import Record, device_name, sync

SHARED = Path(os.environ.get("QUIETDEPTH_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
STOP = ["Question:", "</s>", "<|im_end|>"]  # gsm8k_local's stop strings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="a plain (not Mixture-of-Depths) model: a .gguf, an HF directory, a .ckpt, ...")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and compute")
    parser.add_argument("--gsm8k-dir", default=str(SHARED / "gsm8k"),
                        help="directory with the official train.jsonl and test.jsonl (default: "
                        "$QUIETDEPTH_SHARED_DATA/gsm8k, else ../shared/data/gsm8k beside the repository)")
    parser.add_argument("--n", type=positive_int, default=128, help="test questions")
    parser.add_argument("--shots", type=int, default=5, help="solved training problems before each question")
    parser.add_argument("--max-new-tokens", type=positive_int, default=256, help="tokens per completion at most")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="rows decoded together")
    parser.add_argument("--rounds", type=positive_int, default=2, help="runs of each step, alternating; the fastest counts")
    parser.add_argument("--json", help="also write the record to this file")
    args = parser.parse_args()
    for split in ("train", "test"):
        if not (Path(args.gsm8k_dir) / f"{split}.jsonl").is_file():
            parser.error(f"--gsm8k-dir {args.gsm8k_dir}: no {split}.jsonl there (the official GSM8K files)")
    if args.shots < 0:
        parser.error(f"--shots {args.shots}: give 0 or more")
    record = Record(args.json, {"benchmark": "decode_speed"}, table=print_table)  # an unwritable --json: refused now
    test = gsm8k.load(str(Path(args.gsm8k_dir) / "test.jsonl"))[:args.n]
    train = gsm8k.load(str(Path(args.gsm8k_dir) / "train.jsonl"), split="train")
    try:
        draws = gsm8k.fewshot_draws(train, args.shots, 1234, [q["question"] for q in test])
    except ValueError as error:
        parser.error(f"--shots {args.shots}: {error}")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_eval_model(args.model, None, device, getattr(torch, args.dtype))
    if model.lm.routed_blocks:  # its decoding takes the sliced step whatever fixed_step asks
        parser.error(f"--model {args.model}: a Mixture-of-Depths model has no fixed-shape step to time; give a "
                     "plain model")
    prompts = model.encode_batch([gsm8k.prompt(q["question"], shots) for q, shots in zip(test, draws)])

    record.data.update({
        "model": args.model, "device": device_name(model.device), "torch": torch.__version__, "dtype": args.dtype,
        "n": len(prompts), "shots": args.shots, "prompt_tokens": sum(map(len, prompts)),
        "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "rounds": args.rounds,
        "step": "CUDA graph" if device == "cuda" else "eager"})
    variants = {"sliced": False, "fixed": True}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    tokens: dict[str, list[list[int]]] = {}
    with record:
        for r in range(args.rounds):
            for name in list(variants)[:: 1 if r % 2 == 0 else -1]:
                sync(model.device)
                start = time.perf_counter()
                out = decoding.generate_tokens(model, prompts, args.max_new_tokens, STOP, args.batch_size,
                                               fixed_step=variants[name])
                sync(model.device)
                seconds = time.perf_counter() - start
                runs[name].append({"seconds": seconds, "new_tokens": sum(map(len, out))})
                tokens[name] = out
                print(f"round {r} {name}: {seconds:.2f} s, {sum(map(len, out))} new tokens", flush=True)
                # cold_seconds: the first round (a cold one for the sliced step only; the key kept for the records)
                record.update(variants={v: {"seconds": min(x["seconds"] for x in rs), "cold_seconds": rs[0]["seconds"],
                                            "round_seconds": [x["seconds"] for x in rs],
                                            "new_tokens": rs[-1]["new_tokens"]}
                                        for v, rs in runs.items() if rs})
        fixed, sliced = record.data["variants"]["fixed"], record.data["variants"]["sliced"]
        record.update(identical_completions=sum(a == b for a, b in zip(tokens["sliced"], tokens["fixed"])),
                      speedup=sliced["seconds"] / fixed["seconds"])


def print_table(data: dict[str, Any]) -> None:
    """The Markdown table of the steps timed so far, and the speed-up once both are."""
    print(f"\n{data.get('model')} on {data.get('device')}, torch {torch.__version__}, {data.get('dtype')}; "
          f"{data.get('n')} GSM8K {data.get('shots')}-shot prompts, {data.get('max_new_tokens')} new tokens at most, "
          f"{data.get('batch_size')} rows; fastest of {data.get('rounds')} round(s)\n")
    print("| step | seconds | first round | new tokens | new tokens/s |")
    print("|---|---:|---:|---:|---:|")
    for name, label in (("sliced", "sliced step"), ("fixed", f"fixed step, {data.get('step')}")):
        if name in data.get("variants", {}):
            v = data["variants"][name]
            print(f"| {label} | {v['seconds']:.2f} | {v['cold_seconds']:.2f} | {v['new_tokens']} | "
                  f"{v['new_tokens'] / v['seconds']:.0f} |")
    if "speedup" in data:
        print(f"\nspeed-up {data['speedup']:.2f}×; identical completions {data['identical_completions']} of {data['n']}")

if __name__ == "__main__":
    main()
