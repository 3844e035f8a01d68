"""`python -m viz.plots RUN_DIR`: the training curves of a run, from RUN_DIR/metrics.jsonl, as one PNG.

metrics.jsonl holds one JSON object per line with (at least) `epoch` and some of train_loss, top1, top5,
lr, resolution, images_per_s, seconds. A resumed run may log an epoch twice: the last line wins. Epochs
without validation simply have no top-1 point.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

METRICS = "metrics.jsonl"
# (panel title, y label, [(key, legend label)])
PANELS = (
    ("loss", "cross-entropy", [("train_loss", "train"), ("val_loss", "val")]),
    ("accuracy", "%", [("top1", "top-1"), ("top5", "top-5")]),
    ("learning rate", "lr", [("lr", None)]),
    ("training resolution", "pixels", [("resolution", None)]),
    ("throughput", "images/s", [("images_per_s", None)]),
    ("epoch time", "seconds", [("seconds", None)]),
)


class PlotError(ValueError):
    """A run folder or metrics file that cannot be plotted; the message names the path."""


def read_metrics(path: Path) -> list[dict]:
    """One record per epoch, in epoch order (the last line of a repeated epoch wins)."""
    if not path.is_file():
        raise PlotError(f"{path}: no such file; is the folder a training run (python -m train.main)?")
    by_epoch: dict[float, dict] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PlotError(f"{path}:{n}: not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict) or not isinstance(record.get("epoch"), (int, float)):
            raise PlotError(f"{path}:{n}: expected a JSON object with a numeric 'epoch'")
        by_epoch[record["epoch"]] = record
    if not by_epoch:
        raise PlotError(f"{path}: empty; no epoch has finished yet")
    return [by_epoch[e] for e in sorted(by_epoch)]


def series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) where `key` has a finite number."""
    points = [(r["epoch"], float(r[key])) for r in records
              if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in points], [p[1] for p in points]


def as_percent(values: list[float]) -> list[float]:
    # Accuracy may be logged as a fraction or as a percentage; a run never above 1 is taken as fractions.
    return [100 * v for v in values] if values and max(values) <= 1.0 else values


def plot_curves(records: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8), constrained_layout=True)
    fig.suptitle(title)
    for ax, (name, unit, keys) in zip(axes.flat, PANELS):
        drawn = 0
        for key, label in keys:
            epochs, values = series(records, key)
            if not values:
                continue
            if key in ("top1", "top5"):
                values = as_percent(values)
            ax.plot(epochs, values, marker="o", markersize=3, label=label)
            drawn += 1
            if key == "top1":
                best = max(range(len(values)), key=values.__getitem__)
                ax.annotate(f"best {values[best]:.2f}", (epochs[best], values[best]), textcoords="offset points",
                            xytext=(0, -14), ha="center", fontsize=9)
        if not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
        elif any(label for _, label in keys):
            ax.legend()
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_class_accuracy(accuracies: list[float], out: Path, title: str) -> None:
    """Per-class top-1 (%), classes sorted from worst to best: where the model is weak at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = sorted(100 * a for a in accuracies)
    fig, ax = plt.subplots(figsize=(10, 3.2), constrained_layout=True)
    ax.bar(range(len(values)), values, width=1.0, color="#4878a8")
    ax.axhline(sum(values) / max(len(values), 1), color="#c03030", linewidth=1, label="mean over classes")
    ax.set_xlim(-0.5, len(values) - 0.5)
    ax.set_ylim(0, 100)
    ax.set_xlabel("classes, worst to best")
    ax.set_ylabel("top-1 %")
    ax.set_title(title)
    ax.legend(loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m viz.plots",
                                description="Plot loss, top-1/top-5, LR, resolution, images/s and epoch time per "
                                            "epoch from RUN_DIR/metrics.jsonl.")
    p.add_argument("run_dir", type=Path, help="a training run folder (holds metrics.jsonl)")
    p.add_argument("--output", type=Path, default=None, help="PNG to write (default RUN_DIR/curves.png)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.output or args.run_dir / "curves.png"
    try:
        if not args.run_dir.is_dir():
            raise PlotError(f"{args.run_dir}: no such directory")
        records = read_metrics(args.run_dir / METRICS)
        out.parent.mkdir(parents=True, exist_ok=True)
        plot_curves(records, out, f"{args.run_dir.resolve().name}: {len(records)} epochs")
    except (PlotError, OSError) as exc:
        print(f"viz.plots: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
