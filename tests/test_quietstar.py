"""Quiet-STaR training forward: the thought mask, causality, the loss terms, REINFORCE, save/load/export, MoD."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from modeldefs import ModelConfig, Transformer
from modeldefs.logprob import token_log_prob
from modeldefs.pretrained import export_hf, load_checkpoint, load_pretrained
from modeldefs.quietstar import QuietStar, ThoughtConfig, ThoughtKVCache, thought_attention_mask

# Small but complete: <start>, 2 sampled tokens, <end>, then 3 talk tokens; 2 thoughts per position.
CONFIG = ThoughtConfig(n_ahead=5, n_ahead_talk=3, n_passes=2)


def make_model(mod_capacity: float | None = None, **overrides) -> QuietStar:
    torch.manual_seed(0)
    # init_std well above the default: attention sharp enough that positions and masks matter visibly
    lm = Transformer(ModelConfig.from_name("micro", mod_capacity=mod_capacity, mod_exempt_last=False, init_std=0.3))
    assert mod_capacity is None or lm.routed_blocks  # micro has 2 layers: the last one is the routed one
    model = QuietStar(lm, dataclasses.replace(CONFIG, **overrides), init_token_id=7)
    # A head that actually mixes, so thoughts change predictions (the zero init would hide them).
    torch.nn.init.normal_(model.mixing_head.net[-1].weight, std=0.3)
    return model


def ids(B: int = 2, T: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_thought_mask_allows_exactly_the_prefix_and_the_own_chain():
    T, n_passes = 7, 4
    positions = torch.tensor([0, 2, 5])
    P = len(positions)
    mask = thought_attention_mask(T, positions, n_passes)
    assert mask.shape == (P, T + (n_passes - 1) * P)
    for p, t in enumerate(positions.tolist()):
        allowed = {s for s in range(T) if s <= t} | {T + i * P + p for i in range(n_passes - 1)}
        assert set(mask[p].nonzero().flatten().tolist()) == allowed


def test_parallel_thoughts_equal_each_thought_run_as_its_own_sequence():
    """Behavioural check of mask and positions: chain t computed in parallel = the plain decoder on
    x_0..x_t, <start>, sampled tokens, <end>, x_{t+1}.. with ordinary causal attention."""
    model = make_model()
    x = ids()
    out = model(x, generator=gen())
    lm, K = model.lm, CONFIG.n_ahead_talk
    xs = x.repeat_interleave(CONFIG.n_passes, 0)
    with torch.no_grad():
        for n, p in [(0, 0), (1, 4), (3, len(out.positions) - 1)]:
            t = int(out.positions[p])
            seq = torch.cat([
                lm.embed(xs[n, : t + 1]), model.meta_embedding("start", (1,)),
                lm.embed(out.thought_tokens[n, p]), model.meta_embedding("end", (1,)),
                lm.embed(xs[n, t + 1: t + K]),
            ])
            h = lm.hidden(seq[None])[0]
            h_talk = h[-K:]
            h_base = lm.hidden(lm.embed(xs[n: n + 1]))[0, t: t + K]
            expected = model.mix(h_base, h_talk)[0]
            torch.testing.assert_close(out.mixed_logits[n, p], expected, atol=1e-5, rtol=1e-5)
    assert out.thought_tokens.shape == (xs.size(0), len(out.positions), CONFIG.n_ahead - 3)


def thought_logits(model: QuietStar, row: torch.Tensor, t: int, thought: torch.Tensor) -> torch.Tensor:
    """(n_sampled, V): the plain decoder's logits for each sampled token of the thought taken at t, from
    x_0..x_t, <start> and the thought's earlier tokens as one ordinary causal sequence."""
    lm = model.lm
    with torch.no_grad():
        seq = torch.cat([lm.embed(row[: t + 1]), model.meta_embedding("start", (1,)), lm.embed(thought[:-1])])
        return lm.lm_head(lm.hidden(seq[None]))[0, t + 1:]


