"""`quietdepth fit|validate|test`: the LightningCLI over quietdepth's modules and data."""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.callbacks.progress import ProgressBar
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

from evals import wandb_auth
from modeldefs.safe_dcp import check_distributed_checkpoint

# Imported so their classes resolve by short name in YAML (class_path: CausalLM).
from training import callbacks, data, lm, quietstar_lm, routing_monitor, thought_monitor  # noqa: F401
from training.callbacks import StepProgressBar, checkpoint_epochs, checkpoint_metadata, finish_interrupted_moves
from training.errors import ConfigError
from training.lm import NonFiniteLossError


def default_precision() -> str:
    """bf16 mixed precision where the accelerator supports it, fp32 elsewhere."""
    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"


class SaveResolvedConfig(SaveConfigCallback):
    """Writes the resolved config to the run folder (config.yaml, as Lightning does) and also into each W&B
    run's config and each checkpoint (`config`), which otherwise get only the model's and the data's
    hyperparameters: not the trainer's max_steps, accumulation, clipping or seed. A checkpoint also records the
    id of the W&B run it was logged to (`wandb_run_id`), which resuming from it logs on to."""

    def _resolved(self) -> dict[str, Any]:
        return yaml.safe_load(self.parser.dump(self.config, skip_none=False))

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_hyperparams({"config": self._resolved()})

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint["config"] = self._resolved()
        run_ids = [logger.version for logger in trainer.loggers if isinstance(logger, WandbLogger) and logger.version]
        if run_ids:
            checkpoint["wandb_run_id"] = run_ids[0]


