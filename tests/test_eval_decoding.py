"""Evaluation decoding: batched left-padded greedy generation, stop strings, CoT-decoding, thoughts."""

from __future__ import annotations

import pytest
import torch

from evals import decoding, gsm8k
from evals.batching import compact_cache_rows
from evals.decoding import (CotResult, DecodingConfig, _choose, answer_confidence, completion, cot_decode,
                            cut_at_stop, decode_completions, generate, generate_thoughts, generate_tokens)
from evals.model import EvalModel
from evals.scoring import loglikelihood
from modeldefs import ModelConfig, Transformer
from modeldefs.attention import KVCache
from modeldefs.generate import generate as reference_generate


class ByteTokenizer:
    """Bytes as tokens (ids 0-255) for the 256-token `micro` models; id 0 is EOS."""

    eos_token_id, bos_token_id, name_or_path = 0, None, "bytes"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode())

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict[str, list[list[int]]]:
        return {"input_ids": [list(t.encode()) for t in texts]}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return bytes(ids).decode(errors="replace")

    def __len__(self) -> int:
        return 256


def tiny_model(**overrides) -> EvalModel:
    """A random `micro` model (dense, or Mixture-of-Depths with overrides) with the byte tokenizer."""
    torch.manual_seed(0)
    net = Transformer(ModelConfig.from_name("micro", **overrides)).eval()
    return EvalModel(net, ByteTokenizer(), torch.device("cpu"), torch.float32, "micro-random")


MOD = dict(n_layer=4, mod_capacity=0.5, mod_route_every=1, mod_exempt_first=False, mod_exempt_last=False)
PROMPTS = [[5, 17, 99, 3], [42], [7, 7, 7, 7, 7, 7, 7, 7, 7, 120], [200, 1, 2]]


def reference(model: EvalModel, prompt: list[int], n: int) -> list[int]:
    out = reference_generate(model.net, torch.tensor([prompt]), n, eos_id=model.eos_id)[0, len(prompt):].tolist()
    return out[:out.index(0)] if 0 in out else out


@pytest.mark.parametrize("overrides,chunk", [({}, 256), (MOD, 256), (MOD, 3)], ids=["dense", "mod", "mod-chunked-prefill"])
def test_batched_left_padded_greedy_equals_unbatched_generate(overrides, chunk):
    model = tiny_model(**overrides)
    batched = generate_tokens(model, PROMPTS, max_new_tokens=16, batch_size=4, prefill_chunk=chunk)
    assert batched == [reference(model, p, 16) for p in PROMPTS]
    assert any(len(t) == 16 for t in batched)


def test_mod_model_routes_some_tokens_and_skips_others_while_decoding():
    model = tiny_model(**MOD)
    generate_tokens(model, PROMPTS, max_new_tokens=4, batch_size=4)
    selected = torch.cat([b.routing.selected.flatten() for b in model.lm.routed_blocks.values()])
    assert selected.any() and not selected.all()


def test_stop_string_cuts_the_text_and_finished_rows_leave_the_batch_without_changing_the_others():
    model = tiny_model()
    full = generate(model, PROMPTS, max_new_tokens=16, batch_size=4)
    stop = full[0][5:7]
    stopped = generate(model, PROMPTS, max_new_tokens=16, stop=[stop], batch_size=4)
    assert stopped[0] == full[0][:full[0].index(stop)]
    assert stopped == [cut_at_stop(text, [stop]) for text in full]


def test_rows_finishing_at_different_steps_leave_the_batch_without_changing_the_others():
    model = tiny_model()
    prompts = PROMPTS * 2  # 8 rows; each leaves the batch as it finishes
    full = generate(model, prompts, max_new_tokens=16, batch_size=8)
    stops = [text[3 + i:5 + i] for i, text in enumerate(full[:4])]  # rows end after different steps
    stopped = generate(model, prompts, max_new_tokens=16, stop=stops, batch_size=8)
    assert stopped == [cut_at_stop(text, stops) for text in full]
    assert len({len(text) for text in stopped}) > 2