def test_greedy_thought_tokens_are_the_argmax_of_each_chains_own_logits():
    model = make_model(thought_temperature=0.0)
    x = ids()
    out = model(x, generator=gen())
    xs = x.repeat_interleave(CONFIG.n_passes, 0)
    for n in range(xs.size(0)):
        for p, t in enumerate(out.positions.tolist()):
            thought = out.thought_tokens[n, p]
            assert torch.equal(thought_logits(model, xs[n], t, thought).argmax(-1), thought), (n, t)


@pytest.mark.parametrize("mod_capacity", [None, 0.5], ids=["dense", "mod"])
def test_future_tokens_never_change_outputs_at_or_before_t(mod_capacity):
    model = make_model(mod_capacity)
    x = ids(T=14)
    m = 9  # perturbed position
    y = x.clone()
    y[:, m:] = (y[:, m:] + 1 + torch.arange(y.size(1) - m)) % 256
    a, b = model(x, generator=gen()), model(y, generator=gen())
    torch.testing.assert_close(a.base_logits[:, :m], b.base_logits[:, :m], atol=0, rtol=0)
    # mixed[p, k] predicts x_{t+k+1} from tokens <= t+k
    t_plus_k = a.positions[:, None] + torch.arange(CONFIG.n_ahead_talk)
    keep = t_plus_k < m
    assert keep.any() and not keep.all()
    torch.testing.assert_close(a.mixed_logits[:, keep], b.mixed_logits[:, keep], atol=0, rtol=0)
    assert not torch.equal(a.mixed_logits[:, ~keep], b.mixed_logits[:, ~keep])
    with torch.no_grad():
        la, lb = model.next_token_logits(x), model.next_token_logits(y)
    torch.testing.assert_close(la[:, :m], lb[:, :m], atol=0, rtol=0)
    assert not torch.equal(la[:, m:], lb[:, m:])


def test_with_mixing_weight_zero_the_loss_is_the_plain_nll():
    model = make_model(mixing_bound="none")
    torch.nn.init.zeros_(model.mixing_head.net[-1].weight)  # w = 0 exactly
    x = ids()
    out = model(x, generator=gen())
    assert torch.all(out.mixing_weight == 0)
    with torch.no_grad():
        logits = model.lm(x)
    token_nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), x[:, 1:], reduction="none")
    talk = out.positions[:, None] + torch.arange(CONFIG.n_ahead_talk)  # predicting position + 1
    torch.testing.assert_close(out.lm_nll, token_nll.mean())
    torch.testing.assert_close(out.base_nll, token_nll[:, talk].mean())
    torch.testing.assert_close(out.mixed_nll, out.base_nll)
    assert torch.all(out.reward == 0) and out.policy_loss == 0
    torch.testing.assert_close(out.loss, 0.5 * token_nll.mean() + 0.5 * token_nll[:, talk].mean())


def test_reinforce_raises_the_log_prob_of_a_thought_that_helped():
    """One position, two thoughts of one sampled token each: the one that made the true next token
    likelier (positive advantage) becomes likelier itself after one SGD step on the policy loss."""
    model = make_model(n_ahead=4, n_ahead_talk=1, base_loss_weight=0.0, mixed_loss_weight=0.0,
                       policy_loss_weight=1.0, thought_temperature=3.0)
    x = ids(B=1, T=3)[:, :2]  # T=2: a single thought position (t=0)
    for seed in range(20):  # find samples where the two thoughts differ
        out = model(x, generator=gen(seed))
        if out.thought_tokens[0, 0, 0] != out.thought_tokens[1, 0, 0]:
            break
    true_nll = F.cross_entropy(out.mixed_logits[:, 0, 0], x[0, 1].expand(2), reduction="none")
    assert true_nll[0] != true_nll[1]
    better = int(true_nll.argmin())
    token = out.thought_tokens[better, 0, 0]

    def log_p() -> torch.Tensor:  # log p(token | x_0, <start>) at the REINFORCE temperature
        with torch.no_grad():
            seq = torch.cat([model.lm.embed(x[0, :1]), model.meta_embedding("start", (1,))])
            logits = model.lm.lm_head(model.lm.hidden(seq[None]))[0, -1]
            return F.log_softmax(logits / model.thought_config.reinforce_temperature, -1)[token]

    before = log_p()
    out.loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 1e-2 * p.grad
    assert log_p() > before


