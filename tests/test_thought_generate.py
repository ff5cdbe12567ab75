"""Thought-augmented generation: the plain path equals `generate`, the KV-cached thought path equals a
full recompute with `next_token_logits`."""

from __future__ import annotations

import pytest
import torch

from modeldefs import ModelConfig, Transformer
from modeldefs.generate import generate
from modeldefs.quietstar import QuietStar, ThoughtConfig
from modeldefs.thought_generate import generate_with_thoughts, thought_hidden


def make_model(mod_capacity: float | None = None) -> QuietStar:
    torch.manual_seed(0)
    lm = Transformer(ModelConfig.from_name("micro", mod_capacity=mod_capacity, mod_exempt_last=False, init_std=0.3))
    lm.eval()
    assert mod_capacity is None or lm.routed_blocks  # micro has 2 layers: the last one is the routed one
    model = QuietStar(lm, ThoughtConfig(n_ahead=5, n_ahead_talk=2, n_passes=1, mixing_bound="none"), init_token_id=7)
    torch.nn.init.normal_(model.mixing_head.net[-1].weight, std=0.3)  # thoughts must change the output
    return model


def prompt(B: int = 2, T: int = 6) -> torch.Tensor:
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("mod_capacity", [None, 0.5], ids=["dense", "mod"])
def test_without_thinking_it_is_plain_generation_token_for_token(mod_capacity):
    model = make_model(mod_capacity)
    x = prompt()
    assert torch.equal(generate_with_thoughts(model, x, 10, think=False), generate(model.lm, x, 10))


@pytest.mark.parametrize("mod_capacity", [None, 0.5], ids=["dense", "mod"])
def test_kv_cached_thoughts_equal_a_full_recompute(mod_capacity):
    model = make_model(mod_capacity)
    x = prompt()
    out = generate_with_thoughts(model, x, 10)
    seq = x
    with torch.no_grad():
        for _ in range(10):
            seq = torch.cat([seq, model.next_token_logits(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)
    assert not torch.equal(out, generate(model.lm, x, 10))  # the thoughts did change the text


def test_first_thought_logits_match_the_parallel_forward():
    model = make_model()
    x = prompt()
    with torch.no_grad():
        cache = model.lm.make_kv_cache(x.size(0), x.size(1) + 8)
        h = model.lm.hidden(model.lm.embed(x), kv_cache=cache)[:, -1]
        cached = model.mix(h, thought_hidden(model, cache, x.size(1)))[0]
        torch.testing.assert_close(cached, model.next_token_logits(x)[:, -1], atol=1e-5, rtol=1e-5)


def test_rows_stop_at_eos_and_are_padded_with_it():
    model = make_model()
    x = prompt()
    free = generate_with_thoughts(model, x, 8)
    eos = int(free[0, x.size(1) + 2])  # a token row 0 produces
    out = generate_with_thoughts(model, x, 8, eos_id=eos)
    row = out[0, x.size(1):]
    first = int((row == eos).nonzero()[0])
    assert torch.all(row[first:] == eos)


def test_sampled_thoughts_and_tokens_are_reproducible_with_a_generator():
    model = make_model()
    model.thought_config.eval_thought_temperature = 1.0
    x = prompt()
    a, b, other = (generate_with_thoughts(model, x, 6, temperature=1.0, generator=torch.Generator().manual_seed(seed))
                   for seed in (5, 5, 6))
    assert torch.equal(a, b)
    # The random micro model's next-token distribution is flat (top probability ~0.1 of 256 tokens): 12 tokens
    # drawn at temperature 1 all equal to the argmax, or to another seed's draws, would be a ~1e-11 chance.
    assert not torch.equal(a, other)
    greedy = generate_with_thoughts(model, x, 6, temperature=0.0, generator=torch.Generator().manual_seed(5))
    assert not torch.equal(a, greedy)  # same seed: argmax tokens would have drawn the same thoughts, to this output


def test_the_thought_must_fit_in_the_context():
    model = make_model()
    limit = model.lm.config.block_size
    with pytest.raises(ValueError, match="block_size"):
        generate_with_thoughts(model, prompt(T=limit - 10), 9)
    generate_with_thoughts(model, prompt(T=limit - 10), 9, think=False)


def test_one_token_contexts_match_the_parallel_forward_when_routing_skips_the_prefix():
    """A one-token pass 0 that a routed layer rejects skips the block there; later thought passes that
    do route must still run (and agree with the cached path)."""
    model = make_model(mod_capacity=0.5)
    block = next(iter(model.lm.routed_blocks.values()))
    skipped = 0
    with torch.no_grad():
        for token in range(64):
            x = torch.tensor([[token]])
            cache = model.lm.make_kv_cache(1, 8)
            h = model.lm.hidden(model.lm.embed(x), kv_cache=cache)[:, -1]
            skipped += not bool(block.routing.selected.any())
            cached = model.mix(h, thought_hidden(model, cache, 1))[0]
            torch.testing.assert_close(cached, model.next_token_logits(x)[:, -1], atol=1e-5, rtol=1e-5)
    assert skipped > 0  # the case in question happened