class QuietDepthCLI(LightningCLI):
    """LightningCLI with quietdepth's defaults (precision, progress bar), its checks before a run starts, and its
    errors reported as themselves (`ConfigError`)."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, validate and test: not Lightning's predict, which needs a predict_step and predict data that
        quietdepth's modules do not have (quietdepth-generate continues prompts)."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name != "predict"}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults({"trainer.precision": default_precision()})

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """The trainer, with `StepProgressBar` where it shows a progress bar (rich installed, none configured)."""
        config = {**self.config_init[self.subcommand].get("trainer", {}), **kwargs}
        given = list(config.get("callbacks") or [])
        if (config.get("enable_progress_bar") is not False and _RICH_AVAILABLE
                and not any(isinstance(c, ProgressBar) for c in given)):
            kwargs["callbacks"] = [*given, StepProgressBar()]
        trainer = super().instantiate_trainer(**kwargs)
        _check_mesh(trainer)
        return trainer

    def before_instantiate_classes(self) -> None:
        """Make each WandbLogger's save_dir absolute. W&B's background service outlives a run and resolves a
        relative one against the folder where the process's first run started, so a second run in the same
        process (a notebook, a sweep, the tests) started from another folder would write into the first's.
        A WandbLogger without the wandb package is refused, naming it (jsonargparse would report only "Not a
        valid subclass of Logger" and the whole logger list)."""
        loggers = self.config[self.subcommand].get("trainer", {}).get("logger")
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            if isinstance(logger, Namespace) and logger.class_path.endswith("WandbLogger"):
                if importlib.util.find_spec("wandb") is None:
                    raise ConfigError(f"trainer.logger has {logger.class_path}, but the wandb package is not "
                                      "installed: pip install wandb, or remove the WandbLogger from trainer.logger "
                                      "in the config (the CSVLogger logs alone)")
                init = logger.init_args  # WandbLogger writes to `save_dir or dir`
                key = "save_dir" if init.get("save_dir") or not init.get("dir") else "dir"
                init[key] = os.path.abspath(init.get(key) or ".")

    def instantiate_classes(self) -> None:
        """As LightningCLI's, but an error raised while a class of the config is built comes out as itself, not
        inside jsonargparse's "Does not validate against any of the Union subtypes" error that also prints the
        whole Namespace; a ValueError (a value of the config refused, by our checks or a class's own) as a
        `ConfigError`, other errors with their traceback."""
        try:
            super().instantiate_classes()
        except ValueError as error:
            raised = _raised_inside(error)
            if raised is error:
                raise
            if isinstance(raised, ValueError) and not isinstance(raised, ConfigError):
                raised = ConfigError(str(raised))
            raise raised from None

    def _parse_ckpt_path(self) -> None:
        """Keep the run's configuration as given. LightningCLI would parse a --ckpt_path file's stored
        hyperparameters over it, so that on resume the command line's model settings are silently undone
        (fsdp_param_dtype, compile, finite_check_interval, ...; Lightning issue #20801, PR #21455). The
        checkpoint's architecture is still checked against the configured one (`CausalLM.on_load_checkpoint`)."""

    def fit(self, **kwargs: Any) -> None:
        """`trainer.fit` (LightningCLI runs a method named after the subcommand in its place), without Lightning's
        "Checkpoint directory ... exists and is not empty" warning on a resume: the folder holds the checkpoint
        it resumes. A new run into a folder with checkpoints still gets it, as does `--ckpt_path last` where the
        folder has no last checkpoint (Lightning then starts from step 0)."""
        with warnings.catch_warnings():
            if self._ckpt_paths():  # the checkpoint resumed: for `last`, none where there is no last*.ckpt
                warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            self.trainer.fit(**_weights_only(kwargs))

    def validate(self, **kwargs: Any) -> None:
        """`trainer.validate`, reading --ckpt_path with weights_only (`_weights_only`)."""
        self.trainer.validate(**_weights_only(kwargs))

    def test(self, **kwargs: Any) -> None:
        """`trainer.test`, reading --ckpt_path with weights_only (`_weights_only`)."""
        self.trainer.test(**_weights_only(kwargs))

    def before_fit(self) -> None:
        paths = self._ckpt_paths()
        self._check_ckpt_path(paths)
        metadata = {path: self._metadata(path) for path in paths
                    if (path / "meta.pt" if path.is_dir() else path).is_file()}
        self._check_steps_left(metadata)
        self._continue_wandb_run(metadata)
        for callback in self.trainer.checkpoint_callbacks:  # a file there would fail only at the first save
            if callback.dirpath and Path(callback.dirpath).is_file():
                raise ConfigError(f"the checkpoint folder {callback.dirpath} is a file: set the checkpoint callback's "
                                  "init_args.dirpath (trainer.callbacks) to a folder")

    def before_validate(self) -> None:
        self._check_ckpt_path(self._ckpt_paths())
        self._warn_random_weights()

    def before_test(self) -> None:
        self._check_ckpt_path(self._ckpt_paths())
        self._warn_random_weights()

    def _warn_random_weights(self) -> None:
        """validate/test without --ckpt_path or init_from scores the freshly initialised weights: say so."""
        if self.config_init[self.subcommand].get("ckpt_path") is None and self.model.hparams.get("init_from") is None:
            rank_zero_warn(f"{self.subcommand} runs on randomly initialised weights: give --ckpt_path <checkpoint> "
                           "(or model.init_args.init_from) to score a trained model")

    def _ckpt_paths(self) -> list[Path]:
        """Where the subcommand's --ckpt_path points: nothing, the path, or for `last` the file Lightning
        resumes: the newest `last*.ckpt` (`last-v1.ckpt`, ... included) of the checkpoint callbacks, after
        putting back one that a crash left mid-move (`training.callbacks.finish_interrupted_moves`)."""
        ckpt = self.config_init[self.subcommand].get("ckpt_path")
        if ckpt is None:
            return []
        if ckpt == "best":
            self._refuse_best()
        if ckpt == "last":
            last = self._newest_last()
            return [last] if last else []
        return [Path(ckpt)]

    def _newest_last(self) -> Path | None:
        """The newest `last*.ckpt` of the checkpoint callbacks, after putting back one a crash left mid-move."""
        for callback in self.trainer.checkpoint_callbacks:  # before Lightning looks for the newest last*.ckpt
            if isinstance(callback, ModelCheckpoint) and callback.dirpath and Path(callback.dirpath).is_dir():
                finish_interrupted_moves(Path(callback.dirpath))
        found = [Path(p) for cb in self.trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)
                 for p in cb._find_last_checkpoints(self.trainer)]
        return max(found, key=lambda p: p.stat().st_mtime) if found else None

    def _refuse_best(self) -> None:
        """`--ckpt_path best` is Lightning's best checkpoint of a fit earlier in this process, which a command never
        has: Lightning stopped with a traceback saying ModelCheckpoint "is not configured to save the best model".
        Refuse it, naming the run's best checkpoint as its newest `last*.ckpt` records it."""
        last = self._newest_last()
        states = (self._metadata(last).get("callbacks") or {}).values() if last else []
        scored = next((state for state in states if isinstance(state, dict) and state.get("monitor")
                       and state.get("best_model_path")), None)
        instead = (f"--ckpt_path {scored['best_model_path']} (the best by {scored['monitor']}, as {last} records it)"
                   if scored else "a checkpoint's path, or --ckpt_path last")
        raise ConfigError(f"--ckpt_path best means the best checkpoint of a fit earlier in the same process, which "
                          f"`quietdepth {self.subcommand}` has not run: give {instead}")

    def _check_ckpt_path(self, paths: list[Path]) -> None:
        """Refuse, before the run starts, a --ckpt_path that is no checkpoint (a folder without a distributed
        checkpoint's .metadata, a file that is not a torch archive: truncated, or something else), a folder
        whose metadata or values would run code when unpickled (`modeldefs.safe_dcp`), and a sharded
        checkpoint folder where the strategy reads only files (Lightning would end in an
        IsADirectoryError), naming the ways that work. Under ModelParallelStrategy, which loads the weights before
        `on_load_checkpoint`, the module is told of the checkpoint to check its architecture when it is built
        (`CausalLM.will_restore`). `paths`: `_ckpt_paths()`."""
        trusted = self.config_init[self.subcommand].get("weights_only") is False  # --weights_only false
        for path in paths:
            if path.is_dir() and not (path / ".metadata").is_file():
                raise ConfigError(f"--ckpt_path {path} is a folder without a distributed checkpoint (no .metadata "
                                  "file): give a .ckpt file or a folder an FSDP run saved")
            if path.is_dir() and not trusted:  # Lightning reads it with DCP's defaults: plain pickle for .metadata
                try:
                    check_distributed_checkpoint(path)
                except ValueError as error:
                    raise ConfigError(f"--ckpt_path {error}; a folder from a source you trust loads with "
                                      "--weights_only false") from None
            if path.is_file() and not zipfile.is_zipfile(path):
                raise ConfigError(f"--ckpt_path {path} is not a checkpoint quietdepth can read (not a torch archive: "
                                  "truncated, or another kind of file); give an intact .ckpt")
            if path.is_dir() and not isinstance(self.trainer.strategy, ModelParallelStrategy):
                raise ConfigError(
                    f"--ckpt_path {path} is a distributed (sharded) checkpoint folder, which only ModelParallelStrategy "
                    f"reads: add --config configs/trainer/fsdp.yaml (on one device also --trainer.devices 1 "
                    f"--trainer.strategy.init_args.data_parallel_size 1), or start a new run from its weights with "
                    f"--model.init_args.init_from {path}")
            if isinstance(self.trainer.strategy, ModelParallelStrategy) and hasattr(self.model, "will_restore"):
                # it loads the weights before on_load_checkpoint: the module checks the architecture when built
                if (path / "meta.pt" if path.is_dir() else path).is_file():
                    self.model.will_restore(self._metadata(path))

    @functools.cache
    def _metadata(self, path: Path) -> dict[str, Any]:
        """`checkpoint_metadata` of a --ckpt_path, read once per run (the architecture check under
        ModelParallelStrategy and before_fit's step, epoch and W&B checks share it), with --weights_only."""
        return checkpoint_metadata(path, weights_only=self.config_init[self.subcommand].get("weights_only") is not False)

    def _check_steps_left(self, checkpoints: dict[Path, dict[str, Any]]) -> None:
        """Refuse to resume a checkpoint (`checkpoints`: the `checkpoint_metadata` of each of `_ckpt_paths()`) at or
        past trainer.max_steps, or that had trained trainer.max_epochs epochs: Lightning would train nothing and leave
        an empty run folder behind."""
        max_steps, max_epochs = self.trainer.max_steps, self.trainer.max_epochs
        for path, metadata in checkpoints.items():
            step = metadata.get("global_step", 0)
            if 0 <= max_steps <= step:
                raise ConfigError(f"--ckpt_path {path} is at step {step} and trainer.max_steps is {max_steps}: "
                                  f"there is nothing left to train. Raise --trainer.max_steps "
                                  f"(e.g. to {step + max(step, 1)}) to train on from it")
            epochs = checkpoint_epochs(metadata)
            if max_epochs is not None and 0 <= max_epochs <= epochs:
                raise ConfigError(f"--ckpt_path {path} has trained {epochs} epoch(s) and trainer.max_epochs is "
                                  f"{max_epochs}: there is nothing left to train. Raise --trainer.max_epochs "
                                  f"(e.g. to {epochs + 1}) to train on from it")

    def _continue_wandb_run(self, checkpoints: dict[Path, dict[str, Any]]) -> None:
        """Resuming logs on to the W&B run the checkpoint was logged to (its `wandb_run_id`), as WandbLogger does
        for a given id (resume="allow"), not to a new run of the same name: a WandbLogger given no
        `id`/`version` takes it. Offline, each part is its own folder with that id; `wandb sync` uploads them
        into the one run. `checkpoints`: as for `_check_steps_left`."""
        for metadata in checkpoints.values():
            run_id = metadata.get("wandb_run_id")
            for logger in self.trainer.loggers:
                if run_id and isinstance(logger, WandbLogger) and logger.version is None:  # not started, no id given
                    logger._id = logger._wandb_init["id"] = run_id  # what `version` reports, what wandb.init gets