def test_sampled_thought_tokens_follow_the_tempered_softmax_and_never_a_zero_probability_token():
    model = make_model()
    logits = torch.tensor([2.0, 0.0, -1.0, float("-inf"), 1.0]).expand(40_000, 5)
    tokens = model.sample_thought(logits, temperature=2.0, generator=gen())
    frequency = torch.bincount(tokens, minlength=5) / tokens.numel()
    assert frequency[3] == 0
    # 40,000 draws: the standard error of each frequency is below 0.0025
    torch.testing.assert_close(frequency, (logits[0] / 2.0).softmax(-1), atol=0.01, rtol=0)

@pytest.mark.parametrize("subtract_baseline, clamp_reward", [(True, True), (True, False), (False, False)])
def test_policy_loss_is_the_advantage_weighted_log_prob_of_each_sampled_thought(subtract_baseline, clamp_reward):
    """reward = NLL_base - NLL_mixed summed over the talk tokens; advantage = reward minus the mean over an
    example's n_passes thoughts (subtract_baseline), clamped at 0 (clamp_reward); policy loss = -mean of
    advantage x log p(token) at reinforce_temperature, each recomputed here as its own causal sequence."""
    model = make_model(subtract_baseline=subtract_baseline, clamp_reward=clamp_reward)
    x = ids()
    out = model(x, generator=gen())
    c, K = model.thought_config, CONFIG.n_ahead_talk
    xs = x.repeat_interleave(c.n_passes, 0)
    talk = out.positions[:, None] + torch.arange(1, K + 1)                       # (P, K)
    base_nll = F.cross_entropy(out.base_logits[:, talk - 1].flatten(0, 2), x[:, talk].flatten(), reduction="none")
    mixed_nll = F.cross_entropy(out.mixed_logits.flatten(0, 2), xs[:, talk].flatten(), reduction="none")
    reward = (base_nll.view(x.size(0), 1, -1, K).repeat_interleave(c.n_passes, 0).flatten(1, 2)
              - mixed_nll.view(xs.size(0), -1, K)).sum(-1)                       # (N, P)
    torch.testing.assert_close(out.reward, reward, atol=1e-5, rtol=1e-5)
    advantage = reward.view(x.size(0), c.n_passes, -1)
    if subtract_baseline:
        advantage = advantage - advantage.mean(1, keepdim=True)
    advantage = advantage.flatten(0, 1).clamp(min=0) if clamp_reward else advantage.flatten(0, 1)
    assert (advantage == 0).any() == clamp_reward  # the clamp has something to do in this case
    log_p = torch.stack([torch.stack([
        F.log_softmax(thought_logits(model, xs[n], t, out.thought_tokens[n, p]) / c.reinforce_temperature, -1)
        .gather(-1, out.thought_tokens[n, p, :, None])[:, 0]
        for p, t in enumerate(out.positions.tolist())]) for n in range(xs.size(0))])  # (N, P, n_sampled)
    torch.testing.assert_close(out.policy_loss, -(advantage[..., None] * log_p).mean(), atol=1e-6, rtol=1e-5)


def test_policy_loss_gets_no_gradient_through_its_reward():
    """REINFORCE differentiates only log p(thought): the reward (and its baseline) is a constant. The mixing
    head and <end> enter the policy loss only through the reward (<end> comes after the sampled tokens), so
    they get no gradient from it; <start> and the decoder, which produce the sampled tokens, do. The mixed
    NLL trains the mixing head and both meta tokens."""
    model = make_model(clamp_reward=False)  # every thought's advantage counts
    out = model(ids(), generator=gen())
    assert out.reward.abs().sum() > 0
    names = [name for name, _ in model.named_parameters()]

    def reached(loss: torch.Tensor) -> set[str]:
        grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True, allow_unused=True)
        return {name for name, g in zip(names, grads) if g is not None and g.abs().sum() > 0}

    policy, mixed = reached(out.policy_loss), reached(out.mixed_nll)
    assert "start_thought" in policy and "lm.embed.weight" in policy
    assert "end_thought" not in policy and not any(name.startswith("mixing_head.") for name in policy)
    assert {"start_thought", "end_thought", "mixing_head.net.4.weight"} <= mixed


