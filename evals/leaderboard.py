"""The leaderboard: one CSV of result rows that every run appends to, rendered as Markdown and HTML
(lm-eval's long table and a wide per-model summary), and as a W&B Table when a run is active.

A row is one metric of one task for one model (its source, weights hash and dtype) under one decoding.
A re-run appends its rows; a row equal to one already there in everything but date, commit and speed
is not added again.
"""

from __future__ import annotations

import csv
import html
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evals.files import lock, write_atomic

COLUMNS = ["model", "weights_sha256", "dtype", "decoding", "task", "version", "filter", "n_shot", "metric", "value",
           "stderr", "n", "max_new_tokens", "tokens_per_s", "capacity", "thought_length", "prompts_hash", "commit", "date"]
_NOT_IDENTITY = {"tokens_per_s", "commit", "date"}
LONG_HEADER = ["Model", "Weights", "dtype", "Decoding", "Tasks", "Version", "Filter", "n-shot", "Metric", "Value",
               "± Stderr", "n", "Max new tokens"]


def _key(row: dict[str, Any]) -> tuple[str, ...]:
    return tuple(str(row[c]) for c in COLUMNS if c not in _NOT_IDENTITY)


def read_rows(path: str | Path) -> list[dict[str, str]]:
    """Rows of a leaderboard CSV (none if it does not exist yet, or is empty: a run is creating it)."""
    path = Path(path)
    if not path.is_file() or not path.stat().st_size:
        return []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != COLUMNS:
            raise ValueError(f"{path} is not a leaderboard of this quietdepth version (columns {reader.fieldnames}, "
                             f"expected {COLUMNS}); point --leaderboard at another folder")
        rows = []
        for row in reader:
            if None in row or None in row.values():  # fields beyond the header, or fewer than it
                warnings.warn(f"{path} line {reader.line_num} is incomplete or has extra fields (a run stopped while "
                              "writing it?): skipped; delete or repair that line", stacklevel=2)
                continue
            column = _not_a_number(row)
            if column is not None:  # edited by hand or by a spreadsheet: the tables and plots read these as numbers
                warnings.warn(f"{path} line {reader.line_num}: {column} {row[column]!r} is not a number: skipped; "
                              "repair or delete that line", stacklevel=2)
                continue
            rows.append(row)
        return rows


_NUMBERS = {"value": float, "n_shot": int, "n": int}
_NUMBERS_OR_EMPTY = {"stderr": float, "max_new_tokens": int, "tokens_per_s": float, "capacity": float,
                     "thought_length": int}


def _not_a_number(row: dict[str, str]) -> str | None:
    """The first column of `row` that should hold a number and does not (None if all do)."""
    for column, kind in {**_NUMBERS, **_NUMBERS_OR_EMPTY}.items():
        if row[column] == "" and column in _NUMBERS_OR_EMPTY:
            continue
        try:
            kind(row[column])
        except ValueError:
            return column
    return None