def _check_mesh(trainer: L.Trainer) -> None:
    """ModelParallelStrategy's device mesh must span the processes: Lightning checks it only once every rank has
    started, and then each fails with a traceback. Its "auto" sizes are resolved as Lightning resolves them."""
    strategy = trainer.strategy
    if not isinstance(strategy, ModelParallelStrategy):
        return
    dp, tp = strategy._data_parallel_size, strategy._tensor_parallel_size
    dp = trainer.num_nodes if dp == "auto" else dp
    tp = trainer.num_devices if tp == "auto" else tp
    processes = trainer.num_devices * trainer.num_nodes
    if dp * tp != processes:
        # quietdepth shards with FSDP only (data_parallel_mesh refuses tensor parallelism)
        fix = (f"set data_parallel_size to {processes}" if tp == 1
               else f"set tensor_parallel_size to 1 and data_parallel_size to {processes} (quietdepth shards with FSDP "
                    "only)")
        raise ConfigError(f"trainer.strategy.init_args.data_parallel_size {dp} x tensor_parallel_size {tp} must equal "
                          f"the number of processes, trainer.devices {trainer.num_devices} x trainer.num_nodes "
                          f"{trainer.num_nodes}: {fix}")


def _weights_only(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The subcommand's arguments with --weights_only true where it is unset: Lightning then reads a --ckpt_path
    URL with weights_only=False (a download can run any code as it is unpickled), a local file with torch's
    default. quietdepth checkpoints hold tensors and plain values only."""
    return {**kwargs, "weights_only": True if kwargs.get("weights_only") is None else kwargs["weights_only"]}


def _raised_inside(error: BaseException) -> BaseException:
    """The error that a class raised while jsonargparse built it, from inside the "Does not validate against any
    of the Union subtypes" errors that jsonargparse raises from it; `error` itself where it is no such error."""
    while str(error).startswith("Does not validate against any of the Union subtypes") and (
            error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    return error


def _not_an_advert(record: logging.LogRecord) -> bool:
    """Drops Lightning's "💡 Tip" adverts for its cloud services from its log output."""
    return not record.getMessage().startswith("💡 Tip")


def main(args: list[str] | None = None) -> None:
    """Entry point of the `quietdepth` console script. A run that a check of ours refuses (`ConfigError`) ends
    with `error: <message>` on stderr and exit status 2, as a malformed command line does; one that our
    non-finite check stops (`NonFiniteLossError`, its checkpoints intact) with the same line and status 1.
    `run` raises both."""
    try:
        run(args)
    except (ConfigError, NonFiniteLossError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2 if isinstance(error, ConfigError) else 1)


def run(args: list[str] | None = None) -> QuietDepthCLI:
    """Parse `args` (default: the command line), run the subcommand and return the CLI object."""
    if not wandb_auth.has_credentials():
        os.environ.setdefault("WANDB_MODE", "offline")  # a real, `wandb sync`-able run folder; no login prompt
    # TextDataModule restores the data position itself (its state_dict), which Lightning cannot see.
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    # Lightning 2.6 builds torch's deprecated LeafSpec on every step; nothing a user can act on.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
    for handler in logging.getLogger("lightning.pytorch").handlers:
        if _not_an_advert not in handler.filters:
            handler.addFilter(_not_an_advert)
    wandb = sys.modules.get("wandb")
    callers_run = wandb.run if wandb is not None else None  # WandbLogger logs into it; the caller closes it
    try:
        return QuietDepthCLI(
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=SaveResolvedConfig,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,  # the modules build their own AdamW and schedule (model.init_args)
            args=args,
        )
    finally:
        _finish_wandb_run(failed=sys.exc_info()[0] is not None, keep=callers_run)


def _finish_wandb_run(failed: bool, keep: Any = None) -> None:
    """Close the W&B run that the command started (WandbLogger leaves it open), so a second run in one process
    starts its own. `keep`: a run the caller had open before (`wandb.init()` in a script or a sweep agent's
    function), which WandbLogger logged into and which stays open for the caller to go on logging to."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None and wandb.run is not keep:
        wandb.finish(exit_code=1 if failed else 0)

if __name__ == "__main__":
    main()
