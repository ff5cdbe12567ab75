"""The single-process pieces of the fast path: fused linear + cross-entropy, activation checkpointing,
blocks that compile to one graph, the finite-loss check interval, and the throughput benchmark on a
tiny shape."""

from __future__ import annotations

import copy
import pickle
import platform
import subprocess
import sys
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from modeldefs import ModelConfig, Transformer
from modeldefs.quietstar import QuietStar, ThoughtConfig
from tests.conftest import REPO
from training.lm import CausalLM
from training.loss import linear_cross_entropy
from training.parallelize import apply_activation_checkpointing
from training.quietstar_lm import recompute_mlps


def reference_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy((hidden @ weight.T).float().flatten(0, 1), labels.flatten(), ignore_index=-100)


@pytest.mark.parametrize("chunk_size,compiled", [(1, False), (7, False), (64, False), (1000, False), (7, True),
                                                 (1000, True)])
def test_linear_cross_entropy_matches_full_logits_in_value_and_gradients(chunk_size, compiled):
    hidden = torch.randn(3, 21, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (3, 21))
    labels[0, :5] = -100
    expected = reference_loss(hidden, weight, labels)
    expected_grads = torch.autograd.grad(expected * 3, (hidden, weight))
    torch._dynamo.reset()
    counters.clear()
    got = linear_cross_entropy(hidden, weight, labels, chunk_size, compiled=compiled)
    assert counters["stats"]["unique_graphs"] == (1 if compiled else 0)  # one graph for every chunk
    got_grads = torch.autograd.grad(got * 3, (hidden, weight))  # an upstream gradient other than 1
    torch.testing.assert_close(got, expected)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e)
    with torch.no_grad():  # the evaluation path (no gradients computed in forward)
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, labels, chunk_size), expected)


@pytest.mark.parametrize("compiled", [False, True])
def test_linear_cross_entropy_under_bf16_autocast_is_close_to_fp32(compiled):
    hidden = torch.randn(2, 33, 32, requires_grad=True)
    weight = (torch.randn(300, 32) * 0.1).requires_grad_()
    labels = torch.randint(0, 300, (2, 33))
    expected = reference_loss(hidden, weight, labels)
    expected_grads = torch.autograd.grad(expected, (hidden, weight))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(hidden, weight, labels, 16, compiled=compiled)
    got.backward()
    assert got.dtype == torch.float32 and weight.grad.dtype == torch.float32 and hidden.grad.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
    for got_grad, expected_grad in zip((hidden.grad, weight.grad), expected_grads):
        torch.testing.assert_close(got_grad, expected_grad, rtol=0.05, atol=0.05 * expected_grad.abs().max().item())


def test_linear_cross_entropy_under_fp16_keeps_the_loss_scale_s_gradients_out_of_the_subnormals():
    """16-mixed: GradScaler multiplies the loss (65536 at first) so that fp16 gradients stay in range. The
    fused loss computes its gradients in forward, in fp16: the 1/tokens factor must wait for that scale, or
    a 16k-token batch's grad_hidden lands among the fp16 subnormals (~1.4% error, 2% of it zero)."""
    hidden = torch.randn(16384, 32)
    weight = torch.randn(256, 32) * 0.02
    labels = torch.randint(0, 256, (16384,))
    exact = [t.half().double().requires_grad_() for t in (hidden, weight)]  # the fp16 inputs, in fp64
    F.cross_entropy(exact[0] @ exact[1].T, labels).backward()
    hidden.requires_grad_(), weight.requires_grad_()
    with torch.autocast("cpu", dtype=torch.float16):
        (linear_cross_entropy(hidden, weight, labels, 1024) * 65536.0).backward()
    for got, want in zip((hidden.grad, weight.grad), (exact[0].grad, exact[1].grad)):
        assert ((got.double() / 65536 - want).norm() / want.norm()).item() < 2e-3
    assert (hidden.grad == 0).float().mean() < 1e-3


