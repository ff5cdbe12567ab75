"""`quietdepth-eval`: evaluate models on GSM8K / CommonsenseQA under decoding variants, write
results.json, append to the leaderboard, and plot accuracy against compute knobs.

    quietdepth-eval --model smollm2-135m-instruct --tasks gsm8k csqa --shots 0 5 --decoding greedy cot \\
        --gsm8k-path ../shared/data/gsm8k/test.jsonl --gsm8k-train-path ../shared/data/gsm8k/train.jsonl \\
        --csqa-path ../shared/data/commonsense_qa/dev_rand_split.jsonl --limit 50
    quietdepth-eval plot --leaderboard eval-results --x k --task gsm8k --filter flexible-extract
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from evals import answer_prob, csqa, gsm8k, wandb_auth
from evals.decoding import DecodingConfig
from evals.files import lock, write_atomic
from evals.leaderboard import COLUMNS, LONG_HEADER, append_rows, log_to_wandb, long_table, read_rows, wide_table
from evals.model import DTYPES, EvalModel, ModelLoadError, load_eval_model
from evals.plots import plot_accuracy
from evals.results import TaskResult, git_commit
from modeldefs.pretrained import is_checkpoint

TASKS = ("gsm8k", "gsm8k_chat", "csqa", "csqa_cloze", "csqa_gen", *answer_prob.TASKS)
GENERATIVE = ("gsm8k", "gsm8k_chat", "csqa_gen")
FEW_SHOT = ("gsm8k", "gsm8k_chat")
"""The tasks that `--shots` applies to (the rest are 0-shot)."""


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quietdepth-eval", description="Evaluate models on GSM8K and CommonsenseQA.",
                                epilog="quietdepth-eval plot --help: accuracy against CoT-decoding's k, thought "
                                       "length or capacity, from the leaderboard")
    p.add_argument("--model", nargs="+", default=["smollm2-135m-instruct"],
                   help="model sources: a quietdepth .ckpt, an HF directory or hub id, a .gguf file, or "
                        "smollm2-135m-instruct (offline default)")
    p.add_argument("--tokenizer", default=None, help="tokenizer source (default: the model's; for a .ckpt its training data's)")
    p.add_argument("--tasks", nargs="+", default=["gsm8k", "csqa"], choices=TASKS, metavar="TASK",
                   help=f"any of {', '.join(TASKS)} (csqa = lm-eval's commonsense_qa; *_answer_prob = "
                        f"{answer_prob.LABEL}, 0-shot)")
    p.add_argument("--shots", nargs="+", type=_non_negative, default=None,
                   help="GSM8K few-shot counts (default 5; CommonsenseQA is 0-shot)")
    p.add_argument("--decoding", nargs="+", default=["greedy"], choices=("greedy", "cot", "thoughts"),
                   help="decoding variants; log-likelihood tasks run under greedy (for cot too) and thoughts")
    p.add_argument("--cot-k", nargs="+", type=positive_int, default=None,
                   help=f"CoT-decoding branch counts, one variant each (default {DecodingConfig.cot_k})")
    p.add_argument("--cot-aggregate", action="store_true", help="CoT-decoding: sum confidence per answer (paper's agg)")
    p.add_argument("--max-new-tokens", type=positive_int, default=DecodingConfig.max_new_tokens)
    p.add_argument("--batch-size", type=positive_int, default=DecodingConfig.batch_size,
                   help="rows per forward: completions being generated (each CoT branch is one) or packed rows (scoring)")
    p.add_argument("--prefill-chunk", type=positive_int, default=DecodingConfig.prefill_chunk,
                   help="tokens per forward when reading prompts")
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                   help="on a GPU, launch each decoding step's kernels one by one instead of replaying a CUDA graph")
    p.add_argument("--pack-tokens", type=positive_int, default=DecodingConfig.pack_tokens,
                   help="log-likelihood scoring: most tokens per packed row (rows are as long as the longest context group)")
    p.add_argument("--limit", type=positive_int, default=None, help="evaluate the first N items of each task only")
    p.add_argument("--seed", type=int, default=1234,
                   help="few-shot draw seed, as lm-eval's --fewshot_random_seed (the same seed: lm-eval's prompts); "
                        "also seeds the thoughts of a Quiet-STaR model that samples them (eval_thought_temperature > 0)")
    p.add_argument("--gsm8k-path", default=gsm8k.HUB_ID, help="hub id or local test jsonl")
    p.add_argument("--gsm8k-train-path", default=None, help="few-shot pool: hub id or local train jsonl "
                   "(default: the train split of --gsm8k-path when it is a hub id)")
    p.add_argument("--csqa-path", default=csqa.HUB_ID, help="hub id or local validation jsonl (either schema)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--output", default=None, help="folder for results.json (default eval-results/<UTC time>)")
    p.add_argument("--leaderboard", default="eval-results", help="folder of leaderboard.csv/.md/.html (appended to)")
    p.add_argument("--log-samples", action="store_true", help="also write per-item prompts and outputs (jsonl)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--wandb-project", default=None, metavar="PROJECT",
                   help="log the leaderboard tables to a new W&B run in PROJECT (job type eval, the options as its "
                        "config; offline where wandb finds no credentials, neither WANDB_API_KEY nor a netrc entry "
                        "for its server: `wandb sync` uploads it); without it they go to a "
                        "W&B run only where one is already active (quietdepth-eval called from Python)")
    return p


def plot_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quietdepth-eval plot", description="Accuracy against k / thought length / capacity.")
    p.add_argument("--leaderboard", default="eval-results", help="folder holding leaderboard.csv")
    p.add_argument("--x", required=True, choices=("k", "thought_length", "capacity"))
    p.add_argument("--task", default="gsm8k")
    p.add_argument("--metric", default="exact_match")
    p.add_argument("--filter", default="flexible-extract")
    p.add_argument("--out", default=None, help="PNG path (default <leaderboard>/<task>_vs_<x>.png)")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Fill the defaults that depend on other options, drop repeated values, and refuse options that
    would have no effect or cannot run here (a ValueError naming them)."""
    for name in ("tasks", "decoding", "shots", "cot_k"):
        if getattr(args, name) is not None:
            setattr(args, name, list(dict.fromkeys(getattr(args, name))))
    if "cot" not in args.decoding and (args.cot_k is not None or args.cot_aggregate):
        raise ValueError("--cot-k and --cot-aggregate set CoT-decoding: add cot to --decoding, or drop them")
    if "cot" in args.decoding and not set(GENERATIVE) & set(args.tasks):
        raise ValueError(f"--decoding cot changes generation only, and {', '.join(args.tasks)} are scored by "
                         f"log-likelihood (under greedy): add a generative task ({', '.join(GENERATIVE)}), or drop cot")
    if args.shots is not None and not set(FEW_SHOT) & set(args.tasks):
        raise ValueError("--shots sets GSM8K's few-shot count; the tasks asked for are 0-shot: add gsm8k "
                         "(or gsm8k_chat) to --tasks, or drop --shots")
    args.shots, args.cot_k = args.shots or [5], args.cot_k or [DecodingConfig.cot_k]
    if args.wandb_project is not None and importlib.util.find_spec("wandb") is None:
        raise ValueError(f"--wandb-project {args.wandb_project} logs to W&B, but the wandb package is not installed: "
                         "pip install wandb, or drop --wandb-project")
    check_device(args.device)


