"""`quietdepth fit|validate` on the smoke config, the files a run leaves, and each bad input."""

from __future__ import annotations

import csv
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from transformers import AutoModelForCausalLM

from evals.sample import main as sample_main
from modeldefs.pretrained import load_pretrained, tokenizer_source
from tests.conftest import REPO, requires_smollm2
from training.callbacks import StepProgressBar, _move_into_place, checkpoint_step
from training.cli import main, run
from training.export import main as export_main
from training.errors import ConfigError
from training.lm import CausalLM, NonFiniteLossError
from training.schedule import warmup_cosine

SMOKE = str(REPO / "configs" / "smoke.yaml")


def smoke_args(data: Path, *extra: str, steps: int = 6, config: str = SMOKE) -> list[str]:
    return ["--config", config, "--data.init_args.path", str(data), "--data.init_args.max_documents", "300",
            "--trainer.max_steps", str(steps), "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "2",
            "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false", *extra]


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    (path,) = run_dir.glob("csv/version_*/metrics.csv")
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@requires_smollm2  # loads the smoke config's SmolLM2 tokenizer
def test_each_run_in_one_process_writes_its_wandb_run_into_its_own_folder(tmp_path, monkeypatch, gsm8k_train):
    """W&B's background service outlives a run and resolves a relative save_dir against the folder where the
    process's first run started: the second run, started from another folder, must still land in its own."""
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        run(["fit", *smoke_args(gsm8k_train, "--trainer.limit_val_batches", "0", steps=1)])
    for name in ("first", "second"):
        assert len(list((tmp_path / name / "runs" / "smoke" / "wandb").glob("offline-run-*/*.wandb"))) == 1, name


def test_a_wandb_logger_without_wandb_installed_is_refused_naming_the_package(in_tmp, gsm8k_train, monkeypatch,
                                                                              capsys):
    """Without wandb, WandbLogger raises ModuleNotFoundError, which jsonargparse reported as "Not a valid subclass
    of Logger" with the whole logger list, naming neither wandb nor the fix."""
    from lightning.pytorch.loggers import wandb as lightning_wandb

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails, as where it is not installed
    monkeypatch.setattr(lightning_wandb, "_WANDB_AVAILABLE", False)  # what WandbLogger checks then
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *smoke_args(gsm8k_train, steps=1)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "WandbLogger, but the wandb package is not installed: pip install wandb" in err, err


@requires_smollm2  # loads the smoke config's SmolLM2 tokenizer
def test_a_resumed_run_logs_on_to_the_wandb_run_of_its_checkpoint(in_tmp, gsm8k_train):
    """`--ckpt_path` continues the W&B run the checkpoint was logged to (offline: a second folder with its id, which
    `wandb sync` uploads into it), not a new run of the same name; a given id still decides."""
    args = ["fit", *smoke_args(gsm8k_train, "--trainer.limit_val_batches", "0", steps=2)]
    run(args)
    wandb_dir = in_tmp / "runs" / "smoke" / "wandb"
    (first,) = [p.name.removeprefix("run-") for p in wandb_dir.glob("offline-run-*/run-*.wandb")]
    run([*args, "--trainer.max_steps", "3", "--ckpt_path", "last"])
    assert sorted(p.name for p in wandb_dir.glob("offline-run-*/run-*.wandb")) == [f"run-{first}"] * 2
    run([*args, "--trainer.max_steps", "4", "--ckpt_path", "last", "--trainer.logger.init_args.id", "mine"])
    assert len(list(wandb_dir.glob("offline-run-*/run-mine.wandb"))) == 1


@requires_smollm2  # loads the smoke config's SmolLM2 tokenizer
def test_a_wandb_run_the_caller_opened_is_logged_into_and_left_open(in_tmp, gsm8k_train):
    """A script or a sweep agent's function that calls wandb.init() and then runs quietdepth goes on logging to its
    run afterwards: the command closes only a run it started."""
    wandb = pytest.importorskip("wandb")
    callers = wandb.init(project="quietdepth-test", dir=str(in_tmp), mode="offline")
    try:
        run(["fit", *smoke_args(gsm8k_train, "--trainer.limit_val_batches", "0", steps=1)])
        assert wandb.run is callers
        assert callers.summary.get("train/loss") is not None  # WandbLogger logged into it
        callers.log({"after": 1.0})
    finally:
        callers.finish()


@requires_smollm2  # loads the smoke config's SmolLM2 tokenizer
@pytest.mark.parametrize("init_args", [{"save_dir": "wb"}, {"save_dir": None, "dir": "wb"}])
def test_a_wandb_folder_given_as_save_dir_or_dir_is_made_absolute(in_tmp, gsm8k_train, init_args):
    """WandbLogger writes to `save_dir or dir`: either, made absolute, is where the run's files go."""
    config = yaml.safe_load(Path(SMOKE).read_text())
    config["trainer"]["logger"] = [{"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": init_args}]
    (in_tmp / "wb.yaml").write_text(yaml.safe_dump(config))
    cli = run(["fit", *smoke_args(gsm8k_train, "--trainer.limit_val_batches", "0", steps=1,
                                  config=str(in_tmp / "wb.yaml"))])
    assert cli.trainer.logger.save_dir == str(in_tmp / "wb")
    assert len(list((in_tmp / "wb" / "wandb").glob("offline-run-*/*.wandb"))) == 1


