"""The decoder: causality, the explicit-mask path, position ids, KV-cache generation."""

import pytest
import torch
import torch.nn.functional as F

from modeldefs import ModelConfig, Transformer
from modeldefs.attention import KVCache
from modeldefs.generate import generate, sample_next


def micro(**overrides) -> Transformer:
    return Transformer(ModelConfig.from_name("micro", **overrides)).eval()


def test_future_tokens_never_change_past_logits():
    model = micro()
    x = torch.randint(0, 256, (2, 16))
    y = x.clone()
    y[:, 10:] = torch.randint(0, 256, (2, 6))
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.equal(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_explicit_causal_mask_equals_builtin_causal_path():
    model = micro()
    x = torch.randint(0, 256, (2, 12))
    causal = torch.ones(12, 12, dtype=torch.bool).tril()
    with torch.no_grad():
        torch.testing.assert_close(model(x, mask=causal), model(x), rtol=0, atol=1e-6)


def test_mask_and_position_ids_reproduce_a_shorter_sequence():
    # Two documents packed in one row, with a block-diagonal mask and positions restarting at the
    # second one, give the second document the logits it has on its own.
    model = micro()
    a, b = torch.randint(0, 256, (1, 5)), torch.randint(0, 256, (1, 7))
    packed = torch.cat([a, b], dim=1)
    doc = torch.tensor([0] * 5 + [1] * 7)
    mask = (doc[:, None] == doc[None, :]) & torch.ones(12, 12, dtype=torch.bool).tril()
    positions = torch.cat([torch.arange(5), torch.arange(7)])
    with torch.no_grad():
        got = model(packed, position_ids=positions, mask=mask)[:, 5:]
        torch.testing.assert_close(got, model(b), rtol=0, atol=1e-5)


def test_tied_embeddings_share_one_tensor_and_untied_do_not():
    tied, untied = micro(tie_embeddings=True), micro(tie_embeddings=False)
    assert tied.lm_head.weight is tied.embed.weight
    assert untied.lm_head.weight is not untied.embed.weight
    assert tied.num_params() == untied.num_params() - 256 * 32


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
def test_kv_cache_greedy_generation_equals_full_recompute(n_kv_head):
    model = micro(n_kv_head=n_kv_head)
    prompt = torch.randint(0, 256, (3, 7))
    out = generate(model, prompt, max_new_tokens=10)
    seq = prompt
    with torch.no_grad():
        for _ in range(10):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("n_kv_head", [1, 3, 9])
@pytest.mark.parametrize("masked", [False, True])
def test_one_token_cache_attention_equals_attention_over_repeated_keys(n_kv_head, masked):
    """A decoding step attends each query head to its group's key/value head (grouped-query attention's
    definition: keys and values repeated per query head), with or without a key mask."""
    torch.manual_seed(0)
    B, H, S, D = 3, 9, 11, 8
    cache = KVCache(B, n_kv_head, S, D, torch.float32)
    k, v = torch.randn(B, n_kv_head, S, D), torch.randn(B, n_kv_head, S, D)
    cache.update(0, k[:, :, :-1], v[:, :, :-1])
    q = torch.randn(B, 1, H, D).transpose(1, 2)  # the attention layer's layout: heads split off the features
    mask = torch.rand(B, 1, 1, S) > 0.3 if masked else None
    if masked:
        mask[..., -1] = True
    out = cache.attend(q, k[:, :, -1:], v[:, :, -1:], S - 1, mask)
    repeat = H // n_kv_head
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1),
                                              attn_mask=mask)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_chunked_cache_fill_equals_one_forward_and_overflow_or_a_slot_without_cache_is_refused():
    model = micro()
    x = torch.randint(0, 256, (2, 9))
    cache = model.make_kv_cache(2, 10)
    with torch.no_grad():
        model(x[:, :4], kv_cache=cache)
        chunked = model(x[:, 4:], kv_cache=cache, start_pos=4)  # masked: the chunk attends to the cache
        torch.testing.assert_close(chunked, model(x)[:, 4:], atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="overflows the KV cache's 10 slots"):
            model(x[:, :2], kv_cache=cache, start_pos=9)
        with pytest.raises(ValueError, match="start_pos=3 is a KV-cache slot"):
            model(x, start_pos=3)


def test_generation_pads_a_row_that_produced_eos_while_the_others_go_on():
    model = micro()
    prompt = torch.randint(0, 256, (2, 4))
    free = generate(model, prompt, max_new_tokens=6)
    eos = int(free[0, 4])
    out = generate(model, prompt, max_new_tokens=6, eos_id=eos)
    assert (out[0, 4:] == eos).all()
    row = free[1, 4:].tolist()
    n = row.index(eos) + 1 if eos in row else len(row)  # row 1 decodes as alone, up to its own eos
    assert torch.equal(out[1, :4 + n], free[1, :4 + n])