def check_device(device: str) -> None:
    """Refuse a `--device` torch does not know, and `--device cuda...` on a machine without CUDA (a
    ValueError naming the fix)."""
    try:
        torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"--device {device}: not a device torch knows; use cpu, cuda or cuda:<index>") from error
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this machine has no CUDA device; use --device cpu")


def plan(args: argparse.Namespace) -> list[tuple[str, DecodingConfig]]:
    """(task, decoding) pairs to run, in order: generative tasks under every decoding variant;
    log-likelihood tasks under greedy and thoughts only (CoT-decoding changes generation alone, so for
    them cot means greedy), each once."""
    pairs: dict[tuple[str, str], tuple[str, DecodingConfig]] = {}
    for variant in args.decoding:
        for k in args.cot_k if variant == "cot" else [args.cot_k[0]]:
            for task in args.tasks:
                scored = "greedy" if task not in GENERATIVE and variant == "cot" else variant
                config = DecodingConfig(variant=scored, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                        prefill_chunk=args.prefill_chunk, pack_tokens=args.pack_tokens, cot_k=k,
                                        cot_aggregate=args.cot_aggregate, cuda_graph=args.cuda_graph)
                pairs.setdefault((task, config.label), (task, config))
    return list(pairs.values())


def check_model(model: EvalModel, args: argparse.Namespace) -> None:
    """Refuse, before any task runs, settings this model cannot evaluate under."""
    if "thoughts" in args.decoding and not model.has_thoughts:
        raise ValueError(f"--decoding thoughts needs a Quiet-STaR model; {model.source} is a plain "
                         f"{type(model.net).__name__}: evaluate it without thoughts in a run of its own")
    if "gsm8k_chat" in args.tasks and model.tokenizer.chat_template is None:
        raise ValueError(f"--tasks gsm8k_chat needs a chat template, and the tokenizer of {model.source} has none: "
                         "evaluate gsm8k (the plain prompt) instead, or give --tokenizer one that has a template")
    # thinking before a token writes its thought into the slots after the newest token (evals.decoding)
    thought = model.net.thought_config.n_ahead - 1 if "thoughts" in args.decoding and model.has_thoughts else 0
    if set(GENERATIVE) & set(args.tasks) and args.max_new_tokens + thought >= model.block_size:
        slots = f" and {thought} thought slots leave" if thought else " leaves"
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}{slots} no room for a prompt in {model.source}'s "
                         f"context of {model.block_size} tokens; lower it")


