"""`python -m viz.plots RUN_DIR`: the training curves of a run, from RUN_DIR/metrics.jsonl, as one PNG.

metrics.jsonl holds one JSON object per line with (at least) `epoch` and some of train_loss, top1, top5,
lr, resolution, images_per_s, seconds. A resumed run may log an epoch twice: the last line wins. Epochs
without validation simply have no top-1 point. viz.report draws its per-class chart with this module too.
Class names and run names in any script: viz.fonts picks the fonts.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import BinaryIO

from preprocess.cli import ArgumentParser
from viz import fonts

METRICS = "metrics.jsonl"
DPI = 100  # figure inches -> PNG pixels
MAX_NAMED = 60  # classes named on the per-class chart's x axis; more: every k-th
NAME_CHARS = 24  # a longer class name is cut on that axis
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


def counted(n: int, singular: str, plural: str | None = None) -> str:
    """'1 epoch', '2 epochs', '1 class', '3 classes'."""
    return f"{n:,} {singular if n == 1 else plural or singular + 's'}"


def curves_title(run_dir: Path, records: list[dict]) -> str:
    return f"{run_dir.resolve().name}: {counted(len(records), 'epoch')}"


def draw_curves(records: list[dict], title: str):
    """The figure (matplotlib Figure, not yet saved): 2 x 3 panels, one per PANELS entry, against epoch."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    whole_epochs = all(float(r["epoch"]).is_integer() for r in records)
    fig = Figure(figsize=(15, 8), layout="constrained")
    fig.suptitle(title)
    for ax, (name, unit, keys) in zip(fig.subplots(2, 3).flat, PANELS):
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
        if whole_epochs:  # no tick at epoch 0.5 when every logged epoch is whole
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
    return fig


def plot_curves(records: list[dict], out: Path | BinaryIO, title: str, who: str = "viz.plots") -> None:
    """The curves as a PNG written to `out` (a path, written as named, or a binary file)."""
    with fonts.any_script(who):
        draw_curves(records, title).savefig(out, format="png", dpi=DPI)


def short(name: str, chars: int = NAME_CHARS) -> str:
    return name if len(name) <= chars else name[:chars - 1].rstrip() + "\u2026"


def draw_class_accuracy(names: list[str], accuracies: list[float], title: str):
    """Per-class top-1 (%), classes sorted from worst to best: where the model is weak at a glance. Every
    class is named on the x axis when there are at most MAX_NAMED, else every k-th one."""
    from matplotlib.figure import Figure

    if len(names) != len(accuracies):
        raise ValueError(f"{len(names)} class names for {len(accuracies)} accuracies")
    ranked = sorted(zip(accuracies, range(len(names))))  # ties keep class order
    values = [100 * a for a, _ in ranked]
    fig = Figure(figsize=(10, 4.4), layout="constrained")
    ax = fig.subplots()
    ax.bar(range(len(values)), values, width=1.0 if len(values) > MAX_NAMED else 0.8, color="#4878a8")
    ax.axhline(sum(values) / max(len(values), 1), color="#c03030", linewidth=1, label="mean over classes")
    step = max(1, -(-len(values) // MAX_NAMED))
    ticks = list(range(0, len(values), step))
    ax.set_xticks(ticks, [short(names[ranked[i][1]]) for i in ticks], rotation=90, fontsize=8)
    ax.set_xlim(-0.5, len(values) - 0.5)
    ax.set_ylim(0, 100)
    ax.set_xlabel("classes, worst to best" + (f" (one named per {step})" if step > 1 else ""))
    ax.set_ylabel("top-1 %")
    ax.set_title(title)
    ax.legend(loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    return fig


def plot_class_accuracy(names: list[str], accuracies: list[float], out: Path | BinaryIO, title: str,
                        who: str = "viz.plots") -> None:
    """The per-class chart as a PNG written to `out` (a path, written as named, or a binary file)."""
    with fonts.any_script(who):
        draw_class_accuracy(names, accuracies, title).savefig(out, format="png", dpi=DPI)


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m viz.plots",
                                description="Plot loss, top-1/top-5, LR, resolution, images/s and epoch time per "
                                            "epoch from RUN_DIR/metrics.jsonl.")
    p.add_argument("run_dir", type=Path, help="a training run folder (holds metrics.jsonl)")
    p.add_argument("--output", "--out", dest="output", type=Path, default=None,
                   help="PNG to write (default RUN_DIR/curves.png; .png is added to a name without a suffix, "
                        "curves.png to a folder)")
    return p.parse_args(argv)


def output_path(output: Path | None, run_dir: Path) -> Path:
    """The file --output names: what is written and printed."""
    if output is None:
        return run_dir / "curves.png"
    if output.is_dir():
        return output / "curves.png"
    if not output.suffix:
        return output.with_name(output.name + ".png")
    if output.suffix.lower() != ".png":
        raise PlotError(f"--output {output}: expected a .png file name")
    return output


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        out = output_path(args.output, args.run_dir)
        if not args.run_dir.is_dir():
            raise PlotError(f"{args.run_dir}: no such directory")
        records = read_metrics(args.run_dir / METRICS)
        out.parent.mkdir(parents=True, exist_ok=True)
        plot_curves(records, out, curves_title(args.run_dir, records))
    except (PlotError, OSError) as exc:
        print(f"viz.plots: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