def test_causal_lm_loss_is_the_same_fused_or_not_and_compiled_or_not():
    lm = {name: CausalLM(model="micro", loss_chunk_size=chunk, compile=compile)
          for name, chunk, compile in (("full", None, False), ("fused", 8, False), ("compiled", 8, True))}
    for m in lm.values():
        torch.manual_seed(0)
        m.configure_model()
    batch = {"input_ids": torch.randint(0, 256, (2, 20)), "labels": torch.randint(0, 256, (2, 20))}
    losses = {}
    for name, m in lm.items():
        torch._dynamo.reset()
        counters.clear()
        losses[name] = m.loss(batch)
        losses[name].backward()
        if name == "compiled":  # one graph per block kind, one for the loss's chunks
            assert counters["stats"]["unique_graphs"] == 2
    torch.testing.assert_close(losses["fused"], losses["full"])
    torch.testing.assert_close(losses["compiled"], losses["full"])
    for p_full, p_compiled in zip(lm["full"].parameters(), lm["compiled"].parameters()):
        torch.testing.assert_close(p_compiled.grad, p_full.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("policy", ["block", "selective"])
@pytest.mark.parametrize("mod", [False, True])
def test_activation_checkpointing_keeps_names_types_and_gradients(policy, mod):
    config = ModelConfig.from_name("micro", n_layer=4, **({"mod_capacity": 0.5} if mod else {}))
    x = torch.randint(0, config.vocab_size, (2, 24))
    grads = {}
    for name in ("none", policy):
        torch.manual_seed(0)
        model = Transformer(config)
        apply_activation_checkpointing(model, name)
        model(x).logsumexp(-1).mean().backward()
        grads[name] = {k: p.grad for k, p in model.named_parameters()}
        types = [type(b) for b in model.blocks]
    assert list(grads[policy]) == list(grads["none"])  # same parameter names: checkpoints are interchangeable
    assert types == [type(b) for b in Transformer(config).blocks]
    for k, g in grads["none"].items():
        torch.testing.assert_close(grads[policy][k], g, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("recompute", ["block", "selective", "mlp"])
def test_a_copy_of_a_checkpointed_model_computes_with_its_own_weights(recompute):
    """copy.deepcopy (a frozen reference model, an EMA teacher) and pickling (torch.save of the model) of a model whose
    blocks or MLPs recompute in backward: the copy runs its own weights and gradients reach them, not the original's."""
    config = ModelConfig.from_name("micro", n_layer=4, mod_capacity=0.5)
    torch.manual_seed(0)
    model = Transformer(config)
    if recompute == "mlp":
        recompute_mlps(model)
    else:
        apply_activation_checkpointing(model, recompute)
    x = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    for copy_of in (copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))):
        copied = copy_of(model)
        with torch.no_grad():
            for block in copied.blocks:
                block.mlp.down.weight.mul_(2)
        fresh = Transformer(config)
        fresh.load_state_dict(copied.state_dict())
        got = copied(x)
        torch.testing.assert_close(got, fresh(x))
        got.logsumexp(-1).mean().backward()
        assert all(p.grad is None for p in model.parameters())
        assert all(block.mlp.down.weight.grad is not None for block in copied.blocks)


