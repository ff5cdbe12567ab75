"""CommonsenseQA evaluation and the log-likelihood scoring under it: lm-eval's contract, prefix sharing."""

from __future__ import annotations

import pytest
import torch

from evals.scoring import encode_pair, loglikelihood, loglikelihood_rolling
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


@pytest.mark.parametrize("overrides", [{}, MOD], ids=["dense", "mod"])
def test_batched_prefix_shared_scores_equal_plain_full_forward_scores(overrides):
    model = tiny_model(**overrides)
    batched = loglikelihood(model, REQUESTS, batch_size=2)
    one_by_one = [loglikelihood(model, [r], batch_size=1)[0] for r in REQUESTS]
    reference = [full_forward_score(model, c, k) for c, k in REQUESTS]
    for got, single, want in zip(batched, one_by_one, reference):
        assert got[0] == pytest.approx(want[0], abs=1e-4) and single[0] == pytest.approx(want[0], abs=1e-4)
        assert got[1] == want[1] == single[1]
    assert batched[0] == batched[-1]


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
    (rolling,) = loglikelihood_rolling(model, [tokens])
    full = [0, *tokens]
    windows = [full_forward_score(model, full[max(0, e - 128):s + 1], full[s + 1:e + 1])[0]
               for s, e in [(0, 128), (128, 256), (256, 300)]]
    assert rolling == pytest.approx(sum(windows), abs=1e-3)


def test_encode_pair_moves_trailing_spaces_into_the_continuation():
    model = tiny_model()
    assert encode_pair(model, "Answer: ", "A") == (list(b"Answer:"), list(b" A"))
    assert encode_pair(model, "Answer:", " A") == (list(b"Answer:"), list(b" A"))
