"""Answer probability (official Quiet-STaR metric): renormalisation over the answer alphabet, by hand."""

from __future__ import annotations

import pytest
import torch

from evals import answer_prob
from evals.csqa import Question
from evals.decoding import DecodingConfig
from tests.test_eval_decoding import quietstar_model, tiny_model


def full_softmax(model, text: str) -> torch.Tensor:
    """Probabilities (T, V) over the whole vocabulary from one plain forward over `text`."""
    with torch.no_grad():
        return model.net(torch.tensor([model.encode(text)]))[0].softmax(-1)


def test_gsm8k_item_is_q_a_with_the_final_number_only():
    item = answer_prob.gsm8k_item({"question": "2+3?", "answer": "2+3=5\n#### 5"})
    assert (item.context, item.answer) == ("Q: 2+3?\nA:", " 5\n")


def test_gsm8k_answer_prob_is_the_product_of_digit_and_newline_probabilities_renormalised_by_hand():
    model = tiny_model()  # byte tokenizer: " 42\n" is " ", "4", "2", "\n"
    item = answer_prob.AnswerItem("Q: 40+2?\nA:", " 42\n")
    probs = full_softmax(model, item.context + item.answer)
    alphabet = [ord(c) for c in "0123456789\n"]
    n = len(item.context)  # the space after "A:" is at n and is skipped; "4" at n+1, "2" at n+2, "\n" at n+3
    expected, argmax = 1.0, True
    for position in (n + 1, n + 2, n + 3):
        row = probs[position - 1, alphabet] / probs[position - 1, alphabet].sum()
        true = alphabet.index(model.encode(item.context + item.answer)[position])
        expected *= row[true].item()
        argmax &= int(row.argmax()) == true
    got, got_argmax = answer_prob.answer_probability(model, item, answer_prob.DIGITS)
    assert got == pytest.approx(expected, rel=1e-5) and got_argmax == argmax
    assert 0 < got < 1


def test_csqa_answer_prob_renormalises_over_the_five_letters_and_newline():
    model = tiny_model()
    question = Question(stem="Where?", choices=["a", "b", "c", "d", "e"], answer="C")
    item = answer_prob.csqa_item(question)
    assert item.context == "Q: Where?\n(A) a\n(B) b\n(C) c\n(D) d\n(E) e\nA:" and item.answer == " C\n"
    probs = full_softmax(model, item.context + item.answer)
    alphabet = [ord(c) for c in "ABCDE\n"]  # byte tokenizer: " C" ends in "C"; the space is skipped
    n = len(item.context)
    letter = probs[n, alphabet] / probs[n, alphabet].sum()  # position n (the space) predicts "C" at n+1
    newline = probs[n + 1, alphabet] / probs[n + 1, alphabet].sum()
    got, got_argmax = answer_prob.answer_probability(model, item, answer_prob.LETTER_SYMBOLS)
    assert got == pytest.approx(letter[2].item() * newline[5].item(), rel=1e-5)
    assert got_argmax == (int(letter.argmax()) == 2 and int(newline.argmax()) == 5)


def test_thoughts_at_the_answer_positions_only_equal_thoughts_at_every_token():
    model = quietstar_model()
    item = answer_prob.AnswerItem("Q: 7*6?\nA:", " 42\n")
    ids = torch.tensor([model.encode(item.context + item.answer)])
    n = len(item.context)
    with torch.no_grad():
        everywhere = model.net.next_token_logits(ids)[0, n:n + 3]
    alphabet = [ord(c) for c in "0123456789\n"]
    expected = 1.0
    for row, token in zip(everywhere[:, alphabet].softmax(-1), "42\n"):
        expected *= row[alphabet.index(ord(token))].item()
    with_thoughts, _ = answer_prob.answer_probability(model, item, answer_prob.DIGITS, think=True)
    plain, _ = answer_prob.answer_probability(model, item, answer_prob.DIGITS, think=False)
    assert with_thoughts == pytest.approx(expected, rel=1e-4)
    assert with_thoughts != pytest.approx(plain, rel=1e-3)


def test_evaluate_reports_mean_answer_prob_and_argmax_accuracy():
    model = tiny_model()
    rows = [{"question": f"{a}+1?", "answer": f"#### {a + 1}"} for a in (3, 10, 41)]
    items = [answer_prob.gsm8k_item(r) for r in rows]
    result = answer_prob.evaluate(model, items, "gsm8k_answer_prob", DecodingConfig(), progress=False)
    singles = [answer_prob.answer_probability(model, item, answer_prob.DIGITS) for item in items]
    metrics = {m.name: m.value for m in result.metrics}
    assert metrics["answer_prob"] == pytest.approx(sum(p for p, _ in singles) / 3)
    assert metrics["acc"] == sum(ok for _, ok in singles) / 3 and result.n == 3
    with pytest.raises(ValueError, match="needs a Quiet-STaR model"):
        answer_prob.evaluate(model, items, "gsm8k_answer_prob", DecodingConfig(variant="thoughts"), progress=False)


def test_a_tokenizer_that_merges_digits_is_a_clear_error():
    model = tiny_model()

    class MergingTokenizer(type(model.tokenizer)):
        def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
            return list(text.replace("42", "#").encode())  # "42" as one token that is not a digit

    model.tokenizer = MergingTokenizer()
    with pytest.raises(ValueError, match="merges them"):
        answer_prob.answer_probability(model, answer_prob.AnswerItem("Q: x\nA:", " 42\n"), answer_prob.DIGITS)


def test_cli_runs_both_answer_prob_tasks_with_and_without_thoughts_labelled(smollm2_tokenizer_dir, tmp_path, capsys):
    from evals.cli import main, run_parser
    from modeldefs import ModelConfig, Transformer
    from modeldefs.quietstar import QuietStar, ThoughtConfig
    from tests.test_eval_cli import run_args

    torch.manual_seed(0)
    model = QuietStar(Transformer(ModelConfig.from_name("tiny", n_layer=2, block_size=512)),
                      ThoughtConfig(n_ahead=4, n_ahead_talk=1), init_token_id=0)
    checkpoint = tmp_path / "quietstar.ckpt"
    torch.save({"model_config": model.lm.config.to_dict(), "thought_config": model.thought_config.to_dict(),
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, checkpoint)
    main(run_args(checkpoint, smollm2_tokenizer_dir, tmp_path, "--tasks", "gsm8k_answer_prob", "csqa_answer_prob",
                  "--decoding", "greedy", "thoughts"))
    out = capsys.readouterr().out
    for task in ("gsm8k_answer_prob", "csqa_answer_prob"):
        for decoding in ("greedy", "thoughts"):
            assert f"{decoding}] {task} 0-shot n=2: none/answer_prob" in out
    assert "official Quiet-STaR metric" in run_parser().format_help()
