"""Mixture-of-Depths: selection, order and positions, router gradient, causal inference, KV cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modeldefs import ModelConfig, Transformer
from modeldefs.block import Block
from modeldefs.generate import generate
from modeldefs.mod import RoutedBlock
from modeldefs.rope import rope_cache


def mod_config(**overrides) -> ModelConfig:
    values = dict(mod_capacity=0.25, mod_route_every=2, mod_exempt_last=False, n_layer=4)
    return ModelConfig.from_name("micro", **{**values, **overrides})


def block_inputs(config: ModelConfig, B: int = 3, T: int = 16):
    x = torch.randn(B, T, config.n_embd)
    cos, sin = rope_cache(config.head_dim, config.block_size, config.rope_theta)
    return x, cos[:T][None], sin[:T][None]


@pytest.mark.parametrize("capacity,T,k", [(0.125, 2048, 256), (0.125, 7, 1), (0.5, 9, 4), (1.0, 5, 5), (0.3, 10, 3),
                                         (0.7, 90, 63)])
def test_capacity_gives_k_tokens_per_sequence(capacity, T, k):
    block = RoutedBlock(mod_config(mod_capacity=capacity))
    assert block.capacity_k(T) == k


def test_every_other_block_is_routed_with_first_and_last_exempt():
    config = ModelConfig.from_name("micro", n_layer=8, mod_capacity=0.125)
    assert [config.is_routed(i) for i in range(8)] == [False, True, False, True, False, True, False, False]
    assert list(Transformer(config).routed_blocks) == [1, 3, 5]
    assert not Transformer(ModelConfig.from_name("micro", n_layer=8)).routed_blocks


def test_top_k_tokens_go_through_in_order_with_their_positions():
    config = mod_config()
    block = RoutedBlock(config).train()
    x, cos, sin = block_inputs(config)
    out = block(x, cos, sin)
    logits = block.routing.router_logits
    k = block.capacity_k(x.size(1))
    expected = torch.zeros_like(block.routing.selected).scatter_(1, logits.topk(k, dim=1).indices, True)
    assert torch.equal(block.routing.selected, expected)
    assert torch.equal(out[~expected], x[~expected])  # skipped tokens are untouched
    for b in range(x.size(0)):
        idx = expected[b].nonzero().squeeze(1)  # sequence order
        update = Block.residual_update(block, x[b : b + 1, idx], cos[:, idx], sin[:, idx])[0]
        scale = 2 * torch.sigmoid(logits[b, idx])[:, None]
        torch.testing.assert_close(out[b, idx], x[b, idx] + scale * update)


def test_padding_is_never_selected():
    config = mod_config(mod_capacity=0.5)
    block = RoutedBlock(config).train()
    x, cos, sin = block_inputs(config, B=2, T=8)
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[0, :6] = False  # 2 real tokens, k = 4
    out = block(x, cos, sin, valid=valid)
    assert not (block.routing.selected & ~valid).any()
    assert torch.equal(out[0, :6], x[0, :6])
    assert block.routing.selected[1].sum() == 4


def test_padding_picked_to_fill_k_is_no_key_for_the_real_tokens():
    """A row with fewer real tokens than k has padding among its top k: the real tokens must not attend to it,
    so they compute what they would with only the real tokens selected, whatever the padding holds."""
    config = mod_config(mod_capacity=0.5)
    block = RoutedBlock(config).train()
    x, cos, sin = block_inputs(config, B=2, T=8)
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[0, :6] = False  # left padding: 2 real tokens, k = 4, so 2 padding tokens are picked before them
    out = block(x, cos, sin, valid=valid)
    update = Block.residual_update(block, x[:1, 6:], cos[:, 6:], sin[:, 6:])[0]
    scale = 2 * torch.sigmoid(block.routing.router_logits[0, 6:])[:, None]
    torch.testing.assert_close(out[0, 6:], x[0, 6:] + scale * update)
    x[0, :6] = torch.randn(6, config.n_embd) * 5
    torch.testing.assert_close(block(x, cos, sin, valid=valid)[0, 6:], out[0, 6:])


def test_capacity_one_equals_the_dense_block_up_to_the_router_scale():
    config = mod_config(mod_capacity=1.0)
    routed = RoutedBlock(config).train()
    dense = Block(config)
    dense.load_state_dict(routed.state_dict(), strict=False)
    x, cos, sin = block_inputs(config)
    scale = 2 * torch.sigmoid(routed.router(F.rms_norm(x, (x.size(-1),)))).float()
    torch.testing.assert_close(routed(x, cos, sin), x + scale * (dense(x, cos, sin) - x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scale_by_router", [True, False])
def test_router_gets_the_lm_gradient_only_through_the_scale(scale_by_router):
    config = mod_config(mod_scale_by_router=scale_by_router, mod_aux_weight=0.0)
    model = Transformer(config).train()
    idx = torch.randint(0, config.vocab_size, (2, 32))
    F.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
    grads = [b.router.weight.grad for b in model.routed_blocks.values()]
    if scale_by_router:
        assert all(g is not None and g.abs().sum() > 0 for g in grads)
    else:
        assert all(g is None or g.abs().sum() == 0 for g in grads)


def test_batch_rows_are_routed_independently():
    config = mod_config()
    block = RoutedBlock(config).train()
    x, cos, sin = block_inputs(config, B=4)
    together = block(x, cos, sin)
    alone = torch.cat([block(x[b : b + 1], cos, sin) for b in range(4)])
    torch.testing.assert_close(together, alone)


def test_bf16_autocast_forward_and_backward_reach_every_router_with_the_fp32_loss():
    model = Transformer(mod_config()).train()
    idx = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        reference = F.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(idx)
    loss = F.cross_entropy(logits.float().flatten(0, 1), idx.flatten())
    loss.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=0.01)
    for block in model.routed_blocks.values():  # the router scale stays on the gradient path under autocast
        assert block.router.weight.grad.isfinite().all() and block.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("rule", ["router", "predictor"])
def test_inference_routing_is_causal(rule):
    torch.manual_seed(1)
    model = Transformer(mod_config(mod_causal_rule=rule)).eval()
    idx = torch.randint(0, 256, (2, 40))
    changed = idx.clone()
    changed[:, 25:] = torch.randint(0, 256, (2, 15))
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :25], b[:, :25], rtol=0, atol=1e-6)
    selected = torch.stack([blk.routing.selected for blk in model.routed_blocks.values()])
    assert 0 < selected.float().mean() < 1, "the test needs tokens that skip and tokens that do not"


def test_top_k_training_routing_looks_ahead():
    # The reason inference needs a causal rule: top-k membership of early tokens depends on later ones.
    torch.manual_seed(1)
    model = Transformer(mod_config()).train()
    idx = torch.randint(0, 256, (1, 40))
    changed = idx.clone()
    changed[:, 20:] = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        assert not torch.allclose(model(idx)[:, :20], model(changed)[:, :20])


def test_kv_cache_decoding_equals_full_recompute_and_skipped_tokens_leave_no_entry():
    torch.manual_seed(2)
    model = Transformer(mod_config()).eval()
    prompt = torch.randint(0, 256, (2, 7))
    out = generate(model, prompt, max_new_tokens=25)
    cache = model.make_kv_cache(2, out.size(1))
    with torch.no_grad():
        stepwise = [model(out[:, :7], kv_cache=cache)[:, -1]]
        for pos in range(7, out.size(1) - 1):
            stepwise.append(model(out[:, pos : pos + 1], kv_cache=cache, start_pos=pos)[:, -1])
        full = model(out[:, :-1])
    torch.testing.assert_close(torch.stack(stepwise, 1), full[:, 6:], atol=1e-5, rtol=1e-5)
    assert torch.equal(full[:, 6:].argmax(-1), out[:, 7:])
    for i, block in model.routed_blocks.items():  # the cache marks exactly the tokens the full pass routed
        assert torch.equal(cache[i].routed[:, : out.size(1) - 1], block.routing.selected)


def test_predictor_learns_the_top_k_choice_on_a_toy_task():
    torch.manual_seed(0)
    config = mod_config(mod_capacity=0.5, mod_causal_rule="predictor", mod_predictor_hidden=32)
    block = RoutedBlock(config).train()
    optimizer = torch.optim.AdamW(block.predictor.parameters(), lr=1e-2)
    for _ in range(300):
        x, cos, sin = block_inputs(config, B=8, T=32)
        block(x, cos, sin)
        loss = block.routing.predictor_bce()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x, cos, sin = block_inputs(config, B=8, T=32)
    block(x, cos, sin)
    routing = block.routing
    accuracy = ((routing.predictor_logits > 0) == routing.topk).float().mean()
    assert accuracy > 0.9


def test_predictor_loss_trains_only_the_predictor():
    """The predictor reads the router's input through a stop-gradient: its BCE must not move the router, the
    block or anything below it (the paper: it "does not affect the LM objective")."""
    model = Transformer(mod_config()).train()
    model(torch.randint(0, 256, (2, 16)))
    sum(block.routing.predictor_bce() for block in model.routed_blocks.values()).backward()
    reached = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert reached == {name for name, _ in model.named_parameters() if ".predictor." in name}


def test_flops_per_token_falls_with_capacity():
    dense = Transformer(ModelConfig.from_name("micro", n_layer=8)).flops_per_token(512)
    full = Transformer(ModelConfig.from_name("micro", n_layer=8, mod_capacity=1.0)).flops_per_token(512)
    eighth = Transformer(ModelConfig.from_name("micro", n_layer=8, mod_capacity=0.125)).flops_per_token(512)
    assert eighth < dense < full  # routers and predictors cost a little at capacity 1


def test_flops_per_token_without_top_k_counts_every_token_through_routed_blocks():
    full = Transformer(ModelConfig.from_name("micro", n_layer=8, mod_capacity=1.0)).flops_per_token(512)
    eighth = Transformer(ModelConfig.from_name("micro", n_layer=8, mod_capacity=0.125))
    assert eighth.flops_per_token(512, top_k=False) == full  # the causal rule's masked path computes all tokens


def test_routing_statistics_are_finite_when_one_token_goes_through_a_layer():
    """A batch of one sequence with k = 1 (capacity x length < 2) routes one token per layer: its scale std is 0."""
    from training.routing import routing_stats

    model = Transformer(mod_config(mod_capacity=0.125, mod_predictor=True)).train()
    model(torch.randint(0, 256, (1, 8)))
    stats = routing_stats(model)
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values()), stats
    assert stats["mod/layer01/scale_std"] == 0
