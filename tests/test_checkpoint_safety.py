"""Loading a checkpoint never runs code stored in it: every pickled part is read with an allow-list."""

from __future__ import annotations

import os
import pickle
import threading
import warnings
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from modeldefs import ModelConfig, Transformer
from modeldefs.pretrained import load_pretrained
from tests.conftest import REPO, requires_smollm2
from training.cli import run


class _RunsCode:
    """Unpickling this calls os.mkdir(path): what a hostile checkpoint would do with a shell command."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return os.mkdir, (str(self.path),)


def sharded_checkpoint(folder: Path, **replaced: object) -> Transformer:
    """A distributed checkpoint folder as ModelParallelStrategy writes it: meta.pt beside DCP's .metadata
    and shards; `replaced` values stored in place of the model's (by state-dict name)."""
    model = Transformer(ModelConfig.from_name("micro"))
    state = {"model." + k: replaced.get(k, v) for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.save({"state_dict": state}, checkpoint_id=folder, no_dist=True)
    torch.save({"model_config": model.config.to_dict(), "global_step": 2}, folder / "meta.pt")
    return model


def test_a_checkpoint_loads_bit_for_bit_without_a_random_init(tiny_checkpoint):
    """The model is built without the random init its weights would overwrite, so loading draws nothing from
    torch's generator; the RoPE tables, which the checkpoint does not hold, are computed."""
    saved = torch.load(tiny_checkpoint, weights_only=True)["state_dict"]
    rng = torch.get_rng_state()
    loaded = load_pretrained(str(tiny_checkpoint))
    assert torch.equal(torch.get_rng_state(), rng)
    assert {f"model.{k}": v for k, v in loaded.state_dict().items()}.keys() == saved.keys()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor.view(torch.int32), saved[f"model.{name}"].view(torch.int32)), name
    fresh = Transformer(loaded.config)
    assert torch.equal(loaded.rope_cos, fresh.rope_cos) and torch.equal(loaded.rope_sin, fresh.rope_sin)
    assert loaded.lm_head.weight is loaded.embed.weight


def test_a_runs_checkpoint_folder_given_as_the_model_names_its_newest_checkpoint(tmp_path):
    """quietdepth-export/-eval/-generate of runs/<run>/checkpoints said only 'not an HF model directory'."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name in ("epoch=0-step=2.ckpt", "last.ckpt"):
        (folder / name).touch()
    os.utime(folder / "epoch=0-step=2.ckpt", (0, 0))
    with pytest.raises(FileNotFoundError, match=rf"not an HF model directory: it holds quietdepth checkpoints, give "
                                                rf"one of them, e\.g\. the newest, {folder / 'last.ckpt'}$"):
        load_pretrained(str(folder))


def test_a_sharded_checkpoint_loads(tmp_path):
    model = sharded_checkpoint(tmp_path / "step=2.ckpt")
    loaded = load_pretrained(str(tmp_path / "step=2.ckpt"))
    for (name, ours), theirs in zip(model.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(theirs, ours, rtol=0, atol=0, msg=name)


def test_a_sharded_checkpoint_whose_metadata_would_run_code_is_refused_without_running_it(tmp_path):
    folder = tmp_path / "step=2.ckpt"
    sharded_checkpoint(folder)
    ran = tmp_path / "code-ran"
    (folder / ".metadata").write_bytes(pickle.dumps(_RunsCode(ran)))
    with pytest.raises(ValueError, match=r"\.metadata.*refused"):
        load_pretrained(str(folder))
    assert not ran.exists()


def test_a_sharded_checkpoint_whose_weight_is_a_pickled_value_that_would_run_code_is_refused_without_running_it(
        tmp_path):
    """DCP stores a non-tensor value as torch.save bytes and reads them back with weights_only=False."""
    folder, ran = tmp_path / "step=2.ckpt", tmp_path / "code-ran"
    sharded_checkpoint(folder, **{"norm.weight": _RunsCode(ran)})
    with pytest.raises(ValueError, match=r"state_dict\.model\.norm\.weight.*refused|refused.*model\.norm\.weight"):
        load_pretrained(str(folder))
    assert not ran.exists()


@requires_smollm2  # loads the smoke config's SmolLM2 tokenizer
def test_resuming_from_a_sharded_checkpoint_whose_metadata_would_run_code_is_refused_before_the_run(
        tmp_path, monkeypatch, gsm8k_train):
    """Lightning's ModelParallelStrategy reads the folder with DCP's defaults (plain pickle): the CLI checks it first."""
    folder, ran = tmp_path / "step=2.ckpt", tmp_path / "code-ran"
    sharded_checkpoint(folder)
    (folder / ".metadata").write_bytes(pickle.dumps(_RunsCode(ran)))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"--ckpt_path .*\.metadata is refused"):
        run(["validate", "--config", str(REPO / "configs" / "smoke.yaml"), "--data.init_args.path", str(gsm8k_train),
             "--data.init_args.max_documents", "20", "--ckpt_path", str(folder)])
    assert not ran.exists()
    # --weights_only false says the user trusts it: the check stands aside (here the next one, the strategy's, stops it)
    with pytest.raises(ValueError, match=r"only ModelParallelStrategy reads"):
        run(["validate", "--config", str(REPO / "configs" / "smoke.yaml"), "--data.init_args.path", str(gsm8k_train),
             "--data.init_args.max_documents", "20", "--ckpt_path", str(folder), "--weights_only", "false"])


@pytest.fixture
def served(tmp_path) -> Iterator[tuple[Path, str]]:
    """A folder served over HTTP on localhost: (folder, its URL)."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = partial(SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        yield folder, f"http://127.0.0.1:{server.server_address[1]}"
        server.shutdown()
        thread.join()


@requires_smollm2  # loads the smoke config's SmolLM2 tokenizer
def test_a_ckpt_path_url_is_read_with_weights_only(tmp_path, monkeypatch, gsm8k_train, served):
    """Lightning reads a URL with weights_only=False unless told otherwise (a local file with torch's default, True)."""
    folder, url = served
    ran = tmp_path / "code-ran"
    torch.save({"state_dict": {}, "payload": _RunsCode(ran)}, folder / "last.ckpt")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # where torch.hub keeps the download
    monkeypatch.chdir(tmp_path)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        run(["validate", "--config", str(REPO / "configs" / "smoke.yaml"), "--data.init_args.path", str(gsm8k_train),
             "--data.init_args.max_documents", "20", "--ckpt_path", f"{url}/last.ckpt"])
    assert not ran.exists()


def test_a_sharded_checkpoint_written_under_python_3_13_loads(tmp_path):
    """Lightning gives DCP the folder as a Path, which .metadata keeps (storage_meta.checkpoint_id); Python 3.13
    pickles a Path as pathlib._local.PosixPath (3.12 and 3.14: pathlib.PosixPath). pathlib._local exists only in 3.13+,
    so the 3.13 form is written here by hand."""
    folder = tmp_path / "step=2.ckpt"
    model = sharded_checkpoint(folder)
    metadata = pickle.loads((folder / ".metadata").read_bytes())
    metadata.storage_meta.checkpoint_id = folder  # as Lightning's ModelParallelStrategy passes it
    as_312 = pickle.dumps(metadata, protocol=2)  # no frames: the global's name can be replaced in place
    assert b"cpathlib\nPosixPath\n" in as_312
    (folder / ".metadata").write_bytes(as_312.replace(b"cpathlib\nPosixPath\n", b"cpathlib._local\nPosixPath\n"))
    loaded = load_pretrained(str(folder))
    for (name, ours), theirs in zip(model.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(theirs, ours, rtol=0, atol=0, msg=name)
