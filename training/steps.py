"""When Lightning steps the optimizer and when it logs: the module and the callbacks that follow it ask here."""

from __future__ import annotations

import lightning as L


def starts_optimizer_step(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether micro-batch `batch_idx` is the first of its optimizer step (an epoch's first batch starts one)."""
    return batch_idx % trainer.accumulate_grad_batches == 0


def ends_optimizer_step(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether micro-batch `batch_idx` is the last of its optimizer step, as Lightning decides (the epoch's last
    batch steps too)."""
    return (batch_idx + 1) % trainer.accumulate_grad_batches == 0 or trainer.is_last_batch


def is_logging_step(trainer: L.Trainer, step: int) -> bool:
    """Whether Lightning logs after optimizer step `step` (counted from 1): a multiple of `log_every_n_steps`
    (0: never)."""
    every = trainer.log_every_n_steps
    return every > 0 and step % every == 0


def ends_fit(trainer: L.Trainer, step: int) -> bool:
    """Whether optimizer step `step` (counted from 1), which the current batch completes, is the fit's last by
    `trainer.max_steps` or by `trainer.max_epochs` (the last epoch's last batch); a stop by max_time or a callback
    cannot be foreseen."""
    return step == trainer.max_steps or (trainer.is_last_batch and trainer.current_epoch + 1 == trainer.max_epochs)