def load_data(args: argparse.Namespace) -> dict[str, Any]:
    """Each needed data set once, cut to --limit (the few-shot pool is never cut)."""
    data: dict[str, Any] = {}
    cut = slice(None, args.limit)
    if {"gsm8k", "gsm8k_chat", "gsm8k_answer_prob"} & set(args.tasks):
        data["gsm8k"] = _named("--gsm8k-path", gsm8k.load, args.gsm8k_path, "test")[cut]
        data["gsm8k_train"] = []
        if any(args.shots) and set(FEW_SHOT) & set(args.tasks):
            train = args.gsm8k_train_path
            if train is None:
                if Path(args.gsm8k_path).suffix in (".jsonl", ".json"):
                    raise FileNotFoundError("few-shot GSM8K from a local test file needs --gsm8k-train-path "
                                            "(e.g. ../shared/data/gsm8k/train.jsonl), or pass --shots 0")
                train = args.gsm8k_path
            data["gsm8k_train"] = _named("--gsm8k-train-path", gsm8k.load, train, "train")
    if {"csqa", "csqa_cloze", "csqa_gen", "csqa_answer_prob"} & set(args.tasks):
        data["csqa"] = _named("--csqa-path", csqa.load, args.csqa_path)[cut]
    return data


def _named(option: str, load: Callable[..., list[Any]], *args: str) -> list[Any]:
    """`load(*args)`, with a missing file reported under the option that named it."""
    try:
        return load(*args)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{option}: {error}") from error


def evaluate_model(model: EvalModel, args: argparse.Namespace, data: dict[str, Any]) -> Iterator[TaskResult]:
    """Each planned task's result (GSM8K: one per shot count), as soon as it is done."""
    progress = not args.no_progress
    for task, decoding in plan(args):
        for shots in args.shots if task in FEW_SHOT else [0]:
            # Thoughts sampled at a model's eval_thought_temperature > 0 draw from torch's global generator: seeded
            # per task, each result is reproducible and independent of the tasks run before it.
            torch.manual_seed(args.seed)
            if task in answer_prob.TASKS:
                items = ([answer_prob.gsm8k_item(row) for row in data["gsm8k"]] if task == "gsm8k_answer_prob"
                         else [answer_prob.csqa_item(q) for q in data["csqa"]])
                result = answer_prob.evaluate(model, items, task, decoding, progress)
            elif task in ("gsm8k", "gsm8k_chat"):
                result = gsm8k.evaluate(model, data["gsm8k"], data["gsm8k_train"], decoding, shots, args.seed,
                                        chat=task == "gsm8k_chat", progress=progress)
            else:
                result = csqa.evaluate(model, data["csqa"], task, decoding, progress)
            print(_one_line(model, result), flush=True)
            yield result