@requires_smollm2  # loads the smoke config's SmolLM2 tokenizer
def test_fit_smoke_writes_checkpoints_metrics_wandb_run_and_summary(in_tmp, gsm8k_train, capsys):
    cli = run(["fit", *smoke_args(gsm8k_train, steps=12)])
    run_dir = in_tmp / "runs" / "smoke"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    rows = read_metrics(run_dir)
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert any(r.get("val/loss") for r in rows)
    tokens_per_s = [float(r["train/device/items_per_sec"]) for r in rows if r.get("train/device/items_per_sec")]
    assert tokens_per_s and all(t > 0 for t in tokens_per_s)
    flops_per_s = [float(r["train/device/flops_per_sec"]) for r in rows if r.get("train/device/items_per_sec")]
    assert len(flops_per_s) == len(tokens_per_s) and all(f > 0 for f in flops_per_s)  # from the first interval
    assert not any(r.get("train/device/mfu") for r in rows)  # no known peak FLOP/s for a CPU
    assert len(list((run_dir / "wandb").glob("offline-run-*/*.wandb"))) == 1
    (wandb_logger,) = [lg for lg in cli.trainer.loggers if isinstance(lg, WandbLogger)]
    assert wandb_logger.experiment.config["config"]["trainer"]["max_steps"] == 12  # the whole resolved config
    assert (run_dir / "csv").exists() and list(run_dir.rglob("config.yaml"))
    out = capsys.readouterr().out
    assert "quietdepth run summary" in out and "wandb sync" in out and "last.ckpt" in out
    assert "\ntrain/loss: " in out and "\nloss: " not in out  # one final loss: not also the progress bar's copy
    (suggested,) = [line.split("try it: ")[1] for line in out.splitlines() if line.startswith("try it: ")]
    program, *args = shlex.split(suggested)
    assert program == "quietdepth-generate"
    sample_main([*args, "--max-new-tokens", "3"])  # the suggested command runs on the run's checkpoint
    assert "3 tokens in" in capsys.readouterr().out


@requires_smollm2  # loads the smoke config's SmolLM2 tokenizer
def test_a_checkpoint_holds_the_whole_resolved_config_of_its_run(in_tmp, gsm8k_train):
    """Its hyper_parameters are the model's and the data's only: without the trainer's settings (max_steps, which
    shapes the cosine schedule, accumulation, clipping, the seed) a checkpoint away from its run folder does not say
    how to train it again."""
    main(["fit", *smoke_args(gsm8k_train, "--trainer.accumulate_grad_batches", "2", steps=2)])
    state = torch.load(in_tmp / "runs" / "smoke" / "checkpoints" / "last.ckpt", weights_only=True)
    saved = (in_tmp / "runs" / "smoke" / "csv" / "version_0" / "config.yaml").read_text()
    assert state["config"] == yaml.safe_load(saved)
    assert state["config"]["trainer"]["max_steps"] == 2 and state["config"]["trainer"]["accumulate_grad_batches"] == 2


def test_validate_and_export_from_a_checkpoint(in_tmp, gsm8k_train, smollm2_tokenizer, smollm2_tokenizer_dir):
    main(["fit", *smoke_args(gsm8k_train, "--data.init_args.tokenizer", str(smollm2_tokenizer_dir), steps=3)])
    ckpt = in_tmp / "runs" / "smoke" / "checkpoints" / "last.ckpt"
    main(["validate", *smoke_args(gsm8k_train), "--ckpt_path", str(ckpt)])
    assert tokenizer_source(str(ckpt)) == str(smollm2_tokenizer_dir)  # the run's data tokenizer goes with its weights
    export_main([str(ckpt), str(in_tmp / "hf")])
    assert (in_tmp / "hf" / "tokenizer.json").is_file()
    ours = load_pretrained(str(ckpt)).eval()
    hf = AutoModelForCausalLM.from_pretrained(in_tmp / "hf").eval()
    ids = smollm2_tokenizer("Question: 2+2?", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=0, atol=1e-5)


@requires_smollm2  # loads the smoke config's SmolLM2 tokenizer
def test_validate_and_test_log_on_the_step_of_their_checkpoint(in_tmp, gsm8k_train):
    """As the fit logged its own validation of those weights; Lightning logs them at step 0, where W&B and the
    CSV would show a trained model's loss as the loss at initialisation."""
    main(["fit", *smoke_args(gsm8k_train, steps=3)])
    ckpt = str(in_tmp / "runs" / "smoke" / "checkpoints" / "last.ckpt")
    main(["validate", *smoke_args(gsm8k_train), "--ckpt_path", ckpt])
    main(["test", *smoke_args(gsm8k_train), "--ckpt_path", ckpt])
    rows = {path.parent.name: list(csv.DictReader(path.open()))
            for path in (in_tmp / "runs" / "smoke").glob("csv/version_*/metrics.csv")}
    assert [r["step"] for r in rows["version_0"] if r.get("val/loss")] == ["2"]  # after the 3rd step
    assert [r["step"] for r in rows["version_1"] if r.get("val/loss")] == ["2"]
    assert [r["step"] for r in rows["version_2"] if r.get("test/loss")] == ["2"]


