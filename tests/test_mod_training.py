"""Training Mixture-of-Depths models through the CLI, and MoD-ifying the pretrained SmolLM2."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml

from modeldefs import ModelConfig, Transformer
from modeldefs.pretrained import load_pretrained
from tests.conftest import REPO, requires_smollm2
from training.cli import main
from training.errors import ConfigError
from training.lm import CausalLM
from training.routing import routing_losses
from training.quietstar_lm import QuietStarLM

pytestmark = requires_smollm2


def write_config(tmp: Path, name: str, every: int = 1, checkpoint_every: int = 2, **trainer) -> Path:
    """`name` logging every `every` steps, with routing statistics as often, heatmaps every 2 steps and
    checkpoints every `checkpoint_every` steps (a run still writes last.ckpt at its final step)."""
    config = yaml.safe_load((REPO / "configs" / name).read_text())
    config["trainer"].update(log_every_n_steps=every, enable_progress_bar=False, limit_val_batches=2, **trainer)
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("RoutingMonitor"):
            callback["init_args"].update(stats_every_n_steps=every, heatmap_every_n_steps=2)
        if callback["class_path"].endswith("StepCheckpoint"):
            callback["init_args"]["every_n_train_steps"] = checkpoint_every
    path = tmp / name
    path.write_text(yaml.safe_dump(config))
    return path


def metrics(run: Path) -> list[dict[str, str]]:
    rows = []
    for path in sorted(run.glob("csv/version_*/metrics.csv")):
        rows += list(csv.DictReader(path.open()))
    return rows


def test_mod_smoke_fit_logs_routing_and_draws_heatmaps(tmp_path, monkeypatch, gsm8k_train):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, "mod-smoke.yaml", every=2, max_steps=4, val_check_interval=4,
                          accumulate_grad_batches=2)
    main(["fit", "--config", str(config), "--data.init_args.path", str(gsm8k_train),
          "--data.init_args.max_documents", "200"])
    run = tmp_path / "runs" / "mod-smoke"
    rows = metrics(run)
    for key in ("mod/layer01/predictor_acc", "mod/layer03/causal_fraction", "mod/layer01/scale_std", "train/aux_loss",
                "val/loss_topk", "val/causal_fraction"):
        assert any(r.get(key) for r in rows), key
    # on Lightning's logging steps (once per optimizer step, though 2 micro-batches make each), on the rows of
    # train/loss: the values are read on steps that read the loss anyway, and the steps between wait for nothing
    assert [r["step"] for r in rows if r.get("train/loss")] == ["1", "3"]
    assert [r["step"] for r in rows if r.get("mod/layer01/predictor_acc")] == ["1", "3"]
    # after the first step, then every 2nd
    assert sorted(p.name for p in run.glob("csv/version_*/routing/*.png")) == [
        *(f"router_logits_step_{s:06d}.png" for s in (0, 1, 3)), *(f"step_{s:06d}.png" for s in (0, 1, 3))]
    (offline,) = (run / "wandb").glob("offline-run-*")
    assert list(offline.rglob("media/images/mod/routing_heatmap*.png"))
    assert list(offline.rglob("media/images/mod/router_logits*.png"))
    # `test` reports what validation does: the loss under the causal rule, the compute it spends, the top-k loss
    main(["test", "--config", str(config), "--data.init_args.path", str(gsm8k_train),
          "--data.init_args.max_documents", "200", "--trainer.limit_test_batches", "2",
          "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    for key in ("test/loss", "test/loss_topk", "test/causal_fraction"):
        assert any(r.get(key) for r in metrics(run)), key



def test_a_resumed_run_with_gradient_accumulation_watches_each_step_once(tmp_path, monkeypatch, gsm8k_train):
    """The resumed part's first micro-batch sees the checkpoint's global_step before its own step completes: the
    monitor must not take it for the end of the step the first part already logged and drew."""
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, "mod-smoke.yaml", every=2, max_steps=2, accumulate_grad_batches=2)
    args = ["fit", "--config", str(config), "--data.init_args.path", str(gsm8k_train),
            "--data.init_args.max_documents", "200", "--trainer.limit_val_batches", "0"]
    main(args)
    main([*args, "--trainer.max_steps", "4", "--ckpt_path", "last"])
    run = tmp_path / "runs" / "mod-smoke"
    assert [r["step"] for r in metrics(run) if r.get("mod/layer01/predictor_acc")] == ["1", "3"]
    assert sorted(p.name for p in run.glob("csv/version_1/routing/step_*.png")) == ["step_000003.png"]

@pytest.mark.slow
def test_mod_ified_smollm2_keeps_the_pretrained_weights_and_adds_routers(smollm2_dir):
    module = CausalLM(model=None, init_from=str(smollm2_dir), model_overrides={"mod_capacity": 0.125})
    module.configure_model()
    dense = load_pretrained(str(smollm2_dir)).state_dict()
    routed = module.model.state_dict()
    assert list(module.model.routed_blocks) == list(range(1, 29, 2))
    assert all(torch.equal(routed[k], v) for k, v in dense.items())
    assert {k for k in routed if k not in dense} == {
        f"blocks.{i}.{name}" for i in range(1, 29, 2)
        for name in ("router.weight", "router.bias", "predictor.0.weight", "predictor.0.bias",
                     "predictor.2.weight", "predictor.2.bias")}


def test_overrides_that_reshape_pretrained_weights_are_refused(smollm2_dir):
    module = CausalLM(model=None, init_from=str(smollm2_dir), model_overrides={"n_embd": 128})
    with pytest.raises(ConfigError, match="change the shape of the pretrained weights"):
        module.configure_model()


@pytest.mark.parametrize("overrides, routed", [({"mod_capacity": None}, []), ({"mod_route_every": 3}, [2]),
                                                ({"mod_predictor": False}, [1, 3])])
def test_mod_overrides_of_a_mod_model_keep_its_weights_and_leave_out_the_routers_it_no_longer_has(overrides, routed):
    source = Transformer(ModelConfig.from_name("micro", n_layer=6, mod_capacity=0.25))
    model = CausalLM._with_overrides(source, overrides)
    assert list(model.routed_blocks) == routed
    kept = model.state_dict()
    assert all(torch.equal(kept[k], v) for k, v in source.state_dict().items() if k in kept)
    assert {k for k in source.state_dict() if k not in kept} <= {k for k in source.state_dict()
                                                                 if ".router." in k or ".predictor." in k}


def test_an_override_value_out_of_range_is_refused_as_that_setting(smollm2_dir):
    """The pretrained config is known only once init_from loads, so its overrides' values are checked then: as a
    refusal of the setting (`quietdepth` prints one line), not as a traceback from ModelConfig."""
    module = CausalLM(model=None, init_from=str(smollm2_dir), model_overrides={"mod_capacity": 2.0})
    with pytest.raises(ConfigError, match=r"model.init_args.model_overrides: mod_capacity=2.0 must be in \(0, 1\]"):
        module.configure_model()


@pytest.mark.slow
def test_mod_ified_smollm2_trains_saves_and_resumes(tmp_path, monkeypatch, gsm8k_train, smollm2_dir):
    monkeypatch.chdir(tmp_path)
    # last.ckpt only (1.6 GB with AdamW's moments): a periodic save at step 2 would write the same state again
    config = write_config(tmp_path, "mod-smollm2-135m.yaml", checkpoint_every=1000, max_steps=2, val_check_interval=2)
    config_args = ["--config", str(config), "--model.init_args.init_from", str(smollm2_dir),
                   "--data.init_args.path", str(gsm8k_train),
                   "--data.init_args.max_documents", "60", "--data.init_args.seq_len", "64",
                   "--data.init_args.batch_size", "2", "--model.init_args.warmup_steps", "1"]
    main(["fit", *config_args])
    ckpt = tmp_path / "runs" / "mod-smollm2-135m" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True, mmap=True)  # mmap: reads only what is looked at
    assert state["global_step"] == 2 and state["model_config"]["mod_capacity"] == 0.125
    router = state["state_dict"]["model.blocks.1.router.weight"].clone()
    del state  # the resumed run rewrites this file
    main(["fit", *config_args, "--trainer.max_steps", "4", "--ckpt_path", "last"])
    resumed = torch.load(ckpt, weights_only=True, mmap=True)
    assert resumed["global_step"] == 4
    assert not torch.equal(resumed["state_dict"]["model.blocks.1.router.weight"], router)
    model = load_pretrained(str(ckpt))
    assert list(model.routed_blocks) == list(range(1, 29, 2))
    losses = [float(r["train/loss"]) for r in metrics(tmp_path / "runs" / "mod-smollm2-135m") if r.get("train/loss")]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))


def test_routing_monitor_refuses_a_cadence_below_1():
    from training.routing_monitor import RoutingMonitor

    with pytest.raises(ConfigError, match=r"must be positive \(got 0, 100, 64\)"):
        RoutingMonitor(stats_every_n_steps=0)


def test_every_parameter_adamw_holds_gets_a_gradient_when_routers_have_neither_scale_nor_bce():
    """mod_scale_by_router false with mod_aux_weight 0 leaves a router no gradient: it is frozen and kept out of
    AdamW. In AdamW without a gradient it had no optimizer state, and resuming a sharded FSDP checkpoint stopped
    with 'Missing key in checkpoint state_dict: optimizer_0.state.model.blocks.1.router.weight.step'."""
    overrides = {"mod_capacity": 0.5, "mod_exempt_last": False, "mod_scale_by_router": False, "mod_aux_weight": 0.0}
    module = CausalLM(model="micro", model_overrides=overrides)
    module.configure_model()
    x = torch.randint(0, 256, (2, 16))
    (module.loss({"input_ids": x, "labels": x}) + routing_losses(module.model)).backward()
    decay, no_decay = module._param_groups()
    names = {id(p): name for name, p in module.model.named_parameters()}
    assert [names[id(p)] for p in decay + no_decay if p.grad is None] == []
    routed = CausalLM(model="micro", model_overrides={**overrides, "mod_aux_weight": 0.01})  # the BCE trains it
    routed.configure_model()
    assert routed.model.blocks[1].router.weight.requires_grad


@pytest.mark.parametrize("module", [CausalLM, QuietStarLM])
def test_init_from_alone_in_python_names_the_default_model_it_conflicts_with(module):
    """`model` defaults to 'tiny', so `CausalLM(init_from=...)` sets both: the error says so and gives the fix, not
    "not both" to a caller who set one."""
    with pytest.raises(ConfigError, match=r"model='tiny' \(random init; the default is 'tiny'\) and init_from='x.gguf': "
                                          r"set one of them, .*\(in Python: model=None\)"):
        module(init_from="x.gguf")