def _one_line(model: EvalModel, r: TaskResult) -> str:
    metrics = ", ".join(f"{m.filter}/{m.name} {m.value:.4f} ± {m.stderr:.4f}" for m in r.metrics)
    return f"[{model.source} | {r.decoding}] {r.task} {r.n_shot}-shot n={r.n}: {metrics} ({r.seconds:.1f} s, {r.tokens_per_s:.1f} tok/s)"


def weights_hash(model: EvalModel) -> str:
    """sha256 (first 16 hex digits) of the parameters in state-dict order: which weights were evaluated."""
    digest = hashlib.sha256()
    for name, tensor in model.net.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def model_info(model: EvalModel) -> dict[str, Any]:
    """What results.json records of a model: source, class, parameters, weights hash and configs."""
    info = {"source": model.source, "class": type(model.net).__name__, "params": model.lm.num_params(),
            "weights_sha256": weights_hash(model), "config": model.lm.config.to_dict()}
    if model.has_thoughts:
        info["thought_config"] = model.net.thought_config.to_dict()
    return info


def leaderboard_rows(model: EvalModel, results: list[TaskResult], weights: str, args: argparse.Namespace,
                     commit: str, date: str) -> list[dict[str, Any]]:
    """The leaderboard rows (`evals.leaderboard.COLUMNS`) of `results`: one per task result and metric."""
    capacity = model.lm.config.mod_capacity
    thought_length = model.net.thought_config.n_ahead if model.has_thoughts else None
    return [{"model": model.source, "weights_sha256": weights, "dtype": args.dtype, "decoding": r.decoding,
             "task": r.task, "version": r.version, "filter": m.filter, "n_shot": r.n_shot, "metric": m.name,
             "value": m.value, "stderr": m.stderr, "n": r.n,
             "max_new_tokens": args.max_new_tokens if r.task in GENERATIVE else None,
             "tokens_per_s": round(r.tokens_per_s, 2), "capacity": capacity,
             "thought_length": thought_length if r.decoding == "thoughts" else None,
             "prompts_hash": r.prompts_hash, "commit": commit, "date": date}
            for r in results for m in r.metrics]


def _local_source_missing(source: str) -> bool:
    """A model source that names a local file or folder (a .ckpt / .gguf, or a path from . / ~) that does not exist."""
    looks_local = is_checkpoint(source) or source.endswith(".gguf") or source.startswith((".", "/", "~"))
    return looks_local and not Path(source).expanduser().exists()


def _check_outputs(output: Path | None, leaderboard: str) -> None:
    """Refuse, before anything runs, an --output folder (None: the default, a new one) or a leaderboard the
    results could not be written to."""
    if output is not None and output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} is a file; give a folder (results.json goes inside it)")
    if output is not None:
        _check_no_results(output)
    board = Path(leaderboard)
    if board.exists() and not board.is_dir():
        raise ValueError(f"--leaderboard {board} is a file; give a folder (leaderboard.csv goes inside it)")
    read_rows(board / "leaderboard.csv")  # a foreign CSV there is refused now, not after the evaluation


def _check_no_results(output: Path) -> None:
    """Refuse an --output folder that holds an earlier run's results.json."""
    if (output / "results.json").exists():
        raise ValueError(f"--output {output} already holds an earlier run's results.json; give a new folder, or drop "
                         "--output (each run then gets its own eval-results/<UTC time>)")


