"""`quietdepth-eval`'s files stay whole and its rows are never lost: failed writes, concurrent runs, reruns."""

from __future__ import annotations

import csv
import errno
import fcntl
import json
import os
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch

from evals import leaderboard
from evals.cli import main
from evals.files import write_atomic
from evals.plots import accuracy_lines
from modeldefs import ModelConfig, Transformer
from tests.conftest import REPO, file_size_limit, shared_file


def _row(**changed) -> dict:
    return {**dict(model="m", decoding="greedy", task="csqa", version="N/A", filter="none", n_shot=0, metric="acc",
                   value=0.5, stderr=0.1, n=4, date="d1"), **changed}


def test_a_write_that_fails_midway_keeps_the_earlier_file_whole_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "results.json"
    write_atomic(path, "{}\n")
    with file_size_limit(100), pytest.raises(OSError):
        write_atomic(path, "x" * 1000)
    assert path.read_text() == "{}\n" and [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_a_file_written_whole_gets_the_mode_open_gives_or_keeps_the_one_it_replaces(tmp_path):
    """The temporary file's mode (mkstemp: 0600) made results.json and the leaderboard views readable by their owner
    alone, where open() gives 0644 under the usual umask: a shared server's users or a web server lost them."""
    mask = os.umask(0o022)
    try:
        write_atomic(tmp_path / "new.md", "a")
        (tmp_path / "shared.md").write_text("a")
        (tmp_path / "shared.md").chmod(0o660)
        write_atomic(tmp_path / "shared.md", "b")
    finally:
        os.umask(mask)
    assert (tmp_path / "new.md").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "shared.md").stat().st_mode & 0o777 == 0o660


def test_a_leaderboard_view_that_is_a_symlink_stays_one_and_its_target_gets_the_new_text(tmp_path):
    """write_text followed a symlink (say leaderboard.md linked into a docs site); renaming a temporary file over
    the link replaced the link with a file, and the page it pointed to was never updated again."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "leaderboard.md").write_text("old")
    board = tmp_path / "board"
    board.mkdir()
    (board / "leaderboard.md").symlink_to(site / "leaderboard.md")
    leaderboard.append_rows(board, [_row()])
    assert (board / "leaderboard.md").is_symlink()
    assert "| m " in (site / "leaderboard.md").read_text()
    assert not list(board.glob(".*")) and not list(site.glob(".*"))


def test_a_leaderboard_view_that_fails_midway_keeps_the_earlier_one_whole(tmp_path):
    """leaderboard.md/.html were rewritten in place: a full disk (or a kill) mid-write left them cut short."""
    leaderboard.append_rows(tmp_path, [_row()])
    views = {name: (tmp_path / name).read_text() for name in ("leaderboard.md", "leaderboard.html")}
    csv_size = (tmp_path / "leaderboard.csv").stat().st_size
    with file_size_limit(csv_size + 600), pytest.raises(OSError):  # room for the new CSV row, not the new views
        leaderboard.append_rows(tmp_path, [_row(model="m" * 300)])
    assert {name: (tmp_path / name).read_text() for name in views} == views
    assert not list(tmp_path.glob(".*"))


def test_a_run_updating_the_leaderboard_holds_its_csv_locked_so_another_run_waits_its_turn(tmp_path, monkeypatch):
    """Two runs appending at once each read the CSV, then wrote its views: the one rendering last left out the
    other's rows (found: run B's row in leaderboard.csv, missing from leaderboard.md after run A's slower render)."""
    leaderboard.append_rows(tmp_path, [_row()])
    render, probes = leaderboard.markdown, []

    def render_while_probing(rows):
        with (tmp_path / "leaderboard.csv").open("a") as other_run:
            try:
                fcntl.flock(other_run, fcntl.LOCK_EX | fcntl.LOCK_NB)
                probes.append("free")
            except BlockingIOError:
                probes.append("locked")
        return render(rows)

    monkeypatch.setattr(leaderboard, "markdown", render_while_probing)
    leaderboard.append_rows(tmp_path, [_row(model="m2")])
    assert probes == ["locked"]
    with (tmp_path / "leaderboard.csv").open("a") as after:
        fcntl.flock(after, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released once the views are written



def test_a_run_on_a_filesystem_without_locks_warns_and_keeps_its_results(
        tiny_checkpoint, smollm2_tokenizer_dir, tmp_path, monkeypatch, capsys):
    """NFS emulates flock with POSIX locks, which refuse an exclusive lock on a descriptor not open for writing
    (the --output folder's: EBADF); Lustre without -o flock has none (ENOSYS). Every run stopped with OSError."""
    def no_locks(fd, operation):
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    main(["--model", str(tiny_checkpoint), "--tokenizer", str(smollm2_tokenizer_dir), "--tasks", "csqa", "--limit",
          "1", "--no-progress", "--csqa-path", str(shared_file("commonsense_qa/dev_rand_split.jsonl")),
          "--output", str(tmp_path / "run"), "--leaderboard", str(tmp_path / "board")])
    assert json.loads((tmp_path / "run" / "results.json").read_text())["models"][0]["results"][0]["n"] == 1
    assert len(leaderboard.read_rows(tmp_path / "board" / "leaderboard.csv")) == 1
    err = capsys.readouterr().err
    assert "--output" in err and "leaderboard.csv" in err and "cannot lock it" in err

def test_runs_started_in_the_same_second_each_get_their_own_default_folder(
        tiny_checkpoint, smollm2_tokenizer_dir, tmp_path, monkeypatch):
    """The default folder is eval-results/<UTC second>: the second run was refused for the first one's results.json
    (told to drop the --output it had not given) or, started before that was written, overwrote it."""
    from evals import cli

    class SameSecond(datetime):
        ticks = 0

        @classmethod
        def now(cls, tz=None):
            cls.ticks += 1
            return datetime(2026, 1, 2, 3, 4, 5, cls.ticks, tzinfo=timezone.utc)

    monkeypatch.setattr(cli, "datetime", SameSecond)
    monkeypatch.chdir(tmp_path)
    args = ["--model", str(tiny_checkpoint), "--tokenizer", str(smollm2_tokenizer_dir), "--tasks", "csqa", "--limit", "1",
            "--no-progress", "--csqa-path", str(shared_file("commonsense_qa/dev_rand_split.jsonl"))]
    main(args)
    main([*args, "--limit", "2"])
    folders = sorted(p.name for p in (tmp_path / "eval-results").iterdir() if p.is_dir())
    assert folders == ["20260102-030405", "20260102-030405-2"]
    assert [json.loads((tmp_path / "eval-results" / f / "results.json").read_text())["models"][0]["results"][0]["n"]
            for f in folders] == [1, 2]
    _, summary = leaderboard.wide_table(leaderboard.read_rows(tmp_path / "eval-results" / "leaderboard.csv"))
    assert [(cells[4], cells[5]) for cells in summary] == [("2026-01-02T03:04:05", "1"), ("2026-01-02T03:04:05", "2")]


def test_a_run_that_fails_before_any_result_leaves_no_empty_default_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path), "--tasks", "csqa", "--limit", "1", "--no-progress",
              "--csqa-path", str(shared_file("commonsense_qa/dev_rand_split.jsonl"))])
    assert "cannot load model" in capsys.readouterr().err
    assert not (tmp_path / "eval-results").exists() or not any((tmp_path / "eval-results").iterdir())


