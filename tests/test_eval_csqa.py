"""CommonsenseQA evaluation and the log-likelihood scoring under it: lm-eval's contract, prefix sharing."""

from __future__ import annotations

import json

import pytest
import torch

from evals import csqa
from evals.decoding import DecodingConfig
from evals.model import EvalModel
from evals.scoring import encode_pairs, loglikelihood, loglikelihood_rolling
from modeldefs import ModelConfig, Transformer
from tests.test_eval_decoding import MOD, tiny_model


def full_forward_score(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """The summed log-probability by one plain forward over context + continuation."""
    ids = torch.tensor([context + continuation[:-1]])
    with torch.no_grad():
        logprobs = model.net(ids)[0, len(context) - 1:].log_softmax(-1)
    target = torch.tensor(continuation)
    return logprobs.gather(-1, target[:, None]).sum().item(), bool((logprobs.argmax(-1) == target).all())


REQUESTS = [  # three contexts, continuations of 1-4 tokens, two requests repeated
    ([5, 17, 99, 3], [65]), ([5, 17, 99, 3], [66, 67]), ([5, 17, 99, 3], [68, 69, 70, 71]),
    ([42], [1]), ([7] * 12, [9, 9, 9]), ([42], [2, 3]), ([5, 17, 99, 3], [65]),
]


@pytest.mark.parametrize("overrides,pack", [({}, 512), (MOD, 512), (MOD, 2)], ids=["dense", "mod", "mod-one-per-row"])
def test_batched_prefix_shared_scores_equal_plain_full_forward_scores(overrides, pack):
    model = tiny_model(**overrides)
    batched = loglikelihood(model, REQUESTS, batch_size=2, pack_tokens=pack)
    one_by_one = [loglikelihood(model, [r], batch_size=1)[0] for r in REQUESTS]
    reference = [full_forward_score(model, c, k) for c, k in REQUESTS]
    for got, single, want in zip(batched, one_by_one, reference):
        assert got[0] == pytest.approx(want[0], abs=1e-4) and single[0] == pytest.approx(want[0], abs=1e-4)
        assert got[1] == want[1] == single[1]
    assert batched[0] == batched[-1]


@pytest.mark.parametrize("overrides", [{}, MOD], ids=["dense", "mod"])
@pytest.mark.parametrize("pack", [16, 40, 512], ids=["split-groups", "few-per-row", "rows-as-wide-as-the-longest-group"])
def test_packed_rows_score_each_request_as_it_would_alone(overrides, pack):
    """Multi-token continuations sharing a context, contexts from 1 to 30 tokens, several contexts in a
    row and a context whose continuations do not fit one row: every score equals the plain forward's."""
    model = tiny_model(**overrides)
    contexts = [[(i * 13 + n) % 250 + 1 for i in range(n)] for n in (30, 1, 9, 3, 17)]
    requests = [(c, [(j * 31 + len(c)) % 250 + 1 for j in range(k)]) for c in contexts for k in (1, 2, 5, 7)]
    packed = loglikelihood(model, requests, batch_size=3, pack_tokens=pack)
    for (context, continuation), (score, greedy) in zip(requests, packed):
        want, want_greedy = full_forward_score(model, context, continuation)
        assert score == pytest.approx(want, abs=1e-4) and greedy == want_greedy


def test_a_confident_bf16_model_scores_no_log_probability_above_zero():
    """In bf16 the head's logits are rounded to 8 bits; the target's logit must be rounded too, or it can exceed
    the log-normaliser computed from the rounded logits (a probability above 1; on SmolLM2-135M in bf16, 6 of 45
    three-token requests scored up to +0.2)."""
    model = tiny_model()
    with torch.no_grad():
        model.net.lm_head.weight.mul_(40)  # logits of ~30, the top token's probability ~1
    model.net.to(torch.bfloat16)
    model.dtype = torch.bfloat16
    requests = []
    with torch.no_grad():
        for start in range(40):
            context = [(start * 7 + i * 13) % 255 + 1 for i in range(5)]
            requests.append((context, [int(model.net(torch.tensor([context]))[0, -1].argmax())]))
    scores = [score for score, _ in loglikelihood(model, requests)]
    assert max(scores) <= 0, scores


def test_the_head_in_chunks_of_a_few_slots_scores_as_in_one(monkeypatch):
    """Each target's logit is read from the chunk of slots its context ends in."""
    model = tiny_model()
    whole = loglikelihood(model, REQUESTS)
    monkeypatch.setattr("evals.scoring.HEAD_CHUNK", 2)
    chunked = loglikelihood(model, REQUESTS)
    assert [score for score, _ in chunked] == pytest.approx([score for score, _ in whole], abs=1e-5)
    assert [greedy for _, greedy in chunked] == [greedy for _, greedy in whole]


def test_greedy_flag_is_true_for_the_models_own_greedy_continuation():
    model = tiny_model()
    context = [5, 17, 99, 3]
    with torch.no_grad():
        first = int(model.net(torch.tensor([context]))[0, -1].argmax())
        second = int(model.net(torch.tensor([context + [first]]))[0, -1].argmax())
    (score, greedy), (_, other) = loglikelihood(model, [(context, [first, second]), (context, [first, (second + 1) % 256])])
    assert greedy and not other and score < 0


def test_empty_context_starts_from_the_prefix_token_and_rolling_covers_every_token():
    model = tiny_model()  # byte tokenizer: EOS (0) is the prefix token
    tokens = list(range(1, 40))
    (rolling,) = loglikelihood_rolling(model, [tokens])
    assert rolling == pytest.approx(full_forward_score(model, [0], tokens)[0], abs=1e-4)
    assert loglikelihood(model, [([], tokens)])[0][0] == pytest.approx(rolling, abs=1e-5)


def test_rolling_windows_longer_than_the_context_add_up():
    model = tiny_model()  # block_size 128
    tokens = [(i * 7) % 250 + 1 for i in range(300)]
    (rolling,) = loglikelihood_rolling(model, [tokens], pack_tokens=50)
    full = [0, *tokens]
    windows = [full_forward_score(model, full[max(0, e - 128):s + 1], full[s + 1:e + 1])[0]
               for s, e in [(0, 128), (128, 256), (256, 300)]]
    assert rolling == pytest.approx(sum(windows), abs=1e-3)


def test_no_requests_score_to_no_results_and_an_empty_text_to_zero():
    """An empty request list gives an empty result (as generation does), and rolling scores of texts that
    tokenise to nothing are 0.0 each (lm-eval's hf backend: no windows), even when no text has a token."""
    model = tiny_model()
    assert encode_pairs(model, []) == [] and loglikelihood(model, []) == []
    assert loglikelihood_rolling(model, [[], []]) == [0.0, 0.0]


def test_encode_pair_moves_trailing_spaces_into_the_continuation():
    model = tiny_model()
    assert encode_pairs(model, [("Answer: ", "A"), ("Answer:", " A")]) == [(list(b"Answer:"), list(b" A"))] * 2


def test_batched_pair_encoding_equals_lm_evals_one_request_at_a_time(smollm2_tokenizer):
    """Two batched tokenizer calls give what lm-eval's hf backend gets encoding each request alone: the
    whole string's ids split after the (space-stripped) context's, merges across the boundary included."""
    model = EvalModel(Transformer(ModelConfig.from_name("tiny")).eval(), smollm2_tokenizer, torch.device("cpu"),
                      torch.float32, "tiny-random")
    pairs = [("Question: Where do you keep milk?\nAnswer:", f" {letter}") for letter in "ABCDE"]
    pairs += [("The price is 3", "4 dollars"), ("Answer: ", "a bank"), ("naïve café  ", "crème"), ("hel", "lo world"),
              ("Question: Where do you keep milk?\nAnswer:", " fridge"), ("<|im_start|>user\nHi<|im_end|>", "\n<|im_start|>as")]

    def alone(context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        context_ids = smollm2_tokenizer.encode(context, add_special_tokens=False)
        return context_ids, smollm2_tokenizer.encode(context + continuation, add_special_tokens=False)[len(context_ids):]

    expected = [alone(c, x) for c, x in pairs]
    assert encode_pairs(model, pairs) == expected
    assert any(c + x != smollm2_tokenizer.encode(ctx, add_special_tokens=False)
               + smollm2_tokenizer.encode(cont, add_special_tokens=False)
               for (c, x), (ctx, cont) in zip(expected, pairs))  # a merge across the boundary is among the cases


def test_batched_encoding_ignores_truncation_and_padding_left_on_the_tokenizers_backend(smollm2_tokenizer_dir):
    """A tokenizer.json may ship with truncation (or padding) on, and a padded or truncated call leaves it on in
    the backend: the tokenizer's own call turns both off first (and passes split_special_tokens on), so
    `encode_batch` must not tokenise under them."""
    from transformers import AutoTokenizer

    texts = ["Question: Natalia sold clips to 48 of her friends in April, and half as many in May.", "hi"]
    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    expected = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    tokenizer.backend_tokenizer.enable_truncation(max_length=8)  # as a tokenizer.json with "truncation" loads
    model = EvalModel(Transformer(ModelConfig.from_name("micro", vocab_size=len(tokenizer))).eval(), tokenizer,
                      torch.device("cpu"), torch.float32, "micro-random")
    assert model.encode_batch([]) == []  # the tokenizer's own call fails on no texts (IndexError)
    assert model.encode_batch(texts) == expected
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer(texts, padding=True)
    assert model.encode_batch(texts) == expected
    tokenizer(texts, truncation=True, max_length=4)
    assert model.encode_batch(texts) == expected and len(expected[0]) > 8
    special = ["<|im_start|>user\nHi<|im_end|>"]
    tokenizer.split_special_tokens = True  # special tokens in the text are then split as plain text
    assert model.encode_batch(special) == tokenizer(special, add_special_tokens=False)["input_ids"]
    assert len(model.encode_batch(special)[0]) > 5


def test_batched_encoding_adds_no_special_tokens_where_the_tokenizer_would(smollm2_tokenizer_dir):
    """A Llama-style tokenizer's post-processor puts BOS before every text it encodes with special tokens;
    `encode_batch`, like `encode`, adds none (plain prompts get no BOS, as lm-eval's hf)."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    bos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="<|endoftext|> $A",
                                                                    special_tokens=[("<|endoftext|>", bos)])
    model = EvalModel(Transformer(ModelConfig.from_name("micro", vocab_size=len(tokenizer))).eval(), tokenizer,
                      torch.device("cpu"), torch.float32, "micro-random")
    texts = ["Question: Where do you keep milk?\nAnswer:", "hi"]
    assert tokenizer(texts)["input_ids"][1][0] == bos  # the tokenizer's own default adds it
    assert model.encode_batch(texts) == [model.encode(t) for t in texts] and bos not in model.encode_batch(texts)[0]


OFFICIAL = {"answerKey": "B", "id": "x", "question": {"question_concept": "c", "stem": " Where do you keep milk? ",
            "choices": [{"label": l, "text": t} for l, t in zip("ABCDE", ["shelf", "fridge", "car", "bed", "sky"])]}}
HUB = {"id": "x", "question": " Where do you keep milk? ", "question_concept": "c", "answerKey": "B",
       "choices": {"label": list("ABCDE"), "text": ["shelf", "fridge", "car", "bed", "sky"]}}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_both_schemas_load_to_the_same_questions(tmp_path):
    official = csqa.load(write_jsonl(tmp_path / "official.jsonl", [OFFICIAL]))
    hub = csqa.load(write_jsonl(tmp_path / "hub.jsonl", [HUB]))
    assert official == hub == [csqa.Question(" Where do you keep milk? ", ["shelf", "fridge", "car", "bed", "sky"], "B")]


def test_prompts_match_lm_eval():
    q = csqa._question(HUB, "x")
    assert csqa.letter_prompt(q) == ("Question: Where do you keep milk?\nA. shelf\nB. fridge\nC. car\nD. bed\nE. sky\n"
                                     "Answer:")
    assert csqa.cloze_prompt(q) == "Question: Where do you keep milk?\nAnswer:"


def test_local_validation_file_has_1221_answered_questions():
    from tests.conftest import shared_file

    questions = csqa.load(str(shared_file("commonsense_qa/dev_rand_split.jsonl")))
    assert len(questions) == 1221 and all(len(q.choices) == 5 for q in questions)


def test_missing_file_and_unlabelled_records_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="CommonsenseQA file not found: .*nope.jsonl"):
        csqa.load(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match="answerKey"):
        csqa.load(write_jsonl(tmp_path / "test.jsonl", [{**HUB, "answerKey": ""}]))
    (tmp_path / "broken.jsonl").write_text('{"question": ')
    with pytest.raises(ValueError, match="broken.jsonl:1: malformed JSON"):
        csqa.load(str(tmp_path / "broken.jsonl"))
    with pytest.raises(ValueError, match=r"null.jsonl:1: the question stem must be a non-empty string, got None"):
        csqa.load(write_jsonl(tmp_path / "null.jsonl", [{**HUB, "question": None}]))
    choices = {"label": list("ABCDE"), "text": ["shelf", "", "car", "bed", "sky"]}
    with pytest.raises(ValueError, match="blank.jsonl:2: the choice B must be a non-empty string"):
        csqa.load(write_jsonl(tmp_path / "blank.jsonl", [HUB, {**HUB, "choices": choices}]))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl holds no CommonsenseQA records"):
        csqa.load(str(tmp_path / "empty.jsonl"))


@pytest.mark.parametrize("completion,letter", [
    (" B", "B"), (" The answer is C.", "C"), (" (E) sky", "E"), (" A fridge", "A"), (" I think so", None),
    (" A person would go to the store, so the answer is C.", "C"), (" A shelf holds it. Answer: (D)", "D"),
    (" Answer: B. A bed is soft.", "B"),
    # a lower-case letter after "answer is" is an article, not a stated answer (and never equals a label A-E)
    (" The answer is a bank, so B.", "B"), (" the answer is a dog", None),
])
def test_generated_letter_is_the_stated_answer_else_the_first_standalone_a_to_e(completion, letter):
    assert csqa.extract_letter(completion) == letter
    span = csqa.letter_span(completion)
    assert (completion[slice(*span)] if span else None) == letter


def test_csqa_protocols_pick_the_argmax_of_hand_computed_log_likelihoods(smollm2_tokenizer):
    torch.manual_seed(0)
    net = Transformer(ModelConfig.from_name("tiny", n_layer=2)).eval()
    model = EvalModel(net, smollm2_tokenizer, torch.device("cpu"), torch.float32, "tiny-random")
    questions = [csqa._question(HUB, "x"), csqa.Question("What is red?", ["apple", "sky", "grass", "sea", "snow"], "A")]

    def by_hand(context: str, option: str) -> float:  # one plain forward over the lm-eval token split
        ((c, k),) = encode_pairs(model, [(context, " " + option)])
        return full_forward_score(model, c, k)[0]

    letters = csqa.evaluate(model, questions, "csqa", DecodingConfig(), progress=False)
    cloze = csqa.evaluate(model, questions, "csqa_cloze", DecodingConfig(), progress=False)
    for q, s_letter, s_cloze in zip(questions, letters.samples, cloze.samples):
        hand = [by_hand(csqa.letter_prompt(q), letter) for letter in csqa.LETTERS]
        assert s_letter["scores"] == pytest.approx(hand, abs=1e-4)
        assert s_letter["pred"] == csqa.LETTERS[max(range(5), key=hand.__getitem__)]
        hand = [by_hand(csqa.cloze_prompt(q), choice) for choice in q.choices]
        assert s_cloze["pred"] == csqa.LETTERS[max(range(5), key=hand.__getitem__)]
        normed = [h / len(c) for h, c in zip(hand, q.choices)]
        assert s_cloze["pred_norm"] == csqa.LETTERS[max(range(5), key=normed.__getitem__)]
    accuracy = {m.name: m.value for m in cloze.metrics}
    assert set(accuracy) == {"acc", "acc_norm"}
    assert accuracy["acc"] == sum(s["pred"] == q.answer for s, q in zip(cloze.samples, questions)) / 2
    assert letters.n == 2 and len(letters.prompts_hash) == 16
    # the tokens the model read: each question's context once (its five options share it), then the options
    for result, prompt, options in ((letters, csqa.letter_prompt, lambda q: csqa.LETTERS),
                                    (cloze, csqa.cloze_prompt, lambda q: q.choices)):
        pairs = encode_pairs(model, [(prompt(q), " " + option) for q in questions for option in options(q)])
        assert result.scored_tokens == sum(len(c) for c, _ in pairs[::5]) + sum(len(k) for _, k in pairs)