def test_generation_stops_when_every_row_has_produced_eos():
    model = micro()
    prompt = torch.randint(0, 256, (1, 4)).repeat(2, 1)  # equal rows: both produce eos at the same step
    free = generate(model, prompt, max_new_tokens=6)
    eos = int(free[0, 6])  # the third new token
    stop = free[0, 4:].tolist().index(eos) + 5  # at most 7: decoding must not run on to 4 + 6 = 10
    assert torch.equal(generate(model, prompt, max_new_tokens=6, eos_id=eos), free[:, :stop])


def test_sampling_is_reproducible_with_a_generator_and_top_k_one_is_greedy():
    model = micro()
    prompt = torch.randint(0, 256, (2, 4))
    runs = [generate(model, prompt, 8, temperature=1.0, generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(generate(model, prompt, 8, temperature=0.7, top_k=1), generate(model, prompt, 8))


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    draws = {int(sample_next(logits, 1.0, top_p=0.8, generator=torch.Generator().manual_seed(s))) for s in range(50)}
    assert draws == {0, 1}


@pytest.mark.parametrize("prompt_shape, settings, message", [
    ((4,), {}, r"shape \(batch, length >= 1\), got shape \(4,\)"), ((1, 0), {}, "got shape"),
    ((1, 4), {"max_new_tokens": 0}, "max_new_tokens=0"), ((1, 4), {"temperature": -1.0}, "temperature=-1.0"),
    ((1, 4), {"temperature": float("nan")}, "temperature=nan must be a number >= 0"),
    ((1, 4), {"temperature": 1.0, "top_k": 0}, "top_k=0"), ((1, 4), {"top_p": 0.0}, r"top_p=0.0 must be in \(0, 1\]")])
def test_malformed_generation_requests_are_refused_naming_the_setting(prompt_shape, settings, message):
    settings = {"max_new_tokens": 4, **settings}
    with pytest.raises(ValueError, match=message):
        generate(micro(), torch.zeros(prompt_shape, dtype=torch.long), **settings)


def test_generate_names_the_function_for_the_other_model_kind():
    from modeldefs.quietstar import QuietStar, ThoughtConfig
    from modeldefs.thought_generate import generate_with_thoughts

    lm, prompt = micro(), torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(TypeError, match="decodes with modeldefs.thought_generate.generate_with_thoughts"):
        generate(QuietStar(lm, ThoughtConfig(n_ahead=4, n_ahead_talk=2), init_token_id=1), prompt, 2)
    with pytest.raises(TypeError, match="decodes with modeldefs.generate.generate"):
        generate_with_thoughts(lm, prompt, 2)


def test_sequence_longer_than_context_is_refused_with_the_fix():
    model = micro(block_size=16)
    with pytest.raises(ValueError, match="block_size=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="block_size=16"):
        generate(model, torch.zeros(1, 10, dtype=torch.long), max_new_tokens=10)


def test_config_round_trips_and_names_unknown_fields():
    config = ModelConfig.from_name("smollm2-135m")
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="n_layers"):
        ModelConfig.from_dict({"n_layers": 3})
    with pytest.raises(ValueError, match="unknown model config"):
        ModelConfig.from_name("gpt-5")
    with pytest.raises(ValueError, match="mod_causal_rule='predicter'"):
        ModelConfig.from_name("micro", mod_capacity=0.5, mod_causal_rule="predicter")
    with pytest.raises(ValueError, match=r"mod_capacity=0.5 routes none of the 6 layers \(mod_route_every=10"):
        ModelConfig.from_name("tiny", n_layer=6, mod_capacity=0.5, mod_route_every=10)
    with pytest.raises(ValueError, match="mod_route_every=2.5 must be an integer"):
        ModelConfig.from_name("tiny", mod_capacity=0.5, mod_route_every=2.5)


@pytest.mark.parametrize("field, value, message", [
    ("mod_aux_weight", -0.01, "mod_aux_weight=-0.01 must be >= 0"), ("mod_aux_weight", float("nan"), "mod_aux_weight=nan"),
    ("mod_predictor_hidden", 0, "mod_predictor_hidden=0 must be an integer >= 1"),
    ("mod_predictor_hidden", -3, "mod_predictor_hidden=-3 must be an integer >= 1"),
    ("mod_capacity", "0.5", r"mod_capacity='0.5' must be in \(0, 1\]"),
    ("mod_capacity", True, r"mod_capacity=True must be in \(0, 1\]")])
def test_mod_fields_out_of_range_are_refused_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_name("micro", n_layer=4, **{"mod_capacity": 0.5, field: value})


def test_bf16_forward_is_close_to_fp32():
    model = micro()
    x = torch.randint(0, 256, (2, model.config.block_size))  # the far positions too (bf16 rotary angles)
    with torch.no_grad():
        ref = model(x)
        low = model.to(torch.bfloat16)(x).float()
    assert (low - ref).abs().max() < 0.02 * ref.abs().max()  # measured 0.8%
    assert (low.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95  # measured 98%