MANY = [[(7 * i + 3 * j) % 250 + 1 for j in range(2 + (5 * i) % 11)] for i in range(14)]  # 14 prompts, 2-12 tokens


@pytest.fixture
def shifts(monkeypatch) -> list[tuple[int, int]]:
    """(first, end) of every move of the decoding cache's slots to its front, recorded as decoding runs."""
    moves: list[tuple[int, int]] = []
    shift = decoding.shift_cache_slots
    monkeypatch.setattr(decoding, "shift_cache_slots", lambda *args: moves.append(args[1:]) or shift(*args))
    return moves


@pytest.mark.parametrize("overrides", [{}, MOD], ids=["dense", "mod"])
def test_rows_take_the_next_prompt_as_they_finish_and_move_to_the_cache_front(overrides, shifts):
    """14 prompts through 3 rows: rows finish at different steps (stop strings), take the next prompt
    at once, and the cache's slots shift many times; every completion is what the prompt gets alone."""
    model = tiny_model(**overrides)
    alone = [generate(model, [p], max_new_tokens=12)[0] for p in MANY]
    stops = ["K", "6", "y", "%"]  # ASCII: a byte's replacement character decodes differently in a short window
    shifts.clear()  # count the batched run's moves only
    streamed = generate(model, MANY, max_new_tokens=12, stop=stops, batch_size=3)
    assert streamed == [cut_at_stop(text, stops) for text in alone]
    assert len({len(text) for text in streamed}) > 3 and len(shifts) >= 2
    assert generate_tokens(model, MANY, max_new_tokens=12, batch_size=3) == [reference(model, p, 12) for p in MANY]


@pytest.mark.parametrize("overrides", [{}, MOD], ids=["dense", "mod"])
def test_waiting_prompts_are_prefilled_together_within_the_chunk_budget(overrides, monkeypatch):
    """Prompts of different lengths share a prefill forward (right-padded to the longest, at most
    prefill_chunk tokens), each once, and each still decodes as it would alone."""
    model = tiny_model(**overrides)
    groups: list[list[int]] = []
    prefill = decoding.prefill_prompts

    def recorded(lm, prompts, *args, **kw):
        groups.append(list(map(len, prompts)))
        return prefill(lm, prompts, *args, **kw)

    monkeypatch.setattr(decoding, "prefill_prompts", recorded)
    assert generate_tokens(model, MANY, max_new_tokens=12, batch_size=3, prefill_chunk=24) == \
        [reference(model, p, 12) for p in MANY]
    assert sorted(n for group in groups for n in group) == sorted(map(len, MANY))
    assert all(len(group) * max(group) <= 24 for group in groups if len(group) > 1)
    assert any(len(set(group)) > 1 for group in groups) and len(groups) < len(MANY) // 2


def test_rows_refill_when_the_context_limit_caps_the_cache(shifts):
    """Prompts at block_size - max_new_tokens leave the cache no spare slots: rows still refill, and
    move to the front when the cache is full even if fewer than max_new_tokens // 2 slots are free."""
    model = tiny_model()  # block_size 128
    prompts = [[(5 * i + j) % 250 + 1 for j in range(116)] for i in range(8)]
    stops = ["y", "%"]
    alone = [generate(model, [p], max_new_tokens=12)[0] for p in prompts]
    shifts.clear()
    assert generate(model, prompts, max_new_tokens=12, stop=stops, batch_size=2) == [cut_at_stop(t, stops) for t in alone]
    assert (3, 128) in shifts  # the full cache moved by 3 slots, below the usual 6
    assert generate_tokens(model, prompts, max_new_tokens=12, batch_size=2) == [reference(model, p, 12) for p in prompts]


