"""Evaluation speed: quietdepth's scorer/decoder vs lm-evaluation-harness's `hf` backend, same model,
same tasks, same process.

    python benchmarks/eval_speed.py --limit commonsense_qa_local=200,commonsense_qa_cloze_local=200,gsm8k_local=20

Both sides run through `lm_eval.simple_evaluate` on the offline task YAMLs in evals/lm_eval_tasks
(identical prompts, few-shot draws, stop strings and answer extraction): lm-eval's `HFLM` on the
transformers model, and the `quietdepth` model type (evals/lm_eval_adapter.py) on our decoder with
the same weights (SmolLM2-135M-Instruct from its GGUF by default). Only the backend differs, so the
accuracies must agree. Models load once, outside the timings. "model s" is the time spent inside the
model's request methods (the backend's work; the speed-up is its ratio), "wall s" the whole
`simple_evaluate` call, which adds lm-eval's task building and metrics, the same for both sides. Each
task runs `--rounds` times per side, the order alternating between rounds, and each side's fastest
round counts (the others are in the JSON); on a CPU glibc keeps freed memory (report.keep_freed_memory)
unless `--default-heap`.
tokens/s (over model s) counts every token each side had to read or write: context + continuation of
each scored request, prompt + completion of each generation. Prints a Markdown table and a JSON line; each task's rows print,
and --json is rewritten, as soon as that task is done, so a later task's failure loses no finished one.
Rounds whose metrics differ (GPU kernels need not be deterministic) are flagged, not fatal.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from evals.cli import positive_int
from report import Record, add_heap_option, device_name, steady_heap

TASKS_DIR = Path(__file__).resolve().parents[1] / "evals" / "lm_eval_tasks"
DEFAULT_TASKS = "commonsense_qa_local,commonsense_qa_cloze_local,gsm8k_local"


def parse_limits(text: str) -> dict[str, int]:
    """`task=n,task=n` → {task: n}."""
    limits = {}
    for item in filter(None, text.split(",")):
        task, _, n = item.partition("=")
        if not n.isdigit():
            raise SystemExit(f"--limit {item!r}: expected task=<number of documents>")
        limits[task] = int(n)
    return limits


def load_models(source: str, batch_size: int, hf_batch_size: int, pack_tokens: int, dtype: str):
    """(lm-eval HFLM, quietdepth LM, load seconds of each) on the same weights in the same `dtype`, CPU or
    the first GPU."""
    from lm_eval.models.huggingface import HFLM

    from evals.lm_eval_adapter import QuietdepthLM
    from modeldefs.pretrained import _from_pretrained_args

    device = "cuda" if torch.cuda.is_available() else "cpu"
    path, kwargs = _from_pretrained_args(source)
    start = time.perf_counter()
    hf = HFLM(pretrained=path, device=device, batch_size=hf_batch_size, dtype=dtype, **kwargs)
    hf_load = time.perf_counter() - start
    start = time.perf_counter()
    ours = QuietdepthLM(source, device=device, batch_size=batch_size, pack_tokens=pack_tokens, dtype=dtype)
    return time_requests(hf), time_requests(ours), hf_load, time.perf_counter() - start


def tokens_processed(samples: list[dict[str, Any]], tokenizer: Any) -> int:
    """Tokens read or written for a task's logged requests (same count for both sides)."""
    total = 0
    for sample in unique_docs(samples):
        for i, (context, second) in enumerate(sample["arguments"]):
            if isinstance(second, str):  # log-likelihood request: (context, continuation)
                total += len(tokenizer.encode(context + second, add_special_tokens=False))
            else:  # generation: (context, gen_kwargs); the response is the completion
                total += len(tokenizer.encode(context + sample["resps"][i][0], add_special_tokens=False))
    return total


def time_requests(lm: Any) -> Any:
    """Make `lm.request_seconds` add up the time spent inside its request methods (the backend's own work,
    without lm-eval's task building and metric computation, which both sides share)."""
    lm.request_seconds = 0.0
    for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        def timed(requests: list[Any], *args: Any, _method: Any = getattr(lm, name), **kwargs: Any) -> list[Any]:
            start = time.perf_counter()
            try:
                return _method(requests, *args, **kwargs)
            finally:
                lm.request_seconds += time.perf_counter() - start
        setattr(lm, name, timed)
    return lm


