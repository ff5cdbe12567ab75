"""GSM8K as lm-evaluation-harness's `gsm8k` task (v3) defines it: data, few-shot prompts, answer
extraction (strict-match and flexible-extract) and exact match."""

from __future__ import annotations

import os
import random
import re
from typing import Any

from evals import jsonl
from evals.decoding import DecodingConfig, decode_completions
from evals.metrics import mean_and_stderr
from evals.model import EvalModel
from evals.results import Metric, TaskResult, prompts_hash, timed

HUB_ID = "openai/gsm8k"
STOP_SEQUENCES = ("Question:", "</s>", "<|im_end|>")
INVALID = "[invalid]"
VERSION = "3.0"
"""lm-eval's `gsm8k` task version these prompts, stops and filters reproduce."""
_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_IGNORE = [re.compile(p) for p in (",", r"\$", r"(?s).*#### ", r"\.$")]


def load(path: str = HUB_ID, split: str = "test") -> list[dict[str, str]]:
    """GSM8K problems ({"question", "answer"}) from the hub (config `main`) or a local jsonl file."""
    if jsonl.is_local(path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GSM8K file not found: {path}; give a local jsonl "
                                    "(e.g. ../shared/data/gsm8k/test.jsonl) or the hub id openai/gsm8k")
        rows = jsonl.records(path)
    else:
        import datasets

        rows = ((f"{path}[{i}]", r) for i, r in enumerate(datasets.load_dataset(path, "main", split=split)))
    problems = [_problem(record, where) for where, record in rows]
    if not problems:
        raise ValueError(f"{path} holds no GSM8K problems")
    return problems


def _problem(record: Any, where: str) -> dict[str, str]:
    """A {"question", "answer"} row, or a ValueError naming the row and the field."""
    for field in ("question", "answer"):
        if not isinstance(record, dict) or not isinstance(record.get(field), str) or not record[field].strip():
            raise ValueError(f"{where}: a GSM8K row needs a non-empty string field {field!r}")
    if "#### " not in record["answer"]:
        raise ValueError(f"{where}: a GSM8K answer ends with '#### <number>', the final answer exact match compares "
                         "with; this one has none")
    return {"question": record["question"], "answer": record["answer"]}


def fewshot_draws(train: list[dict[str, str]], k: int, seed: int, questions: list[str]) -> list[list[dict[str, str]]]:
    """`k` training problems for each test question, drawn as lm-eval's default sampler draws them: one
    `Random(seed)` for the task, `k` problems per question in the questions' order, so that the prompts
    equal lm-eval's at the same seed (its `--fewshot_random_seed`, 1234 by default). A draw that holds the
    test question itself is drawn again without it (lm-eval would keep it; GSM8K's splits share none)."""
    if k > len(train):
        raise ValueError(f"{k}-shot GSM8K needs at least {k} training problems; the train split holds {len(train)}")
    rng = random.Random(seed)
    draws = []
    for question in questions:
        picked = rng.sample(range(len(train)), k)
        if any(train[i]["question"] == question for i in picked):
            picked = rng.sample([i for i in range(len(train)) if train[i]["question"] != question], k)
        draws.append([train[i] for i in picked])
    return draws


def prompt(question: str, shots: list[dict[str, str]]) -> str:
    """lm-eval's plain prompt: solved examples separated by a blank line, then `Question: …\\nAnswer:`."""
    parts = [f"Question: {s['question']}\nAnswer: {s['answer']}" for s in shots]
    return "\n\n".join([*parts, f"Question: {question}\nAnswer:"])


def chat_prompt(question: str, shots: list[dict[str, str]], tokenizer: Any) -> str:
    """The same examples as a multi-turn chat (lm-eval's `fewshot_as_multiturn`), through the
    tokenizer's chat template, ending where the assistant's answer starts."""
    messages = []
    for s in shots:
        messages += [{"role": "user", "content": f"Question: {s['question']}\nAnswer:"},
                     {"role": "assistant", "content": s["answer"]}]
    messages.append({"role": "user", "content": f"Question: {question}\nAnswer:"})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def extract_strict(completion: str) -> str:
    """The number after the first `#### `, or `[invalid]`."""
    match = _STRICT.search(completion)
    return match.group(1) if match else INVALID


def extract_flexible(completion: str) -> str:
    """The last number-like span in the completion, or `[invalid]`."""
    matches = _FLEXIBLE.findall(completion)
    if not matches:
        return INVALID
    return next(group for group in matches[-1] if group)


def flexible_span(completion: str) -> tuple[int, int] | None:
    """Character span of the flexible-extract answer (the last number-like span): the answer whose
    tokens CoT-decoding measures its confidence on."""
    match = None
    for match in _FLEXIBLE.finditer(completion):
        pass
    return None if match is None else match.span(match.lastindex)


def normalize(text: str) -> str:
    """lm-eval's exact-match normalisation for GSM8K: drop `,`, `$`, everything up to `#### ` and a
    trailing `.`, then lower-case."""
    for pattern in _IGNORE:
        text = pattern.sub("", text)
    return text.lower()


def exact_match(prediction: str, answer: str) -> bool:
    """Whether an extracted prediction equals the reference solution's final answer."""
    return normalize(prediction) == normalize(answer)


def evaluate(model: EvalModel, rows: list[dict[str, str]], train: list[dict[str, str]], decoding: DecodingConfig,
             shots: int = 5, seed: int = 1234, chat: bool = False, progress: bool = True) -> TaskResult:
    """GSM8K exact match under strict-match and flexible-extract, `shots` examples per problem drawn from
    `train` as lm-eval draws them (`fewshot_draws`), plain or chat-template prompts."""
    if shots and not train:
        raise ValueError(f"{shots}-shot GSM8K needs training problems to draw examples from; pass the train split")
    questions = [row["question"] for row in rows]
    draws = fewshot_draws(train, shots, seed, questions) if shots else [[] for _ in rows]
    prompts = [chat_prompt(q, examples, model.tokenizer) if chat else prompt(q, examples)
               for q, examples in zip(questions, draws)]
    with timed() as clock:
        completions, generated = decode_completions(model, model.encode_batch(prompts), decoding,
                                                    list(STOP_SEQUENCES), flexible_span, progress=progress,
                                                    normalize=normalize)
    strict = [extract_strict(c) for c in completions]
    flexible = [extract_flexible(c) for c in completions]
    scores = {
        "strict-match": [float(exact_match(p, r["answer"])) for p, r in zip(strict, rows)],
        "flexible-extract": [float(exact_match(p, r["answer"])) for p, r in zip(flexible, rows)],
    }
    return TaskResult(
        task="gsm8k_chat" if chat else "gsm8k", version=VERSION, n_shot=shots, decoding=decoding.label,
        metrics=[Metric(name, "exact_match", *mean_and_stderr(values)) for name, values in scores.items()],
        n=len(rows), prompts_hash=prompts_hash(prompts), seconds=clock.seconds, generated_tokens=generated,
        samples=[{"prompt": p, "completion": c, "strict": s, "flexible": f, "answer": r["answer"]}
                 for p, c, s, f, r in zip(prompts, completions, strict, flexible, rows)],
    )