def test_cot_branches_split_across_rows_give_what_each_prompt_gets_alone():
    model = tiny_model()
    last_char = lambda text: (len(text) - 1, len(text)) if text else None  # noqa: E731
    prompts = MANY[:4]
    streamed = cot_decode(model, prompts, 10, stop=["ab", "q"], answer_span=last_char, k=4, batch_size=3)
    for prompt, result in zip(prompts, streamed):
        (alone,) = cot_decode(model, [prompt], 10, stop=["ab", "q"], answer_span=last_char, k=4, batch_size=4)
        assert [text for text, _ in result.branches] == [text for text, _ in alone.branches]
        assert [c for _, c in result.branches] == pytest.approx([c for _, c in alone.branches], abs=1e-6)
        assert result.text == alone.text


def test_compacting_the_cache_moves_only_the_alive_rows_past_the_kept_prefix():
    layer = KVCache(6, 1, 4, 2, torch.float32)
    layer.k.copy_(torch.arange(6.0)[:, None, None, None].expand_as(layer.k))
    start = layer.k.data_ptr()
    order = compact_cache_rows([layer], [0, 2, 4, 5])
    assert order == [0, 4, 2, 5]  # rows 4 and 5 fill the finished rows 1 and 3; 0 and 2 stay put
    assert layer.k[:, 0, 0, 0].tolist() == [0.0, 4.0, 2.0, 5.0] and layer.v.size(0) == 4
    assert layer.k.data_ptr() == start  # a view of the first rows, not a copy of the cache


def test_prompts_longer_than_the_context_keep_their_last_tokens():
    model = tiny_model()  # block_size 128
    long_prompt = list(range(1, 200))
    with pytest.warns(UserWarning, match=r"1 of 2 prompts are longer than the 120 tokens .* keep only their last 120"):
        tokens, _ = generate_tokens(model, [long_prompt, [1, 2, 3]], max_new_tokens=8)
    assert tokens == reference(model, long_prompt[-120:], 8)


def test_cot_decoding_keeps_the_branch_with_the_highest_answer_margin():
    model = tiny_model()
    prompt, k, n = PROMPTS[0], 4, 12
    last_char = lambda text: (len(text) - 1, len(text)) if text else None  # noqa: E731 - the "answer" is the last character
    (result,) = cot_decode(model, [prompt], n, stop=[], answer_span=last_char, k=k)
    with torch.no_grad():
        first = model.net(torch.tensor([prompt]))[0, -1].topk(k).indices.tolist()
        expected = []
        for token in first:  # each branch by a plain full forward: first token forced, then greedy
            ids = [*prompt, token, *reference(model, [*prompt, token], n - 1)][:len(prompt) + n]
            probs = model.net(torch.tensor([ids]))[0, len(prompt) - 1:].softmax(-1)
            top2 = probs.topk(2, dim=-1).values
            margins = (top2[:, 0] - top2[:, 1]).tolist()
            text = model.decode(ids[len(prompt):])
            expected.append((text, answer_confidence(model, ids[len(prompt):], margins, last_char(text))))
    assert [t for t, _ in result.branches] == [t for t, _ in expected]
    assert [c for _, c in result.branches] == pytest.approx([c for _, c in expected], abs=1e-5)
    best = max(expected, key=lambda b: b[1])
    assert result.text == best[0] and len({c for _, c in expected}) > 1


def test_answer_confidence_averages_the_margins_of_the_tokens_overlapping_the_answer():
    model = tiny_model()
    tokens = list(b"ab 42.")
    margins = [0.1, 0.2, 0.3, 0.5, 0.9, 0.0]
    assert answer_confidence(model, tokens, margins, (3, 5)) == pytest.approx(0.7)
    assert answer_confidence(model, tokens, margins, None) == 0.0


def test_a_mixture_of_depths_model_in_train_mode_is_refused():
    """A model fresh from training (or `load_pretrained`) is in train mode, where routed layers pick top-k, which
    looks ahead: its scores and completions would not be the causal rule's."""
    net = Transformer(ModelConfig.from_name("micro", n_layer=4, mod_capacity=0.5))
    with pytest.raises(ValueError, match=r"EvalModel of mine: the Mixture-of-Depths model is in train mode.*\.eval\(\)"):
        EvalModel(net, ByteTokenizer(), torch.device("cpu"), torch.float32, "mine")
    EvalModel(net.eval(), ByteTokenizer(), torch.device("cpu"), torch.float32, "mine")