def append_rows(directory: str | Path, rows: Sequence[dict[str, Any]]) -> tuple[list[dict[str, str]], int]:
    """Append `rows` to `directory`/leaderboard.csv (skipping rows already there), rewrite the Markdown
    and HTML views; returns (all rows, rows added). The CSV is locked (`flock`) meanwhile, so that runs
    appending at once take turns: each reads every row the others added, and renders them all."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "leaderboard.csv"
    with path.open("a", newline="") as f:
        lock(f.fileno(), str(path))
        existing = read_rows(path)
        seen = {_key(r) for r in existing}
        added = []
        for row in rows:
            row = {c: "" if row.get(c) is None else str(row[c]) for c in COLUMNS}
            if _key(row) not in seen:
                seen.add(_key(row))
                added.append(row)
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if os.fstat(f.fileno()).st_size == 0:
            writer.writeheader()
        else:
            f.write(_line_ending(path))
        writer.writerows(added)
        f.flush()
        everything = existing + added
        write_atomic(directory / "leaderboard.md", markdown(everything))
        write_atomic(directory / "leaderboard.html", html_page(everything))
    return everything, len(added)


def _line_ending(path: Path) -> str:
    """What ends the CSV's last line before rows are appended: nothing where it ends in a newline. A last line without
    one (an editor dropped it, or a run stopped mid-row) would join the first new row; one cut inside a quoted field
    (an odd count of `"`: the csv module doubles those inside a field) would take every later row into that field."""
    data = path.read_bytes()
    if not data or data.endswith((b"\r", b"\n")):
        return ""
    last_line = data[max(data.rfind(b"\n"), data.rfind(b"\r")) + 1:]
    return ('"' if last_line.count(b'"') % 2 else "") + "\r\n"  # the csv module's line ending


def _number(text: str, digits: int = 4) -> str:
    if text in ("", "nan"):
        return "N/A" if text == "nan" else ""
    value = float(text)
    return "N/A" if math.isnan(value) else f"{value:.{digits}f}"


def long_table(rows: Sequence[dict[str, str]]) -> list[list[str]]:
    """lm-eval's results table (Tasks | Version | Filter | n-shot | Metric | Value | ± Stderr), per model (source,
    weights, dtype) and decoding, with n and the generation budget: the fields that tell two rows apart."""
    return [[r["model"], r["weights_sha256"][:8], r["dtype"], r["decoding"], r["task"], r["version"], r["filter"],
             r["n_shot"], r["metric"], _number(r["value"]), _number(r["stderr"]), r["n"], r["max_new_tokens"]]
            for r in rows]


_TASK_ORDER = ["gsm8k", "gsm8k_chat", "csqa", "csqa_cloze", "csqa_gen", "gsm8k_answer_prob", "csqa_answer_prob"]
_GSM8K_FILTERS = {"strict-match": "strict", "flexible-extract": "flexible"}  # in column order


def _summary_column(row: dict[str, str]) -> tuple[tuple[int, int, int, str], str]:
    """(sort key, name) of the summary column a row fills: GSM8K per shot count and filter, else task and metric."""
    task, order = row["task"], _TASK_ORDER.index(row["task"]) if row["task"] in _TASK_ORDER else len(_TASK_ORDER)
    if row["filter"] in _GSM8K_FILTERS:
        rank = list(_GSM8K_FILTERS).index(row["filter"])
        return (order, int(row["n_shot"]), rank, ""), f"{task} {row['n_shot']}-shot {_GSM8K_FILTERS[row['filter']]}"
    return (order, 0, 0, row["metric"]), f"{task} {row['metric']}"


def wide_table(rows: Sequence[dict[str, str]]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): one row per evaluation run (its date) of a model (source, weights, dtype) under a
    decoding, so that results of runs with another --limit, token budget or seed never share a row; one
    column per task and metric (GSM8K: per n-shot and filter); n (items per task, "/"-joined where the
    tasks differ), the generation budget, and `tokens/s`: the speed of the run's GSM8K evaluation with
    the fewest shots."""
    columns: dict[str, tuple[int, int, int, str]] = {}
    table: dict[tuple[str, ...], dict[str, str]] = {}
    ns: dict[tuple[str, ...], list[str]] = {}
    fewest_shots: dict[tuple[str, ...], int] = {}
    for r in rows:
        key, column = _summary_column(r)
        columns[column] = key
        run = (r["model"], r["weights_sha256"][:8], r["dtype"], r["decoding"], r["date"])  # shown to the second
        cells = table.setdefault(run, {"max new tokens": ""})
        cells[column] = _number(r["value"])
        if r["n"] not in ns.setdefault(run, []):
            ns[run].append(r["n"])
        cells["max new tokens"] = cells["max new tokens"] or r["max_new_tokens"]
        if r["task"] == "gsm8k" and int(r["n_shot"]) <= fewest_shots.get(run, int(r["n_shot"])):
            fewest_shots[run], cells["tokens/s"] = int(r["n_shot"]), _number(r["tokens_per_s"], 1)
    names = [*sorted(columns, key=columns.__getitem__), "tokens/s"]
    header = ["model", "weights", "dtype", "decoding", "date", "n", "max new tokens", *names]
    return header, [[*run[:4], run[4][:19], "/".join(ns[run]), cells["max new tokens"],
                     *(cells.get(c, "") for c in names)] for run, cells in table.items()]


def _markdown_cell(text: str) -> str:
    """`text` as it reads in a Markdown table cell: a `|` (in a model path, say) would end the cell, and `<`
    open an HTML tag, which Markdown renders."""
    return html.escape(text, quote=False).replace("|", "\\|")


def _markdown_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(_markdown_cell, row)) + " |" for row in body]
    return "\n".join(lines)


def markdown(rows: Sequence[dict[str, str]]) -> str:
    header, wide = wide_table(rows)
    return (f"# Leaderboard\n\n## Summary\n\n{_markdown_table(header, wide)}\n\n"
            f"## All results\n\n{_markdown_table(LONG_HEADER, long_table(rows))}\n")


def _html_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>{cells}</tbody>\n</table>"


def html_page(rows: Sequence[dict[str, str]]) -> str:
    header, wide = wide_table(rows)
    style = "table{border-collapse:collapse;margin-bottom:2em}td,th{border:1px solid #ccc;padding:2px 8px}"
    return (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>quietdepth leaderboard</title>"
            f"<style>{style}</style></head><body>\n<h2>Summary</h2>\n{_html_table(header, wide)}\n"
            f"<h2>All results</h2>\n{_html_table(LONG_HEADER, long_table(rows))}\n</body></html>\n")


def log_to_wandb(rows: Sequence[dict[str, str]]) -> bool:
    """Log the rows as W&B Tables (long and summary) to the active run; False when there is none."""
    try:
        import wandb
    except ImportError:
        return False
    if wandb.run is None:
        return False
    header, wide = wide_table(rows)
    typed = {**_NUMBERS, **_NUMBERS_OR_EMPTY}
    long = [[_typed(r[c], typed.get(c)) for c in COLUMNS] for r in rows]
    # the summary's score columns (after "max new tokens") and tokens/s are numbers; n may read "16/9"
    kinds = [None] * 6 + [int] + [float] * (len(header) - 7)
    summary = [[_typed(cell, kind) for cell, kind in zip(row, kinds)] for row in wide]
    wandb.run.log({"eval/leaderboard": wandb.Table(columns=COLUMNS, data=long),
                   "eval/summary": wandb.Table(columns=header, data=summary)})
    return True


def _typed(text: str, kind: type | None) -> Any:
    """A table cell for W&B, which sorts and charts a column by its type: a number column's text as that number
    (None where empty or "N/A"), other columns as text."""
    if kind is None:
        return text
    return None if text in ("", "N/A") else kind(text)
