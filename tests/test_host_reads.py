"""The hot loops read no values back from the device, checked on any machine.

On a GPU, every `.item()`, `int(t)`, `bool(t)` or op with a data-dependent output shape (boolean
indexing, `nonzero`) makes the host wait for the device. `tests/test_gpu.py` catches that with CUDA's
sync debug mode; here a torch-function mode records tensors turned into Python values and a dispatch
mode the ops whose output shape depends on values, so the same rule holds on the CPU in CI: a
training step that neither logs nor checks the loss, and a KV-cached decoding step, read nothing
(Mixture-of-Depths decoding reads one flag per routed layer, by design: it skips the block when no
row routes).
"""

from __future__ import annotations

import traceback
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from modeldefs import ModelConfig, Transformer
from modeldefs.generate import generate
from modeldefs.quietstar import QuietStar, ThoughtConfig
from modeldefs.thought_generate import generate_with_thoughts
from tests.conftest import REPO, requires_smollm2, smoke_config, step_reads_values
from training.cli import run

SCALAR_READS = {"__int__", "__bool__", "__float__", "__index__", "__complex__", "item", "tolist", "numpy", "equal",
                "allclose"}
aten = torch.ops.aten
SHAPE_READS = {aten.nonzero.default, aten.masked_select.default, aten.repeat_interleave.Tensor, aten._unique2.default,
               aten.unique_consecutive.default, aten.bincount.default}


def _caller() -> str:
    """The innermost repository frames (not tests, not installed packages) of the current call."""
    frames = [f"{Path(f.filename).relative_to(REPO)}:{f.lineno} {f.name}" for f in traceback.extract_stack()
              if f.filename.startswith(str(REPO)) and "/.venv/" not in f.filename and "/tests/" not in f.filename]
    return " <- ".join(reversed(frames[-3:]))


class _ScalarReads(TorchFunctionMode):
    """A tensor turned into a Python number, bool or list (`int(t)`, `bool(t)`, `.item()`, `.tolist()`)."""

    def __init__(self, reads: list[str]) -> None:
        super().__init__()
        self.reads = reads

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) in SCALAR_READS:
            self.reads.append(f"{func.__name__} at {_caller()}")
        return func(*args, **(kwargs or {}))


class _ShapeReads(TorchDispatchMode):
    """An op whose output shape depends on tensor values (`nonzero`, boolean indexing), anywhere below Python."""

    def __init__(self, reads: list[str]) -> None:
        super().__init__()
        self.reads = reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        boolean_index = func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
        if func in SHAPE_READS or boolean_index:
            self.reads.append(f"{func} at {_caller()}")
        return func(*args, **(kwargs or {}))


class HostReads:
    """Records, while active, each read of a tensor's values on the host, with the repository frames calling it."""

    def __init__(self) -> None:
        self.reads: list[str] = []
        self._modes = (_ShapeReads(self.reads), _ScalarReads(self.reads))

    def __enter__(self) -> HostReads:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)


class RecordHostReadsBetweenLoggingSteps(L.Callback):
    """Records host reads from the start to the end of every training batch that neither logs nor checks
    the loss. Listed last, so the other callbacks' batch-end hooks run inside the recording."""

    def __init__(self) -> None:
        self.reads: list[str] = []
        self.steps_checked = 0
        self._recorder: HostReads | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if step_reads_values(trainer, pl_module):
            return
        self._recorder = HostReads()
        self._recorder.__enter__()
        self.steps_checked += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._recorder is not None:
            self._recorder.__exit__(None, None, None)
            self.reads += self._recorder.reads
            self._recorder = None


@pytest.mark.parametrize("inference", [False, True])
def test_the_recorder_sees_each_kind_of_value_read(inference):
    """The check can fail: a number, a bool, a list and a boolean index are each recorded once, in
    inference mode too (where decoding runs)."""
    with torch.inference_mode(inference):
        t = torch.arange(4)
        with HostReads() as recorder:
            int(t[-1])
            bool(t.any())
            t.tolist()
            t[t > 1]
            t + 1
    assert [r.split()[0] for r in recorder.reads] == ["__int__", "__bool__", "tolist", "aten.index.Tensor"]