def _commit_of_installed_copy(site: Path) -> str:
    """git_commit() of evals/ copied into `site` as pip installs it, run from there."""
    package = site / "evals"
    package.mkdir(parents=True, exist_ok=True)
    for name in ("__init__.py", "results.py"):
        shutil.copy(REPO / "evals" / name, package / name)
    code = "from evals.results import git_commit; print(git_commit())"
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(site)}, cwd=site,
                          capture_output=True, text=True, check=True).stdout.strip()


def test_results_name_the_commit_of_an_installed_copy_not_of_the_project_it_is_installed_in(tmp_path):
    """A venv inside the user's own project: git_commit() reported that project's HEAD (and its edits as -dirty)."""
    git = ["git", "-c", "user.name=u", "-c", "user.email=u@x"]
    subprocess.run([*git, "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "notes.txt").write_text("a")
    subprocess.run([*git, "add", "notes.txt"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "users project"], cwd=tmp_path, check=True)
    (tmp_path / "notes.txt").write_text("b")
    site = tmp_path / ".venv" / "lib" / "site-packages"
    assert _commit_of_installed_copy(site) == "unknown"
    info = site / "quietdepth-0.1.0.dist-info"  # as pip install writes it
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: quietdepth\nVersion: 0.1.0\n")
    assert _commit_of_installed_copy(site) == "quietdepth==0.1.0"
    commit = "0123456789abcdef0123456789abcdef01234567"  # pip install git+https://...@<commit> records it (PEP 610)
    (info / "direct_url.json").write_text(json.dumps({"url": "https://example.org/quietdepth.git",
                                                      "vcs_info": {"vcs": "git", "commit_id": commit}}))
    assert _commit_of_installed_copy(site) == commit


def test_a_run_into_an_output_folder_another_run_is_writing_is_refused(
        tiny_checkpoint, smollm2_tokenizer_dir, tmp_path, monkeypatch, capsys):
    """Both runs passed the check for an earlier results.json before either had written one; each then wrote its own
    over the other's (found: the second run's results.json gone, the first's in its place)."""
    from evals import cli

    args = ["--model", str(tiny_checkpoint), "--tokenizer", str(smollm2_tokenizer_dir), "--tasks", "csqa",
            "--no-progress", "--csqa-path", str(shared_file("commonsense_qa/dev_rand_split.jsonl")),
            "--output", str(tmp_path / "run"), "--leaderboard", str(tmp_path / "board")]
    evaluate, second = cli.csqa.evaluate, []

    def start_another_run_meanwhile(*a, **kw):
        if not second:
            second.append(True)
            with pytest.raises(SystemExit) as exit_info:
                main([*args, "--limit", "2"])
            assert exit_info.value.code == 2
        return evaluate(*a, **kw)

    monkeypatch.setattr(cli.csqa, "evaluate", start_another_run_meanwhile)
    main([*args, "--limit", "1"])
    assert "another quietdepth-eval run is writing to --output" in capsys.readouterr().err
    report = json.loads((tmp_path / "run" / "results.json").read_text())
    assert report["models"][0]["results"][0]["n"] == 1


def test_results_json_records_the_command_of_a_run_started_from_python(
        tiny_checkpoint, smollm2_tokenizer_dir, tmp_path):
    """main(argv) from a script (a sweep, say) recorded the host process's command line (here pytest's)."""
    args = ["--model", str(tiny_checkpoint), "--tokenizer", str(smollm2_tokenizer_dir), "--tasks", "csqa",
            "--limit", "1", "--no-progress", "--csqa-path", str(shared_file("commonsense_qa/dev_rand_split.jsonl")),
            "--output", str(tmp_path / "run"), "--leaderboard", str(tmp_path / "board")]
    main(args)
    assert json.loads((tmp_path / "run" / "results.json").read_text())["command"] == ["quietdepth-eval", *args]


def test_a_row_edited_to_hold_no_number_where_one_belongs_is_skipped_with_a_warning(tmp_path):
    """A value or shot count emptied by hand made every later run end in a ValueError rendering the views (after
    its rows were appended), and `quietdepth-eval plot` fail with "could not convert string to float: ''"."""
    path = tmp_path / "leaderboard.csv"
    written, _ = leaderboard.append_rows(tmp_path, [_row(task="gsm8k", filter="strict-match"), _row(model="m2")])
    edited = [dict(row) for row in written]
    edited[0]["n_shot"], edited[1]["value"] = "", ""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=leaderboard.COLUMNS)
        writer.writeheader()
        writer.writerows(edited)
    with pytest.warns(UserWarning) as warned:
        rows, added = leaderboard.append_rows(tmp_path, [_row(model="m3")])
    assert [str(w.message).split(": skipped")[0].split("leaderboard.csv ")[1] for w in warned] == [
        "line 2: n_shot '' is not a number", "line 3: value '' is not a number"]
    assert added == 1 and [r["model"] for r in rows] == ["m3"]
    assert "| m3 |" in (tmp_path / "leaderboard.md").read_text()
    with pytest.warns(UserWarning, match="is not a number"):
        assert list(accuracy_lines(leaderboard.read_rows(path), "k", "csqa", "acc", "none").values()) == [
            {1.0: (0.5, 0.1)}]


def test_samples_of_a_diverged_model_are_strict_json(smollm2_tokenizer_dir, tmp_path):
    """A checkpoint whose training diverged (NaN weights) wrote NaN answer probabilities and scores into the samples
    as bare NaN, which is not JSON: jq, JavaScript and strict parsers refused the files (results.json already said
    null)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny", n_layer=1, block_size=256))
    checkpoint = tmp_path / "diverged.ckpt"
    torch.save({"model_config": model.config.to_dict(),
                "state_dict": {f"model.{k}": v.fill_(float("nan")) for k, v in model.state_dict().items()}}, checkpoint)
    main(["--model", str(checkpoint), "--tokenizer", str(smollm2_tokenizer_dir), "--tasks", "csqa", "gsm8k_answer_prob",
          "--limit", "2", "--no-progress", "--log-samples", "--gsm8k-path", str(shared_file("gsm8k/test.jsonl")),
          "--csqa-path", str(shared_file("commonsense_qa/dev_rand_split.jsonl")), "--output", str(tmp_path / "run"),
          "--leaderboard", str(tmp_path / "board")])

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    files = sorted((tmp_path / "run").glob("samples_*.jsonl"))
    samples = [json.loads(line, parse_constant=refuse) for f in files for line in f.read_text().splitlines()]
    assert len(files) == 2 and len(samples) == 4
    assert {s.get("answer_prob", "none") for s in samples} == {None, "none"}
