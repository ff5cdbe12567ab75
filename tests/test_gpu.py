"""CUDA: a bf16-mixed CLI fit with throughput/MFU logging, no host syncs between logging steps, bf16 numerics,
compiled blocks (checkpointed too), generation."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch.distributed.fsdp import FSDPModule

from modeldefs import ModelConfig, Transformer
from modeldefs.generate import generate
from tests.conftest import REPO, smoke_config, step_reads_values
from training.cli import run
from training.parallelize import apply_activation_checkpointing, apply_compile

pytestmark = pytest.mark.gpu


def test_cli_fit_on_cuda_runs_bf16_and_logs_tokens_per_second_and_mfu(tmp_path, monkeypatch, gsm8k_train,
                                                                       tokenizer_source):
    monkeypatch.chdir(tmp_path)
    cli = run(["fit", "--config", smoke_config(tmp_path, gsm8k_train, tokenizer_source, max_steps=40, compile=True)])
    assert cli.trainer.precision == "bf16-mixed"
    (metrics,) = Path("runs/smoke/csv").glob("version_*/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    mfu = [float(r["train/device/mfu"]) for r in rows if r.get("train/device/mfu")]
    tokens_per_s = [float(r["train/device/items_per_sec"]) for r in rows if r.get("train/device/items_per_sec")]
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert mfu and all(0 < m < 1 for m in mfu)
    assert tokens_per_s and min(tokens_per_s) > 0
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_fsdp2_preset_on_one_gpu_reports_mfu_against_the_bf16_peak(tmp_path, monkeypatch, gsm8k_train,
                                                                   tokenizer_source):
    """configs/trainer/fsdp.yaml runs 32-true with bf16 compute from FSDP's policy: MFU's peak is bf16's."""
    from lightning.fabric.utilities.throughput import get_available_flops

    peak = get_available_flops(torch.device("cuda"), torch.bfloat16)
    if peak is None:
        pytest.skip(f"Lightning knows no bf16 peak for {torch.cuda.get_device_name()}")
    monkeypatch.chdir(tmp_path)
    config = smoke_config(tmp_path, gsm8k_train, tokenizer_source, max_steps=20, compile=False)
    run(["fit", "--config", config, "--config", str(REPO / "configs" / "trainer" / "fsdp.yaml"),
         "--trainer.devices", "1", "--trainer.strategy.init_args.data_parallel_size", "1",
         "--trainer.strategy.init_args.save_distributed_checkpoint", "false"])
    (metrics,) = Path("runs/smoke/csv").glob("version_*/metrics.csv")
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("train/device/mfu")]
    assert rows
    for r in rows:
        assert float(r["train/device/mfu"]) == pytest.approx(float(r["train/device/flops_per_sec"]) / peak, rel=1e-4)


def test_fsdp2_cpu_offload_on_one_gpu_trains_with_the_shards_in_host_memory(tmp_path, monkeypatch, gsm8k_train,
                                                                            tokenizer_source):
    """The preset's FSDP2Strategy leaves the offloaded shards in host memory (Lightning's own strategy moves
    them to the GPU, which FSDP2 refuses), and gradient clipping reduces host-memory gradients over gloo."""
    monkeypatch.chdir(tmp_path)
    config = smoke_config(tmp_path, gsm8k_train, tokenizer_source, max_steps=20, compile=False)
    cli = run(["fit", "--config", config, "--config", str(REPO / "configs" / "trainer" / "fsdp.yaml"),
               "--trainer.devices", "1", "--trainer.strategy.init_args.data_parallel_size", "1",
               "--trainer.strategy.init_args.process_group_backend", "cuda:nccl,cpu:gloo",
               "--trainer.strategy.init_args.save_distributed_checkpoint", "false",
               "--model.init_args.fsdp_cpu_offload", "true", "--model.init_args.compile", "false"])
    for module in cli.model.modules():  # the root and last block keep their gathered parameters until resharded
        if isinstance(module, FSDPModule):
            module.reshard()
    assert {p.device.type for p in cli.model.parameters()} == {"cpu"}
    assert {b.device.type for b in cli.model.buffers()} == {"cuda"}
    assert cli.model.device.type == "cuda"
    (metrics,) = Path("runs/smoke/csv").glob("version_*/metrics.csv")
    losses = [float(r["train/loss"]) for r in csv.DictReader(metrics.open()) if r.get("train/loss")]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