def _trained_looking(model: QuietStar) -> QuietStar:
    with torch.no_grad():  # move meta tokens and head off their initial values, as training would
        model.start_thought.add_(torch.randn_like(model.start_thought))
        model.end_thought.add_(torch.randn_like(model.end_thought))
        for p in model.mixing_head.parameters():
            p.add_(torch.randn_like(p))
    return model


def reference_log_prob(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    return (logits.float() / temperature).log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_token_log_prob_equals_log_softmax_in_value_and_gradient(temperature):
    logits = torch.randn(3, 5, 300, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 300, (3, 5))
    upstream = torch.randn(3, 5)  # as REINFORCE's advantages weight them
    expected = reference_log_prob(logits, tokens, temperature)
    (expected_grad,) = torch.autograd.grad((expected * upstream).sum(), logits)
    got = token_log_prob(logits, tokens, temperature)
    (got_grad,) = torch.autograd.grad((got * upstream).sum(), logits)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got_grad, expected_grad)


def test_token_log_prob_keeps_bf16_logits_not_an_fp32_log_softmax():
    logits = torch.randn(4, 7, 500, requires_grad=True)
    tokens = torch.randint(0, 500, (4, 7))
    kept = {}
    for name, log_prob in (("reference", reference_log_prob), ("ours", token_log_prob)):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            got = log_prob(logits.bfloat16(), tokens, 2.0)
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage() for t in saved if t.size(-1) == 500}
        kept[name] = sum(s.nbytes() for s in storages.values())  # gather saves log_softmax's output again
        got.sum().backward()
    assert kept["reference"] == 4 * 7 * 500 * 4  # the fp32 log-softmax
    assert kept["ours"] == 4 * 7 * 500 * 2  # the bf16 logits


def test_meta_tokens_and_mixing_head_survive_a_checkpoint_bit_exact(tmp_path):
    model = _trained_looking(make_model())
    path = tmp_path / "qs.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "model_config": model.lm.config.to_dict(), "thought_config": model.thought_config.to_dict()}, path)
    loaded = load_checkpoint(path)
    assert isinstance(loaded, QuietStar) and loaded.thought_config == model.thought_config
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = ids()
    torch.testing.assert_close(loaded.next_token_logits(x), model.next_token_logits(x), atol=0, rtol=0)


def test_meta_tokens_and_mixing_head_survive_hf_export_bit_exact(tmp_path):
    model = _trained_looking(make_model())
    out = export_hf(model, tmp_path / "hf")
    assert json.loads((out / "thought_config.json").read_text()) == model.thought_config.to_dict()
    loaded = load_pretrained(str(out))
    assert isinstance(loaded, QuietStar)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_a_checkpoint_missing_the_meta_tokens_is_refused(tmp_path):
    model = make_model()
    state = {f"model.{k}": v for k, v in model.state_dict().items() if "thought" not in k}
    path = tmp_path / "qs.ckpt"
    torch.save({"state_dict": state, "model_config": model.lm.config.to_dict(),
                "thought_config": model.thought_config.to_dict()}, path)
    with pytest.raises(RuntimeError, match="start_thought"):
        load_checkpoint(path)


