"""The MoD throughput and isoFLOP, Quiet-STaR thought-attention, thought-decoding and profile, and eval-speed
benchmarks run on CPU in a tiny shape and print their results (benchmarks, not timed tests: nothing here asserts
a speed); the CPU heap setting they share really stops page faults on reallocation."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest
import torch

from modeldefs import ModelConfig, Transformer
from modeldefs.pretrained import export_hf
from tests.conftest import REPO, requires_smollm2, shared_file, shared_subset

ISOFLOP_DATA = ("gsm8k/train.jsonl", "commonsense_qa/train_rand_split.jsonl")  # what mod_isoflop.py reads


def run_benchmark(name: str, *args: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / name), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_mod_throughput_sweeps_every_variant_in_each_round(tmp_path):
    out = run_benchmark("mod_throughput.py", "--shape", "micro", "--seq", "32", "--steps", "1", "--rounds", "2",
                        "--capacities", "0.5", "--json", str(tmp_path / "mod.json"))
    assert "| dense |" in out and "| MoD 0.5 |" in out
    record = json.loads((tmp_path / "mod.json").read_text())
    assert [len(r["tokens_per_s_rounds"]) for r in record["results"]] == [2, 2]


def test_thought_attention_paths_agree_and_are_timed(tmp_path):
    out = run_benchmark("thought_attention.py", "--shape", "micro", "--seq", "24", "--n-ahead", "5",
                        "--n-ahead-talk", "2", "--steps", "1", "--json", str(tmp_path / "attn.json"))
    record = json.loads((tmp_path / "attn.json").read_text())
    assert record["compact_loss"] == record["dense_loss"]  # the script also refuses to time otherwise
    assert set(record["seconds_per_step"]) == {"plain", "compact", "dense_mask"} and "the dense mask's time per step" in out


def test_mod_throughput_interleaved_times_every_variant_at_each_step(tmp_path):
    out = run_benchmark("mod_throughput.py", "--shape", "micro", "--seq", "32", "--steps", "3", "--interleave",
                        "--capacities", "0.5", "0.25", "--json", str(tmp_path / "mod.json"))
    assert "step 3/3: dense" in out and "| MoD 0.25 |" in out
    record = json.loads((tmp_path / "mod.json").read_text())
    assert record["timing"] == "interleaved"
    for r in record["results"]:
        assert len(r["step_seconds"]) == 3
        assert abs(r["tokens_per_s"] - 3 * 4 * 32 / sum(r["step_seconds"])) < 1e-6 * r["tokens_per_s"]
    dense, *routed = record["results"]  # peak memory on the CPU too: routing fewer tokens holds fewer activations
    assert 0 < routed[-1]["peak_mem_gib"] < dense["peak_mem_gib"]


def test_mod_throughput_refuses_rounds_with_interleave():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "mod_throughput.py"), "--interleave",
                           "--rounds", "3"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2 and "--rounds sweeps one variant at a time" in proc.stderr


@requires_smollm2
def test_eval_speed_runs_both_backends_in_alternating_rounds_with_equal_accuracy(tmp_path, smollm2_tokenizer):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is an optional extra: pip install -e '.[lmeval]'")
    shared_file("commonsense_qa/dev_rand_split.jsonl")
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("micro", vocab_size=len(smollm2_tokenizer)))
    export_hf(model, tmp_path / "tiny", tokenizer=smollm2_tokenizer)
    out = run_benchmark("eval_speed.py", "--model", str(tmp_path / "tiny"), "--tasks", "commonsense_qa_local",
                        "--limit", "commonsense_qa_local=3", "--rounds", "2", "--json", str(tmp_path / "speed.json"))
    assert "| commonsense_qa_local | quietdepth | 3 |" in out and "fastest of 2 round(s)" in out
    task = json.loads((tmp_path / "speed.json").read_text())["tasks"]["commonsense_qa_local"]
    sides = [task["lm-eval hf"], task["quietdepth"]]
    assert sides[0]["metrics"] == sides[1]["metrics"]  # same model, same task: the same answers
    for side in sides:
        assert len(side["round_request_seconds"]) == 2 and side["request_seconds"] == min(side["round_request_seconds"])



@requires_smollm2
def test_eval_speed_runs_both_backends_with_the_shot_count_asked_for(tmp_path, smollm2_tokenizer):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is an optional extra: pip install -e '.[lmeval]'")
    shared_file("gsm8k/test.jsonl")
    torch.manual_seed(0)  # a context of 512: a 0-shot prompt + 256 new tokens
    model = Transformer(ModelConfig.from_name("micro", vocab_size=len(smollm2_tokenizer), block_size=512))
    export_hf(model, tmp_path / "tiny", tokenizer=smollm2_tokenizer)
    run_benchmark("eval_speed.py", "--model", str(tmp_path / "tiny"), "--tasks", "gsm8k_local", "--num-fewshot", "0",
                  "--limit", "gsm8k_local=2", "--rounds", "1", "--json", str(tmp_path / "speed.json"))
    record = json.loads((tmp_path / "speed.json").read_text())
    task = record["tasks"]["gsm8k_local"]
    assert record["num_fewshot"] == 0 and task["lm-eval hf"]["n_shot"] == task["quietdepth"]["n_shot"] == 0
    assert task["lm-eval hf"]["metrics"] == task["quietdepth"]["metrics"]


def test_decode_speed_decodes_the_same_completions_with_both_steps(tmp_path, smollm2_tokenizer, monkeypatch, capsys):
    """In process, to see what each round asks of decoding: the 'fixed' variant is the fixed-shape step (on the
    CPU only fixed_step=True runs it: None would time the sliced step twice), the rounds alternate their order,
    and the record keeps each variant's fastest and first rounds."""
    from evals import decoding

    data = shared_subset(tmp_path / "data", ("gsm8k/train.jsonl", "gsm8k/test.jsonl"), 20)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("micro", vocab_size=len(smollm2_tokenizer), block_size=1024))
    export_hf(model, tmp_path / "tiny", tokenizer=smollm2_tokenizer)
    asked: list[bool | None] = []
    generate_tokens = decoding.generate_tokens
    monkeypatch.setattr(decoding, "generate_tokens",
                        lambda *a, **kw: asked.append(kw["fixed_step"]) or generate_tokens(*a, **kw))
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    monkeypatch.setattr(sys, "argv", ["decode_speed.py", "--model", str(tmp_path / "tiny"), "--gsm8k-dir",
                                      str(data / "gsm8k"), "--n", "6", "--shots", "2", "--max-new-tokens", "8",
                                      "--batch-size", "4", "--json", str(tmp_path / "decode.json")])
    from decode_speed import main

    main()
    out = capsys.readouterr().out
    record = json.loads((tmp_path / "decode.json").read_text())
    assert record["identical_completions"] == record["n"] == 6 and "| fixed step, eager |" in out
    assert "| step | seconds | first round |" in out  # the fixed step's first round is not a cold one
    assert asked == [False, True, True, False]  # sliced, fixed; then fixed, sliced
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("round ")] == [
        "round 0 sliced", "round 0 fixed", "round 1 fixed", "round 1 sliced"]
    for v in record["variants"].values():
        assert len(v["round_seconds"]) == 2 and v["seconds"] == min(v["round_seconds"])
        assert v["cold_seconds"] == v["round_seconds"][0]
    fixed, sliced = record["variants"]["fixed"], record["variants"]["sliced"]
    assert record["speedup"] == pytest.approx(sliced["seconds"] / fixed["seconds"])
    assert fixed["new_tokens"] == sliced["new_tokens"] > 0


