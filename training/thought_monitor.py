"""`ThoughtMonitor`: the thoughts Quiet-STaR samples during training, as text (CSV file and W&B table)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from training.errors import ConfigError
from training.quietstar_lm import QuietStarLM
from training.steps import ends_optimizer_step

COLUMNS = ["step", "sequence", "position", "context", "thought", "continuation", "reward", "mixing_weight"]


class ThoughtMonitor(L.Callback):
    """Writes a few of the thoughts sampled in a training step, decoded, with what they were thinking about.

    After the first optimizer step and every `every_n_steps` steps it draws `samples` (sequence, position)
    pairs from the step's `ThoughtOutput` (the fields `QuietStarLM.training_step` returns) and appends, per
    pair, the last `context_tokens` tokens up to the position, the thought, the true continuation the thought was
    scored on, its reward and mixing weight, to `<log_dir>/thoughts.csv` (`trainer.log_dir`: the first
    logger's version folder, so each run, and each resumed part of one, has its own file beside its
    metrics.csv); with a WandbLogger attached the same rows go to a W&B table `quietstar/thoughts`. The
    draws use their own generator, so monitoring does not change the training run's randomness.
    """

    def __init__(self, every_n_steps: int = 50, samples: int = 4, context_tokens: int = 24, seed: int = 0) -> None:
        """
        Args:
            every_n_steps: optimizer steps between samples, counted as Lightning's logging counts them (step n,
                n = 1, 2, ..., when n is a multiple): with a multiple of `log_every_n_steps` the copies to the host
                happen on steps that read the loss anyway.
            samples: thoughts written each time (at most the batch size times n_passes, the thoughts a step samples).
            context_tokens: tokens of context shown before each thought.
            seed: seed of the choice of sequences and positions.
        """
        if every_n_steps < 1 or samples < 1:
            raise ConfigError("ThoughtMonitor every_n_steps and samples must be positive")
        self.every_n_steps = every_n_steps
        self.samples = samples
        self.context_tokens = context_tokens
        self.seed = seed

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, QuietStarLM):
            raise ConfigError(f"ThoughtMonitor shows Quiet-STaR thoughts; {type(pl_module).__name__} does not think "
                              "(use training.quietstar_lm.QuietStarLM as the model, or drop the callback)")
        # trainer.log_dir is a broadcast from rank 0: read here, on every rank, not in the rank-0-only hook
        self._path = Path(trainer.log_dir) / "thoughts.csv"

    @rank_zero_only
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not ends_optimizer_step(trainer, batch_idx):  # a micro-batch that only accumulates
            return
        step = trainer.global_step - 1  # the optimizer step this batch completed, as train/loss is logged
        if step > 0 and trainer.global_step % self.every_n_steps != 0:
            return
        tokenizer = getattr(trainer.datamodule, "tokenizer", None) if trainer.datamodule is not None else None
        rows = self.rows(step, batch["input_ids"], outputs, pl_module.model.thought_config.n_ahead_talk, tokenizer)
        path = self._path
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with path.open("a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(COLUMNS)
            writer.writerows(rows)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(key="quietstar/thoughts", columns=COLUMNS, data=rows, step=step)

    def rows(self, step: int, input_ids: torch.Tensor, out: dict[str, torch.Tensor], n_ahead_talk: int,
             tokenizer: Any) -> list[list[Any]]:
        """One table row per sampled thought (`COLUMNS`); `out` holds the `ThoughtOutput` fields thought_tokens,
        positions, reward and mixing_weight."""
        thoughts = out["thought_tokens"].cpu()  # (B * n_passes, P, sampled tokens), copies of a sequence adjacent
        n_copies, n_positions = thoughts.shape[:2]
        n_passes = n_copies // input_ids.size(0)
        generator = torch.Generator().manual_seed(self.seed + step)
        copies = torch.randperm(n_copies, generator=generator)[: self.samples]
        positions = torch.randint(n_positions, (len(copies),), generator=generator)
        reward = out["reward"].float().cpu()                    # (N, P)
        weight = out["mixing_weight"].float().mean(-1).cpu()   # (N, P): mean over the talk tokens
        ids, starts = input_ids.cpu(), out["positions"].tolist()
        rows = []
        for copy, j in zip(copies.tolist(), positions.tolist()):
            sequence, t = copy // n_passes, starts[j]
            context = ids[sequence, max(0, t + 1 - self.context_tokens): t + 1].tolist()
            continuation = ids[sequence, t + 1: t + 1 + n_ahead_talk].tolist()
            rows.append([step, sequence, t, decode(tokenizer, context), decode(tokenizer, thoughts[copy, j].tolist()),
                         decode(tokenizer, continuation), round(float(reward[copy, j]), 5),
                         round(float(weight[copy, j]), 5)])
        return rows


def decode(tokenizer: Any, ids: list[int]) -> str:
    """Text of `ids` (ids as numbers without a tokenizer)."""
    return tokenizer.decode(ids) if tokenizer is not None else " ".join(map(str, ids))

