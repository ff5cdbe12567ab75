"""Which checkpoints a `StepCheckpoint` keeps and names, on a toy module whose validation loss differs at every step."""

from __future__ import annotations

import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from training.callbacks import RunSummary, StepCheckpoint


class Regression(L.LightningModule):
    """One linear layer fitting y = 3x; `validated` maps each validation's global step to its val/loss."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.validated: dict[int, float] = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", torch.nn.functional.mse_loss(self.layer(x), y))

    def on_validation_epoch_end(self) -> None:
        self.validated[self.trainer.global_step] = float(self.trainer.callback_metrics["val/loss"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def loader(seed: int) -> DataLoader:
    x = torch.randn(64, 1, generator=torch.Generator().manual_seed(seed))
    return DataLoader(TensorDataset(x, 3 * x), batch_size=4)


def fit(tmp_path: Path, max_steps: int, val_check_interval: int, **checkpoint) -> tuple[Regression, StepCheckpoint]:
    torch.manual_seed(0)
    module, callback = Regression(), StepCheckpoint(dirpath=tmp_path / "checkpoints", **checkpoint)
    trainer = L.Trainer(max_steps=max_steps, val_check_interval=val_check_interval, check_val_every_n_epoch=None,
                        callbacks=[callback], logger=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(module, loader(1), loader(2))
    return module, callback


def scores(callback: StepCheckpoint) -> dict[int, float]:
    return {torch.load(path, weights_only=True)["global_step"]: float(score)
            for path, score in callback.best_k_models.items()}


def test_a_periodic_checkpoint_on_a_validation_step_is_scored_by_that_validation(tmp_path):
    """every_n_train_steps with a validation metric as monitor: a checkpoint saved at the end of a training step
    took the val/loss of the validation before it (Lightning saves before that step's validation runs)."""
    module, callback = fit(tmp_path, max_steps=6, val_check_interval=2, monitor="val/loss", save_top_k=-1,
                           every_n_train_steps=2, save_last=True)
    assert scores(callback) == pytest.approx(module.validated) and sorted(module.validated) == [2, 4, 6]
    assert callback.best_model_score == pytest.approx(min(module.validated.values()))
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6


def test_a_periodic_checkpoint_without_validation_is_not_a_top_k_candidate(tmp_path):
    """Saves between validations (every 2 steps, validation every 4) hold weights no validation has scored: they
    must not enter the top-k under an older step's val/loss; the user is told why and how to align them."""
    with pytest.warns(UserWarning, match=r"step 2 has no validation.*multiple of trainer\.val_check_interval"):
        module, callback = fit(tmp_path, max_steps=8, val_check_interval=4, monitor="val/loss", save_top_k=-1,
                               every_n_train_steps=2, save_last=True)
    assert scores(callback) == pytest.approx(module.validated) and sorted(module.validated) == [4, 8]



def test_a_periodic_checkpoint_before_an_epoch_end_validation_is_scored_by_it(tmp_path):
    """With validation at each epoch's end (16 steps), Lightning's deferral of a save whose metric is not logged yet
    never ran: step 16's checkpoint was lost and steps 24 and 32 were kept under step 16's val/loss."""
    torch.manual_seed(0)
    module, callback = Regression(), StepCheckpoint(dirpath=tmp_path / "checkpoints", monitor="val/loss",
                                                    save_top_k=-1, every_n_train_steps=8, save_last=True)
    trainer = L.Trainer(max_steps=32, callbacks=[callback], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path)
    with pytest.warns(UserWarning, match=r"step 8 has no validation"):
        trainer.fit(module, loader(1), loader(2))
    assert scores(callback) == pytest.approx(module.validated) and sorted(module.validated) == [16, 32]

def test_the_run_summary_names_the_newest_checkpoint_as_latest_without_save_last(tmp_path, capsys):
    """With save_last false and a monitor, the summary's "latest:" (and its quietdepth-generate line) named the
    best checkpoint, here the first (mode max on a falling loss), not the newest."""
    torch.manual_seed(0)
    callback = StepCheckpoint(dirpath=tmp_path / "checkpoints", monitor="val/loss", mode="max", save_top_k=-1,
                              save_last=False)
    trainer = L.Trainer(max_steps=6, val_check_interval=2, check_val_every_n_epoch=None,
                        callbacks=[callback, RunSummary()], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(Regression(), loader(1), loader(2))
    assert Path(callback.best_model_path).name == "epoch=0-step=2.ckpt"
    assert "(latest: epoch=0-step=6.ckpt)" in capsys.readouterr().out


class CtrlCAtStep5(L.Callback):
    """Ctrl-C as Lightning sees it, once the run has taken 5 steps."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 5:
            raise KeyboardInterrupt


def test_ctrl_c_without_save_last_says_to_resume_from_the_newest_checkpoint(tmp_path, capsys):
    """The interrupted run's resume line named the best checkpoint (step 2), older than the newest (step 4)."""
    torch.manual_seed(0)
    callback = StepCheckpoint(dirpath=tmp_path / "checkpoints", monitor="val/loss", mode="max", save_top_k=-1,
                              save_last=False)
    trainer = L.Trainer(max_steps=8, val_check_interval=2, check_val_every_n_epoch=None,
                        callbacks=[callback, RunSummary(), CtrlCAtStep5()], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path)
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning exits with status 1 after its graceful shutdown
            trainer.fit(Regression(), loader(1), loader(2))
    finally:
        signal.signal(signal.SIGINT, handler)  # which Lightning set to ignore Ctrl-C for the rest of the process
    newest = tmp_path / "checkpoints" / "epoch=0-step=4.ckpt"
    assert Path(callback.best_model_path).name == "epoch=0-step=2.ckpt"
    assert f"resume: the same command with --ckpt_path {newest}   (continues from {newest}, step 4)" in \
        capsys.readouterr().out
