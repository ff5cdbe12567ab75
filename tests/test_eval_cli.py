"""`quietdepth-eval`: an end-to-end run on a tiny random checkpoint, the leaderboard, plots, bad inputs."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

from evals import leaderboard
from evals.cli import main
from evals.plots import accuracy_lines, plot_accuracy
from modeldefs import ModelConfig, Transformer
from tests.conftest import shared_file


def data_args() -> list[str]:
    return ["--gsm8k-path", str(shared_file("gsm8k/test.jsonl")), "--gsm8k-train-path", str(shared_file("gsm8k/train.jsonl")),
            "--csqa-path", str(shared_file("commonsense_qa/dev_rand_split.jsonl"))]


def run_args(checkpoint: Path, tokenizer: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(checkpoint), "--tokenizer", str(tokenizer), "--limit", "2", "--max-new-tokens", "6",
            "--output", str(out / "run"), "--leaderboard", str(out / "board"), "--no-progress", *data_args(), *extra]


def test_end_to_end_run_writes_results_samples_and_leaderboard(
        tiny_checkpoint, smollm2_tokenizer_dir, tmp_path, capsys):
    args = run_args(tiny_checkpoint, smollm2_tokenizer_dir, tmp_path, "--tasks", "gsm8k", "csqa", "csqa_cloze", "csqa_gen",
                    "--shots", "0", "1", "--decoding", "greedy", "cot", "--cot-k", "2", "--log-samples")
    main(args)
    report = json.loads((tmp_path / "run" / "results.json").read_text())
    assert report["git_commit"] and report["wall_seconds"] > 0
    (entry,) = report["models"]
    assert entry["source"] == str(tiny_checkpoint) and len(entry["weights_sha256"]) == 16
    done = {(r["task"], r["decoding"], r["n_shot"]) for r in entry["results"]}
    assert done == {("gsm8k", "greedy", 0), ("gsm8k", "greedy", 1), ("csqa", "greedy", 0), ("csqa_cloze", "greedy", 0),
                    ("csqa_gen", "greedy", 0), ("gsm8k", "cot-k2", 0), ("gsm8k", "cot-k2", 1), ("csqa_gen", "cot-k2", 0)}
    for result in entry["results"]:
        assert result["n"] == 2 and result["prompts_hash"] and result["seconds"] > 0 and result["tokens_per_s"] > 0
        assert all(0 <= m["value"] <= 1 for m in result["metrics"])
    gsm8k_filters = {m["filter"] for r in entry["results"] if r["task"] == "gsm8k" for m in r["metrics"]}
    assert gsm8k_filters == {"strict-match", "flexible-extract"}
    assert len(list((tmp_path / "run").glob("samples_*.jsonl"))) == 8
    board = tmp_path / "board"
    rows = list(csv.DictReader((board / "leaderboard.csv").open()))
    assert len(rows) == 2 * 2 + 1 + 2 + 1 + 2 * 2 + 1  # gsm8k has two filters per shot count; cloze acc + acc_norm
    markdown = (board / "leaderboard.md").read_text()
    assert "| Tasks | Version | Filter | n-shot | Metric | Value | ± Stderr | n | Max new tokens |" in markdown
    assert ("| model | weights | dtype | decoding | date | n | max new tokens | gsm8k 0-shot strict | gsm8k 0-shot "
            "flexible | gsm8k 1-shot strict") in markdown
    assert "<table>" in (board / "leaderboard.html").read_text()
    out = capsys.readouterr().out
    assert "quietdepth-eval results" in out and f"{len(rows)} new row(s) of {len(rows)}" in out


def test_a_rerun_appends_only_rows_that_changed(tiny_checkpoint, smollm2_tokenizer_dir, tmp_path, capsys):
    args = run_args(tiny_checkpoint, smollm2_tokenizer_dir, tmp_path, "--tasks", "csqa", "csqa_cloze")
    main(args)
    main([*args, "--output", str(tmp_path / "run2")])  # identical results: nothing appended
    assert "0 new row(s) of 3" in capsys.readouterr().out
    main([*args, "--limit", "3", "--output", str(tmp_path / "run3")])  # other items: new rows
    rows = list(csv.DictReader((tmp_path / "board" / "leaderboard.csv").open()))
    assert [r["n"] for r in rows] == ["2", "2", "2", "3", "3", "3"]


def test_results_json_is_strict_json_with_null_for_the_stderr_of_one_item(tiny_checkpoint, smollm2_tokenizer_dir,
                                                                         tmp_path):
    main(run_args(tiny_checkpoint, smollm2_tokenizer_dir, tmp_path, "--tasks", "csqa", "--limit", "1"))

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    report = json.loads((tmp_path / "run" / "results.json").read_text(), parse_constant=refuse)
    (result,) = report["models"][0]["results"]
    assert result["n"] == 1 and [m["stderr"] for m in result["metrics"]] == [None]
    (row,) = csv.DictReader((tmp_path / "board" / "leaderboard.csv").open())
    assert leaderboard.long_table([row])[0][10] == "N/A"

def test_plot_writes_a_png_of_accuracy_against_cot_k(tmp_path, capsys):
    base = dict(model="m", task="gsm8k", version="3.0", filter="flexible-extract", n_shot=0, metric="exact_match",
                n=10, tokens_per_s=1.0, capacity=None, thought_length=None, prompts_hash="h", commit="c", date="d")
    rows = [{**base, "decoding": d, "value": v, "stderr": 0.1} for d, v in [("greedy", 0.1), ("cot-k3", 0.2), ("cot-k5", 0.3)]]
    rows += [{**base, "decoding": "cot-k5-agg", "value": 0.25, "stderr": 0.1},
             {**base, "decoding": "greedy", "n_shot": 5, "value": 0.4, "stderr": 0.1}]
    stored, _ = leaderboard.append_rows(tmp_path, rows)
    assert {label: {k: v for k, (v, _) in points.items()} for label, points in
            accuracy_lines(stored, "k", "gsm8k", "exact_match", "flexible-extract").items()} == {
        "m, 0-shot, n=10": {1.0: 0.1, 3.0: 0.2, 5.0: 0.3},  # 5-shot greedy and aggregated CoT stay off this line
        "m, 0-shot, n=10, aggregated": {1.0: 0.1, 5.0: 0.25},
        "m, 5-shot, n=10": {1.0: 0.4},
    }
    # other weights (a checkpoint overwritten in place) or another --limit are other lines
    other = [{**rows[2], "weights_sha256": "abcdef0123456789", "dtype": "float32"}, {**rows[1], "n": 20}]
    stored, _ = leaderboard.append_rows(tmp_path, other)
    assert set(accuracy_lines(stored, "k", "gsm8k", "exact_match", "flexible-extract")) == {
        "m, 0-shot, n=10", "m, 0-shot, n=10, aggregated", "m, 5-shot, n=10", "m (abcdef01, float32), 0-shot, n=10",
        "m, 0-shot, n=20"}
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        main(["plot", "--leaderboard", str(tmp_path), "--x", "k", "--out", str(tmp_path / "afile" / "x.png")])
    assert exit_info.value.code == 2 and "afile is a file; give a .png path" in capsys.readouterr().err
    main(["plot", "--leaderboard", str(tmp_path), "--x", "k"])
    png = tmp_path / "gsm8k_vs_k.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit):
        main(["plot", "--leaderboard", str(tmp_path), "--x", "capacity"])


def test_a_plot_has_a_title_ticks_at_the_values_evaluated_and_its_whole_legend(tmp_path, monkeypatch):
    import struct

    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to look at
    base = dict(task="gsm8k", version="3.0", filter="flexible-extract", n_shot=0, metric="exact_match", n=3,
                tokens_per_s=1.0, capacity=None, thought_length=None, prompts_hash="h", commit="c", date="d", stderr=0.1)
    checkpoint = "/a/long/path/to/runs/mod-quietstar-smoke-with-a-long-name/checkpoints/last.ckpt"  # as real sources are
    rows = [{**base, "model": checkpoint, "weights_sha256": "0123456789abcdef", "dtype": "float32", "decoding": d,
             "value": v} for d, v in [("greedy", 0.1), ("cot-k4", 0.2)]]
    plot_accuracy(leaderboard.append_rows(tmp_path, rows)[0], "k", "gsm8k", "exact_match", "flexible-extract",
                  tmp_path / "k.png")
    (fig,) = figures
    ax = fig.axes[0]
    assert ax.get_title() == "gsm8k exact_match (flexible-extract) vs CoT-decoding k"
    assert list(ax.get_xticks()) == [1.0, 4.0]
    fig.set_dpi(120)  # as saved
    legend_width = ax.get_legend().get_window_extent(fig.canvas.get_renderer()).width
    png_width, _ = struct.unpack(">II", (tmp_path / "k.png").read_bytes()[16:24])
    assert png_width >= legend_width  # no legend label is cut off


def test_a_thought_length_or_capacity_point_never_silently_hides_another_models_result(tmp_path):
    base = dict(decoding="thoughts", task="csqa", version="N/A", filter="none", n_shot=0, metric="acc", stderr=0.1,
                n=3, tokens_per_s=1.0, thought_length=4, prompts_hash="h", commit="c", date="d")
    rows = [{**base, "model": "quietstar", "weights_sha256": "aaaa", "capacity": None, "value": 0.2},
            {**base, "model": "mod-quietstar", "weights_sha256": "bbbb", "capacity": 0.125, "value": 0.3}]
    stored, _ = leaderboard.append_rows(tmp_path, rows)
    assert accuracy_lines(stored, "thought_length", "csqa", "acc", "none") == {  # a dense and a MoD thinker: two lines
        "thoughts, dense, 0-shot, n=3": {4.0: (0.2, 0.1)}, "thoughts, capacity 0.125, 0-shot, n=3": {4.0: (0.3, 0.1)}}
    greedy = [{**row, "decoding": "greedy", "thought_length": None, "capacity": 0.125} for row in rows]
    stored, _ = leaderboard.append_rows(tmp_path, greedy)
    with pytest.warns(UserWarning, match=r"two models at capacity = 0.125: quietstar \(aaaa\) and mod-quietstar"):
        assert accuracy_lines(stored, "capacity", "csqa", "acc", "none")["greedy, 0-shot, n=3"] == {0.125: (0.3, 0.1)}


def test_leaderboard_appends_new_rows_and_skips_identical_ones(tmp_path):
    row = dict(model="m", decoding="greedy", task="csqa", version="N/A", filter="none", n_shot=0, metric="acc",
               value=0.5, stderr=0.1, n=4, tokens_per_s=3.0, capacity=None, thought_length=None, prompts_hash="h",
               commit="c1", date="d1")
    _, added = leaderboard.append_rows(tmp_path, [row])
    assert added == 1
    rows, added = leaderboard.append_rows(tmp_path, [{**row, "commit": "c2", "date": "d2", "tokens_per_s": 9.0},
                                                     {**row, "value": 0.75}])
    assert added == 1 and [r["value"] for r in rows] == ["0.5", "0.75"]
    assert (tmp_path / "leaderboard.csv").read_text().count("\n") == 3
    header, wide = leaderboard.wide_table(rows)
    assert header == ["model", "weights", "dtype", "decoding", "date", "n", "max new tokens", "csqa acc", "tokens/s"]
    assert wide == [["m", "", "", "greedy", "d1", "4", "", "0.7500", ""]]  # one run: the latest value wins
    # the same scores from other weights, in another dtype, or under another token budget are other rows
    others = [{**row, "weights_sha256": "abcdef0123456789"}, {**row, "dtype": "bfloat16"}, {**row, "max_new_tokens": 64}]
    rows, added = leaderboard.append_rows(tmp_path, others)
    assert added == 3
    long = leaderboard.long_table(rows)
    assert len({tuple(cells) for cells in long}) == len(long)  # the long table tells every row apart
    assert [cells[:3] for cells in leaderboard.wide_table(rows)[1]] == [["m", "", ""], ["m", "abcdef01", ""],
                                                                        ["m", "", "bfloat16"]]


def test_the_summary_never_puts_results_of_two_runs_in_one_row():
    """Another --limit, budget or seed is another run (its date): a summary row is never a mix of runs."""
    base = dict(model="m", weights_sha256="0123456789abcdef", dtype="float32", decoding="greedy", version="3.0",
                task="gsm8k", filter="strict-match", metric="exact_match", stderr="0.1", capacity="",
                thought_length="", prompts_hash="h", commit="c")
    rows = [{**base, "n": "8", "n_shot": "0", "max_new_tokens": "32", "value": "0.1", "tokens_per_s": "30",
             "date": "2026-11-27T05:00:00+00:00"},
            {**base, "n": "8", "n_shot": "5", "max_new_tokens": "32", "value": "0.2", "tokens_per_s": "20",
             "date": "2026-11-27T05:00:00+00:00"},
            {**base, "n": "16", "n_shot": "0", "max_new_tokens": "8", "value": "0.3", "tokens_per_s": "40",
             "date": "2026-11-27T06:00:00+00:00"},
            {**base, "task": "csqa", "filter": "none", "metric": "acc", "n": "9", "n_shot": "0", "max_new_tokens": "",
             "value": "0.4", "tokens_per_s": "90", "date": "2026-11-27T06:00:00+00:00"}]
    header, wide = leaderboard.wide_table(rows)
    assert header[4:] == ["date", "n", "max new tokens", "gsm8k 0-shot strict", "gsm8k 5-shot strict", "csqa acc",
                          "tokens/s"]
    assert [cells[4:] for cells in wide] == [
        ["2026-11-27T05:00:00", "8", "32", "0.1000", "0.2000", "", "30.0"],  # tokens/s: the 0-shot run's
        ["2026-11-27T06:00:00", "16/9", "8", "0.3000", "", "0.4000", "40.0"]]


def test_the_summary_has_a_column_per_task_and_metric_in_a_fixed_order():
    base = dict(model="m", weights_sha256="0123456789abcdef", dtype="float32", decoding="greedy", version="1.0",
                n="4", max_new_tokens="", tokens_per_s="5.0", capacity="", thought_length="", prompts_hash="h",
                commit="c", date="d", stderr="0.1")
    rows = [{**base, "task": "csqa_gen", "filter": "none", "n_shot": "0", "metric": "acc", "value": "0.2"},
            {**base, "task": "csqa_cloze", "filter": "none", "n_shot": "0", "metric": "acc_norm", "value": "0.3"},
            {**base, "task": "gsm8k_chat", "filter": "flexible-extract", "n_shot": "5", "metric": "exact_match", "value": "0.4"},
            {**base, "task": "gsm8k", "filter": "flexible-extract", "n_shot": "0", "metric": "exact_match", "value": "0.5"},
            {**base, "task": "gsm8k", "filter": "strict-match", "n_shot": "0", "metric": "exact_match", "value": "0.6"},
            {**base, "task": "csqa_cloze", "filter": "none", "n_shot": "0", "metric": "acc", "value": "0.7"}]
    header, wide = leaderboard.wide_table(rows)
    assert header[7:] == ["gsm8k 0-shot strict", "gsm8k 0-shot flexible", "gsm8k_chat 5-shot flexible",
                          "csqa_cloze acc", "csqa_cloze acc_norm", "csqa_gen acc", "tokens/s"]
    assert wide == [["m", "01234567", "float32", "greedy", "d", "4", "", "0.6000", "0.5000", "0.4000", "0.7000", "0.3000",
                     "0.2000", "5.0"]]


def test_unknown_task_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        main(["--tasks", "mmlu"])
    assert "invalid choice: 'mmlu'" in capsys.readouterr().err


def test_missing_data_file_is_a_clear_error(tiny_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tiny_checkpoint), "--tasks", "csqa", "--csqa-path", str(tmp_path / "nope.jsonl")])
    assert exit_info.value.code == 2
    assert "CommonsenseQA file not found" in capsys.readouterr().err


def test_model_that_cannot_be_loaded_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "broken.ckpt"
    torch.save({"state_dict": {}}, bad)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x80\x04not a checkpoint")
    folder = tmp_path / "folder.ckpt"  # a folder named like a distributed checkpoint, without its files
    folder.mkdir()
    for source in (str(tmp_path / "missing.ckpt"), str(bad), str(garbage), str(folder), str(tmp_path)):
        with pytest.raises(SystemExit) as exit_info:
            main(["--model", source, "--tasks", "csqa", *data_args(), "--limit", "1", "--output", str(tmp_path / "o"),
                  "--leaderboard", str(tmp_path / "b")])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert f"cannot load model {source!r}" in err and "weights_only=False" not in err


def test_settings_that_cannot_run_fail_before_any_model_is_evaluated(
        tiny_checkpoint, smollm2_tokenizer_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without CUDA, also on a GPU machine
    (tmp_path / "afile").write_text("")
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / "results.json").write_text("{}")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "leaderboard.csv").write_text("name,score\nx,1\n")
    for extra, message in [(["--model", str(tiny_checkpoint), str(tmp_path / "nope.ckpt")], "cannot load model"),
                           (["--output", str(tmp_path / "afile")], "--output"),
                           (["--output", str(tmp_path / "earlier")], "already holds an earlier run's results.json"),
                           (["--leaderboard", str(tmp_path / "afile")], "--leaderboard"),
                           (["--leaderboard", str(tmp_path / "foreign")], "is not a leaderboard of this quietdepth version"),
                           (["--device", "cuda"], "--device cuda: this machine has no CUDA device"),
                           (["--device", "gpu"], "--device gpu: not a device torch knows"),
                           (["--cot-k", "5"], "--cot-k and --cot-aggregate set CoT-decoding"),
                           (["--decoding", "cot", "--cot-k", "5"], "--decoding cot changes generation only"),
                           (["--tasks", "csqa", "--shots", "5"], "--shots sets GSM8K's few-shot count")]:
        with pytest.raises(SystemExit) as exit_info:
            main([*run_args(tiny_checkpoint, smollm2_tokenizer_dir, tmp_path, "--tasks", "csqa"), *extra])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
        assert not (tmp_path / "run").exists() and not (tmp_path / "board").exists()
    assert (tmp_path / "foreign" / "leaderboard.csv").read_text() == "name,score\nx,1\n"
    assert (tmp_path / "earlier" / "results.json").read_text() == "{}"


def test_a_model_that_fails_its_checks_keeps_the_results_of_the_models_before_it(
        tiny_checkpoint, smollm2_tokenizer_dir, tmp_path, capsys):
    short = Transformer(ModelConfig.from_name("tiny", n_layer=1, block_size=32))
    short_checkpoint = tmp_path / "short.ckpt"
    torch.save({"model_config": short.config.to_dict(),
                "state_dict": {f"model.{k}": v for k, v in short.state_dict().items()}}, short_checkpoint)
    args = run_args(tiny_checkpoint, smollm2_tokenizer_dir, tmp_path, "--tasks", "csqa", "gsm8k", "--shots", "0",
                    "--max-new-tokens", "40")
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--model", str(tiny_checkpoint), str(short_checkpoint)])
    assert exit_info.value.code == 2
    assert "--max-new-tokens 40 leaves no room for a prompt" in capsys.readouterr().err
    (entry,) = json.loads((tmp_path / "run" / "results.json").read_text())["models"]
    assert entry["source"] == str(tiny_checkpoint) and len(entry["results"]) == 2
    rows = list(csv.DictReader((tmp_path / "board" / "leaderboard.csv").open()))
    assert len(rows) == 3 and {r["model"] for r in rows} == {str(tiny_checkpoint)}
    assert {(r["task"], r["max_new_tokens"], r["dtype"]) for r in rows} == {("csqa", "", "float32"), ("gsm8k", "40", "float32")}


def test_a_task_that_fails_midway_keeps_the_results_of_the_tasks_before_it(
        tiny_checkpoint, smollm2_tokenizer_dir, tmp_path, monkeypatch):
    from evals import cli

    def out_of_memory(*args, **kwargs):
        raise MemoryError("injected: the GSM8K task fails")

    monkeypatch.setattr(cli.gsm8k, "evaluate", out_of_memory)
    with pytest.raises(MemoryError):
        main(run_args(tiny_checkpoint, smollm2_tokenizer_dir, tmp_path, "--tasks", "csqa", "gsm8k", "--shots", "0"))
    (entry,) = json.loads((tmp_path / "run" / "results.json").read_text())["models"]
    assert [r["task"] for r in entry["results"]] == ["csqa"]
    rows = list(csv.DictReader((tmp_path / "board" / "leaderboard.csv").open()))
    assert [(r["task"], r["metric"]) for r in rows] == [("csqa", "acc")]


def test_each_task_runs_once_per_variant_and_cot_scores_log_likelihood_tasks_greedily():
    from evals.cli import check_args, plan, run_parser

    def planned(*argv: str) -> list[tuple[str, str]]:
        args = run_parser().parse_args(list(argv))
        check_args(args)
        return [(task, decoding.label) for task, decoding in plan(args)]

    assert planned("--tasks", "csqa", "gsm8k", "--decoding", "cot") == [("csqa", "greedy"), ("gsm8k", "cot-k10")]
    assert planned("--tasks", "csqa", "csqa", "csqa_gen", "--decoding", "greedy", "cot", "cot", "--cot-k", "3", "3", "5") == [
        ("csqa", "greedy"), ("csqa_gen", "greedy"), ("csqa_gen", "cot-k3"), ("csqa_gen", "cot-k5")]
    for flags, graph in ([], True), (["--no-cuda-graph"], False):
        args = run_parser().parse_args(["--tasks", "gsm8k", "--decoding", "greedy", "cot", *flags])
        check_args(args)
        assert {decoding.cuda_graph for _, decoding in plan(args)} == {graph}


def test_thoughts_on_a_plain_model_is_a_clear_error(tiny_checkpoint, smollm2_tokenizer_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(run_args(tiny_checkpoint, smollm2_tokenizer_dir, tmp_path, "--tasks", "csqa_gen", "--decoding", "thoughts"))
    assert "needs a Quiet-STaR model" in capsys.readouterr().err


def test_gsm8k_chat_with_a_tokenizer_without_a_chat_template_is_refused_before_any_task_runs(
        tiny_checkpoint, smollm2_tokenizer_dir, tmp_path, capsys):
    """It stopped only when gsm8k_chat's turn came, after the tasks before it, with transformers' message."""
    plain = tmp_path / "plain-tokenizer"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (plain / name).parent.mkdir(exist_ok=True)
        (plain / name).write_text((smollm2_tokenizer_dir / name).read_text())
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit) as exit_info:
        main(run_args(tiny_checkpoint, plain, tmp_path, "--tasks", "csqa", "gsm8k_chat", "--shots", "0"))
    assert exit_info.value.code == 2
    assert (f"--tasks gsm8k_chat needs a chat template, and the tokenizer of {tiny_checkpoint} has none"
            in capsys.readouterr().err)
    assert not (tmp_path / "run" / "results.json").exists() and not (tmp_path / "board").exists()


def test_quietstar_checkpoint_runs_with_thoughts_and_records_the_thought_length(smollm2_tokenizer_dir, tmp_path):
    from modeldefs.quietstar import QuietStar, ThoughtConfig

    torch.manual_seed(0)
    lm = Transformer(ModelConfig.from_name("tiny", n_layer=2, block_size=512))
    net = QuietStar(lm, ThoughtConfig(n_ahead=4, n_ahead_talk=2, n_passes=1), init_token_id=7)
    checkpoint = tmp_path / "qs.ckpt"
    torch.save({"model_config": lm.config.to_dict(), "thought_config": net.thought_config.to_dict(),
                "state_dict": {f"model.{k}": v for k, v in net.state_dict().items()}}, checkpoint)
    main(run_args(checkpoint, smollm2_tokenizer_dir, tmp_path, "--tasks", "csqa", "csqa_gen", "--decoding", "greedy", "thoughts"))
    (entry,) = json.loads((tmp_path / "run" / "results.json").read_text())["models"]
    assert entry["class"] == "QuietStar" and entry["thought_config"]["n_ahead"] == 4
    assert {(r["task"], r["decoding"]) for r in entry["results"]} == {
        ("csqa", "greedy"), ("csqa_gen", "greedy"), ("csqa", "thoughts"), ("csqa_gen", "thoughts")}
    rows = list(csv.DictReader((tmp_path / "board" / "leaderboard.csv").open()))
    assert {(r["decoding"], r["thought_length"]) for r in rows} == {("greedy", ""), ("thoughts", "4")}  # greedy did not think


def test_thought_slots_count_against_the_context_when_the_model_is_checked(smollm2_tokenizer_dir, tmp_path, capsys):
    """A thought takes n_ahead - 1 slots after the newest token: a --max-new-tokens that leaves no room for a
    prompt once they are counted is refused when the model loads, not in the thoughts task after the others ran."""
    from modeldefs.quietstar import QuietStar, ThoughtConfig

    lm = Transformer(ModelConfig.from_name("tiny", n_layer=1, block_size=64))
    net = QuietStar(lm, ThoughtConfig(n_ahead=4, n_ahead_talk=2, n_passes=1), init_token_id=7)
    checkpoint = tmp_path / "qs.ckpt"
    torch.save({"model_config": lm.config.to_dict(), "thought_config": net.thought_config.to_dict(),
                "state_dict": {f"model.{k}": v for k, v in net.state_dict().items()}}, checkpoint)
    with pytest.raises(SystemExit) as exit_info:
        main([*run_args(checkpoint, smollm2_tokenizer_dir, tmp_path, "--tasks", "csqa_gen", "--decoding", "greedy",
                        "thoughts"), "--max-new-tokens", "61"])
    assert exit_info.value.code == 2
    assert "--max-new-tokens 61 and 3 thought slots leave no room for a prompt" in capsys.readouterr().err
    assert not (tmp_path / "board").exists()  # nothing was evaluated, greedy included


def test_sampled_thoughts_give_the_same_results_on_every_run(smollm2_tokenizer_dir, tmp_path):
    """A model whose thoughts are sampled (eval_thought_temperature > 0, as the official eval's tau-0.001 hard
    Gumbel-softmax in effect is) is scored the same on a rerun: before, the draws came from an unseeded generator."""
    from modeldefs.quietstar import QuietStar, ThoughtConfig

    torch.manual_seed(0)
    lm = Transformer(ModelConfig.from_name("tiny", n_layer=2, block_size=512))
    net = QuietStar(lm, ThoughtConfig(n_ahead=5, eval_thought_temperature=1.0), init_token_id=7)
    torch.nn.init.normal_(net.mixing_head.net[-1].weight, std=0.3)  # a head that mixes the thought in
    checkpoint = tmp_path / "qs.ckpt"
    torch.save({"model_config": lm.config.to_dict(), "thought_config": net.thought_config.to_dict(),
                "state_dict": {f"model.{k}": v for k, v in net.state_dict().items()}}, checkpoint)
    values = []
    for run in ("first", "second"):
        torch.manual_seed(len(values))  # whatever ran before in the process
        main(run_args(checkpoint, smollm2_tokenizer_dir, tmp_path / run, "--tasks", "gsm8k_answer_prob", "csqa",
                      "--decoding", "thoughts"))
        (entry,) = json.loads((tmp_path / run / "run" / "results.json").read_text())["models"]
        values.append([m["value"] for r in entry["results"] for m in r["metrics"]])
    assert values[0] == values[1]


def test_leaderboard_goes_to_the_active_wandb_run_as_tables(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    row = dict(model="m", weights_sha256="0123456789abcdef", dtype="float32", decoding="greedy", task="csqa",
               version="N/A", filter="none", n_shot="0", metric="acc", value="0.5", stderr="0.1", n="4",
               max_new_tokens="", tokens_per_s="3.0", capacity="", thought_length="", prompts_hash="h", commit="c", date="d")
    assert not leaderboard.log_to_wandb([row])  # no active run
    run = wandb.init(project="quietdepth-test", dir=str(tmp_path))
    try:
        assert leaderboard.log_to_wandb([row])
        assert {"eval/leaderboard", "eval/summary"} <= set(run.summary.keys())
    finally:
        run.finish()


def test_wandb_project_logs_the_leaderboard_to_a_new_wandb_run_from_the_command_line(
        tiny_checkpoint, smollm2_tokenizer_dir, tmp_path, monkeypatch, capsys):
    """The tables went to W&B only where a run was already active, which a command line never has."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    main(run_args(tiny_checkpoint, smollm2_tokenizer_dir, tmp_path, "--tasks", "csqa", "--wandb-project", "qd-test"))
    (offline,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    assert list(offline.rglob("media/table/eval/leaderboard*.table.json"))
    assert list(offline.rglob("media/table/eval/summary*.table.json"))
    assert "leaderboard logged to the active W&B run" in capsys.readouterr().out
    assert wandb.run is None  # finished


def test_a_model_path_with_a_pipe_or_markup_keeps_its_cells_in_the_markdown_and_html_tables(tmp_path):
    """A path is user text: `|` would end a Markdown cell early (shifting every cell after it), `<` open an HTML tag."""
    row = dict(model="runs/a|b <i>x</i>/last.ckpt", decoding="greedy", task="csqa", version="N/A", filter="none",
               n_shot=0, metric="acc", value=0.5, stderr=0.1, n=4, date="d1")
    leaderboard.append_rows(tmp_path, [row])
    markdown = (tmp_path / "leaderboard.md").read_text()
    for table in markdown.split("\n\n"):
        if table.startswith("|"):  # every row of a table has as many cells as its header
            widths = {len(line.replace("\\|", "").split("|")) for line in table.splitlines()}
            assert len(widths) == 1, table
    assert "runs/a\\|b &lt;i&gt;x&lt;/i&gt;/last.ckpt" in markdown
    page = (tmp_path / "leaderboard.html").read_text()
    assert "<i>" not in page and "runs/a|b &lt;i&gt;x&lt;/i&gt;/last.ckpt" in page


def _board_row(**changed) -> dict:
    return {**dict(model="m", decoding="greedy", task="csqa", version="N/A", filter="none", n_shot=0, metric="acc",
                   value=0.5, stderr=0.1, n=4, date="d1"), **changed}


def test_a_leaderboard_csv_without_a_final_newline_gets_new_rows_on_lines_of_their_own(tmp_path):
    """An editor or a copy can drop the last newline; appending then glued the new row onto the last one."""
    leaderboard.append_rows(tmp_path, [_board_row()])
    path = tmp_path / "leaderboard.csv"
    path.write_text(path.read_text().rstrip("\r\n"))
    rows, added = leaderboard.append_rows(tmp_path, [_board_row(model="m2", value=0.75)])
    assert added == 1
    assert [(r["model"], r["value"], r["date"]) for r in leaderboard.read_rows(path)] == [("m", "0.5", "d1"),
                                                                                           ("m2", "0.75", "d1")]


def test_a_row_cut_short_by_a_crash_is_skipped_with_a_warning_and_later_runs_still_append(tmp_path):
    """A process killed mid-append leaves a partial last row: every later run then failed rendering it (TypeError
    on its missing fields), and glued its first new row onto it."""
    leaderboard.append_rows(tmp_path, [_board_row()])
    path = tmp_path / "leaderboard.csv"
    path.write_text(path.read_text() + "m2,,,greedy,csqa,N/A,no")
    with pytest.warns(UserWarning, match=r"leaderboard.csv line 3 .*incomplete"):
        rows, added = leaderboard.append_rows(tmp_path, [_board_row(model="m3")])
    assert added == 1 and [r["model"] for r in rows] == ["m", "m3"]
    assert "| m3 |" in (tmp_path / "leaderboard.md").read_text()


def test_a_row_cut_short_inside_a_quoted_field_does_not_swallow_the_rows_appended_after_it(tmp_path):
    """A model path with a comma is written quoted: cut inside it, the open quote made every later row part of
    that field, so the rows later runs appended were never read back (gone from the leaderboard after the next run)."""
    leaderboard.append_rows(tmp_path, [_board_row()])
    path = tmp_path / "leaderboard.csv"
    path.write_text(path.read_text() + '"runs/a,b/la')
    with pytest.warns(UserWarning, match="incomplete"):
        leaderboard.append_rows(tmp_path, [_board_row(model="m3")])
    with pytest.warns(UserWarning, match="incomplete"):
        assert [r["model"] for r in leaderboard.read_rows(path)] == ["m", "m3"]


def test_wandb_project_inside_a_callers_active_run_leaves_that_run_open(
        tiny_checkpoint, smollm2_tokenizer_dir, tmp_path, monkeypatch):
    """wandb.init inside an active run returns that run, which _wandb_run then finished under the caller."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    callers = wandb.init(project="quietdepth-test", dir=str(tmp_path))
    try:
        main(run_args(tiny_checkpoint, smollm2_tokenizer_dir, tmp_path, "--tasks", "csqa", "--wandb-project", "qd-test"))
        assert wandb.run is callers
        assert {"eval/leaderboard", "eval/summary"} <= set(callers.summary.keys())
        callers.log({"after": 1})  # the caller goes on logging
    finally:
        callers.finish()


def test_wandb_project_without_wandb_installed_is_refused_before_the_evaluation(
        tiny_checkpoint, smollm2_tokenizer_dir, tmp_path, monkeypatch, capsys):
    """`import wandb` ran only once every task was done: a ModuleNotFoundError traceback at the end of the run."""
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails, as where it is not installed
    with pytest.raises(SystemExit) as exit_info:
        main(run_args(tiny_checkpoint, smollm2_tokenizer_dir, tmp_path, "--tasks", "csqa", "--wandb-project", "qd"))
    assert exit_info.value.code == 2
    assert "--wandb-project qd logs to W&B, but the wandb package is not installed: pip install wandb" in \
        capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not (tmp_path / "board" / "leaderboard.csv").exists()


def test_the_wandb_tables_hold_numbers_as_numbers(tmp_path, monkeypatch):
    """W&B sorts, filters and charts a Table column by its type: values logged as text sort '1583.1' before
    '825.9' and cannot be plotted."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    base = dict(model="m", weights_sha256="0123456789abcdef", dtype="float32", decoding="greedy", version="3.0",
                task="gsm8k", filter="strict-match", metric="exact_match", n_shot="0", n="4", max_new_tokens="32",
                capacity="", thought_length="", prompts_hash="h", commit="c", date="d")
    rows = [{**base, "value": "0.25", "stderr": "0.25", "tokens_per_s": "825.86"},
            {**base, "task": "csqa", "filter": "none", "metric": "acc", "value": "0.5", "stderr": "",
             "max_new_tokens": "", "tokens_per_s": "1583.1"}]
    run = wandb.init(project="quietdepth-test", dir=str(tmp_path))
    try:
        assert leaderboard.log_to_wandb(rows)
    finally:
        run.finish()
    (long,) = tmp_path.rglob("media/table/eval/leaderboard*.table.json")
    table = json.loads(long.read_text())
    first, second = (dict(zip(table["columns"], row)) for row in table["data"])
    assert (first["value"], first["stderr"], first["n"], first["n_shot"], first["max_new_tokens"],
            first["tokens_per_s"], first["capacity"]) == (0.25, 0.25, 4, 0, 32, 825.86, None)
    assert (second["stderr"], second["max_new_tokens"], second["tokens_per_s"]) == (None, None, 1583.1)
    (summary,) = tmp_path.rglob("media/table/eval/summary*.table.json")
    table = json.loads(summary.read_text())
    (cells,) = (dict(zip(table["columns"], row)) for row in table["data"])
    assert (cells["gsm8k 0-shot strict"], cells["csqa acc"], cells["tokens/s"], cells["max new tokens"]) == (
        0.25, 0.5, 825.9, 32)
