"""No finished measurement is lost: a benchmark that fails, is stopped (Ctrl-C, SIGTERM from `timeout`) or
runs out of memory part way still prints the rows it finished and has them in its --json file, marked
incomplete with the error; checks and bad arguments that would void a run stop it before the timing."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, shared_file, shared_subset
from tests.test_benchmarks import ISOFLOP_DATA

ENV = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}


@pytest.fixture
def benchmarks(monkeypatch):
    """Import benchmark scripts as modules (they import `report` from their own folder)."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))


def run_main(monkeypatch, module, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *args])
    module.main()


def test_mod_isoflop_keeps_the_models_it_trained_when_a_later_one_fails(benchmarks, monkeypatch, capsys, tmp_path):
    import mod_isoflop

    # 400 documents of each: validating on every held-out byte of the full files took most of the run
    data = shared_subset(tmp_path / "data", ISOFLOP_DATA, lines=400)
    monkeypatch.setattr(mod_isoflop, "SHARED", data)
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


def test_an_earlier_json_file_is_kept_when_a_run_stops_before_measuring_anything(benchmarks, monkeypatch, tmp_path):
    import mod_isoflop

    monkeypatch.setattr(mod_isoflop, "SHARED", shared_file("gsm8k/train.jsonl").parents[1])
    shared_file("commonsense_qa/train_rand_split.jsonl")

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(mod_isoflop, "train", interrupted)
    (tmp_path / "iso.json").write_text('{"results": "an earlier run"}')
    with pytest.raises(KeyboardInterrupt):
        run_main(monkeypatch, mod_isoflop, "--n-embd", "32", "--n-layer", "2", "--n-head", "2", "--seq", "32",
                 "--json", str(tmp_path / "iso.json"))
    assert (tmp_path / "iso.json").read_text() == '{"results": "an earlier run"}'
    assert [f.name for f in tmp_path.iterdir()] == ["iso.json"]


def failing_build(module, fail_variant: str, fail_at_call: int):
    """`module.build`, but `fail_variant`'s step raises out-of-memory on its `fail_at_call`-th call (0: at build)."""
    build = module.build

    def wrapped(variant, *args, **kwargs):
        if variant.name == fail_variant and fail_at_call == 0:
            raise torch.OutOfMemoryError("CUDA out of memory")
        model, step, flops = build(variant, *args, **kwargs)
        calls = 0

        def counted(x, y):
            nonlocal calls
            calls += 1
            if variant.name == fail_variant and calls == fail_at_call:
                raise torch.OutOfMemoryError("CUDA out of memory")
            step(x, y)

        return model, counted, flops

    return wrapped


def test_train_throughput_sequential_keeps_the_variants_it_finished(benchmarks, monkeypatch, capsys, tmp_path):
    import train_throughput

    monkeypatch.setattr(train_throughput, "build", failing_build(train_throughput, "mod", 0))
    with pytest.raises(torch.OutOfMemoryError):
        run_main(monkeypatch, train_throughput, "--shape", "micro", "--seq", "16", "--batch", "2", "--steps", "1",
                 "--rounds", "1", "--warmup", "0", "--default-heap", "--sequential", "--variants", "hf", "qd", "mod",
                 "--json", str(tmp_path / "t.json"))
    record = json.loads((tmp_path / "t.json").read_text())
    assert [r["variant"] for r in record["results"]] == ["hf", "qd"] and not record["complete"]
    out = capsys.readouterr().out
    assert "| hf |" in out and "| qd |" in out


def test_train_throughput_keeps_the_rounds_it_finished(benchmarks, monkeypatch, capsys, tmp_path):
    import train_throughput

    # warm-up step, round 1's step, then round 2's step fails
    monkeypatch.setattr(train_throughput, "build", failing_build(train_throughput, "qd", 3))
    with pytest.raises(torch.OutOfMemoryError):
        run_main(monkeypatch, train_throughput, "--shape", "micro", "--seq", "16", "--batch", "2", "--steps", "1",
                 "--rounds", "2", "--warmup", "1", "--default-heap", "--variants", "hf", "qd",
                 "--json", str(tmp_path / "t.json"))
    record = json.loads((tmp_path / "t.json").read_text())
    assert [r["variant"] for r in record["results"]] == ["hf", "qd"]
    assert all(r["tokens_per_s"] > 0 for r in record["results"]) and not record["complete"]
    assert "round 1/2: hf" in capsys.readouterr().out


def test_train_throughput_max_batch_keeps_the_policies_it_searched(benchmarks, monkeypatch, tmp_path):
    import train_throughput

    search = train_throughput.policy_max_batch

    def block_fails(args, config, device, dtype, ac, budget):
        if ac == "block":
            raise RuntimeError("compile failed")
        return search(args, config, device, dtype, ac, budget)

    monkeypatch.setattr(train_throughput, "policy_max_batch", block_fails)
    with pytest.raises(RuntimeError):
        run_main(monkeypatch, train_throughput, "--shape", "micro", "--seq", "16", "--max-batch", "--default-heap",
                 "--memory-budget-gib", "0.002", "--batch-limit", "2", "--json", str(tmp_path / "t.json"))
    record = json.loads((tmp_path / "t.json").read_text())
    assert [r["activation_checkpointing"] for r in record["max_batch"]] == ["none", "selective"]
    assert record["error"] == "RuntimeError: compile failed"


