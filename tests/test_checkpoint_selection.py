"""Which checkpoints a `StepCheckpoint` keeps and names, on a toy module whose validation loss differs at every step."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from training.callbacks import StepCheckpoint


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
    with pytest.warns(UserWarning, match=r"step 6 has no validation.*multiple of trainer\.val_check_interval"):
        module, callback = fit(tmp_path, max_steps=8, val_check_interval=4, monitor="val/loss", save_top_k=-1,
                               every_n_train_steps=2, save_last=True)
    assert scores(callback) == pytest.approx(module.validated) and sorted(module.validated) == [4, 8]

