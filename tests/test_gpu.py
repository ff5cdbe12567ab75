"""CUDA: a bf16-mixed CLI fit with throughput/MFU logging, no host syncs between logging steps, bf16 numerics,
compiled blocks, generation."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from modeldefs import ModelConfig, Transformer
from modeldefs.generate import generate
from tests.conftest import REPO, smoke_config, step_reads_values
from training.cli import run

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
    config["trainer"]["callbacks"].append({"class_path": "tests.test_gpu.FailOnSyncBetweenLoggingSteps"})
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
