"""GSM8K evaluation pieces: lm-eval's prompt, answer extraction, exact match, few-shot draws, data."""

from __future__ import annotations

from pathlib import Path

import pytest

from evals import gsm8k
from evals.metrics import mean_and_stderr

REFERENCE = "She has 3 + 4 = <<3+4=7>>7 apples.\n#### 1,250"


@pytest.mark.parametrize("completion,strict,flexible", [
    (" She has 1,250 apples.\n#### 1,250", "1,250", "1,250"),
    (" It costs $1,250.", "[invalid]", "$1,250."),
    (" 3 + 4 = 7, so the answer is 1250.\n\nQuestion:", "[invalid]", "1250."),
    (" #### -5", "-5", "-5"),
    (" #### 2.50 dollars", "2.50", "2.50"),
    (" first 12 then #### 7 and later 9", "7", "9"),
    (" I do not know.", "[invalid]", "[invalid]"),
    (" The answer is 8", "[invalid]", "8"),
])
def test_extraction_matches_lm_eval_regexes(completion, strict, flexible):
    assert gsm8k.extract_strict(completion) == strict
    assert gsm8k.extract_flexible(completion) == flexible


@pytest.mark.parametrize("prediction,correct", [
    ("1,250", True), ("$1,250.", True), ("1250", True), ("1250.0", False), ("-1250", False), ("[invalid]", False),
])
def test_exact_match_normalises_commas_dollars_and_trailing_periods(prediction, correct):
    assert gsm8k.exact_match(prediction, REFERENCE) is correct


def test_prompt_is_lm_eval_format():
    shots = [{"question": "Q1?", "answer": "A1\n#### 1"}, {"question": "Q2?", "answer": "A2\n#### 2"}]
    assert gsm8k.prompt("Q?", shots) == "Question: Q1?\nAnswer: A1\n#### 1\n\nQuestion: Q2?\nAnswer: A2\n#### 2\n\nQuestion: Q?\nAnswer:"
    assert gsm8k.prompt("Q?", []) == "Question: Q?\nAnswer:"


def test_chat_prompt_puts_shots_in_turns(smollm2_tokenizer):
    text = gsm8k.chat_prompt("Q?", [{"question": "Q1?", "answer": "A1\n#### 1"}], smollm2_tokenizer)
    assert text.index("Question: Q1?") < text.index("A1\n#### 1") < text.index("Question: Q?")
    assert text.endswith("<|im_start|>assistant\n")


def test_fewshot_draw_is_deterministic_and_excludes_the_test_question():
    train = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(50)]
    questions = [f"q{i}" for i in range(50)]  # each test question is also a training one here
    first = gsm8k.fewshot_draws(train, 5, seed=1234, questions=questions)
    assert first == gsm8k.fewshot_draws(train, 5, seed=1234, questions=questions)
    assert first != gsm8k.fewshot_draws(train, 5, seed=1235, questions=questions)
    assert all(len(shots) == 5 for shots in first)
    assert all(s["question"] != q for q, shots in zip(questions, first) for s in shots)
    with pytest.raises(ValueError, match="at least 51 training problems"):
        gsm8k.fewshot_draws(train, 51, seed=1234, questions=questions)


def test_fewshot_prompts_equal_lm_evals_gsm8k_prompts_at_the_same_seed():
    pytest.importorskip("lm_eval", reason="lm-eval is an optional extra: pip install -e '.[lmeval]'")
    from lm_eval.tasks import TaskManager, get_task_dict

    from tests.conftest import shared_file

    test = gsm8k.load(str(shared_file("gsm8k/test.jsonl")))[:8]
    train = gsm8k.load(str(shared_file("gsm8k/train.jsonl")))
    tasks = TaskManager(include_path=str(Path(gsm8k.__file__).parent / "lm_eval_tasks"), include_defaults=False)
    task = get_task_dict(["gsm8k_local"], tasks)["gsm8k_local"]
    task.set_fewshot_seed(seed=1234)  # what lm_eval.simple_evaluate does with its default seed
    task.build_all_requests(limit=len(test))
    theirs = [request.args[0] for request in sorted(task.instances, key=lambda request: request.doc_id)]
    draws = gsm8k.fewshot_draws(train, 5, seed=1234, questions=[row["question"] for row in test])
    assert [gsm8k.prompt(row["question"], shots) for row, shots in zip(test, draws)] == theirs


def test_local_test_file_loads_with_its_answers():
    from tests.conftest import shared_file

    rows = gsm8k.load(str(shared_file("gsm8k/test.jsonl")))
    assert len(rows) == 1319
    assert all(gsm8k.extract_strict(r["answer"]) != gsm8k.INVALID for r in rows)
    assert all(gsm8k.exact_match(gsm8k.extract_strict(r["answer"]), r["answer"]) for r in rows)


def test_missing_file_and_bad_rows_are_clear_errors_naming_the_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="GSM8K file not found: .*nope.jsonl"):
        gsm8k.load(str(tmp_path / "nope.jsonl"))
    good = '{"question": "1+1?", "answer": "#### 2"}'
    for bad, message in [('{"question": "2+2?"}', "field 'answer'"), ('{"answer": "#### 4"}', "field 'question'"),
                         ('{"question": "2+2?", "answer": ', "malformed JSON"),
                         ('{"question": "2+2?", "answer": "four"}', "answer ends with '#### <number>'"),
                         ('{"question": "caf\xe9?", "answer": "#### 4"}', "not UTF-8 text \\(byte 0xe9 at column 18\\)")]:
        path = tmp_path / "rows.jsonl"
        path.write_bytes(f"{good}\n\n".encode() + bad.encode("latin-1") + b"\n")  # latin-1: the one non-UTF-8 row
        with pytest.raises(ValueError, match=f"rows.jsonl:3: .*{message}"):
            gsm8k.load(str(path))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty.jsonl holds no GSM8K problems"):
        gsm8k.load(str(tmp_path / "empty.jsonl"))


def test_a_file_that_starts_with_a_byte_order_mark_reads_its_first_row(tmp_path):
    """Windows tools (Notepad, PowerShell 5) start a UTF-8 file with a BOM; lm-eval's `datasets` reads such a file."""
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + '{"question": "1+1?", "answer": "#### 2"}\n'.encode())
    assert [row["question"] for row in gsm8k.load(str(path))] == ["1+1?"]


def test_mean_and_stderr():
    mean, stderr = mean_and_stderr([1, 0, 1, 1])
    assert mean == 0.75 and stderr == pytest.approx((0.25 / 4) ** 0.5)
    with pytest.raises(ValueError):
        mean_and_stderr([])