def run_decode_speed(tmp_path, *args: str) -> subprocess.CompletedProcess:
    data = shared_subset(tmp_path / "data", ("gsm8k/train.jsonl", "gsm8k/test.jsonl"), 20)
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "decode_speed.py"), "--gsm8k-dir",
                           str(data / "gsm8k"), *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


def test_decode_speed_refuses_an_unwritable_json_path_before_loading_the_model(tmp_path):
    """It was written after every round had run (minutes on a GPU), then failed."""
    json_path = tmp_path / "no" / "such" / "decode.json"
    proc = run_decode_speed(tmp_path, "--model", str(tmp_path / "none"), "--json", str(json_path))
    assert proc.returncode == 1 and f"--json {json_path}: cannot write it" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("shots, message", [("-1", "--shots -1: give 0 or more"),
                                            ("30", "30-shot GSM8K needs at least 30 training problems")])
def test_decode_speed_refuses_a_shot_count_it_cannot_draw_before_loading_the_model(tmp_path, shots, message):
    proc = run_decode_speed(tmp_path, "--model", str(tmp_path / "none"), "--shots", shots)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]


@requires_smollm2
def test_decode_speed_refuses_a_mixture_of_depths_model_it_would_time_sliced_twice(tmp_path):
    """A routed model decodes with the sliced step whatever fixed_step asks: both rows would be the sliced step,
    one of them labelled the fixed step."""
    torch.manual_seed(0)
    lm = Transformer(ModelConfig.from_name("tiny", n_layer=4, block_size=512, mod_capacity=0.5))
    checkpoint = tmp_path / "mod.ckpt"
    torch.save({"model_config": lm.config.to_dict(),
                "state_dict": {f"model.{k}": v for k, v in lm.state_dict().items()}}, checkpoint)
    proc = run_decode_speed(tmp_path, "--model", str(checkpoint), "--n", "2", "--shots", "1", "--max-new-tokens", "2")
    assert proc.returncode == 2 and "Mixture-of-Depths" in proc.stderr, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_eval_speed_flags_rounds_that_disagree_instead_of_dropping_the_run():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from eval_speed import fastest

    runs = [{"request_seconds": 2.0, "metrics": {"acc/none": (0.5, 0.1)}},
            {"request_seconds": 1.5, "metrics": {"acc/none": (0.4, 0.1)}}]
    result = fastest("gsm8k_local", "lm-eval hf", runs)
    assert result["request_seconds"] == 1.5 and result["round_request_seconds"] == [2.0, 1.5]
    assert result["rounds_agree"] is False and result["round_metrics"] == [r["metrics"] for r in runs]
    assert fastest("gsm8k_local", "quietdepth", runs[:1])["rounds_agree"] is True