@requires_smollm2
@pytest.mark.parametrize("config_name", ["smoke.yaml", "mod-smoke.yaml", "quietstar-smoke.yaml"])
def test_training_steps_between_logging_steps_read_nothing_back(tmp_path, monkeypatch, gsm8k_train,
                                                                tokenizer_source, config_name):
    monkeypatch.chdir(tmp_path)
    config = smoke_config(tmp_path, gsm8k_train, tokenizer_source, max_steps=7, compile=False, name=config_name)
    settings = yaml.safe_load(Path(config).read_text())
    for callback in settings["trainer"]["callbacks"]:  # the monitors read values every 5 steps, as the loss is logged
        if callback["class_path"].endswith(("RoutingMonitor", "ThoughtMonitor")):
            callback["init_args"] = {k: 5 if k.endswith("every_n_steps") else v
                                     for k, v in callback["init_args"].items()}
    Path(config).write_text(yaml.safe_dump(settings))
    cli = run(["fit", "--config", config, "--data.init_args.max_documents", "300",
               "--model.init_args.finite_check_interval", "5",
               "--trainer.callbacks+=tests.test_host_reads.RecordHostReadsBetweenLoggingSteps"])
    (recorder,) = [c for c in cli.trainer.callbacks if isinstance(c, RecordHostReadsBetweenLoggingSteps)]
    assert recorder.steps_checked == 5  # steps 2, 3, 4, 6, 7: step 1 and step 5 log and check the loss
    assert recorder.reads == []


def test_a_quietstar_step_over_mixture_of_depths_reads_nothing_back():
    """Thoughts over routed blocks: every pass goes through the thought cache and the causal routing rule."""
    lm = Transformer(ModelConfig.from_name("micro", mod_capacity=0.5, mod_exempt_last=False))
    model = QuietStar(lm, ThoughtConfig(n_ahead=4, n_ahead_talk=2, n_passes=2), init_token_id=7)
    ids = torch.randint(0, 256, (2, 12))
    with HostReads() as recorder:
        model(ids).loss.backward()
    assert recorder.reads == []


def test_kv_cached_decoding_reads_nothing_back():
    torch.manual_seed(0)
    prompt = torch.randint(0, 256, (2, 5))
    dense = Transformer(ModelConfig.from_name("micro")).eval()
    thinking = QuietStar(Transformer(ModelConfig.from_name("micro")).eval(), ThoughtConfig(n_ahead=4),
                         init_token_id=7).eval()
    with HostReads() as recorder:
        generate(dense, prompt, 6)
        generate_with_thoughts(thinking, prompt, 3)
    assert recorder.reads == []


def test_mixture_of_depths_decoding_reads_one_flag_per_routed_layer_and_step():
    """The only read: whether any row routes through the block, so that a step no row routes skips it."""
    model = Transformer(ModelConfig.from_name("micro", mod_capacity=0.5, mod_exempt_last=False)).eval()
    new_tokens = 6
    with HostReads() as recorder:
        generate(model, torch.randint(0, 256, (2, 5)), new_tokens)
    assert len(recorder.reads) == len(model.routed_blocks) * (new_tokens - 1)  # the prompt's forward reads none
    assert all("modeldefs/mod.py" in r and "_causal" in r for r in recorder.reads), recorder.reads


def test_continuous_batching_reads_the_new_tokens_once_per_step_and_the_first_tokens_once_per_prefill(monkeypatch):
    """evals' generation: each step reads its new tokens once (for the stop strings), and each prefill
    of waiting prompts reads their first tokens once; refilling, compacting and shifting rows read nothing."""
    from evals import decoding
    from tests.test_eval_decoding import MANY, tiny_model

    model = tiny_model()
    heads = []  # the output head runs once per prefill (the first tokens) and once per step
    model.lm.lm_head.register_forward_hook(lambda *_: heads.append(1))
    prefills = []
    prefill = decoding.prefill_prompts
    monkeypatch.setattr(decoding, "prefill_prompts", lambda *args, **kw: prefills.append(1) or prefill(*args, **kw))
    with HostReads() as recorder:
        tokens = decoding.generate_tokens(model, MANY, max_new_tokens=12, batch_size=3, prefill_chunk=24)
    steps = len(heads) - len(prefills)
    assert len(tokens) == len(MANY) and steps > len(MANY) * 11 / 3 and 1 < len(prefills) < len(MANY)
    assert [r.split(" at ")[0] for r in recorder.reads] == ["tolist"] * len(heads)
    assert all("evals/decoding.py" in r for r in recorder.reads), recorder.reads


class _ScalarCopies(TorchDispatchMode):
    """`t[i] = number` on a 1-d tensor: a copy of a host 0-d tensor into a 0-d slice. On a GPU that is a blocking
    host-to-device copy (a sync), whereas `t[i].fill_(number)` passes the number to a kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is aten.copy_.default and args[1].dim() == 0 and args[1].device.type == "cpu":
            self.copies.append(_caller())
        return func(*args, **(kwargs or {}))


def test_continuous_batching_starts_rows_without_copying_host_scalars_to_the_device():
    from evals import decoding
    from tests.test_eval_decoding import MANY, tiny_model

    with _ScalarCopies() as recorder:
        decoding.generate_tokens(tiny_model(), MANY, max_new_tokens=12, batch_size=3, prefill_chunk=24)
    assert recorder.copies == []