def unique_docs(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One logged sample per document (lm-eval logs a generation task's documents once per filter)."""
    return list({sample["doc_id"]: sample for sample in samples}.values())


def run(lm: Any, task: str, limit: int | None, task_manager: Any, tokenizer: Any,
        num_fewshot: int | None) -> dict[str, Any]:
    from lm_eval import simple_evaluate

    lm.request_seconds = 0.0
    start = time.perf_counter()
    out = simple_evaluate(model=lm, tasks=[task], limit=limit, num_fewshot=num_fewshot, log_samples=True,
                          task_manager=task_manager)
    seconds = time.perf_counter() - start
    metrics = {k.replace(",", "/"): v for k, v in out["results"][task].items()
               if "," in k and "_stderr" not in k}
    stderrs = {k.replace("_stderr,", "/"): v for k, v in out["results"][task].items() if "_stderr," in k}
    tokens = tokens_processed(out["samples"][task], tokenizer)
    return {"seconds": seconds, "request_seconds": lm.request_seconds, "n": len(unique_docs(out["samples"][task])),
            "n_shot": out["n-shot"][task], "tokens": tokens,
            "tokens_per_s": tokens / lm.request_seconds,
            "metrics": {k: (v, stderrs.get(k)) for k, v in metrics.items()}}


def fastest(task: str, side: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the least model time, with every round's time. Rounds that disagree on a metric (GPU
    kernels in bf16 need not be deterministic) are kept and flagged, with each round's metrics, not fatal."""
    best = min(runs, key=lambda r: r["request_seconds"])
    result = {**best, "round_request_seconds": [r["request_seconds"] for r in runs], "rounds_agree": True}
    if any(r["metrics"] != runs[0]["metrics"] for r in runs[1:]):
        result.update(rounds_agree=False, round_metrics=[r["metrics"] for r in runs])
        print(f"warning: {task} / {side}: metrics differ between rounds: "
              + " vs ".join(str(r["metrics"]) for r in runs), file=sys.stderr, flush=True)
    return result


def table_rows(task: str, result: dict[str, Any]) -> list[str]:
    """The task's two Markdown rows (lm-eval hf, then quietdepth with the speed-up)."""
    rows = []
    for side in ("lm-eval hf", "quietdepth"):
        r = result[side]
        metrics = "; ".join(f"{k} {v:.4f} ± {e:.4f}" if isinstance(e, float) else f"{k} {v:.4f}"
                            for k, (v, e) in r["metrics"].items())
        if not r["rounds_agree"]:
            metrics += " (fastest round; rounds differ, see JSON)"
        rows.append(f"| {task} | {side} | {r['n']} | {r['request_seconds']:.1f} | {r['seconds']:.1f} | "
                    f"{r['tokens_per_s']:.0f} | {metrics} | "
                    + (f"{result['speedup']:.2f}× |" if side == "quietdepth" else "|"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a .gguf, an HF directory or smollm2-135m-instruct")
    parser.add_argument("--tasks", default=DEFAULT_TASKS, help="comma-separated task names from evals/lm_eval_tasks")
    parser.add_argument("--limit", default="", help="documents per task, e.g. gsm8k_local=20 (default: all)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="quietdepth: rows per forward, completions being generated or packed scoring rows")
    parser.add_argument("--pack-tokens", type=positive_int, default=512, help="quietdepth: most tokens per packed scoring row")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="weights and compute of both backends")
    parser.add_argument("--hf-batch-size", type=positive_int, default=32, help="lm-eval hf backend batch size")
    parser.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt (default: each task's own, "
                        "5 for gsm8k_local)")
    parser.add_argument("--rounds", type=positive_int, default=2,
                        help="runs of each task per backend, in alternating order; each side's fastest counts")
    add_heap_option(parser)
    parser.add_argument("--json", help="also write the record to this file")
    args = parser.parse_args()
    tasks = args.tasks.split(",")
    limits = parse_limits(args.limit)
    for task in limits.keys() - set(tasks):
        parser.error(f"--limit names {task}, which --tasks does not run (tasks: {args.tasks})")
    known = sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))
    for task in set(tasks) - set(known):
        parser.error(f"--tasks {task}: no such task in {TASKS_DIR} (tasks: {', '.join(known)})")
    heap_kept = steady_heap(args, torch.device("cuda" if torch.cuda.is_available() else "cpu"))

    def print_table(data: dict[str, Any]) -> None:
        print(f"\n{args.model} on {data['device']} ({data['threads']} threads), torch {torch.__version__}, "
              f"{args.dtype}; batch size quietdepth {args.batch_size}, lm-eval hf {args.hf_batch_size}; fastest of "
              f"{args.rounds} round(s), alternating order" + ("; CPU heap kept" if heap_kept else "") + "\n")
        print("| task | backend | n | model s | wall s | tokens/s | accuracy ± stderr | speed-up (model s) |")
        print("|---|---|---:|---:|---:|---:|---|---:|")
        for task, result in data["tasks"].items():
            print("\n".join(table_rows(task, result)))

    record = Record(args.json, {"benchmark": "eval_speed"}, table=print_table)  # an unwritable --json: refused now
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    task_manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    hf, ours, hf_load, ours_load = load_models(args.model, args.batch_size, args.hf_batch_size, args.pack_tokens,
                                                args.dtype)
    tokenizer = ours.model.tokenizer
    record.data.update({
        "model": args.model, "device": device_name(ours.model.device),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "dtype": args.dtype, "batch_size": args.batch_size,
        "hf_batch_size": args.hf_batch_size, "pack_tokens": args.pack_tokens, "rounds": args.rounds,
        "num_fewshot": args.num_fewshot,
        "cpu_heap_kept": heap_kept, "load_seconds": {"lm-eval hf": hf_load, "quietdepth": ours_load},
        "tasks": {}})

    with record:
        for task in tasks:
            limit = limits.get(task)
            sides = [("lm-eval hf", hf), ("quietdepth", ours)]
            rounds: dict[str, list[dict[str, Any]]] = {"lm-eval hf": [], "quietdepth": []}
            for i in range(args.rounds):  # the order alternates, so neither side always runs on a warmer process
                for side, lm in sides if i % 2 == 0 else sides[::-1]:
                    rounds[side].append(run(lm, task, limit, task_manager, tokenizer, args.num_fewshot))
            result = {side: fastest(task, side, runs) for side, runs in rounds.items()}
            result["speedup"] = result["lm-eval hf"]["request_seconds"] / result["quietdepth"]["request_seconds"]
            record.update(tasks={**record.data["tasks"], task: result})
            print("\n".join(table_rows(task, result)), flush=True)  # this task's rows now: a later one may fail


if __name__ == "__main__":
    main()
