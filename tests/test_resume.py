"""A training run killed with SIGKILL and resumed with `--ckpt_path last` continues step for step."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from tests.conftest import REPO, requires_smollm2
from training.cli import run

pytestmark = [requires_smollm2, pytest.mark.slow]
STEPS, KILL_AFTER = 24, 12


def write_config(run_dir: Path, data: Path) -> Path:
    config = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    trainer = config["trainer"]
    trainer.update(max_steps=STEPS, val_check_interval=1000, log_every_n_steps=1, enable_progress_bar=False,
                   default_root_dir=str(run_dir))
    trainer["logger"] = [{"class_path": "lightning.pytorch.loggers.CSVLogger",
                          "init_args": {"save_dir": str(run_dir), "name": "csv", "flush_logs_every_n_steps": 1}}]
    trainer["callbacks"][0]["init_args"].update(dirpath=str(run_dir / "checkpoints"), every_n_train_steps=4)
    # Short documents make several epochs of data, so the resume also crosses an epoch boundary.
    config["data"]["init_args"].update(path=str(data), max_documents=20, val_fraction=0.1, seq_len=64, batch_size=4)
    path = run_dir / "config.in.yaml"
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def quietdepth(config: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "2"}
    return subprocess.Popen([sys.executable, "-m", "training", "fit", "--config", str(config), *extra],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        with path.open() as f:
            out.update({int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")})
    return out


def finish(proc: subprocess.Popen, timeout: float = 300) -> None:
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, output[-3000:]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, gsm8k_train) -> tuple[Path, int]:
    """The uninterrupted smoke run of STEPS steps that the resumed runs below are compared with (read only), and
    its steps per epoch."""
    run_dir = tmp_path_factory.mktemp("straight")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(run_dir)
        cli = run(["fit", "--config", str(write_config(run_dir, gsm8k_train))])
    return run_dir, len(cli.datamodule.train_dataloader())


def test_resume_after_sigkill_reproduces_the_uninterrupted_losses(tmp_path, gsm8k_train, straight):
    """Killed and resumed in processes of their own, compared with the same run uninterrupted (in this process)."""
    straight, _ = straight
    killed = tmp_path / "killed"
    config = write_config(killed, gsm8k_train)
    proc = quietdepth(config)
    deadline = time.monotonic() + 240
    while not list(killed.glob(f"checkpoints/*step={KILL_AFTER}.ckpt")) and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed:\n{output[-3000:]}"
    # last.ckpt is written just after the step file, so the kill may land before it is updated.
    resumed_from = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert KILL_AFTER - 4 <= resumed_from < STEPS

    finish(quietdepth(config, "--ckpt_path", "last"))
    expected, got = losses(straight), losses(killed)
    assert len(expected) == STEPS
    after = [s for s in sorted(expected) if s >= resumed_from]
    assert after, "nothing ran after the resume point"
    assert [got[s] for s in after] == [expected[s] for s in after]


class RecordBatches(L.Callback):
    """(epoch, batch size) of every training batch."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen.append((trainer.current_epoch, batch["input_ids"].size(0)))


def test_resuming_with_a_larger_batch_trains_the_rest_of_the_epoch(tmp_path, gsm8k_train, monkeypatch):
    """Lightning resumes its batch counter from the checkpoint (4 batches of 2) and counts it against the
    new loader's length (batches of 4): the epoch must still run until its remaining data is used up."""
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, gsm8k_train)
    first = run(["fit", "--config", str(config), "--data.init_args.batch_size", "2", "--trainer.max_steps", "4"])
    sequences = len(first.datamodule.train_dataloader().dataset)
    assert sequences >= 16, "the test needs at least two more batches of 4 in epoch 0"
    rest = (sequences - 4 * 2) // 4  # the steps left in epoch 0; then one step of epoch 1
    second = run(["fit", "--config", str(config), "--data.init_args.batch_size", "4", "--trainer.max_steps",
                  str(4 + rest + 1),
                  "--trainer.callbacks+=tests.test_resume.RecordBatches",
                  "--ckpt_path", str(tmp_path / "checkpoints" / "epoch=0-step=4.ckpt")])
    (recorder,) = [c for c in second.trainer.callbacks if isinstance(c, RecordBatches)]
    epoch0 = [b for epoch, b in recorder.seen if epoch == 0]
    assert len(epoch0) == rest and set(epoch0) == {4}
    assert any(epoch == 1 for epoch, _ in recorder.seen)


