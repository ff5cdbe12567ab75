"""CommonsenseQA (validation, 5 choices) under three protocols.

- `csqa`: lm-evaluation-harness's `commonsense_qa` task — the prompt lists the lettered choices and
  the letters " A" … " E" are scored by log-likelihood; `acc`.
- `csqa_cloze`: prompt `Question: {stem}\\nAnswer:`, the five choice texts scored; `acc`, and
  `acc_norm` (log-likelihood divided by the choice's length, as lm-eval computes it: characters).
- `csqa_gen`: the lettered prompt, a generated answer, the letter A–E it states (`extract_letter`); `acc`.
  This is the one decoding variants (CoT-decoding, thoughts) change.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from evals import jsonl
from evals.decoding import DecodingConfig, decode_completions
from evals.metrics import mean_and_stderr
from evals.model import EvalModel
from evals.results import Metric, TaskResult, prompts_hash, timed
from evals.scoring import encode_pairs, loglikelihood

HUB_ID = "tau/commonsense_qa"
LETTERS = ("A", "B", "C", "D", "E")
GEN_STOP = ("\n\n", "Question:", "</s>", "<|im_end|>")
_STATED = re.compile(r"\b(?i:answer(?: is|:)?)\s*\(?([A-E])\b")  # "Answer is" in any case, the letter a capital
_LETTER = re.compile(r"\b([A-E])\b")


@dataclass
class Question:
    """One CommonsenseQA question with its five choices, whichever schema it was read from."""

    stem: str
    choices: list[str]
    """Choice texts in label order A–E."""
    answer: str
    """The correct label, A–E."""


def _question(record: dict[str, Any], where: str) -> Question:
    """A record of either schema: the official jsonl (`question.stem`, `question.choices[{label, text}]`)
    or the hub's (`question` string, `choices{label[], text[]}`)."""
    try:
        if isinstance(record["question"], dict):
            stem = record["question"]["stem"]
            pairs = [(c["label"], c["text"]) for c in record["question"]["choices"]]
        else:
            stem = record["question"]
            pairs = list(zip(record["choices"]["label"], record["choices"]["text"]))
        answer = record["answerKey"]
    except (KeyError, TypeError) as error:
        raise ValueError(f"{where}: not a CommonsenseQA record (missing {error}); expected the official "
                         "jsonl schema or the hub schema of tau/commonsense_qa") from error
    if [label for label, _ in pairs] != list(LETTERS) or answer not in LETTERS:
        raise ValueError(f"{where}: expected choices labelled A-E and an answerKey among them, got "
                         f"{[label for label, _ in pairs]} / {answer!r} (the test split has no answers)")
    for field, text in [("question stem", stem), *((f"choice {label}", text) for label, text in pairs)]:
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: the {field} must be a non-empty string, got {text!r}")
    return Question(stem=stem, choices=[text for _, text in pairs], answer=answer)


def load(path: str = HUB_ID, split: str = "validation") -> list[Question]:
    """CommonsenseQA questions from the hub or a local jsonl file (e.g. ../shared/data/commonsense_qa/dev_rand_split.jsonl)."""
    if jsonl.is_local(path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"CommonsenseQA file not found: {path}; give a local jsonl (e.g. "
                                    "../shared/data/commonsense_qa/dev_rand_split.jsonl) or the hub id tau/commonsense_qa")
        questions = [_question(record, where) for where, record in jsonl.records(path)]
        if not questions:
            raise ValueError(f"{path} holds no CommonsenseQA records")
        return questions
    import datasets

    return [_question(r, f"{path}[{i}]") for i, r in enumerate(datasets.load_dataset(path, split=split))]


def letter_prompt(q: Question) -> str:
    """lm-eval's `commonsense_qa` prompt: the stem, the lettered choices, `Answer:`."""
    lines = [f"Question: {q.stem.strip()}", *(f"{letter}. {text}" for letter, text in zip(LETTERS, q.choices))]
    return "\n".join([*lines, "Answer:"])


def cloze_prompt(q: Question) -> str:
    """The `csqa_cloze` prompt: the stem alone, `Answer:`; the choice texts are scored after it."""
    return f"Question: {q.stem.strip()}\nAnswer:"


def _letter_match(completion: str) -> re.Match[str] | None:
    """The letter an answer states ("the answer is C", "Answer: (C)"), else its first standalone
    capital A–E, so that an article ("A person would ...") before a stated answer is not taken."""
    return _STATED.search(completion) or _LETTER.search(completion)