@requires_smollm2
def test_eval_speed_keeps_a_finished_task_when_a_later_task_fails(tmp_path, smollm2_tokenizer):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is an optional extra: pip install -e '.[lmeval]'")
    data = tmp_path / "data"  # CommonsenseQA present, GSM8K missing: the second task fails after the first ran
    (data / "commonsense_qa").mkdir(parents=True)
    for name in ("train_rand_split.jsonl", "dev_rand_split.jsonl"):
        (data / "commonsense_qa" / name).symlink_to(shared_file(f"commonsense_qa/{name}"))
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("micro", vocab_size=len(smollm2_tokenizer)))
    export_hf(model, tmp_path / "tiny", tokenizer=smollm2_tokenizer)
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "eval_speed.py"), "--model", str(tmp_path / "tiny"),
                           "--tasks", "commonsense_qa_local,gsm8k_local", "--limit", "commonsense_qa_local=2",
                           "--rounds", "1", "--json", str(tmp_path / "speed.json")], cwd=REPO, capture_output=True,
                          text=True, timeout=300,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "QUIETDEPTH_SHARED_DATA": str(data)})
    assert proc.returncode != 0 and "gsm8k" in proc.stderr
    assert "| commonsense_qa_local | quietdepth | 2 |" in proc.stdout
    record = json.loads((tmp_path / "speed.json").read_text())
    assert list(record["tasks"]) == ["commonsense_qa_local"] and record["complete"] is False and "error" in record