def test_quietstar_cost_keeps_the_rounds_it_finished(benchmarks, monkeypatch, capsys, tmp_path):
    import quietstar_cost

    make_step = quietstar_cost.make_step
    made = []

    def second_thought_round_fails(model, loss_of, dtype, device):
        step, calls, thought = make_step(model, loss_of, dtype, device), [], len(made) == 1
        made.append(model)

        def counted(x):
            calls.append(1)
            if thought and len(calls) == 2:  # the thought variant, in round 2
                raise torch.OutOfMemoryError("CUDA out of memory")
            step(x)

        return counted

    monkeypatch.setattr(quietstar_cost, "make_step", second_thought_round_fails)
    with pytest.raises(torch.OutOfMemoryError):
        run_main(monkeypatch, quietstar_cost, "--shape", "micro", "--batch", "1", "--seq", "16", "--n-ahead", "4",
                 "--n-ahead-talk", "1", "--steps", "1", "--rounds", "2", "--warmup", "0",
                 "--json", str(tmp_path / "q.json"))
    record = json.loads((tmp_path / "q.json").read_text())
    assert [r["variant"] for r in record["results"]] == ["plain x1", "thought 4 / talk 1"] and record["steps"] == 1
    assert "| thought 4 / talk 1 |" in capsys.readouterr().out


def test_thought_decode_keeps_the_plain_time_when_the_thought_run_fails(benchmarks, monkeypatch, tmp_path):
    import thought_decode

    per_token_seconds = thought_decode.per_token_seconds

    def thinking_fails(model, prompt, new_tokens, think, repeats):
        if think:
            raise KeyboardInterrupt
        return per_token_seconds(model, prompt, new_tokens, think, repeats)

    monkeypatch.setattr(thought_decode, "per_token_seconds", thinking_fails)
    with pytest.raises(KeyboardInterrupt):
        run_main(monkeypatch, thought_decode, "--source", "micro", "--n-ahead", "4", "--new-tokens", "3",
                 "--repeats", "1", "--json", str(tmp_path / "d.json"))
    record = json.loads((tmp_path / "d.json").read_text())
    assert record["plain_ms_per_token"] > 0 and record["error"] == "KeyboardInterrupt"


def test_thought_attention_checks_the_paths_agree_before_timing_them(benchmarks, monkeypatch):
    import thought_attention

    attend = thought_attention.DenseMaskCache.attend
    monkeypatch.setattr(thought_attention.DenseMaskCache, "attend", lambda self, *args: 2 * attend(self, *args))
    timed = []
    monkeypatch.setattr(thought_attention, "time_steps", lambda step, steps: timed.append(step) or 1.0)
    with pytest.raises(SystemExit, match="the two attention paths disagree"):
        run_main(monkeypatch, thought_attention, "--shape", "micro", "--seq", "16", "--n-ahead", "4",
                 "--n-ahead-talk", "2", "--steps", "1")
    assert timed == []


def test_a_benchmark_stopped_by_sigterm_prints_and_keeps_the_steps_it_timed(tmp_path):
    """What `timeout` does to a run past its limit: SIGTERM, which by default kills Python at once."""
    proc = subprocess.Popen([sys.executable, str(REPO / "benchmarks" / "mod_throughput.py"), "--shape", "micro",
                             "--seq", "16", "--interleave", "--steps", "100000", "--capacities", "0.5",
                             "--json", str(tmp_path / "mod.json")], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("step 2/"):
                proc.send_signal(signal.SIGTERM)
                break
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    record = json.loads((tmp_path / "mod.json").read_text())
    assert record["complete"] is False and record["error"] == "stopped by SIGTERM"
    assert [r["variant"] for r in record["results"]] == ["dense", "MoD 0.5"]
    assert all(len(r["step_seconds"]) >= 2 for r in record["results"])
    assert "| MoD 0.5 |" in out and "stopped before the end (stopped by SIGTERM)" in err


def test_an_unwritable_json_path_is_refused_before_any_timing(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "mod_throughput.py"), "--shape", "micro",
                           "--seq", "16", "--steps", "1", "--rounds", "1", "--capacities", "0.5",
                           "--json", str(tmp_path / "missing" / "mod.json")],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and f"--json {tmp_path / 'missing' / 'mod.json'}: cannot write it" in proc.stderr
    assert "round 1" not in proc.stdout


@pytest.mark.parametrize("script,args", [("train_throughput.py", ["--steps", "0"]),
                                         ("mod_throughput.py", ["--rounds", "0"]),
                                         ("quietstar_cost.py", ["--steps", "0"]),
                                         ("thought_decode.py", ["--repeats", "0"])])
def test_a_zero_count_is_refused_before_any_work(script, args):
    """--steps 0 would warm up every variant, then divide by zero time; --repeats 0 take the median of nothing."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"argument {args[0]}: 0 is not a positive integer" in proc.stderr


def test_peak_memory_on_a_cpu_is_the_most_held_at_once_above_the_start(benchmarks):
    from report import PeakMemory

    before = torch.ones(2**24)  # 64 MiB allocated before the block: not counted
    with PeakMemory(torch.device("cpu")) as memory:
        first = torch.ones(2**25)  # 128 MiB
        del first
        second = torch.ones(2**24)  # 64 MiB: the peak stays 128, not the 192 allocated in all
    assert memory.gib == pytest.approx(0.125, rel=1e-3)
    assert before.numel() and second.numel()