def test_completions_drop_special_tokens_as_lm_eval_does(smollm2_tokenizer):
    """lm-eval's `hf` backend decodes a completion with skip_special_tokens, then cuts it at the stops: a
    special token inside the answer must not split the number that flexible-extract reads, and CoT's
    confidence must use the same text's character offsets."""
    model = EvalModel(Transformer(ModelConfig.from_name("micro")), smollm2_tokenizer, torch.device("cpu"),
                      torch.float32, "micro-random")
    encode = lambda text: smollm2_tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    special = smollm2_tokenizer.convert_tokens_to_ids("<|im_start|>")
    tokens = encode("The answer is 1") + [special] + encode("8.\n\nQuestion: what next?")
    text = completion(model, tokens, ["Question:"])
    assert text == "The answer is 18.\n\n"
    assert gsm8k.extract_flexible(text) == "18."
    assert gsm8k.extract_flexible(cut_at_stop(model.decode(tokens), ["Question:"])) == "8."  # specials kept
    margins = [0.0] * len(tokens)
    for i, t in enumerate(tokens):
        if smollm2_tokenizer.decode([t]) in ("1", "8", "."):  # the answer "18.", split by the special token
            margins[i] = 0.6
    margins[tokens.index(special)] = 0.1  # adds no text: not part of the answer
    assert answer_confidence(model, tokens, margins, gsm8k.flexible_span(text)) == pytest.approx(0.6)