def _strict_json(value: Any, **dumps: Any) -> str:
    """`value` as JSON, with every float NaN or infinity inside dicts and lists as null: bare NaN and Infinity are not
    JSON, and strict parsers (jq, JavaScript, pandas' ujson) refuse the file."""
    def finite(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        if isinstance(v, list):
            return [finite(x) for x in v]
        return v

    return json.dumps(finite(value), allow_nan=False, **dumps)


def _save(report: dict[str, Any], output: Path, rows: list[dict[str, Any]], leaderboard: str) -> int:
    """Write results.json (every model so far) and append `rows` to the leaderboard; returns rows added."""
    output.mkdir(parents=True, exist_ok=True)
    write_atomic(output / "results.json", _strict_json(report, indent=2, default=str) + "\n")  # NaN: stderr of n = 1
    return append_rows(leaderboard, rows)[1]


def run(args: argparse.Namespace, argv: list[str] | None = None) -> dict[str, Any]:
    """Evaluate every model; each result is saved (results.json, leaderboard) as soon as it is done. `argv`, the
    arguments `args` were parsed from (default: the command line's), is recorded as the command."""
    started = time.perf_counter()
    now = datetime.now(timezone.utc)
    check_args(args)
    output = Path(args.output or Path("eval-results") / now.strftime("%Y%m%d-%H%M%S"))
    _check_outputs(Path(args.output) if args.output else None, args.leaderboard)
    for source in args.model:
        if _local_source_missing(source):
            raise ModelLoadError(f"cannot load model {source!r}: no such file or directory")
    # to the microsecond: it tells apart in the leaderboard's summary runs started in the same second
    report: dict[str, Any] = {"created": now.isoformat(timespec="microseconds"), "git_commit": git_commit(),
                              "command": ["quietdepth-eval", *(sys.argv[1:] if argv is None else argv)],
                              "config": vars(args), "models": []}
    data = load_data(args)
    created = args.output is None or not output.exists()
    output = _claim_folder(output) if args.output is None else output
    output.mkdir(parents=True, exist_ok=True)
    with _held(output):
        try:
            return _evaluate_all(args, output, report, started, data)
        finally:
            if created and not any(output.iterdir()):  # nothing evaluated: no empty folder left behind
                output.rmdir()


def _claim_folder(folder: Path) -> Path:
    """Create `folder`, or `folder`-2, -3, ... where a run that started in the same second has it: each run
    its own folder, never another's."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    claimed, n = folder, 1
    while True:
        try:
            claimed.mkdir()
            return claimed
        except FileExistsError:
            n += 1
            claimed = folder.with_name(f"{folder.name}-{n}")


@contextmanager
def _held(output: Path) -> Iterator[None]:
    """Hold `output` (an flock on the folder) for one run: a second run writing there would overwrite this
    one's results.json, or this one the second's."""
    fd = os.open(output, os.O_RDONLY)
    try:
        try:
            lock(fd, f"--output {output}", wait=False)
        except BlockingIOError:
            raise ValueError(f"another quietdepth-eval run is writing to --output {output}; give another folder, or "
                             "drop --output (each run then gets its own eval-results/<UTC time>)") from None
        _check_no_results(output)  # a run that finished there since the first check
        yield
    finally:
        os.close(fd)


def _evaluate_all(args: argparse.Namespace, output: Path, report: dict[str, Any], started: float,
                  data: dict[str, Any]) -> dict[str, Any]:
    """Evaluate every model into `output` and the leaderboard, adding each result to `report` (results.json's
    content); returns it."""
    rows, added = [], 0
    for source in args.model:
        load_start = time.perf_counter()
        model = load_eval_model(source, args.tokenizer, args.device, DTYPES[args.dtype])
        check_model(model, args)
        entry = {**model_info(model), "load_seconds": round(time.perf_counter() - load_start, 2), "results": []}
        report["models"].append(entry)
        for r in evaluate_model(model, args, data):
            entry["results"].append(r.to_dict())
            if args.log_samples:
                output.mkdir(parents=True, exist_ok=True)
                name = f"samples_{len(report['models'])}_{Path(source).name}_{r.task}_{r.n_shot}shot_{r.decoding}.jsonl"
                write_atomic(output / name, "".join(_strict_json(s) + "\n" for s in r.samples))  # NaN: a diverged model
            new = leaderboard_rows(model, [r], entry["weights_sha256"], args, report["git_commit"], report["created"])
            report["wall_seconds"] = round(time.perf_counter() - started, 2)
            added += _save(report, output, new, args.leaderboard)
            rows += new
        del model
    with _wandb_run(args.wandb_project, output, vars(args)):
        logged = log_to_wandb([{c: str(r[c]) if r[c] is not None else "" for c in COLUMNS} for r in rows])
    print(summary(rows, output, args.leaderboard, added, logged, report["wall_seconds"]))
    return report


@contextlib.contextmanager
def _wandb_run(project: str | None, output: Path, config: dict[str, Any]) -> Iterator[None]:
    """A W&B run in `project` (files under `output`) for the block, finished after it; nothing for None, nor
    inside a caller's active run, which the tables go to and which stays open (wandb.init would return that run,
    and finishing it would close it under the caller). Offline where wandb would find no credentials
    (`wandb_auth.has_credentials`), as `quietdepth fit`, so it never asks to log in."""
    active = sys.modules.get("wandb")
    if project is None or (active is not None and active.run is not None):
        yield
        return
    import wandb

    if not wandb_auth.has_credentials():
        os.environ.setdefault("WANDB_MODE", "offline")
    output.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=project, job_type="eval", config=config, dir=str(output))
    try:
        yield
    finally:
        run.finish()


def summary(rows: list[dict[str, Any]], output: Path, leaderboard: str, added: int, wandb_logged: bool,
            seconds: float) -> str:
    """The final printout: this run's long table and wide summary, and where everything went."""
    text_rows = [{c: "" if r[c] is None else str(r[c]) for c in COLUMNS} for r in rows]

    def table(header: list[str], body: list[list[str]]) -> str:
        widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(header)]
        fmt = lambda cells: "|" + "|".join(f" {c:<{w}} " for c, w in zip(cells, widths)) + "|"  # noqa: E731
        return "\n".join([fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, body)])

    header, wide = wide_table(text_rows)
    board = Path(leaderboard)
    lines = ["", "quietdepth-eval results", table(LONG_HEADER, long_table(text_rows)), "", table(header, wide), "",
             f"results:     {output / 'results.json'}",
             f"leaderboard: {board / 'leaderboard.md'} (+ .csv, .html); {added} new row(s) of {len(rows)}",
             f"wall time:   {seconds:.1f} s" + ("; leaderboard logged to the active W&B run" if wandb_logged else "")]
    return "\n".join(lines)


