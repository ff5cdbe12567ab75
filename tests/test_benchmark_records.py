"""No finished measurement is lost: a benchmark that fails, is stopped (Ctrl-C, SIGTERM from `timeout`) or
runs out of memory part way still prints the rows it finished and has them in its --json file, marked
incomplete with the error; checks and bad arguments that would void a run stop it before the timing."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from tests.conftest import REPO, shared_file


@pytest.fixture
def benchmarks(monkeypatch):
    """Import benchmark scripts as modules (they import `report` from their own folder)."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))


def run_main(monkeypatch, module, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *args])
    module.main()


def test_mod_isoflop_keeps_the_models_it_trained_when_a_later_one_fails(benchmarks, monkeypatch, capsys, tmp_path):
    import mod_isoflop

    monkeypatch.setattr(mod_isoflop, "SHARED", shared_file("gsm8k/train.jsonl").parents[1])
    shared_file("commonsense_qa/train_rand_split.jsonl")
    train = mod_isoflop.train

    def deep_model_out_of_memory(name, config, *args):
        if config.n_layer > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return train(name, config, *args)

    monkeypatch.setattr(mod_isoflop, "train", deep_model_out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        run_main(monkeypatch, mod_isoflop, "--n-embd", "32", "--n-layer", "2", "--n-head", "2", "--seq", "32",
                 "--batch", "2", "--dense-steps", "2", "--json", str(tmp_path / "iso.json"))
    record = json.loads((tmp_path / "iso.json").read_text())
    assert [r["model"] for r in record["results"]] == ["dense", "MoD 0.125, same shape"]
    assert record["complete"] is False and record["error"] == "OutOfMemoryError: CUDA out of memory"
    out = capsys.readouterr().out
    assert "| dense |" in out and "| MoD 0.125, same shape |" in out
    assert json.loads(out.strip().splitlines()[-1]) == record