def test_eval_speed_refuses_an_unknown_task_before_loading_models(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "eval_speed.py"), "--model", str(tmp_path / "none"),
                           "--tasks", "commonsense_qa_local,gsm8k"], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2 and "--tasks gsm8k: no such task" in proc.stderr and "gsm8k_local" in proc.stderr



def test_eval_speed_refuses_an_unwritable_json_path_before_loading_models(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "eval_speed.py"), "--model", str(tmp_path / "none"),
                           "--json", str(tmp_path / "no" / "such" / "speed.json")], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 1 and f"--json {tmp_path / 'no' / 'such' / 'speed.json'}: cannot write it" in proc.stderr

def test_eval_speed_refuses_zero_rounds_before_loading_models(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "eval_speed.py"), "--model", str(tmp_path / "none"),
                           "--rounds", "0"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2 and "--rounds: 0 is not a positive integer" in proc.stderr


FAULTS_ON_REALLOCATION = """
import resource, sys
import torch
sys.path.insert(0, "benchmarks")
from report import keep_freed_memory

def faults():  # minor page faults of allocating and freeing a 64 MB tensor five times
    torch.ones(16 * 2**20)
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.ones(16 * 2**20)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start

before = faults()
applied = keep_freed_memory()
print(applied, before, min(faults() for _ in range(4)))  # the heap settles within a few reallocations
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keep_freed_memory tunes glibc's malloc")
def test_keep_freed_memory_stops_page_faults_on_reallocation():
    proc = subprocess.run([sys.executable, "-c", FAULTS_ON_REALLOCATION], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    applied, before, after = proc.stdout.split()
    assert applied == "True"
    assert int(before) > 5 * 10_000  # each 64 MB allocation is mapped afresh: ~16k faults
    assert int(after) < 1_000


@pytest.mark.parametrize("fits_up_to_gib,limit,expected", [(70, 256, 20), (70, 10, 10), (70, 16, 16), (12, 256, 0),
                                                           (14, 256, 1), (2000, 256, 256), (40, 256, 10)])
def test_largest_batch_search_finds_the_boundary(monkeypatch, fits_up_to_gib, limit, expected):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from train_throughput import largest_batch

    probes = []

    def fits(batch: int) -> float | None:  # 10 GiB of state, 3 GiB per sample
        probes.append(batch)
        gib = 10.0 + 3 * batch
        return gib if gib <= fits_up_to_gib else None

    batch, gib = largest_batch(fits, limit=limit)
    assert batch == expected and gib == (10.0 + 3 * expected if expected else None)
    assert max(probes) <= limit and len(probes) == len(set(probes))  # no batch tried twice


def test_quietstar_curves_joins_the_parts_of_a_resumed_run_and_refuses_other_metrics(tmp_path):
    header = "step,train/base_nll,train/mixed_nll,train/nll_gain,train/mixing_weight_mean,val/base_nll,val/mixed_nll\n"
    first, second = tmp_path / "version_0.csv", tmp_path / "version_1.csv"
    first.write_text(header + "".join(f"{s},3.0,2.5,0.5,0.1,,\n" for s in range(6)) + "5,,,,,2.9,2.8\n")
    second.write_text(header + "".join(f"{s},2.0,1.0,1.0,0.2,,\n" for s in range(4, 10)))  # resumed from step 4
    table = run_benchmark("quietstar_curves.py", str(first), str(second), str(tmp_path / "curves.png"), "--every", "5")
    assert "| 4 | 2.8000 | 2.2000 | +0.6000 | 0.1200 |" in table  # steps 0-3 from the first part, step 4 from the second
    assert "| 9 | 2.0000 | 1.0000 | +1.0000 | 0.2000 |" in table and "| 5 | 2.9000 | 2.8000 |" in table
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "mod.csv").write_text("step,train/loss\n0,3.0\n")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "quietstar_curves.py"), str(tmp_path / "mod.csv"),
                           str(tmp_path / "x.png")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "not the metrics of a Quiet-STaR run" in proc.stderr


@pytest.mark.parametrize("variant,dtype", [("qd", torch.float32), ("qd-bf16res", torch.bfloat16),
                                           ("mod-bf16res", torch.bfloat16)])
def test_bf16res_variant_runs_the_residual_stream_between_blocks_in_bf16(monkeypatch, variant, dtype):
    """Under bf16 autocast the blocks take an fp32 stream (fp32 embedding rows), or bf16 with `-bf16res`."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from train_throughput import SHAPES, Variant, build

    model, step, _ = build(Variant.parse(variant), ModelConfig(**SHAPES["micro"]), 16, torch.device("cpu"),
                           torch.bfloat16, loss_chunk=8)
    seen = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    x = torch.randint(0, 256, (2, 16))
    step(x, x)
    assert seen == [dtype] * len(model.blocks)
    with pytest.raises(ValueError, match="-bf16res is quietdepth's"):
        Variant.parse("hf-bf16res")


