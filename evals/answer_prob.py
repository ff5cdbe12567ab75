"""Answer probability (official Quiet-STaR metric): the probability of the answer, renormalised
over the answer's alphabet, as Zelikman et al. measure during training (ezelikman/quiet-star,
`eval_helpers.py`: `preprocess_eval_function_gsm`/`_csqa` and `compute_metrics`).

Each item is one text, `Q: {question}\\nA: {answer}\\n`, read in a single forward:
- `gsm8k_answer_prob`: the answer is GSM8K's final number alone (the text after `####`, no
  reasoning), e.g. `Q: ...\\nA: 72\\n`. Alphabet: the digits 0-9 and the newline.
- `csqa_answer_prob`: `Q: {stem}\\n(A) {choice}\\n...(E) {choice}\\nA: C\\n`. Alphabet: the letters
  A-E (as tokenised after a space) and the newline.

At every answer token that is in the alphabet the model's distribution is restricted to the alphabet
and renormalised; the item's score is the product of the true tokens' renormalised probabilities
(the whole answer, closing newline included). Answer tokens outside the alphabet (the space before a
number, a minus sign) are skipped, as the official code skips them. Metrics: `answer_prob`, the mean
of that product (the official "accuracy"), and `acc`, the share of items whose every scored token is
the most likely in its alphabet (for CSQA: the gold letter beats the other four).

With thoughts (decoding variant `thoughts`, a Quiet-STaR model) the scored positions use the
thought-mixed logits, as the official eval thinks at every token. A thought at position t reads
tokens <= t only, so thoughts are computed at the scored positions alone, which gives the same
logits there. Thought tokens are sampled at the model's `eval_thought_temperature` (greedy by
default; the official eval samples at temperature 1, see `ThoughtConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from evals.csqa import LETTERS, Question
from evals.decoding import DecodingConfig
from evals.metrics import mean_and_stderr
from evals.model import EvalModel
from evals.results import Metric, TaskResult, prompts_hash, timed

TASKS = ("gsm8k_answer_prob", "csqa_answer_prob")
LABEL = "answer probability (official Quiet-STaR metric)"
DIGITS = tuple("0123456789") + ("\n",)
LETTER_SYMBOLS = tuple(f" {letter}" for letter in LETTERS) + ("\n",)


@dataclass
class AnswerItem:
    """One answer-probability text, split where the scored answer starts."""

    context: str
    """Everything up to and including `A:`."""
    answer: str
    """What follows: ` 72\\n` or ` C\\n`."""


def gsm8k_item(row: dict[str, str]) -> AnswerItem:
    """`Q: {question}\\nA:` and the final number after `####` with a closing newline."""
    return AnswerItem(f"Q: {row['question']}\nA:", " " + row["answer"].split("####")[-1].strip() + "\n")


def csqa_item(q: Question) -> AnswerItem:
    """The official CSQA prompt: the stem, `(A) choice` lines, `A:`; the answer is the gold letter."""
    choices = "\n".join(f"({letter}) {text}" for letter, text in zip(LETTERS, q.choices))
    return AnswerItem(f"Q: {q.stem}\n{choices}\nA:", f" {q.answer}\n")


def alphabet_ids(model: EvalModel, symbols: tuple[str, ...]) -> list[int]:
    """The token of each symbol as it appears in an answer: the last token of its encoding (a tokenizer
    that splits ` C` into ` ` + `C` scores `C`, and skips the space like the official code)."""
    ids = [model.encode(s)[-1] for s in symbols]
    if len(set(ids)) != len(ids):
        raise ValueError(f"the tokenizer of {model.source} maps answer symbols {symbols} to repeated ids {ids}")
    return ids


def answer_probability(model: EvalModel, item: AnswerItem, symbols: tuple[str, ...], think: bool = False
                       ) -> tuple[float, bool]:
    """(product of the renormalised probabilities of the answer's alphabet tokens, whether each was
    the alphabet's argmax) for one item."""
    alphabet = alphabet_ids(model, symbols)
    context, whole = model.encode(item.context), model.encode(item.context + item.answer)
    if whole[:len(context)] != context:
        raise ValueError(f"the answer {item.answer!r} merges with the end of its context when tokenised")
    answer = whole[len(context):]
    scored = [k for k, token in enumerate(answer) if token in alphabet]
    expected = sum(item.answer.count(s) for s in symbols)
    if len(scored) != expected:
        raise ValueError(f"answer {item.answer!r} has {expected} symbols of {symbols} but {len(scored)} of its tokens are "
                         f"single alphabet tokens: the tokenizer of {model.source} merges them (the metric needs "
                         "digits and letters tokenised on their own, as Mistral's and SmolLM2's tokenizers do)")
    limit = model.block_size - (model.net.thought_config.n_ahead - 1 if think else 0)
    if len(whole) > limit:
        raise ValueError(f"item of {len(whole)} tokens does not fit block_size={model.block_size}"
                         + (" with a thought" if think else ""))
    ids = torch.tensor([whole], device=model.device)
    positions = torch.tensor([len(context) + k - 1 for k in scored], device=model.device)  # each predicts its token
    if think:
        logits = model.net.next_token_logits(ids, think=True, positions=positions)[0]
    else:
        logits = model.lm.lm_head(model.lm.hidden(model.lm.embed(ids))[0, positions])
    logprobs = logits[:, alphabet].float().log_softmax(-1)
    target = torch.tensor([alphabet.index(answer[k]) for k in scored], device=model.device)
    chosen = logprobs.gather(-1, target[:, None]).squeeze(-1)
    return chosen.sum().exp().item(), bool((logprobs.argmax(-1) == target).all())


@torch.inference_mode()
def evaluate(model: EvalModel, items: list[AnswerItem], task: str, decoding: DecodingConfig,
             progress: bool = True) -> TaskResult:
    """`answer_prob` and `acc` over `items` (see the module docstring); `decoding.variant` "thoughts"
    scores with thought-mixed logits, any other with the plain LM."""
    if task not in TASKS:
        raise ValueError(f"unknown answer-probability task {task!r}; choose one of {', '.join(TASKS)}")
    think = decoding.variant == "thoughts"
    if think and not model.has_thoughts:
        raise ValueError(f"{task} with thoughts needs a Quiet-STaR model; {model.source} is a plain "
                         f"{type(model.net).__name__}")
    symbols = DIGITS if task == "gsm8k_answer_prob" else LETTER_SYMBOLS
    with timed() as clock:
        scores = [answer_probability(model, item, symbols, think)
                  for item in tqdm(items, desc=task, disable=not progress)]
    tokens = sum(len(model.encode(item.context + item.answer)) for item in items)
    prompts = [item.context for item in items]
    return TaskResult(
        task=task, version="1.0", n_shot=0, decoding=decoding.label,
        metrics=[Metric("none", "answer_prob", *mean_and_stderr([p for p, _ in scores])),
                 Metric("none", "acc", *mean_and_stderr([float(ok) for _, ok in scores]))],
        n=len(items), prompts_hash=prompts_hash(prompts), seconds=clock.seconds, scored_tokens=tokens,
        samples=[{"prompt": item.context, "answer": item.answer, "answer_prob": p, "argmax": ok}
                 for item, (p, ok) in zip(items, scores)],
    )