def test_mod_model_thinks_trains_and_routes_by_its_causal_rule():
    model = make_model(mod_capacity=0.5)
    out = model(ids(), generator=gen())
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for block in model.lm.routed_blocks.values():
        assert block.routing.topk is None  # causal rule, not top-k, in every pass
        grad = block.router.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert model.start_thought.grad.abs().sum() > 0 and model.mixing_head.net[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("think", [True, False])
def test_inference_logits_of_a_mod_model_route_by_its_causal_rule_in_train_mode_too(think):
    """`load_pretrained` returns train mode; `next_token_logits` is inference, with and without thoughts alike:
    the causal rule, never training's top-k (which looks ahead)."""
    model = make_model(mod_capacity=0.5)
    with torch.no_grad():
        trained = model.train().next_token_logits(ids(), think=think)
        deployed = model.eval().next_token_logits(ids(), think=think)
    torch.testing.assert_close(trained, deployed)


def test_mod_thought_pass_that_no_row_routes_skips_the_block_and_still_runs():
    model = make_model(mod_capacity=0.5)
    (block,) = model.lm.routed_blocks.values()
    with torch.no_grad():
        block.router.bias.fill_(-100.0)  # nothing routed: single-chain passes skip the block
    # Lengths of the passes that reach the block, and of those that run its attention (its computation's start).
    reached, computed = [], []
    block.register_forward_pre_hook(lambda module, args: reached.append(args[0].size(1)))
    block.attn.register_forward_pre_hook(lambda module, args: computed.append(args[0].size(1)))
    out = model(ids(T=CONFIG.n_ahead_talk + 1), generator=gen())  # one thought position
    assert len(out.positions) == 1 and torch.isfinite(out.loss)
    assert 1 in reached and computed == [n for n in reached if n > 1]  # only the multi-token prefix pass computes


def test_thought_cache_refuses_a_pass_out_of_order_or_off_the_pass_grid():
    T, P, D = 4, 2, 8
    mask = thought_attention_mask(T, torch.tensor([0, 2]), n_passes=4)
    cache = ThoughtKVCache(1, T, P, mask.size(1), torch.device("cpu"))
    x = torch.randn(1, 1, T, D)
    cache.attend(x, x, x, 0, None)
    t = torch.randn(1, 1, P, D)
    cache.attend(t, t, t, T + P, mask[:, : T + 2 * P])  # pass 2 after a skipped pass 1 (a routed layer)
    for start_pos in (T, T + P, T + 2 * P + 1):  # passes 1 and 2 again, a slot between passes
        with pytest.raises(ValueError, match="one slot per chain per pass, in order"):
            cache.attend(t, t, t, start_pos, mask)
    assert cache.chain[0].shape == (1, 1, P, 2, D)  # the skipped pass holds a masked-out slot


def test_stride_thinks_at_every_stride_th_position_only():
    model = make_model(stride=3)
    out = model(ids(T=16), generator=gen())
    assert out.positions.tolist() == [0, 3, 6, 9, 12]  # t + n_ahead_talk <= 15
    assert out.mixed_logits.shape[:3] == (4, 5, CONFIG.n_ahead_talk)


@pytest.mark.parametrize("field, value", [
    ("n_ahead", 3), ("n_ahead_talk", 0), ("n_passes", 0), ("stride", 0), ("thought_temperature", -1.0),
    ("reinforce_temperature", 0.0), ("policy_loss_weight", -1.0), ("mixing_bound", "tanh"),
])
def test_bad_config_values_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ThoughtConfig(**{field: value})


@pytest.mark.parametrize("field, value", [
    ("n_ahead", 6.0), ("n_ahead_talk", 2.0), ("n_passes", True), ("stride", "2"), ("thought_temperature", float("nan")),
    ("eval_thought_temperature", "0.7"), ("policy_loss_weight", float("inf")), ("clamp_reward", "false"),
    ("subtract_baseline", 1),
])
def test_config_values_of_the_wrong_type_are_refused_naming_the_field(field, value):
    """`thoughts:` is an untyped dict in the CLI config: ThoughtConfig itself must refuse what would fail
    deep in the forward (a float count) or misbehave silently (a NaN temperature, the string "false")."""
    with pytest.raises(ValueError, match=f"{field}="):
        ThoughtConfig(**{field: value})


def test_unknown_config_key_is_named():
    with pytest.raises(ValueError, match="n_thoughts"):
        ThoughtConfig.from_dict({"n_thoughts": 3})


def test_sequences_too_short_or_too_long_are_refused():
    model = make_model()
    with pytest.raises(ValueError, match="n_ahead_talk"):
        model(ids(T=3))
    with pytest.raises(ValueError, match="block_size"):
        model(ids(T=model.lm.config.block_size))
    with pytest.raises(ValueError, match="init_token_id"):
        QuietStar(model.lm, CONFIG, init_token_id=10_000)
