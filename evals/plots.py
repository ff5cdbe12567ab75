"""Accuracy against a compute knob — CoT-decoding's k, Quiet-STaR's thought length, Mixture-of-Depths
capacity — from leaderboard rows, as a PNG with standard-error bars, one line per group."""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

XAxis = Literal["k", "thought_length", "capacity"]
_COT_K = re.compile(r"^cot-k(\d+)")


def x_value(row: dict[str, str], x: XAxis) -> float | None:
    """The row's value on the x axis, or None if the row does not vary it (greedy counts as k = 1)."""
    if x == "k":
        match = _COT_K.match(row["decoding"])
        return float(match.group(1)) if match else (1.0 if row["decoding"] == "greedy" else None)
    return float(row[x]) if row[x] else None


Lines = dict[str, dict[float, tuple[float, float]]]


def line_label(row: dict[str, str], x: XAxis) -> str:
    """The line a row belongs to: for k one model (source, weights, dtype), otherwise one decoding at the
    other knob's value (thought length: the capacity, dense or MoD; capacity: the thought length); either
    at one shot count, number of items and generation budget, so that no line joins other runs' settings."""
    identity = ", ".join(filter(None, (row["weights_sha256"][:8], row["dtype"])))
    if x == "thought_length":
        who = row["decoding"] + (f", capacity {row['capacity']}" if row["capacity"] else ", dense")
    elif x == "capacity":
        who = row["decoding"] + (f", thought length {row['thought_length']}" if row["thought_length"] else "")
    else:
        who = f"{row['model']} ({identity})" if identity else row["model"]
    budget = f", {row['max_new_tokens']} new tokens" if row["max_new_tokens"] else ""
    return f"{who}, {row['n_shot']}-shot, n={row['n']}{budget}"


def accuracy_lines(rows: Sequence[dict[str, str]], x: XAxis, task: str, metric: str, filter: str) -> Lines:
    """{line label: {x: (value, stderr)}} for `metric` (under `filter`) on `task`. A line holds one
    setting: for k one model at one shot count (aggregated CoT-decoding a line of its own, greedy its
    k = 1 point on each), otherwise one decoding at one shot count. The latest row wins where a point
    repeats, with a warning where it hides another model's result."""
    lines: Lines = {}
    owners: dict[tuple[str, float], str] = {}  # (line, x) -> the model whose result the point shows
    greedy: dict[str, tuple[float, float]] = {}
    for row in rows:
        if (row["task"], row["metric"], row["filter"]) != (task, metric, filter):
            continue
        value = x_value(row, x)
        if value is None:
            continue
        point = (float(row["value"]), float(row["stderr"]) if row["stderr"] not in ("", "nan") else 0.0)
        setting = line_label(row, x)
        if x == "k" and row["decoding"] == "greedy":
            greedy[setting] = point
            continue
        if x == "k" and row["decoding"].endswith("-agg"):
            setting += ", aggregated"
        owner = f"{row['model']} ({row['weights_sha256'][:8]})"
        hidden = owners.get((setting, value))
        if hidden is not None and hidden != owner:
            warnings.warn(f"line '{setting}' has two models at {x} = {value:g}: {hidden} and {owner}; "
                          f"only the latest, {owner}, is plotted", stacklevel=2)
        owners[setting, value] = owner
        lines.setdefault(setting, {})[value] = point
    for setting, point in greedy.items():  # greedy is k = 1 of every CoT line of its setting
        for label in [label for label in (setting, f"{setting}, aggregated") if label in lines] or [setting]:
            lines.setdefault(label, {})[1.0] = point
    if not lines:
        raise ValueError(f"no leaderboard rows with task={task!r}, metric={metric!r}, filter={filter!r} that vary {x!r}; "
                         "check the names against leaderboard.csv")
    return lines


def plot_accuracy(rows: Sequence[dict[str, str]], x: XAxis, task: str, metric: str, filter: str, out: str | Path) -> Path:
    """Write a PNG of `accuracy_lines` with standard-error bars."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    lines = accuracy_lines(rows, x, task, metric, filter)
    fig, ax = plt.subplots(figsize=(6, 4))
    for group, points in sorted(lines.items()):
        xs = sorted(points)
        ax.errorbar(xs, [points[v][0] for v in xs], yerr=[points[v][1] for v in xs], marker="o", capsize=3, label=group)
    knob = {"k": "CoT-decoding k", "thought_length": "thought length", "capacity": "Mixture-of-Depths capacity"}[x]
    ax.set_title(f"{task} {metric} ({filter}) vs {knob}")
    ax.set_xlabel({"k": "CoT-decoding k (1 = greedy)",
                   "thought_length": "thought length n_ahead (<start>, n_ahead - 3 sampled tokens, <end>)",
                   "capacity": "Mixture-of-Depths capacity"}[x])
    ax.set_xticks(sorted({v for points in lines.values() for v in points}))  # the values evaluated, not 3.85, 3.9, ...
    ax.set_ylabel(f"{task} {metric} ({filter})")
    ax.grid(alpha=0.3)
    # below the axes: labels name checkpoints and settings, wider than the axes, and would hide points or be cut off
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.18))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")  # the image grows to hold the whole legend
    plt.close(fig)
    return out
