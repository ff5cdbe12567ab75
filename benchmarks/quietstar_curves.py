"""NLL with vs without thought over a Quiet-STaR run, from its metrics CSV: a PNG plot and a Markdown table.

    python benchmarks/quietstar_curves.py runs/quietstar-smollm2-135m-cpu/csv/version_0/metrics.csv \
        benchmarks/results/quietstar_cpu_curves.png --every 25

A run resumed with `--ckpt_path` logs each part to a new `version_N`: give every part's CSV, in order
(a step logged twice keeps the later file's value). Train curves are means over windows of `--every`
logged steps; validation points are plotted as they are.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

CURVES = [("base_nll", "without thought (base)"), ("mixed_nll", "with thought (mixed)")]


def read(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def series(rows: list[dict[str, str]], key: str) -> list[tuple[int, float]]:
    """(step, value) of `key` in step order; a step that appears again keeps its last value."""
    return sorted({int(r["step"]): float(r[key]) for r in rows if r.get(key)}.items())


def windows(points: list[tuple[int, float]], every: int) -> list[tuple[int, float]]:
    """(last step, mean value) over consecutive windows of `every` steps."""
    out, bucket = [], []
    for step, value in points:
        bucket.append((step, value))
        if step // every != bucket[0][0] // every:
            bucket.pop()
            out.append((bucket[-1][0], sum(v for _, v in bucket) / len(bucket)))
            bucket = [(step, value)]
    if bucket:
        out.append((bucket[-1][0], sum(v for _, v in bucket) / len(bucket)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", type=Path, nargs="+", help="the run's metrics.csv (every part of a resumed run)")
    parser.add_argument("png", type=Path)
    parser.add_argument("--every", type=int, default=25, help="steps per window of the train means and table rows")
    args = parser.parse_args()
    rows = [row for path in args.metrics for row in read(path)]
    if not series(rows, "train/base_nll"):
        parser.error(f"no train/base_nll in {', '.join(map(str, args.metrics))}: not the metrics of a Quiet-STaR run")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for (key, label), color in zip(CURVES, ("tab:blue", "tab:orange")):
        train = windows(series(rows, f"train/{key}"), args.every)
        ax.plot([s for s, _ in train], [v for _, v in train], color=color, label=f"train, {label}")
        val = series(rows, f"val/{key}")
        ax.plot([s for s, _ in val], [v for _, v in val], "o--", color=color, label=f"val, {label}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("NLL of the talk tokens (nats)")
    ax.set_title("Quiet-STaR: NLL with vs without thought")
    ax.legend(fontsize=8)
    fig.tight_layout()
    args.png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png, dpi=110)

    train = {key: dict(windows(series(rows, f"train/{key}"), args.every)) for key, _ in CURVES}
    gain = dict(windows(series(rows, "train/nll_gain"), args.every))
    weight = dict(windows(series(rows, "train/mixing_weight_mean"), args.every))
    print("| steps up to | train base NLL | train mixed NLL | gain (base - mixed) | mixing weight |\n|---|---|---|---|---|")
    for step in train["base_nll"]:
        print(f"| {step} | {train['base_nll'][step]:.4f} | {train['mixed_nll'].get(step, float('nan')):.4f} | "
              f"{gain.get(step, float('nan')):+.4f} | {weight.get(step, float('nan')):.4f} |")
    val = {key: dict(series(rows, f"val/{key}")) for key, _ in CURVES}
    if val["base_nll"]:
        print("\n| val at step | base NLL | mixed NLL |\n|---|---|---|")
        for step, base in val["base_nll"].items():
            print(f"| {step} | {base:.4f} | {val['mixed_nll'].get(step, float('nan')):.4f} |")


if __name__ == "__main__":
    main()