def plot(args: argparse.Namespace) -> Path:
    rows = read_rows(Path(args.leaderboard) / "leaderboard.csv")
    if not rows:
        raise FileNotFoundError(f"no leaderboard rows in {Path(args.leaderboard) / 'leaderboard.csv'}; run an evaluation first")
    out = Path(args.out or Path(args.leaderboard) / f"{args.task}_vs_{args.x}.png")
    blocking = next((p for p in out.parents if p.is_file()), None)
    if blocking is not None or out.is_dir():
        kind = "file" if blocking else "folder"
        raise ValueError(f"--out {out}: {blocking or out} is a {kind}; give a .png path in a folder")
    path = plot_accuracy(rows, args.x, args.task, args.metric, args.filter, out)
    print(f"wrote {path}")
    return path


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    is_plot = bool(argv) and argv[0] == "plot"
    parser = plot_parser() if is_plot else run_parser()
    args = parser.parse_args(argv[1:] if is_plot or (argv and argv[0] == "run") else argv)
    try:
        plot(args) if is_plot else run(args, argv)
    except (ModelLoadError, FileNotFoundError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    except ConnectionError as error:  # a hub dataset id with no hub in reach
        parser.exit(2, f"{parser.prog}: error: {error}; offline, give local files: --gsm8k-path, "
                       "--gsm8k-train-path, --csqa-path (e.g. ../shared/data/gsm8k/test.jsonl)\n")
    except ValueError as error:  # bad settings found past argument parsing (a data file's schema, a decoding field)
        parser.exit(2, f"{parser.prog}: error: {error}\n")


if __name__ == "__main__":
    main()