@pytest.mark.parametrize("name,message", [("qd-fusedadam", "unknown modifier '-fusedadam'"),
                                          ("qd+compiled", "unknown modifier '\\+compiled'"),
                                          ("mod-bf16", "unknown modifier '-bf16'"),
                                          ("qd-acselective-acblock", "one of -acselective, -acblock")])
def test_variant_with_a_misspelled_or_conflicting_modifier_is_refused(monkeypatch, name, message):
    """A modifier the script does not know would otherwise time another variant under the name asked for."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from train_throughput import Variant

    with pytest.raises(ValueError, match=message):
        Variant.parse(name)
    assert Variant.parse("mod-bf16res-fusedadamw+compile") == Variant(
        "mod-bf16res-fusedadamw+compile", "mod", compile=True, fused_adamw=False, bf16_residual=True)


def test_thought_decode_and_quietstar_profile_run_their_smoke_shapes(tmp_path):
    out = run_benchmark("thought_decode.py", "--source", "micro", "--n-ahead", "5", "--new-tokens", "4",
                        "--repeats", "1", "--json", str(tmp_path / "decode.json"))
    record = json.loads((tmp_path / "decode.json").read_text())
    assert record["new_tokens"] == 4 and record["target_ratio"] == 6 and "with thoughts (cached)" in out
    out = run_benchmark("quietstar_profile.py", "--shape", "micro", "--batch", "1", "--seq", "16", "--n-ahead", "4",
                        "--n-ahead-talk", "2", "--n-passes", "1", "--rows", "3")
    assert "Self CPU time total" in out


def test_mod_isoflop_trains_its_three_models_on_one_budget(tmp_path):
    # 400 documents of each: its validation passes (5 over every held-out byte) took 21 of its 23 s on the full files
    data = shared_subset(tmp_path / "data", ISOFLOP_DATA, lines=400)
    run_benchmark("mod_isoflop.py", "--n-embd", "32", "--n-layer", "2", "--n-head", "2", "--seq", "32", "--batch", "2",
                  "--dense-steps", "2", "--json", str(tmp_path / "iso.json"), env={"QUIETDEPTH_SHARED_DATA": str(data)})
    record = json.loads((tmp_path / "iso.json").read_text())
    assert [r["model"] for r in record["results"]] == ["dense", "MoD 0.125, same shape", "MoD 0.125, 3 layers"]
    assert all(0 < r["train_flops"] <= record["budget_flops"] for r in record["results"])


def test_eval_speed_refuses_a_limit_for_a_task_it_does_not_run(tmp_path):
    """`--limit gsm8k=32` (not gsm8k_local) would otherwise evaluate all 1,319 problems on both backends;
    it is refused before any model loads (this one does not exist)."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "eval_speed.py"), "--model", str(tmp_path / "none"),
                           "--tasks", "gsm8k_local", "--limit", "gsm8k=32"], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2 and "--limit names gsm8k, which --tasks does not run" in proc.stderr