class RecordStepGradNorm(L.Callback):
    """Records the total norm of the gradients that each optimizer step used (after any clipping)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_train_start(self, trainer, pl_module) -> None:
        def record(optimizer, args, kwargs) -> None:
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

        trainer.optimizers[0].register_step_post_hook(record)  # (Lightning runs backward inside `step`)


@requires_smollm2  # loads the smoke config's SmolLM2 tokenizer
def test_bf16_mixed_training_clips_gradients_with_the_fused_optimizer(in_tmp, gsm8k_train):
    # Lightning's AMP plugin refuses to clip for fused optimizers; CausalLM clips itself where no loss scaler runs.
    clip = 1e-3
    cli = run(["fit", *smoke_args(gsm8k_train, "--trainer.precision", "bf16-mixed", "--trainer.gradient_clip_val",
                                  str(clip), "--trainer.callbacks+=tests.test_cli.RecordStepGradNorm", steps=3)])
    rows = read_metrics(in_tmp / "runs" / "smoke")
    norms = [float(r["train/grad_norm"]) for r in rows if r.get("train/grad_norm")]  # logged before clipping
    assert len(norms) == 3 and all(clip < n < float("inf") for n in norms)
    (recorder,) = [c for c in cli.trainer.callbacks if isinstance(c, RecordStepGradNorm)]
    assert len(recorder.norms) == 3 and all(n == pytest.approx(clip, rel=1e-3) for n in recorder.norms)


def test_print_config_shows_the_resolved_config(in_tmp, gsm8k_train, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *smoke_args(gsm8k_train), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == "training.lm.CausalLM"
    assert printed["data"]["init_args"]["max_documents"] == 300
    assert printed["trainer"]["max_steps"] == 6


def test_predict_is_no_subcommand(in_tmp, gsm8k_train, capsys):
    """The modules have no predict_step or predict data: Lightning's predict ended in a traceback after tokenising
    ('`predict_dataloader` must be implemented')."""
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", *smoke_args(gsm8k_train)])
    assert exit_info.value.code == 2 and "invalid choice: 'predict'" in capsys.readouterr().err


def test_unknown_config_key_is_named(in_tmp, gsm8k_train, capsys):
    with pytest.raises(SystemExit):
        main(["fit", *smoke_args(gsm8k_train, "--model.init_args.learning_rate", "0.1")])
    assert "learning_rate" in capsys.readouterr().err


@requires_smollm2  # the old CLI loaded the smoke config's SmolLM2 tokenizer before it failed
def test_lightnings_optimizer_options_are_unknown_as_the_modules_build_their_own(in_tmp, gsm8k_train, capsys):
    """LightningCLI's --optimizer / --lr_scheduler replace the module's configure_optimizers (AdamW groups, schedule):
    they were accepted, then the fit crashed ('optimizer got an empty parameter list', a traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *smoke_args(gsm8k_train), "--optimizer", "torch.optim.SGD", "--optimizer.lr", "0.1"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --optimizer" in capsys.readouterr().err


def test_a_failed_check_of_ours_reads_as_its_own_message(in_tmp, gsm8k_train):
    """Not inside jsonargparse's "Does not validate against any of the Union subtypes" with the Namespace."""
    with pytest.raises(ValueError) as error:
        run(["fit", *smoke_args(gsm8k_train, "--model.init_args.lr", "-1")])
    assert str(error.value).startswith("model.init_args: lr=-1.0 must be > 0")
    assert "Union" not in str(error.value) and "Namespace(" not in str(error.value)
    with pytest.raises(ValueError, match=r"^data\.seq_len=0 must be >= 1$"):
        run(["fit", *smoke_args(gsm8k_train, "--data.init_args.seq_len", "0")])

def test_wrong_type_is_named(in_tmp, gsm8k_train, capsys):
    with pytest.raises(SystemExit):
        main(["fit", *smoke_args(gsm8k_train, "--model.init_args.lr", "fast")])
    err = capsys.readouterr().err
    assert "lr" in err and "fast" in err


@requires_smollm2  # loads the smoke config's SmolLM2 tokenizer
def test_sequence_longer_than_context_stops_before_training(in_tmp, gsm8k_train):
    with pytest.raises(ValueError, match=r"data.seq_len=2048 .*block_size=1024"):
        run(["fit", *smoke_args(gsm8k_train, "--data.init_args.seq_len", "2048")])
    assert not (in_tmp / "runs" / "smoke" / "checkpoints").exists()


@requires_smollm2  # loads the smoke config's SmolLM2 tokenizer
def test_a_tokenizer_larger_than_the_vocabulary_and_a_misspelled_override_stop_before_training(in_tmp, gsm8k_train):
    with pytest.raises(ValueError, match=r"data.tokenizer has 49152 tokens but the model's vocab_size is 256"):
        run(["fit", *smoke_args(gsm8k_train, "--model.init_args.model", "micro", "--data.init_args.seq_len", "64")])
    with pytest.raises(ValueError, match=r"unknown ModelConfig field\(s\) \['n_layerz'\]"):
        run(["fit", *smoke_args(gsm8k_train, "--model.init_args.model_overrides", "{n_layerz: 3}")])
    assert not (in_tmp / "runs" / "smoke" / "checkpoints").exists()


@requires_smollm2  # loads the smoke config's SmolLM2 tokenizer
def test_resuming_another_architecture_names_the_fields_that_differ(in_tmp, gsm8k_train):
    main(["fit", *smoke_args(gsm8k_train, steps=3)])
    last = in_tmp / "runs" / "smoke" / "checkpoints" / "last.ckpt"
    saved = last.read_bytes()
    with pytest.raises(ValueError, match=r"n_layer: 4 in the checkpoint, 2 here.*init_from=<checkpoint>"):
        run(["fit", *smoke_args(gsm8k_train, "--model.init_args.model_overrides", "{n_layer: 2}", "--ckpt_path", "last",
                                steps=6)])
    assert last.read_bytes() == saved


@requires_smollm2  # loads the smoke config's SmolLM2 tokenizer
def test_a_ckpt_path_that_holds_no_checkpoint_or_another_kind_of_model_is_refused_before_training(in_tmp, gsm8k_train):
    main(["fit", *smoke_args(gsm8k_train, steps=2)])
    last = in_tmp / "runs" / "smoke" / "checkpoints" / "last.ckpt"
    saved = last.read_bytes()
    truncated = in_tmp / "truncated.ckpt"
    truncated.write_bytes(saved[: len(saved) // 2])
    (in_tmp / "empty.ckpt").mkdir()
    for path, message in [(truncated, "is not a checkpoint quietdepth can read"),
                          (in_tmp / "empty.ckpt", "is a folder without a distributed checkpoint")]:
        with pytest.raises(ValueError, match=message):
            run(["fit", *smoke_args(gsm8k_train, "--ckpt_path", str(path), steps=3)])
    with pytest.raises(ValueError, match="holds a plain language-model checkpoint and this run trains a Quiet-STaR"):
        run(["validate", *smoke_args(gsm8k_train, "--ckpt_path", str(last), config=str(REPO / "configs" /
                                                                                        "quietstar-smoke.yaml"))])
    assert last.read_bytes() == saved


@requires_smollm2  # loads the smoke config's SmolLM2 tokenizer
def test_resuming_a_run_that_reached_max_steps_is_refused_with_the_step_to_raise_it_to(in_tmp, gsm8k_train):
    main(["fit", *smoke_args(gsm8k_train, steps=2)])
    with pytest.raises(ValueError, match=r"last.ckpt is at step 2 and trainer.max_steps is 2: .* \(e.g. to 4\)"):
        run(["fit", *smoke_args(gsm8k_train, "--ckpt_path", "last", steps=2)])
    assert sorted(p.name for p in (in_tmp / "runs" / "smoke" / "csv").iterdir()) == ["version_0"]


@requires_smollm2  # loads the smoke config's SmolLM2 tokenizer
def test_a_run_without_end_is_refused_as_the_schedule_needs_a_length(in_tmp, gsm8k_train):
    """max_steps=-1 and max_epochs=-1 (Lightning's endless training, e.g. under max_time): the cosine schedule's length
    is infinite; int() of it raised an OverflowError with a traceback."""
    with pytest.raises(ConfigError, match=r"trainer.max_steps=-1 with trainer.max_epochs=-1 .* --trainer.max_steps"):
        run(["fit", *smoke_args(gsm8k_train, "--trainer.max_epochs", "-1", "--trainer.max_time", "00:00:00:20",
                                steps=-1)])


@requires_smollm2  # loads the smoke config's SmolLM2 tokenizer
def test_resuming_a_run_that_trained_max_epochs_is_refused_with_the_epochs_to_raise_it_to(in_tmp, gsm8k_train):
    by_epochs = ["--data.init_args.max_documents", "30", "--trainer.max_epochs", "1"]  # one short epoch
    main(["fit", *smoke_args(gsm8k_train, *by_epochs, steps=-1)])
    refusal = r"last.ckpt has trained 1 epoch\(s\) and trainer.max_epochs is 1: .* \(e.g. to 2\)"
    with pytest.raises(ValueError, match=refusal):
        run(["fit", *smoke_args(gsm8k_train, *by_epochs, "--ckpt_path", "last", steps=-1)])
    assert sorted(p.name for p in (in_tmp / "runs" / "smoke" / "csv").iterdir()) == ["version_0"]


@requires_smollm2  # loads the smoke config's SmolLM2 tokenizer
def test_resuming_a_checkpoint_saved_at_the_last_step_of_its_final_epoch_is_refused_too(in_tmp, gsm8k_train):
    """A periodic checkpoint on an epoch's last step is written before Lightning counts the epoch (which it does
    when it resumes): the refusal missed it, and the resumed run trained nothing and left csv/version_1 behind."""
    settings = yaml.safe_load(Path(SMOKE).read_text())
    settings["trainer"]["callbacks"][0]["init_args"].update(every_n_train_steps=1, save_top_k=1)
    config = in_tmp / "smoke.yaml"
    config.write_text(yaml.safe_dump(settings))
    by_epochs = ["--data.init_args.max_documents", "30", "--trainer.max_epochs", "1"]  # one short epoch
    main(["fit", *smoke_args(gsm8k_train, *by_epochs, steps=-1, config=str(config))])
    with pytest.raises(ValueError, match=r"last.ckpt has trained 1 epoch\(s\) and trainer.max_epochs is 1"):
        run(["fit", *smoke_args(gsm8k_train, *by_epochs, "--ckpt_path", "last", steps=-1, config=str(config))])
    assert sorted(p.name for p in (in_tmp / "runs" / "smoke" / "csv").iterdir()) == ["version_0"]


@requires_smollm2  # loads the smoke config's SmolLM2 tokenizer
def test_validate_with_ckpt_path_best_is_refused_naming_the_runs_best_checkpoint(in_tmp, gsm8k_train):
    """Lightning's "best" is the best of a fit earlier in the same process: a new command stopped with a traceback
    saying that ModelCheckpoint "is not configured to save the best model", though it was."""
    settings = yaml.safe_load(Path(SMOKE).read_text())
    settings["trainer"]["callbacks"][0]["init_args"].update(every_n_train_steps=3, monitor="val/loss", save_top_k=1)
    config = in_tmp / "smoke.yaml"
    config.write_text(yaml.safe_dump(settings))
    fitted = run(["fit", *smoke_args(gsm8k_train, config=str(config))])
    best = fitted.trainer.checkpoint_callback.best_model_path
    with pytest.raises(ConfigError, match=rf"^--ckpt_path best means .* `quietdepth validate` has not run: give "
                                          rf"--ckpt_path {best} \(the best by val/loss, as .*last.ckpt records it\)$"):
        run(["validate", *smoke_args(gsm8k_train, "--ckpt_path", "best", config=str(config))])


@requires_smollm2  # loads the smoke config's SmolLM2 tokenizer
def test_a_resumed_run_does_not_warn_that_its_checkpoint_folder_is_not_empty(in_tmp, gsm8k_train, recwarn):
    """It holds the checkpoint the run resumes; Lightning's ModelCheckpoint warned on every `--ckpt_path last`."""
    args = ["fit", *smoke_args(gsm8k_train, "--trainer.limit_val_batches", "0", steps=2)]
    main(args)
    recwarn.clear()
    main([*args, "--trainer.max_steps", "4", "--ckpt_path", "last"])
    assert not [str(w.message) for w in recwarn if "exists and is not empty" in str(w.message)]


@requires_smollm2  # loads the smoke config's SmolLM2 tokenizer
def test_ckpt_path_last_without_a_last_checkpoint_still_warns_that_the_folder_is_not_empty(in_tmp, gsm8k_train):
    """Lightning then resumes nothing and starts from step 0 beside the checkpoints already in the folder."""
    args = ["fit", *smoke_args(gsm8k_train, "--trainer.limit_val_batches", "0", steps=2)]
    main(args)
    checkpoints = in_tmp / "runs" / "smoke" / "checkpoints"
    (checkpoints / "last.ckpt").rename(checkpoints / "step=2.ckpt")  # a periodic checkpoint, no last one
    with pytest.warns(UserWarning, match="exists and is not empty"):
        main([*args, "--ckpt_path", "last"])


@requires_smollm2  # loads the smoke config's SmolLM2 tokenizer
def test_ckpt_path_last_checks_the_newest_last_checkpoint_the_one_lightning_resumes(in_tmp, gsm8k_train):
    """A second run into the folder writes last-v1.ckpt; `last` resumes it, not the older last.ckpt."""
    main(["fit", *smoke_args(gsm8k_train, steps=4)])
    main(["fit", *smoke_args(gsm8k_train, steps=1)])
    assert (in_tmp / "runs" / "smoke" / "checkpoints" / "last-v1.ckpt").is_file()
    cli = run(["fit", *smoke_args(gsm8k_train, "--ckpt_path", "last", steps=3)])  # last.ckpt is at step 4
    assert cli.trainer.global_step == 3


@requires_smollm2  # loads the smoke config's SmolLM2 tokenizer
def test_fast_dev_run_writes_no_checkpoint_that_ckpt_path_last_would_resume(in_tmp, gsm8k_train):
    """Lightning documents fast_dev_run as writing no checkpoint; ModelCheckpoint's on_train_end still wrote a step-1
    last-v1.ckpt beside the run's last.ckpt, the newest, so the run's next `--ckpt_path last` resumed it."""
    main(["fit", *smoke_args(gsm8k_train, steps=3)])
    main(["fit", *smoke_args(gsm8k_train), "--trainer.fast_dev_run", "true"])
    checkpoints = in_tmp / "runs" / "smoke" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt"]
    assert checkpoint_step(checkpoints / "last.ckpt") == 3


@requires_smollm2  # loads the smoke config's SmolLM2 tokenizer
def test_a_save_that_fails_midway_leaves_the_previous_last_checkpoint_whole(in_tmp, gsm8k_train, monkeypatch):
    main(["fit", *smoke_args(gsm8k_train, steps=2)])
    last = in_tmp / "runs" / "smoke" / "checkpoints" / "last.ckpt"
    saved = last.read_bytes()

    def disk_full(self, checkpoint, path, storage_options=None) -> None:
        Path(path).write_bytes(saved[:1000])  # what a write cut short leaves
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch, pytest.raises(OSError, match="No space left"):
        patch.setattr(TorchCheckpointIO, "save_checkpoint", disk_full)
        main(["fit", *smoke_args(gsm8k_train, "--ckpt_path", "last", steps=3)])
    assert last.read_bytes() == saved
    cli = run(["fit", *smoke_args(gsm8k_train, "--ckpt_path", "last", steps=3)])  # and it resumes
    assert cli.trainer.global_step == 3 and not list(last.parent.glob("*.partial"))
    # a crash between the move's two renames leaves last.ckpt.previous and no last.ckpt: `last` still finds it
    last.rename(last.with_name("last.ckpt.previous"))
    main(["fit", *smoke_args(gsm8k_train, "--ckpt_path", "last", steps=4)])
    newest = max(last.parents[1].glob("csv/version_*"), key=lambda p: int(p.name.split("_")[1]))
    with (newest / "metrics.csv").open() as f:
        assert [r["step"] for r in csv.DictReader(f) if r.get("train/loss")] == ["3"]  # resumed: one step trained
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]

def test_a_sharded_checkpoint_moved_over_a_link_replaces_the_link_not_the_checkpoint_it_points_to(tmp_path):
    """With save_last: link, last.ckpt can link to a periodic sharded checkpoint (a folder); the final step's
    last.ckpt, written when no periodic checkpoint holds that step, takes the link's place."""
    periodic, last, staged = tmp_path / "step=4.ckpt", tmp_path / "last.ckpt", tmp_path / "last.ckpt.partial"
    for folder, step in ((periodic, "4"), (staged, "6")):
        folder.mkdir()
        (folder / "shard").write_text(step)
    last.symlink_to(periodic.name, target_is_directory=True)
    _move_into_place(staged, last)
    assert not last.is_symlink() and (last / "shard").read_text() == "6"
    assert (periodic / "shard").read_text() == "4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "step=4.ckpt"]


class RecordCheckpointsOnDisk(CSVLogger):
    """The step of each checkpoint a logger finds on disk when told of a save (WandbLogger(log_model=...) uploads
    what it finds then)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[dict[str, int | None]] = []

    def after_save_checkpoint(self, checkpoint_callback) -> None:
        paths = {Path(p) for p in (checkpoint_callback.last_model_path, checkpoint_callback.best_model_path) if p}
        self.seen.append({p.name: torch.load(p, weights_only=True)["global_step"] if p.is_file() else None
                          for p in paths})


@requires_smollm2  # loads the smoke config's SmolLM2 tokenizer
def test_loggers_told_of_a_save_find_the_checkpoint_in_place(in_tmp, gsm8k_train):
    cli = run(["fit", *smoke_args(gsm8k_train, "--trainer.logger+=tests.test_cli.RecordCheckpointsOnDisk",
                                  "--trainer.logger.save_dir", "runs/smoke", steps=2)])
    (recorder,) = [lg for lg in cli.trainer.loggers if isinstance(lg, RecordCheckpointsOnDisk)]
    assert recorder.seen == [{"last.ckpt": 2}]


@requires_smollm2  # loads the smoke config's SmolLM2 tokenizer
def test_validate_on_random_weights_warns_and_a_checkpoint_folder_that_is_a_file_stops_fit(in_tmp, gsm8k_train):
    with pytest.warns(UserWarning, match="validate runs on randomly initialised weights: give --ckpt_path"):
        main(["validate", *smoke_args(gsm8k_train)])
    config = yaml.safe_load(Path(SMOKE).read_text())
    (checkpoint,) = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("StepCheckpoint")]
    checkpoint["init_args"]["dirpath"] = str(in_tmp / "afile")
    (in_tmp / "afile").write_text("")
    (in_tmp / "smoke.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=r"checkpoint folder .*afile is a file: set the checkpoint callback"):
        run(["fit", *smoke_args(gsm8k_train, config=str(in_tmp / "smoke.yaml"))])


@requires_smollm2  # loads the smoke config's SmolLM2 tokenizer
def test_the_progress_bar_counts_steps_towards_max_steps_across_a_resume(in_tmp, gsm8k_train):
    pytest.importorskip("rich", reason="the step bar is a rich progress bar")
    run(["fit", *smoke_args(gsm8k_train, "--trainer.enable_progress_bar", "true", steps=2)])
    cli = run(["fit", *smoke_args(gsm8k_train, "--trainer.enable_progress_bar", "true", "--ckpt_path", "last", steps=3)])
    bar = cli.trainer.progress_bar_callback
    assert isinstance(bar, StepProgressBar)
    task = bar.progress.tasks[bar.train_progress_bar_id]  # Lightning's read "Epoch 0/-2", 1/<epoch batches left>
    assert (task.completed, task.total) == (3, 3) and task.description.endswith("Steps")


@requires_smollm2  # loads the smoke config's SmolLM2 tokenizer
def test_log_every_n_steps_0_trains_without_logging_steps(in_tmp, gsm8k_train):
    """Lightning reads 0 as "never log": throughput and train/loss must not divide by it."""
    cli = run(["fit", *smoke_args(gsm8k_train, "--trainer.log_every_n_steps", "0", "--trainer.limit_val_batches", "0",
                                  steps=3)])
    assert cli.trainer.global_step == 3 and "train/device/items_per_sec" not in cli.trainer.logged_metrics


def test_an_init_from_that_cannot_be_read_is_refused_as_that_setting(tmp_path):
    """A ConfigError, which the command shows as one `error:` line (as a missing init_from file), not a traceback."""
    (tmp_path / "cut.ckpt").write_bytes(b"PK\x03\x04")  # a checkpoint cut short
    module = CausalLM(model=None, init_from=str(tmp_path / "cut.ckpt"))
    with pytest.raises(ConfigError, match=r"^model.init_args.init_from: .*cut.ckpt is not a checkpoint quietdepth can"):
        module.configure_model()


def test_missing_data_file_names_the_field(in_tmp, gsm8k_train):
    with pytest.raises(FileNotFoundError, match="data.path"):
        run(["fit", *smoke_args(in_tmp / "missing.jsonl")])


def quietdepth(*args: str) -> subprocess.CompletedProcess:
    """The `quietdepth` command as a user runs it, in a process of its own."""
    return subprocess.run([sys.executable, "-m", "training", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"})


@pytest.mark.parametrize("extra, message", [
    (["--model.init_args.lr", "-1"], "error: model.init_args: lr=-1.0 must be > 0"),  # while the model is built
    (["--data.init_args.path", "missing.jsonl"], "error: data.path: missing.jsonl not found"),  # inside trainer.fit
])
def test_the_command_shows_a_refused_run_as_one_error_line_with_exit_status_2(in_tmp, gsm8k_train, extra, message):
    result = quietdepth("fit", *smoke_args(gsm8k_train, *extra))
    assert result.returncode == 2, result.stderr[-3000:]
    assert message in result.stderr and "Traceback" not in result.stderr


class FailsAtTrainStart(L.Callback):
    """A bug's stand-in: a ValueError that is no refusal of the settings."""

    def on_train_start(self, trainer, pl_module) -> None:
        raise ValueError("a bug, not a refusal")


@requires_smollm2  # loads the smoke config's SmolLM2 tokenizer
def test_the_command_shows_the_traceback_of_an_error_that_is_no_refusal(in_tmp, gsm8k_train):
    result = quietdepth("fit", *smoke_args(gsm8k_train, "--trainer.callbacks+=tests.test_cli.FailsAtTrainStart"))
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "ValueError: a bug, not a refusal" in result.stderr


class CtrlCAtStep4(L.Callback):
    """Ctrl-C as Lightning sees it, once the run has taken 4 steps."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 4:
            raise KeyboardInterrupt


@requires_smollm2  # loads the smoke config's SmolLM2 tokenizer
def test_ctrl_c_ends_the_fit_with_a_summary_that_says_how_to_resume_and_keeps_the_checkpoints(in_tmp, gsm8k_train,
                                                                                                capsys):
    run(["fit", *smoke_args(gsm8k_train, steps=2)])
    folder = in_tmp / "runs" / "smoke" / "checkpoints"
    saved = {path.name: path.read_bytes() for path in folder.iterdir()}
    capsys.readouterr()
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as exit_info:  # Lightning exits with status 1 after its graceful shutdown
            run(["fit", *smoke_args(gsm8k_train, "--ckpt_path", "last",
                                    "--trainer.callbacks+=tests.test_cli.CtrlCAtStep4", steps=6)])
    finally:
        signal.signal(signal.SIGINT, handler)  # which Lightning set to ignore Ctrl-C for the rest of the process
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    assert "quietdepth run interrupted at step 4" in out and "\nsteps: 4 " in out
    assert f"resume: the same command with --ckpt_path last   (continues from {folder / 'last.ckpt'}, step 2)" in out
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == saved



class CtrlCAtSetup(L.Callback):
    """Ctrl-C as Lightning sees it while the run is set up (the data tokenised, the model built): before a
    resumed run has restored its checkpoint."""

    def setup(self, trainer, pl_module, stage) -> None:
        raise KeyboardInterrupt


@requires_smollm2  # loads the smoke config's SmolLM2 tokenizer
def test_ctrl_c_before_a_resumed_run_restores_its_checkpoint_says_to_resume_from_it(in_tmp, gsm8k_train, capsys):
    run(["fit", *smoke_args(gsm8k_train, steps=2)])
    capsys.readouterr()
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):
            run(["fit", *smoke_args(gsm8k_train, "--ckpt_path", "last",
                                    "--trainer.callbacks+=tests.test_cli.CtrlCAtSetup", steps=6)])
    finally:
        signal.signal(signal.SIGINT, handler)
    out = capsys.readouterr().out
    last = in_tmp / "runs" / "smoke" / "checkpoints" / "last.ckpt"
    assert f"resume: the same command with --ckpt_path last   (continues from {last}, step 2)" in out
    assert "no checkpoint written yet" not in out

class SlowValidationRecorder(L.Callback):
    """Records the progress bar's loss after every training batch; each validation batch sleeps `sleep` s."""

    def __init__(self, sleep: float) -> None:
        self.sleep, self.shown = sleep, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.shown.append(trainer.progress_bar_metrics.get("loss"))

    def on_validation_batch_end(self, *args) -> None:
        time.sleep(self.sleep)


@requires_smollm2  # loads the smoke config's SmolLM2 tokenizer
def test_throughput_and_bar_loss_are_read_on_logging_steps_without_validation_time(in_tmp, gsm8k_train):
    config = yaml.safe_load(Path(SMOKE).read_text())
    config["trainer"]["callbacks"].append(
        {"class_path": "tests.test_cli.SlowValidationRecorder", "init_args": {"sleep": 1.5}})
    (in_tmp / "slow.yaml").write_text(yaml.safe_dump(config))
    cli = run(["fit", *smoke_args(gsm8k_train, "--trainer.log_every_n_steps", "3", "--trainer.val_check_interval",
                                  "4", steps=9, config=str(in_tmp / "slow.yaml"))])
    rows = read_metrics(in_tmp / "runs" / "smoke")
    speed = [r for r in rows if r.get("train/device/items_per_sec")]
    assert [int(r["step"]) for r in speed] == [2, 5, 8]  # the 3rd, 6th and 9th steps, on Lightning's rows
    tokens = [int(r["train/lengths"]) for r in speed]
    assert tokens == [3 * 4 * 128, 6 * 4 * 128, 9 * 4 * 128]  # 3 steps of batch 4 x seq 128 per interval
    seconds = [float(r["train/time"]) for r in speed]
    for i, r in enumerate(speed):
        interval = seconds[i] - (seconds[i - 1] if i else 0.0)
        assert float(r["train/device/items_per_sec"]) == pytest.approx(3 * 4 * 128 / interval, rel=1e-6)
        assert interval < 2 * 1.5  # validations after steps 4 and 8 slept 2 x 1.5 s each, not counted
    (recorder,) = [c for c in cli.trainer.callbacks if isinstance(c, SlowValidationRecorder)]
    losses = {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}
    for i, shown in enumerate(recorder.shown):  # refreshed on steps 1, 3, 6 and 9 only; then as logged
        refreshed = max(s for s in (0, 2, 5, 8) if s <= i)
        assert refreshed == i or shown == recorder.shown[i - 1]
        assert refreshed == 0 or float(shown) == pytest.approx(losses[refreshed], rel=1e-6)


class RecordMicroBatchLosses(L.Callback):
    """Records each micro-batch's training loss under the optimizer step it goes into."""

    def __init__(self) -> None:
        self.losses: dict[int, list[float]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step = trainer.global_step  # advances only after the step's last micro-batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Lightning hands back the loss divided by the micro-batches per step (as backward saw it).
        self.losses.setdefault(self._step, []).append(float(outputs["loss"]) * trainer.accumulate_grad_batches)


@requires_smollm2  # loads the smoke config's SmolLM2 tokenizer
def test_train_loss_is_the_mean_over_the_optimizer_steps_micro_batches(in_tmp, gsm8k_train):
    """2 micro-batches per step, 5 batches an epoch (so every 3rd step has 1), logged every 2nd step: each
    logged train/loss is its step's mean, with nothing left over from the steps between or the epoch before."""
    cli = run(["fit", *smoke_args(gsm8k_train, "--trainer.accumulate_grad_batches", "2",
                                  "--trainer.limit_train_batches", "5", "--trainer.log_every_n_steps", "2",
                                  "--trainer.limit_val_batches", "0",
                                  "--trainer.callbacks+=tests.test_cli.RecordMicroBatchLosses", steps=6)])
    (recorder,) = [c for c in cli.trainer.callbacks if isinstance(c, RecordMicroBatchLosses)]
    assert [len(recorder.losses[s]) for s in range(6)] == [2, 2, 1, 2, 2, 1]
    rows = read_metrics(in_tmp / "runs" / "smoke")
    logged = {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}
    assert sorted(logged) == [1, 3, 5]
    for step, loss in logged.items():
        micro = recorder.losses[step]
        assert loss == pytest.approx(sum(micro) / len(micro), rel=1e-6), f"step {step}: {loss} vs {micro}"


@requires_smollm2  # loads the smoke config's SmolLM2 tokenizer
def test_the_learning_rate_is_logged_once_per_optimizer_step_with_gradient_accumulation(in_tmp, gsm8k_train):
    """Lightning's LearningRateMonitor logs at the start of every micro-batch of a logging step: with 2 micro-batches
    per step, each logging step had two rows (two points at one step in W&B)."""
    run(["fit", *smoke_args(gsm8k_train, "--trainer.accumulate_grad_batches", "2", "--trainer.log_every_n_steps", "2",
                            "--trainer.limit_val_batches", "0", steps=4)])
    rows = read_metrics(in_tmp / "runs" / "smoke")
    assert [int(r["step"]) for r in rows if r.get("lr-AdamW/decay")] == [1, 3]


class PoisonWeights(L.Callback):
    """Fault injection: sets one weight to NaN at a given step and hook, as a diverging run would."""

    def __init__(self, step: int, hook: str) -> None:
        self.step, self.hook = step, hook

    def _poison(self, trainer: L.Trainer, pl_module: L.LightningModule, hook: str) -> None:
        if hook == self.hook and trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.model.embed.weight[0, 0] = float("nan")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._poison(trainer, pl_module, "batch_start")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._poison(trainer, pl_module, "batch_end")


def poisoned_run(in_tmp: Path, data: Path, hook: str) -> list[str]:
    config = yaml.safe_load(Path(SMOKE).read_text())
    config["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 1
    config["trainer"]["callbacks"].append(
        {"class_path": "tests.test_cli.PoisonWeights", "init_args": {"step": 3, "hook": hook}})
    (in_tmp / "poison.yaml").write_text(yaml.safe_dump(config))
    return ["fit", *smoke_args(data, steps=10, config=str(in_tmp / "poison.yaml"))]


def assert_last_checkpoint_is_good(in_tmp: Path, step: int) -> None:
    state = torch.load(in_tmp / "runs" / "smoke" / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == step
    assert all(torch.isfinite(t).all() for t in state["state_dict"].values())


@requires_smollm2  # loads the smoke config's SmolLM2 tokenizer
@pytest.mark.parametrize("interval, message", [(1, "training loss is nan at global step 3"),
                                               (4, "not finite at one of global steps 0-3")])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(in_tmp, gsm8k_train, interval, message):
    args = poisoned_run(in_tmp, gsm8k_train, "batch_start")
    with pytest.raises(NonFiniteLossError, match=message):
        run([*args, "--model.init_args.finite_check_interval", str(interval)])
    assert_last_checkpoint_is_good(in_tmp, 3)


@requires_smollm2  # loads the smoke config's SmolLM2 tokenizer
def test_the_command_shows_a_non_finite_loss_stop_as_one_error_line_with_exit_status_1(in_tmp, gsm8k_train):
    result = quietdepth(*poisoned_run(in_tmp, gsm8k_train, "batch_start"))
    assert result.returncode == 1, result.stderr[-3000:]
    assert "error: training loss is nan at global step 3" in result.stderr and "Traceback" not in result.stderr
    assert_last_checkpoint_is_good(in_tmp, 3)


@requires_smollm2  # loads the smoke config's SmolLM2 tokenizer
def test_non_finite_weights_are_never_written_to_a_checkpoint(in_tmp, gsm8k_train):
    # Weights go bad after step 3's update, before its checkpoint: that save is refused.
    with pytest.raises(NonFiniteLossError, match="weights are not finite at global step 3"):
        run(poisoned_run(in_tmp, gsm8k_train, "batch_end"))
    assert_last_checkpoint_is_good(in_tmp, 2)


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_shipped_config_parses(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs" / name), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].startswith("training.") and printed["trainer"]["max_steps"] > 0


@requires_smollm2  # loads the smoke config's SmolLM2 tokenizer
def test_a_resumed_run_trains_with_its_own_optimizer_settings_not_the_checkpoints(in_tmp, gsm8k_train):
    """Lightning restores the optimizer's param groups and the schedule's base lr from the checkpoint."""
    run(["fit", *smoke_args(gsm8k_train, steps=2)])
    last = in_tmp / "runs" / "smoke" / "checkpoints" / "last.ckpt"
    cli = run(["fit", *smoke_args(gsm8k_train, "--ckpt_path", str(last), "--model.init_args.lr", "0.01",
                                  "--model.init_args.weight_decay", "0.5", "--model.init_args.betas", "[0.8, 0.9]",
                                  steps=3)])
    hp = cli.model.hparams
    with (in_tmp / "runs" / "smoke" / "csv" / "version_1" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    (used,) = [float(r["lr-AdamW/decay"]) for r in rows if r.get("lr-AdamW/decay")]  # the resumed step, step 2
    assert used == pytest.approx(0.01 * warmup_cosine(2, hp.warmup_steps, 3, hp.min_lr_ratio))
    saved = torch.load(last, weights_only=True)["optimizer_states"][0]["param_groups"]
    assert [(g["weight_decay"], tuple(g["betas"]), g["initial_lr"]) for g in saved] == [
        (0.5, (0.8, 0.9), 0.01), (0.0, (0.8, 0.9), 0.01)]


@requires_smollm2  # loads the smoke config's SmolLM2 tokenizer
def test_a_resumed_run_keeps_its_command_line_settings_not_the_checkpoints(in_tmp, gsm8k_train):
    """LightningCLI would parse a checkpoint's stored hyperparameters over the command line on resume."""
    run(["fit", *smoke_args(gsm8k_train, steps=2)])
    last = in_tmp / "runs" / "smoke" / "checkpoints" / "last.ckpt"  # a file path: "last" is not parsed for hparams
    cli = run(["fit", *smoke_args(gsm8k_train, "--ckpt_path", str(last), "--model.init_args.finite_check_interval", "7",
                                  steps=3)])
    assert cli.model.hparams.finite_check_interval == 7 and cli.trainer.global_step == 3
