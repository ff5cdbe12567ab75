"""Callbacks: token throughput/MFU, the learning rate once per optimizer step, checkpoints written whole
(`<name>.partial`, then moved) with the final step in `last.ckpt`, RNG state in checkpoints, the end-of-run
summary (also after Ctrl-C) and a progress bar that counts optimizer steps."""

from __future__ import annotations

import os
import random
import shlex
import shutil
import time
from pathlib import Path
from typing import Any
from weakref import proxy

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.throughput import Throughput, get_available_flops
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from training.steps import ends_optimizer_step, is_logging_step, starts_optimizer_step


class TokenThroughput(L.Callback):
    """Training tokens/s, FLOP/s and MFU over each logging interval (`trainer.log_every_n_steps`).

    The clock is read, after a `cuda.synchronize`, only when an optimizer step lands on a logging step, so
    the steps in between run without a host-device sync; validation time is left out. Logs
    `train/device/items_per_sec` (tokens/s per device), `train/device/flops_per_sec` and, where Lightning
    knows the device's peak (CUDA datacenter GPUs, not CPUs), `train/device/mfu`; on several devices also
    the totals (`train/items_per_sec`, ...). FLOPs come from the module's `flops_per_token` (a module whose
    step costs more than one pass of its model, Quiet-STaR, counts its own) or its model's.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._peak = get_available_flops(trainer.strategy.root_device, compute_dtype(trainer, pl_module))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A window of two updates: each figure is the rate between two consecutive logging steps.
        self._throughput = Throughput(available_flops=self._peak, world_size=trainer.world_size, window_size=2)
        self._batches = self._samples = self._tokens = self._flops = 0
        self._flops_per_token: dict[int, int] = {}
        self._throughput.update(time=0.0, batches=0, samples=0, lengths=0, flops=0)  # FLOP/s from the 1st interval
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        ids = batch["input_ids"]
        if ids.size(1) not in self._flops_per_token:  # counted once per sequence length
            count = getattr(pl_module, "flops_per_token", None) or pl_module.model.flops_per_token
            self._flops_per_token[ids.size(1)] = count(ids.size(1))
        self._batches += 1
        self._samples += ids.size(0)
        self._tokens += ids.numel()
        self._flops += self._flops_per_token[ids.size(1)] * ids.numel()
        if not ends_optimizer_step(trainer, batch_idx) or not is_logging_step(trainer, trainer.global_step):
            return
        _synchronize(trainer)
        self._throughput.update(time=time.perf_counter() - self._t0, batches=self._batches, samples=self._samples,
                                lengths=self._tokens, flops=self._flops)
        self._flops = 0  # Throughput takes the FLOPs done since its last update
        metrics = {f"train/{k}": v for k, v in self._throughput.compute().items()}
        for logger in trainer.loggers:  # on the row of Lightning's own metrics for this step (0-based)
            logger.log_metrics(metrics, step=trainer.global_step - 1)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            _synchronize(trainer)
            self._val_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            _synchronize(trainer)
            self._t0 += time.perf_counter() - self._val_start  # validation is not training time


class StepLearningRateMonitor(LearningRateMonitor):
    """Lightning's `LearningRateMonitor` (`lr-<optimizer>/<param group>`), logged once per optimizer step.

    Lightning's logs at the start of every batch of a logging step, so with `trainer.accumulate_grad_batches` = n
    each logging step had n rows of the same value in metrics.csv and n points at one step in W&B. This logs at
    the step's first micro-batch only; the learning rate is the one that step's optimizer update uses.
    """

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if starts_optimizer_step(trainer, batch_idx):
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)


def compute_dtype(trainer: L.Trainer, pl_module: L.LightningModule) -> torch.dtype:
    """The dtype the matmuls run in, whose peak MFU is measured against."""
    # Under FSDP2 the precision plugin says 32-true and the mixed-precision policy computes in
    # fsdp_param_dtype: the device peak is that dtype's (bf16 on an H100: 15x the fp32 peak).
    param_dtype = getattr(pl_module.hparams, "fsdp_param_dtype", None)
    if isinstance(trainer.strategy, ModelParallelStrategy) and param_dtype is not None:
        return getattr(torch, param_dtype)
    prefix = str(trainer.precision).split("-")[0]
    return {"bf16": torch.bfloat16, "16": torch.float16, "64": torch.float64}.get(prefix, torch.float32)


def _synchronize(trainer: L.Trainer) -> None:
    if trainer.strategy.root_device.type == "cuda":
        torch.cuda.synchronize(trainer.strategy.root_device)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():  # a link (save_last: link) goes, not the checkpoint it points to
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _move_into_place(staged: Path, target: Path) -> None:
    """Put the finished checkpoint `staged` (a file or a folder) at `target`, replacing what is there."""
    if staged.is_file() and not target.is_dir():
        os.replace(staged, target)  # atomic
        return
    previous = target.with_name(target.name + ".previous")
    if target.exists():
        _remove(previous)
        target.rename(previous)
    staged.rename(target)
    _remove(previous)


def finish_interrupted_moves(directory: Path) -> None:
    """Put back each `<name>.previous` that has no `<name>` beside it: what a crash between
    `_move_into_place`'s two renames leaves (ranks that race for one lose with FileNotFoundError)."""
    for previous in directory.glob("*.previous"):
        target = previous.with_suffix("")
        if not target.exists():
            try:
                previous.rename(target)
            except FileNotFoundError:
                pass


class StepCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` whose `save_last` also holds the run's final step when `trainer.max_steps` ends it,
    and whose saves never leave a half-written checkpoint under a checkpoint's name.

    Lightning itself writes "last" at the end of fit only when it has saved nothing yet, and then after
    the loop has counted the interrupted epoch as finished: `last.ckpt` can miss the final steps, and a
    run extended from it (a larger max_steps, `--ckpt_path last`) would skip the rest of that epoch's data.
    This writes it at the final optimizer step instead, inside the epoch, as every periodic checkpoint is
    (with `save_last="link"` as a file, unless a periodic checkpoint of that step is there to link to; a top-k
    saved after each validation still saves after that step's validation, scored by it),
    through `ModelCheckpoint`'s own save path (its private helpers, as of Lightning 2.6; the resume test in
    tests/test_resume.py guards the behaviour).

    A checkpoint is scored by the validation of its own weights: with `every_n_train_steps` and a `monitor`,
    Lightning saved at the end of the step, before that step's validation, so each top-k score was the previous
    validation's. A periodic save at a step that validation follows is made after it; one at a step without
    validation (or before the first) writes `last.ckpt` only (with a warning), not a top-k entry scored by an
    older step; a `monitor` the validation did not log stops the run there, naming the metrics it did log.
    tests/test_checkpoint_selection.py guards this.
    """

    _before_validation: dict[str, Any] = {}  # set, never changed in place
    _validation_metrics: frozenset[str] = frozenset()
    _warned_unvalidated = False
    _save_after_validation = False  # a periodic save waits for the validation that follows its step

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._before_validation = dict(trainer.callback_metrics)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The metrics this validation logged: a monitor among them scores only the weights validated.
        before = self._before_validation
        self._validation_metrics = frozenset(k for k, v in trainer.callback_metrics.items() if before.get(k) is not v)
        if self._save_after_validation and self.monitor not in trainer.callback_metrics:
            raise MisconfigurationException(f"StepCheckpoint(monitor={self.monitor!r}): validation logged no "
                                            f"{self.monitor!r}; the metrics are {sorted(trainer.callback_metrics)}")
        if self._save_after_validation and not self._should_skip_saving_checkpoint(trainer):
            self._save_after_validation = False
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
            return
        super().on_validation_end(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.monitor is not None and self._saves_now(trainer, pl_module):
            self._defer_save_until_validation = False  # Lightning's deferral, which its epoch-end mode never ran
            if trainer.fit_loop.epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher):
                # Validation runs after this step: save then, scored by the validation of these weights.
                self._save_after_validation = True
                self._save_final_last(trainer, restore_step=True)
                return
            if self.monitor not in trainer.callback_metrics or self.monitor in self._validation_metrics:
                # No validation has scored these weights (the monitor's value, if any, is an earlier step's).
                if not self._warned_unvalidated:
                    self._warned_unvalidated = True
                    rank_zero_warn(f"StepCheckpoint(monitor={self.monitor!r}): step {trainer.global_step} has no "
                                   f"validation, so its checkpoint (and those of later steps like it) is not a top-k "
                                   f"candidate (no validation scored its weights); set every_n_train_steps to a "
                                   f"multiple of trainer.val_check_interval, or leave it out to save after each "
                                   f"validation")
                if self.save_last == "link":  # the newest checkpoint is an older step's: write last.ckpt itself
                    self._last_checkpoint_saved = ""
                self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
                return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._save_final_last(trainer, restore_step=self._every_n_epochs >= 1
                              and not self._should_save_on_train_epoch_end(trainer))

    def _saves_now(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        """Whether `every_n_train_steps` saves at the step this batch ended (automatic optimization)."""
        return (pl_module.automatic_optimization and self._every_n_train_steps >= 1
                and trainer.global_step % self._every_n_train_steps == 0
                and not self._should_skip_saving_checkpoint(trainer))

    def _save_final_last(self, trainer: L.Trainer, restore_step: bool) -> None:
        """`last.ckpt` at the step `trainer.max_steps` ends the run; `restore_step`: a save after that step's
        validation (scored by it) still runs."""
        if self.save_last and trainer.global_step == trainer.max_steps and not self._should_skip_saving_checkpoint(trainer):
            if self.save_last == "link":  # no checkpoint holds this step for a link: write last.ckpt itself
                self._last_checkpoint_saved = ""
            saved_before = self._last_global_step_saved
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            if restore_step:
                self._last_global_step_saved = saved_before

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """As `ModelCheckpoint`'s (`last` where the run saved nothing yet), except under `fast_dev_run`, which
        Lightning documents as writing no checkpoint: its step-1 `last-v1.ckpt` beside a run's `last.ckpt` was
        the newest, so the run's next `--ckpt_path last` resumed the debug run instead."""
        if not trainer.fast_dev_run:
            super().on_train_end(trainer, pl_module)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        """Write beside the checkpoint's place (`<name>.partial`) and move it there once every rank is done,
        so that a crash mid-save leaves the previous checkpoint of that name whole. A distributed checkpoint
        is a folder whose shards each rank rewrote in place: after a crash, `last.ckpt` held one rank's new
        shards beside another's old ones, and resumed from that mix without an error. The loggers hear of
        the save (`ModelCheckpoint._save_checkpoint`'s steps) once it is in place: a logger that uploads
        checkpoints (`WandbLogger(log_model=...)`) looks for them on disk then."""
        staged = Path(filepath + ".partial")
        if trainer.is_global_zero and staged.exists():  # left by an earlier crash
            _remove(staged)
        trainer.strategy.barrier()
        trainer.save_checkpoint(str(staged), self.save_weights_only)
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            _move_into_place(staged, Path(filepath))
        trainer.strategy.barrier()
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))


class RNGState(L.Callback):
    """Saves every rank's Python/NumPy/torch/CUDA RNG states in checkpoints and restores each rank's
    own when training resumes on the same number of ranks (on another number: a warning, no restore)."""

    def __init__(self) -> None:
        self._to_restore: list[dict[str, Any]] | None = None

    def state_dict(self) -> dict[str, Any]:
        # Lightning builds the checkpoint on every rank, then rank 0 writes it: gather all ranks' states.
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state = {
            "python": random.getstate(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                      "has_gauss": has_gauss, "cached": cached},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,  # this rank's device
        }
        ranks = [state]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(ranks, state)
        return {"ranks": ranks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._to_restore = state_dict["ranks"]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Restored here, not at load time, so nothing between loading and the first step consumes it.
        if self._to_restore is None:
            return
        ranks, self._to_restore = self._to_restore, None
        if len(ranks) != trainer.world_size:
            rank_zero_warn(f"the checkpoint holds the RNG states of {len(ranks)} rank(s), this run has "
                           f"{trainer.world_size}: random draws continue from the seed, not from the checkpoint")
            return
        state = ranks[trainer.global_rank]
        random.setstate(state["python"])
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
        torch.set_rng_state(state["torch"])
        if state["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


class RunSummary(L.Callback):
    """Prints where the run's checkpoints, metrics and W&B files are, with the final losses; also when Ctrl-C
    stops a fit (Lightning ends it on the KeyboardInterrupt), then with the step reached and how to resume."""

    def __init__(self) -> None:
        self._t0: float | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = time.perf_counter()

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._print("quietdepth run summary", self._lines(trainer))

    @rank_zero_only
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt) and trainer.state.fn == TrainerFn.FITTING:
            self._print(f"quietdepth run interrupted at step {trainer.global_step}",
                        self._lines(trainer) + _resume_lines(trainer))

    def _lines(self, trainer: L.Trainer) -> list[str]:
        bar_only = set(trainer.progress_bar_metrics) - set(trainer.logged_metrics)  # e.g. the bar's copy of the loss
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1 and k not in bar_only}
        wall = f"   wall time: {time.perf_counter() - self._t0:.1f} s" if self._t0 is not None else ""
        lines = [f"steps: {trainer.global_step}{wall}"]
        lines += [f"{k}: {v:.4g}" for k, v in sorted(metrics.items())]
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath:
                newest = _newest([Path(path) for path in (cb.last_model_path, cb.best_model_path, *cb.best_k_models)
                                  if path])
                last = str(newest) if newest else ""
                lines.append(f"checkpoints: {cb.dirpath}" + (f"   (latest: {Path(last).name})" if last else ""))
                if last:
                    lines.append(f"try it: quietdepth-generate --model {shlex.quote(last)} --prompt 'Once upon a time'")
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                lines.append(f"metrics CSV: {Path(logger.log_dir) / 'metrics.csv'}")
            elif isinstance(logger, WandbLogger) and not getattr(logger.experiment, "disabled", False):
                run_dir = Path(logger.experiment.dir).parent
                lines.append(f"W&B run: {run_dir}" + ("   (offline: `wandb sync " + str(run_dir) + "`)"
                                                     if "offline" in run_dir.name else ""))
        return lines

    @staticmethod
    def _print(title: str, lines: list[str]) -> None:
        width = max(len(line) for line in [title, *lines])
        print("\n" + "=" * width + f"\n{title}\n" + "\n".join(lines) + "\n" + "=" * width, flush=True)


def _resume_lines(trainer: L.Trainer) -> list[str]:
    """How to go on from the newest checkpoint on disk, which the interrupt left as it was: this run's, or the
    last checkpoint that `--ckpt_path last` finds in its folder (an interrupt before a resumed run has restored
    its checkpoint, or saved one, leaves the checkpoint callbacks knowing of none)."""
    newest = _newest([Path(path) for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)
                      for path in (cb.last_model_path, cb.best_model_path, *cb.best_k_models,
                                   *cb._find_last_checkpoints(trainer)) if path])
    if newest is None:
        return ["no checkpoint written yet: rerunning the command starts from step 0"]
    ckpt_path = "last" if newest.name.startswith(ModelCheckpoint.CHECKPOINT_NAME_LAST) else shlex.quote(str(newest))
    return [f"resume: the same command with --ckpt_path {ckpt_path}   (continues from {newest}, step "
            f"{checkpoint_step(newest)})"]


def _newest(paths: list[Path]) -> Path | None:
    """The most recently written of `paths` that exist (a top-k other than the best can be the newest)."""
    return max((path for path in paths if path.exists()), key=lambda path: path.stat().st_mtime, default=None)


def checkpoint_step(path: Path) -> int:
    """The global step a checkpoint (a file, or a sharded checkpoint's folder) was saved at."""
    return checkpoint_metadata(path).get("global_step", 0)


def checkpoint_epochs(metadata: dict[str, Any]) -> int:
    """The training epochs whose every batch a checkpoint (its `checkpoint_metadata`) had trained."""
    fit_loop = (metadata.get("loops") or {}).get("fit_loop", {})
    epochs = fit_loop.get("epoch_progress", {}).get("current", {})
    trained = epochs.get("processed", 0)
    # Saved after an epoch's last batch but before Lightning counted that epoch (a periodic checkpoint on the epoch's
    # last step): resuming, Lightning counts it first.
    if epochs.get("started", 0) > trained and fit_loop.get("epoch_loop.batch_progress", {}).get("is_last_batch"):
        trained += 1
    return trained


def checkpoint_metadata(path: Path, weights_only: bool = True) -> dict[str, Any]:
    """A checkpoint's Lightning state (a file's whole dict, memory-mapped, or a sharded checkpoint's `meta.pt`)."""
    source = path / "meta.pt" if path.is_dir() else path
    return torch.load(source, map_location="cpu", weights_only=weights_only, mmap=not path.is_dir())


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar counting optimizer steps towards `trainer.max_steps`, the length of a
    quietdepth run. Lightning's own reads "Epoch 0/-2" for a run bounded by steps, and after a resume counts
    the epoch's batches from 0 against a total that ignores the resume. The CLI uses it where `rich` is
    installed and the run shows a progress bar; a run without `max_steps` gets Lightning's epoch bar."""

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self.trainer.max_steps > 0 else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        return "Steps" if self.trainer.max_steps > 0 else super()._get_train_description(current_epoch)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._show_step(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.max_steps <= 0:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self.is_disabled and self.train_progress_bar_id is None:  # resumed inside an epoch
            self._initialize_train_progress_bar_id()
        self._show_step(trainer)
        self._update_metrics(trainer, pl_module)
        self.refresh()

    def _show_step(self, trainer: L.Trainer) -> None:
        if trainer.max_steps > 0 and self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(self.train_progress_bar_id, completed=trainer.global_step)