def extract_letter(completion: str) -> str | None:
    """The answer letter A–E of a generated answer, or None (`_letter_match`)."""
    match = _letter_match(completion)
    return match.group(1) if match else None


def letter_span(completion: str) -> tuple[int, int] | None:
    """Character span of the extracted letter (the answer CoT-decoding measures confidence on)."""
    match = _letter_match(completion)
    return match.span(1) if match else None


def _choice_scores(model: EvalModel, contexts: list[str], options: list[list[str]], decoding: DecodingConfig,
                   progress: bool) -> tuple[list[list[float]], int]:
    """Log-likelihood of each option (target delimiter " " prepended, as lm-eval does) per context,
    and the number of tokens the model read. Under the `thoughts` variant, thought-mixed logits score."""
    requests = encode_pairs(model, [(context, " " + option) for context, opts in zip(contexts, options) for option in opts])
    scores = loglikelihood(model, requests, batch_size=decoding.batch_size, progress=progress,
                           think=decoding.variant == "thoughts", pack_tokens=decoding.pack_tokens)
    flat = iter(score for score, _ in scores)
    # what the model reads: each distinct context once (its options share it), then each option
    pairs = {(tuple(c), tuple(k)) for c, k in requests}
    tokens = sum(map(len, {c for c, _ in pairs})) + sum(len(k) for _, k in pairs)
    return [[next(flat) for _ in opts] for opts in options], tokens


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # ties: the first, as numpy's argmax


def evaluate(model: EvalModel, questions: list[Question], task: str, decoding: DecodingConfig,
             progress: bool = True) -> TaskResult:
    """Run protocol `task` (csqa, csqa_cloze or csqa_gen) on `questions`; per-item results in `samples`."""
    gold = [LETTERS.index(q.answer) for q in questions]
    metrics: dict[str, list[float]] = {}
    with timed() as clock:
        if task == "csqa":
            prompts = [letter_prompt(q) for q in questions]
            scores, tokens = _choice_scores(model, prompts, [list(LETTERS)] * len(questions), decoding, progress)
            metrics["acc"] = [float(_argmax(s) == g) for s, g in zip(scores, gold)]
            samples = [{"scores": s, "pred": LETTERS[_argmax(s)]} for s in scores]
        elif task == "csqa_cloze":
            prompts = [cloze_prompt(q) for q in questions]
            scores, tokens = _choice_scores(model, prompts, [q.choices for q in questions], decoding, progress)
            normed = [[v / len(c) for v, c in zip(s, q.choices)] for s, q in zip(scores, questions)]
            metrics["acc"] = [float(_argmax(s) == g) for s, g in zip(scores, gold)]
            metrics["acc_norm"] = [float(_argmax(s) == g) for s, g in zip(normed, gold)]
            samples = [{"scores": s, "pred": LETTERS[_argmax(s)], "pred_norm": LETTERS[_argmax(n)]}
                       for s, n in zip(scores, normed)]
        elif task == "csqa_gen":
            prompts = [letter_prompt(q) for q in questions]
            completions, tokens = decode_completions(model, model.encode_batch(prompts), decoding,
                                                     list(GEN_STOP), letter_span, progress=progress)
            preds = [extract_letter(c) for c in completions]
            metrics["acc"] = [float(p == q.answer) for p, q in zip(preds, questions)]
            samples = [{"completion": c, "pred": p} for c, p in zip(completions, preds)]
        else:
            raise ValueError(f"unknown CommonsenseQA protocol {task!r}; choose csqa, csqa_cloze or csqa_gen")
    version = "N/A" if task == "csqa" else "1.0"  # lm-eval's commonsense_qa yaml carries no version
    return TaskResult(
        task=task, version=version, n_shot=0, decoding=decoding.label,
        metrics=[Metric("none", name, *mean_and_stderr(values)) for name, values in metrics.items()],
        n=len(questions), prompts_hash=prompts_hash(prompts), seconds=clock.seconds,
        generated_tokens=tokens if task == "csqa_gen" else 0, scored_tokens=0 if task == "csqa_gen" else tokens,
        samples=[{"prompt": p, "answer": q.answer, **s} for p, q, s in zip(prompts, questions, samples)],
    )