class FailOnSyncBetweenLoggingSteps(L.Callback):
    """CUDA raises on any host-device sync during a step that neither logs nor checks the loss (and during the
    next batch's transfer): such steps must queue work without waiting for the GPU."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        torch.cuda.set_sync_debug_mode("default" if step_reads_values(trainer, pl_module) else "error")

    def on_train_end(self, trainer, pl_module) -> None:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("config_name", ["smoke.yaml", "mod-smoke.yaml", "quietstar-smoke.yaml"])
def test_steps_between_logging_steps_never_sync_with_the_host(tmp_path, monkeypatch, gsm8k_train, tokenizer_source,
                                                              config_name):
    monkeypatch.chdir(tmp_path)
    config = yaml.safe_load(Path(smoke_config(tmp_path, gsm8k_train, tokenizer_source, max_steps=20, compile=True,
                                              name=config_name)).read_text())
    # First, so each batch's mode is set before the other callbacks' batch-start hooks run (LearningRateMonitor
    # copies the learning rate to the device, a sync, on logging steps).
    config["trainer"]["callbacks"].insert(0, {"class_path": "tests.test_gpu.FailOnSyncBetweenLoggingSteps"})
    config["trainer"].update(enable_progress_bar=True, val_check_interval=100)
    config["model"]["init_args"]["finite_check_interval"] = 10
    (tmp_path / "sync.yaml").write_text(yaml.safe_dump(config))
    try:
        run(["fit", "--config", str(tmp_path / "sync.yaml")])
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_bf16_autocast_logits_follow_fp32():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("micro")).cuda().eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 64), device="cuda")
    with torch.no_grad():
        full = model(ids)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            half = model(ids).float()
    assert (half - full).abs().max() < 0.05 * full.abs().max()
    assert (half.argmax(-1) == full.argmax(-1)).float().mean() > 0.95


def test_kv_cached_greedy_generation_on_cuda_matches_a_full_forward():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("micro")).cuda().eval()
    prompt = torch.randint(0, model.config.vocab_size, (2, 10), device="cuda")
    out = generate(model, prompt, max_new_tokens=20)
    with torch.no_grad():
        predicted = model(out[:, :-1]).argmax(-1)
    assert torch.equal(predicted[:, 9:], out[:, 10:])


@pytest.mark.parametrize("branches", [1, 4], ids=["greedy", "cot"])
def test_eval_decoding_replays_one_cuda_graph_and_decodes_what_eager_steps_do(branches, monkeypatch):
    """14 prompts through 3 rows (refills, moves to the cache front, rows ending at different steps): the step
    is captured once and replayed, and gives the eager sliced step's tokens and CoT margins (fp32)."""
    from evals import decoding
    from evals.decode_step import DecodeStep
    from evals.model import EvalModel
    from tests.test_eval_decoding import MANY, ByteTokenizer

    torch.manual_seed(0)
    net = Transformer(ModelConfig.from_name("micro")).cuda().eval()
    model = EvalModel(net, ByteTokenizer(), torch.device("cuda"), torch.float32, "micro-random")
    captures: list[DecodeStep] = []
    capture = DecodeStep._capture
    monkeypatch.setattr(DecodeStep, "_capture", lambda self: captures.append(self) or capture(self))
    stops = ["K", "6", "y", "%"]
    eager = decoding._decode_rows(model, MANY, 12, stops, 2048, 3, branches, fixed_step=False)
    assert captures == []
    graphed = decoding._decode_rows(model, MANY, 12, stops, 2048, 3, branches)
    assert len(captures) == 1 and captures[0].graph is not None
    assert graphed[0] == eager[0] and len({len(t) for t in graphed[0]}) > 1
    assert [m for row in graphed[1] for m in row] == pytest.approx([m for row in eager[1] for m in row], abs=1e-4)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU to hold the model off the current device")
def test_eval_decoding_graph_runs_on_the_models_gpu_not_the_current_one():
    from evals import decoding
    from evals.model import EvalModel
    from tests.test_eval_decoding import MANY, ByteTokenizer

    torch.manual_seed(0)
    net = Transformer(ModelConfig.from_name("micro")).to("cuda:1").eval()
    model = EvalModel(net, ByteTokenizer(), torch.device("cuda:1"), torch.float32, "micro-random")
    with torch.cuda.device(0):
        eager = decoding.generate_tokens(model, MANY, 12, batch_size=3, fixed_step=False)
        assert decoding.generate_tokens(model, MANY, 12, batch_size=3) == eager


@pytest.mark.parametrize("policy", ["selective", "block"])
def test_checkpointed_blocks_compile_with_inductor_and_keep_the_memory_saving(policy):
    """configure_model's order on CUDA (checkpointing, then inductor per block): the blocks compile, every
    layer shares the graph, bf16 gradients follow eager's, and the step's peak memory stays below the
    compiled step without checkpointing."""
    from torch._dynamo.utils import counters

    config = ModelConfig(name="ac", vocab_size=8192, n_layer=4, n_embd=512, n_head=8, n_kv_head=8,
                         intermediate_size=1376, rope_theta=10000.0, tie_embeddings=False, block_size=1024)
    x = torch.randint(0, config.vocab_size, (8, 1024), device="cuda", generator=torch.Generator("cuda").manual_seed(0))

    def step(model: Transformer) -> tuple[float, list[torch.Tensor]]:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1).float(), x[:, 1:].flatten())
        loss.backward()
        peak = torch.cuda.max_memory_allocated() - resident
        grads = [p.grad.float() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        return peak, grads

    peaks, grads, stats = {}, {}, {}
    for name in ("eager", "none", policy):
        torch.manual_seed(0)
        model = Transformer(config).cuda()
        if name != "eager":
            apply_activation_checkpointing(model, name)
            apply_compile(model)
        torch._dynamo.reset()
        counters.clear()
        step(model)  # compiles
        peaks[name], grads[name] = step(model)
        stats[name] = {**counters["stats"], "graph_breaks": sum(counters["graph_break"].values())}
    names = [n for n, _ in model.named_parameters()]
    errors = {n: ((got - want).abs().max() / (want.abs().max() + 1e-6)).item()
              for n, got, want in zip(names, grads[policy], grads["eager"])}
    # Every figure in every message: a GPU log may keep only the failure's last lines.
    figures = (f"dynamo {stats}; peaks (MiB) { {n: round(b / 2**20, 1) for n, b in peaks.items()} }; "
               f"worst gradient error {max(errors, key=errors.get)} {max(errors.values()):.4f} of eager's max")
    for name in ("none", policy):
        assert stats[name]["unique_graphs"] == 1, f"{name} compiled {stats[name]['unique_graphs']} graphs; {figures}"
    for n, got, want in zip(names, grads[policy], grads["eager"]):
        assert (got - want).abs().max() <= 0.05 * want.abs().max() + 1e-6, f"{n}: {errors[n]:.4f}; {figures}"
    assert peaks[policy] < peaks["none"], f"{policy} peak not below none's; {figures}"