def test_extending_a_finished_run_continues_step_for_step(tmp_path, gsm8k_train, monkeypatch, straight):
    """A run that max_steps ends between periodic checkpoints (every 4 steps) leaves its final step in
    last.ckpt, inside its epoch: extended with a larger max_steps it trains what the longer run would have."""
    monkeypatch.chdir(tmp_path)
    straight, steps_per_epoch = straight
    # the first run ends in its second epoch, between two periodic checkpoints
    first = next(s for s in range(steps_per_epoch + 1, STEPS) if s % 4 and s % steps_per_epoch)
    config = write_config(tmp_path / "extended", gsm8k_train)
    run(["fit", "--config", str(config), "--trainer.max_steps", str(first)])
    last = torch.load(tmp_path / "extended" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == first
    assert last["loops"]["fit_loop"]["epoch_progress"]["current"]["completed"] == first // steps_per_epoch
    run(["fit", "--config", str(config), "--ckpt_path", "last"])
    expected, got = losses(straight), losses(tmp_path / "extended")
    assert sorted(got) == sorted(expected) == list(range(STEPS))
    assert [got[s] for s in range(first, STEPS)] == [expected[s] for s in range(first, STEPS)]


def test_extending_a_run_that_max_epochs_ended_trains_the_next_epoch_whole(tmp_path, gsm8k_train, monkeypatch):
    """With no periodic checkpoint in the run, Lightning writes its last.ckpt at the end of fit, once the epoch is
    counted as done; its data position said the next epoch's first sequences were consumed (as many as an epoch has),
    so the extended run trained none of them."""
    monkeypatch.chdir(tmp_path)
    by_epochs = ["--trainer.max_steps", "-1", "--trainer.max_epochs"]
    straight = run(["fit", "--config", str(write_config(tmp_path / "straight", gsm8k_train)), *by_epochs, "2"])
    config = write_config(tmp_path / "extended", gsm8k_train)
    settings = yaml.safe_load(config.read_text())
    settings["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 1000
    config.write_text(yaml.safe_dump(settings))
    run(["fit", "--config", str(config), *by_epochs, "1"])
    extended = run(["fit", "--config", str(config), *by_epochs, "2", "--ckpt_path", "last"])
    assert extended.trainer.global_step == straight.trainer.global_step
    assert losses(tmp_path / "extended") == losses(tmp_path / "straight")


def test_a_last_checkpoint_saved_as_a_link_holds_the_final_step(tmp_path, gsm8k_train, monkeypatch):
    """With save_last: link, last.ckpt links to the newest periodic checkpoint (every 4 steps): a run that max_steps
    ends between two of them must still leave its final step there, as with a copy."""
    monkeypatch.chdir(tmp_path)
    config_path = write_config(tmp_path, gsm8k_train)
    config = yaml.safe_load(config_path.read_text())
    config["trainer"]["callbacks"][0]["init_args"]["save_last"] = "link"
    config_path.write_text(yaml.safe_dump(config))
    run(["fit", "--config", str(config_path), "--trainer.max_steps", "6"])
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6


def test_a_checkpoint_scored_by_validation_is_saved_after_the_final_steps_validation(tmp_path, gsm8k_train,
                                                                                       monkeypatch):
    """Without every_n_train_steps, ModelCheckpoint saves its top-k after each validation, scored by it. The final
    step's last.ckpt, written before that step's validation, must not make the callback skip that save: the final
    weights (often the best) were left out of the top-k, and best_model_path named an older checkpoint."""
    monkeypatch.chdir(tmp_path)
    config_path = write_config(tmp_path, gsm8k_train)
    config = yaml.safe_load(config_path.read_text())
    checkpoint = config["trainer"]["callbacks"][0]["init_args"]
    del checkpoint["every_n_train_steps"]
    checkpoint.update(monitor="val/loss", save_top_k=-1)
    config["trainer"].update(val_check_interval=3, limit_val_batches=2)
    config_path.write_text(yaml.safe_dump(config))
    cli = run(["fit", "--config", str(config_path), "--trainer.max_steps", "6"])
    with next(tmp_path.glob("csv/version_*/metrics.csv")).open() as f:
        validated = {int(r["step"]) + 1: float(r["val/loss"]) for r in csv.DictReader(f) if r.get("val/loss")}
    scores = {torch.load(path, weights_only=True)["global_step"]: float(score)
              for path, score in cli.trainer.checkpoint_callback.best_k_models.items()}
    assert scores == pytest.approx(validated) and sorted(validated) == [3, 6]
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