def test_checkpointed_blocks_compile_to_one_graph_that_still_recomputes(monkeypatch):
    """configure_model checkpoints, then compiles each block (torchtitan's order). The compiled blocks
    must be compiled (dynamo skips a frame that starts in `checkpoint` itself), share one graph over
    all layers, give eager's gradients, and keep checkpointing's memory saving inside the graph: block
    keeps less than selective (matmul and attention outputs kept), which keeps less than none."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from report import saved_activation_bytes  # counts a compiled graph's saved tensors too

    aot_eager = torch._dynamo.lookup_backend("aot_eager")  # AOT autograd's partitioner, no kernels built
    config = ModelConfig.from_name("micro", n_layer=4)
    x = torch.randint(0, config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    reference = Transformer(config)  # eager, no checkpointing
    reference(x).logsumexp(-1).mean().backward()
    saved: dict[str, int] = {}
    for policy in ("none", "selective", "block"):
        torch.manual_seed(0)
        model = Transformer(config)
        apply_activation_checkpointing(model, policy)
        graphs: list[torch.fx.GraphModule] = []

        def counting(gm: torch.fx.GraphModule, inputs: list) -> Any:
            graphs.append(gm)
            return aot_eager(gm, inputs)

        torch._dynamo.reset()
        for block in model.blocks:
            block.compile(backend=counting, fullgraph=True)
        saved[policy] = saved_activation_bytes(lambda: model(x).logsumexp(-1).mean(), model.parameters())
        assert len(graphs) == 1, f"{policy}: {len(graphs)} graphs for {config.n_layer} layers"
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=lambda m: f"{policy} {name}: {m}")
    assert saved["block"] < saved["selective"] < saved["none"], saved


@pytest.mark.parametrize("kind", ["dense", "routed-topk", "routed-causal"])
def test_every_kind_of_block_compiles_to_one_graph_without_breaks(kind):
    """`apply_compile` compiles each block; a graph break would split it and add host round trips.
    fullgraph=True raises on any break (the eager backend traces without building kernels)."""
    config = ModelConfig.from_name("micro", mod_capacity=None if kind == "dense" else 0.5, mod_exempt_last=False)
    model = Transformer(config).train(kind != "routed-causal")
    block = model.blocks[1]
    x = torch.randn(2, 16, config.n_embd, requires_grad=True)
    cos, sin = model.rope_cos[:16][None], model.rope_sin[:16][None]
    torch._dynamo.reset()
    compiled = torch.compile(block, backend="eager", fullgraph=True)
    got = compiled(x, cos, sin)
    got.sum().backward()
    torch.testing.assert_close(got, block(x, cos, sin))


@pytest.mark.parametrize("mod_capacity, recompute", [(None, False), (0.5, False), (None, True)])
def test_quietstar_thought_passes_compile_to_a_few_graphs_whatever_the_thought_length(mod_capacity, recompute):
    """Every thought pass widens the cache by one slot per chain. Compiled blocks must not get one graph
    per pass: the 15 passes of configs/quietstar-smollm2-135m.yaml would pass dynamo's recompile limit (8)
    and run the rest eager. Pass 0, pass 1 and pass 2 get their own graphs, every later pass shares one
    with dynamic sizes: the same count for 9 and for 15 passes, compiled without breaks and equal to
    eager; with the MLPs recomputed (`activation_checkpointing: mlp`) too, and not once per layer.
    (Inductor adds one graph of a routed block for the last pass, whose slice of the routing buffer
    is the whole buffer.)"""
    graphs: list[torch.fx.GraphModule] = []

    def counting(gm: torch.fx.GraphModule, inputs: list) -> torch.fx.GraphModule:
        graphs.append(gm)
        return gm.forward

    counts = {}
    for n_ahead in (6, 12):
        torch.manual_seed(0)
        config = ModelConfig.from_name("micro", n_layer=4, mod_capacity=mod_capacity, mod_exempt_last=False)
        model = QuietStar(Transformer(config), ThoughtConfig(n_ahead=n_ahead, n_ahead_talk=4), init_token_id=7)
        x = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
        eager = model(x, generator=torch.Generator().manual_seed(0)).loss
        if recompute:
            recompute_mlps(model.lm)
        torch._dynamo.reset()
        graphs.clear()
        for block in model.lm.blocks:
            block.compile(backend=counting, fullgraph=True)
        for seed in range(2):  # the second step reuses every graph
            compiled = model(x, generator=torch.Generator().manual_seed(seed)).loss
            if seed == 0:
                torch.testing.assert_close(compiled, eager)
                compiled.backward()
        counts[n_ahead] = len(graphs)
    kinds = 1 if mod_capacity is None else 2  # Block.forward, RoutedBlock.forward
    assert counts[6] == counts[12] == 4 * kinds, counts


def test_unknown_activation_checkpointing_policy_is_named():
    with pytest.raises(ValueError, match="activation_checkpointing='everything'"):
        apply_activation_checkpointing(Transformer(ModelConfig.from_name("micro")), "everything")


def test_bad_finite_check_interval_and_schedule_settings_name_the_field():
    with pytest.raises(ValueError, match="finite_check_interval=0"):
        CausalLM(model="micro", finite_check_interval=0)
    for bad in ({"min_lr_ratio": 5.0}, {"warmup_steps": -5}, {"lr": -1.0}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))}={next(iter(bad.values()))}"):
            CausalLM(model="micro", **bad)


def test_throughput_benchmark_prints_its_tables_on_cpu():
    script = REPO / "benchmarks" / "train_throughput.py"
    common = ["--shape", "micro", "--seq", "32", "--batch", "2", "--threads", "1"]
    runs = [[*common, "--steps", "1", "--rounds", "1", "--warmup", "1", "--variants", "hf", "qd", "mod", "qd-acblock"],
            [*common, "--max-batch", "--memory-budget-gib", "0.002", "--batch-limit", "2", "--default-heap"]]
    outputs = []
    for extra in runs:
        proc = subprocess.run([sys.executable, str(script), *extra], cwd=REPO, capture_output=True, text=True,
                              timeout=300, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs.append(proc.stdout)
    for variant in ("hf", "qd", "mod", "qd-acblock"):
        assert f"| {variant} |" in outputs[0]
    for policy in ("none", "selective", "block"):
        assert f"| {policy} |" in outputs[1]
    if platform.libc_ver()[0] == "glibc":  # the steady heap is the default; --default-heap leaves malloc alone
        assert '"cpu_heap_kept": true' in outputs[0] and '"cpu_heap_kept": false' in outputs[1]