def test_batched_stop_check_decodes_as_one_decode_per_row(smollm2_tokenizer):
    """The stop check decodes every row's tail in one tokenizer call (`EvalModel.decode_batch`): each text
    must be what `decode` gives, special tokens and a character split across byte tokens included; a
    tokenizer without a fast backend, or one that cleans up spaces after it, is decoded row by row."""
    model = EvalModel(Transformer(ModelConfig.from_name("micro")), smollm2_tokenizer, torch.device("cpu"),
                      torch.float32, "micro-random")
    encode = lambda text: smollm2_tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    emoji = encode("\U0001F600")
    rows = [encode("The answer is 18.\n\nQuestion:"), [smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")],
            emoji[:1], encode(" ok") + emoji[:-1], [], encode("  two  spaces , here .")]
    assert model.decode_batch(rows) == [model.decode(ids) for ids in rows]
    assert decoding._StopChecker(model, ["Question:", "<|im_end|>"])(rows) == [True, True, False, False, False, False]
    bytes_model = tiny_model()
    assert bytes_model.decode_batch([[104, 105], [240, 159]]) == ["hi", "\ufffd"]


def test_cot_aggregation_sums_confidence_per_answer():
    spans = lambda text: (text.index("=") + 1, len(text))  # noqa: E731
    branches = [(t, c, spans(t)) for t, c in [("x=1", 0.5), ("y=2", 0.3), ("z= 2", 0.4), ("w=3", 0.0)]]
    assert _choose(branches, aggregate=False, normalize=str.strip).text == "x=1"
    chosen = _choose(branches, aggregate=True, normalize=str.strip)
    assert isinstance(chosen, CotResult) and chosen.text == "z= 2" and chosen.confidence == pytest.approx(0.7)


def bigram_model(successors: dict[str, dict[str, float]]) -> EvalModel:
    """A `micro`-shaped model whose next token depends on the newest byte alone: logits
    `successors[byte][next]` (0 elsewhere, so an unlisted byte is followed by id 0, the EOS). Its blocks
    add nothing (zero output projections) and its hidden state is the newest byte's one-hot."""
    torch.manual_seed(0)
    net = Transformer(ModelConfig.from_name("micro", n_embd=256)).eval()
    with torch.no_grad():
        net.embed.weight.copy_(torch.eye(256))
        net.norm.weight.fill_(1 / 16)  # RMSNorm of a one-hot in 256 dimensions is 16 times it
        net.lm_head.weight.zero_()
        for block in net.blocks:
            block.attn.proj.weight.zero_()
            block.mlp.down.weight.zero_()
        for byte, logits in successors.items():
            for following, logit in logits.items():
                net.lm_head.weight[ord(following), ord(byte)] = logit
    return EvalModel(net, ByteTokenizer(), torch.device("cpu"), torch.float32, "micro-bigram")


def test_gsm8k_cot_aggregation_counts_answers_equal_under_exact_match_as_one():
    """Branches "$7." and "7." state the answer 7 (GSM8K's exact match drops "$" and a trailing "."), "9" is
    the single most confident branch: aggregated, 7's summed confidence wins."""
    model = bigram_model({":": {"$": 8.0, "7": 1.0, "9": 0.9}, "$": {"7": 5.0}, "7": {".": 5.0}})
    config = DecodingConfig(variant="cot", cot_k=3, cot_aggregate=True, max_new_tokens=8)
    (branches,) = cot_decode(model, [model.encode("Answer:")], 8, [], gsm8k.flexible_span, k=3)
    assert [(text, round(confidence, 2)) for text, confidence in branches.branches] == [
        ("$7.", 0.55), ("7.", 0.64), ("9", 0.92)]
    result = gsm8k.evaluate(model, [{"question": "q", "answer": "#### 7"}], [], config, shots=0, progress=False)
    assert result.samples[0]["completion"] == "7." and result.metrics[1].value == 1.0


def quietstar_model(**overrides) -> EvalModel:
    """A random Quiet-STaR model over a `micro` LM (dense, or Mixture-of-Depths with overrides)."""
    from modeldefs.quietstar import QuietStar, ThoughtConfig

    torch.manual_seed(0)
    lm = Transformer(ModelConfig.from_name("micro", init_std=0.3, **overrides)).eval()
    net = QuietStar(lm, ThoughtConfig(n_ahead=5, n_ahead_talk=2, n_passes=1, mixing_bound="none"), init_token_id=7)
    torch.nn.init.normal_(net.mixing_head.net[-1].weight, std=0.3)  # thoughts must change the output
    return EvalModel(net.eval(), ByteTokenizer(), torch.device("cpu"), torch.float32, "micro-quietstar")


def with_thoughts_alone(model: EvalModel, prompt: list[int], n: int) -> list[int]:
    """`generate_with_thoughts` on the prompt alone, up to EOS."""
    from modeldefs.thought_generate import generate_with_thoughts

    out = generate_with_thoughts(model.net, torch.tensor([prompt]), n, eos_id=0)[0, len(prompt):].tolist()
    return out[:out.index(0)] if 0 in out else out


@pytest.mark.parametrize("overrides", [{}, MOD], ids=["dense", "mod"])
def test_thoughts_decode_in_shared_rows_as_each_prompt_alone(overrides, shifts):
    """7 prompts through 3 rows with a thought before every token: rows refill, the cache moves to the
    front, stop strings end rows early, and every completion is `generate_with_thoughts` on its prompt
    alone."""
    model = quietstar_model(**overrides)
    prompts, n = MANY[:7], 12
    alone = [with_thoughts_alone(model, p, n) for p in prompts]
    shifts.clear()
    config = DecodingConfig(variant="thoughts", max_new_tokens=n, batch_size=3)
    texts, generated = decode_completions(model, prompts, config, stop=[], answer_span=lambda text: None)
    assert texts == [model.decode(t) for t in alone] and generated == sum(map(len, alone))
    assert len(shifts) >= 1
    stops = ["l", "7", "U", "b", "N"]  # ASCII, each in some completion of the dense or the MoD model
    stopped, generated_stopped = decode_completions(model, prompts, config, stop=stops, answer_span=lambda text: None)
    assert stopped == [cut_at_stop(model.decode(t), stops) for t in alone]
    assert generated_stopped < generated  # rows stop at the stop string, not at max_new_tokens
    assert texts != decode_completions(model, prompts, DecodingConfig(max_new_tokens=n), [], lambda text: None)[0]


def test_thought_scoring_uses_the_thought_mixed_logits():
    model = quietstar_model()
    context, continuation = [5, 17, 99, 3], [65, 66, 67]
    ((score, _),) = loglikelihood(model, [(context, continuation)], think=True)
    with torch.no_grad():
        logprobs = model.net.next_token_logits(torch.tensor([context + continuation[:-1]]))[0, 3:].log_softmax(-1)
    assert score == pytest.approx(logprobs.gather(-1, torch.tensor(continuation)[:, None]).sum().item(), abs=1e-5)
    assert score != pytest.approx(loglikelihood(model, [(context, continuation)])[0][0], abs=1e-3)
    # Three letters share one input (as CSQA's five do); another context of the same length and a
    # continuation of the same length batch with them; every score equals the request's own forward.
    other = [9, 8, 7, 6]
    requests = [*[(context, [c]) for c in (65, 66, 67)], (other, [70]), (context, continuation), (other, [71, 72, 73])]
    grouped = loglikelihood(model, requests, think=True, batch_size=2)
    for (c, k), (got, greedy) in zip(requests, grouped):
        with torch.no_grad():
            alone = model.net.next_token_logits(torch.tensor([c + k[:-1]]))[0, len(c) - 1:].log_softmax(-1)
        want = alone.gather(-1, torch.tensor(k)[:, None])
        assert got == pytest.approx(want.sum().item(), abs=1e-5)
        assert greedy == bool((alone.argmax(-1) == torch.tensor(k)).all())
    with pytest.raises(ValueError, match="needs a Quiet-STaR model"):
        loglikelihood(tiny_model(), [(context, continuation)], think=True)


def test_thought_scoring_keeps_the_end_of_a_context_too_long_for_its_thought_positions():
    model = quietstar_model()
    L, thought = model.block_size, model.net.thought_config.n_ahead - 1
    context, continuation = [(7 * i) % 250 + 1 for i in range(L + 10)], [65, 66]
    ((score, _),) = loglikelihood(model, [(context, continuation)], think=True)  # used to exceed block_size
    kept = context[-(L - thought - len(continuation) + 1):]
    ((want, _),) = loglikelihood(model, [(kept, continuation)], think=True)
    assert score == want and len(kept) + len(continuation) - 1 + thought == L


def test_thoughts_variant_on_a_plain_model_is_a_clear_error():
    with pytest.raises(ValueError, match="needs a Quiet-STaR model.*plain Transformer"):
        generate_thoughts(tiny_model(), PROMPTS, 4)


def test_decoding_config_names_a_bad_variant():
    with pytest.raises(ValueError, match="'beam' is not one of"):
        DecodingConfig(variant="beam")
    assert DecodingConfig(variant="cot", cot_k=5).label == "cot-k5"
    with pytest.raises(ValueError, match="cuda_graph='false' must be True or False"):
        DecodingConfig(cuda_graph="false")


@pytest.mark.parametrize("decode", [generate_tokens, generate, generate_thoughts])
def test_max_new_tokens_below_one_is_a_clear_error(decode):
    model = quietstar_model() if decode is generate_thoughts else tiny_model()
    with pytest.raises(ValueError, match=r"max_new_tokens=0 must be >= 1"):
        decode(model, PROMPTS, 0)


def test_a_context_without_room_for_the_thought_slots_names_them():
    model = quietstar_model()  # block_size 128, n_ahead 5: a thought takes 4 slots after the newest token
    with pytest.raises(ValueError, match=r"max_new_tokens=124 and 4 thought slots leave no room for a prompt in block_size=128"):
        generate_thoughts(model, PROMPTS, 124)


def scripted_model(text: str) -> EvalModel:
    """A `micro` model that greedily continues the first byte of `text` (distinct bytes) with the rest of it,
    then from its second byte on again, and so on: the blocks add nothing, and the embedding and head map
    each byte to the next (the last byte to the second)."""
    model = tiny_model()
    data = text.encode()
    with torch.no_grad():
        for block in model.net.blocks:
            block.attn.proj.weight.zero_()
            block.mlp.down.weight.zero_()
        model.net.embed.weight.zero_()
        model.net.lm_head.weight.zero_()
        for slot, (byte, successor) in enumerate(zip(data, data[1:] + data[1:2])):
            model.net.embed.weight[byte, slot] = 1.0
            model.net.lm_head.weight[successor, slot] = 10.0
    return model


def test_a_stop_string_of_multibyte_characters_ends_generation():
    # "\U0001F600" is one character but four byte tokens: the stop check must look back far enough to see it.
    model = scripted_model("ab\U0001F600\n")
    assert generate(model, [[ord("a")]], max_new_tokens=18) == ["b\U0001F600\n" * 3]
    assert generate_tokens(model, [[ord("a")]], max_new_tokens=20, stop=["\U0001F600\n"]) == [list("b\U0001F600\n".encode())]


def test_continuations_that_end_at_their_first_token_free_their_row_at_once():
    """A first token that is EOS ends the continuation as it starts (before any decoding step): the row takes
    the next prompt, duplicates included, and a CoT branch forced to EOS is empty while its siblings go on."""
    model = bigram_model({"x": {"\0": 5.0, "y": 1.0}, "a": {"b": 5.0, "\0": 3.0}, "b": {"c": 5.0},
                          "q": {"r": 5.0, "s": 1.0}, "r": {"q": 5.0}})  # "x" and "a"'s runner-up are EOS
    prompts = [model.encode(text) for text in ("x", "za", "x", "zq", "zzx", "b", "zq")]
    for n, batch_size in [(1, 2), (5, 2), (5, 3), (5, 7)]:
        assert generate_tokens(model, prompts, n, batch_size=batch_size) == [reference(model, p, n) for p in prompts]
    assert generate(model, prompts, 5, stop=["qr"], batch_size=2) == ["", "bc", "", "r", "", "c", "r"]
    last_char = lambda text: (len(text) - 1, len(text)) if text else None  # noqa: E731
    streamed = cot_decode(model, [model.encode(t) for t in ("a", "x", "q")], 4, ["qr"], last_char, k=2, batch_size=3)
    assert [[text for text, _ in r.branches] for r in streamed] == [["bc", ""], ["", "y"], ["r", "s"]]
    assert [r.generated_tokens for r in streamed] == [2, 1, 4]


def fixed_step_runs(monkeypatch) -> list[int]:
    """Rows of every fixed-shape decoding step (`evals.decode_step.DecodeStep.run`), recorded as decoding runs."""
    from evals.decode_step import DecodeStep

    rows: list[int] = []
    run = DecodeStep.run
    monkeypatch.setattr(DecodeStep, "run", lambda self: rows.append(self.token.numel()) or run(self))
    return rows


@pytest.mark.parametrize("case", ["refills", "capped-cache", "cot", "sharp-attention"])
def test_the_fixed_shape_step_decodes_what_the_sliced_step_does(case, shifts, monkeypatch):
    """The CUDA-graph step's fixed shapes (keys/values written at a device-held slot, attention over every slot
    under the key mask), run eagerly on the CPU: refills, moves to the cache front (at max_new_tokens // 2 and
    at a full cache) and CoT branches give the sliced step's tokens and margins; finished rows stay to the end.
    sharp-attention: refills on larger weights, whose attention is peaked enough that the tokens depend on the
    rotary positions (the default init's does not: there, every token at position 0 decodes the same)."""
    model = tiny_model(init_std=0.3) if case == "sharp-attention" else tiny_model()
    prompts, n, stops, rows, branches = MANY, 12, ["K", "6", "y", "%"], 3, 1
    if case == "capped-cache":
        prompts, stops, rows = [[(5 * i + j) % 250 + 1 for j in range(116)] for i in range(8)], ["y", "%"], 2
    if case == "cot":
        prompts, n, stops, branches = MANY[:5], 10, ["ab", "q"], 4
    sliced = decoding._decode_rows(model, prompts, n, stops, 2048, rows, branches, fixed_step=False)
    moves_sliced = list(shifts)
    steps = fixed_step_runs(monkeypatch)
    fixed = decoding._decode_rows(model, prompts, n, stops, 2048, rows, branches, fixed_step=True)
    assert fixed[0] == sliced[0]
    assert [m for row in fixed[1] for m in row] == pytest.approx([m for row in sliced[1] for m in row], abs=1e-5)
    assert shifts[len(moves_sliced):] == moves_sliced and len(moves_sliced) >= 2
    assert steps and set(steps) == {rows}  # every step ran fixed, on all rows (finished ones are not dropped)
    assert len({len(t) for t in fixed[0]}) > 1  # rows finished at different steps


@pytest.mark.parametrize("model", [lambda: tiny_model(**MOD), lambda: quietstar_model()], ids=["mod", "thoughts"])
def test_mixture_of_depths_and_thought_decoding_keep_the_sliced_step(model, monkeypatch):
    """A routed block skips work per step and thoughts write scratch slots: neither has a fixed-shape step."""
    steps = fixed_step_runs(monkeypatch)
    m = model()
    decoding._decode_rows(m, MANY[:3], 4, [], 2048, 2, thinker=m.net if m.has_thoughts else None, fixed_step=True)
    assert steps == []


def test_the_fixed_shape_step_decodes_a_bfloat16_model_in_its_dtype(monkeypatch):
    """The slot cache is made in the weights' dtype, so a bf16 model's keys and values are written into it as
    they come (a float32 cache refuses them) and decode what the sliced step does."""
    torch.manual_seed(0)
    net = Transformer(ModelConfig.from_name("micro")).to(torch.bfloat16).eval()
    model = EvalModel(net, ByteTokenizer(), torch.device("cpu"), torch.bfloat16, "micro-random-bf16")
    sliced = decoding._decode_rows(model, MANY, 12, ["K", "6", "y", "%"], 2048, 3, fixed_step=False)
    steps = fixed_step_runs(monkeypatch)
    assert decoding._decode_rows(model, MANY, 12, ["K", "6", "y", "%"], 2048, 3, fixed_step=True) == sliced
    assert steps


def test_fixed_step_reaches_the_decoding_rows_from_every_entry_point(monkeypatch):
    """generate, generate_tokens and cot_decode hand `fixed_step` on (True: the fixed-shape step, on the CPU too;
    False: never); `DecodingConfig.cuda_graph` (--no-cuda-graph, lm-eval's cuda_graph=false) arrives as False
    when off and as None (a graph on a GPU) when on, for greedy and CoT. On a CPU None and False decode alike,
    so the value is read where it arrives."""
    model, prompts = tiny_model(), MANY[:3]
    steps = fixed_step_runs(monkeypatch)
    calls = {"generate": lambda fixed: decoding.generate(model, prompts, 3, batch_size=2, fixed_step=fixed),
             "generate_tokens": lambda fixed: decoding.generate_tokens(model, prompts, 3, batch_size=2,
                                                                      fixed_step=fixed),
             "cot_decode": lambda fixed: decoding.cot_decode(model, prompts, 3, [], lambda text: None, k=2,
                                                             batch_size=2, fixed_step=fixed)}
    for name, call in calls.items():
        for fixed in (True, False):
            steps.clear()
            call(fixed)
            assert bool(steps) == fixed, f"{name}(fixed_step={fixed})"
    seen: list[bool | None] = []
    rows = decoding._decode_rows
    monkeypatch.setattr(decoding, "_decode_rows", lambda *a, **kw: seen.append(kw["fixed_step"]) or rows(*a, **kw))
    for variant in ("greedy", "cot"):
        for graph in (True, False):
            config = DecodingConfig(variant=variant, max_new_tokens=2, batch_size=2, cot_k=2, cuda_graph=graph)
            decoding.decode_completions(model, prompts, config, [], lambda text: None)
    assert seen == [None, False, None, False]
