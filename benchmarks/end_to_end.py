"""`python -m benchmarks.end_to_end`: the whole chain, stage by stage, with the accuracy it reaches.

By default this is the `make demo` chain on the built-in synthetic set with the `smoke` preset (CPU):
synthetic parquet -> shards -> training -> Grad-CAM. With --data it skips the first two stages and trains
on existing shards (e.g. ImageNet on a GPU box, with --config rn50 and torchrun-free single process).
Each stage runs as its own process, exactly as a user would type it; the table gives wall seconds per
stage, the training's mean images/s and final top-1 from RUN_DIR/metrics.jsonl.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from preprocess.cli import ArgumentParser
from benchmarks.report import add_report_flags, append_result, cpu_description, report_path


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m benchmarks.end_to_end",
                                description="Time every stage of the pipeline and record the top-1 it reaches.")
    p.add_argument("--data", type=Path, default=None, help="existing shards (default: build the synthetic demo set)")
    p.add_argument("--config", default="smoke", help="training preset or YAML (default smoke)")
    p.add_argument("--work", type=Path, default=None, help="folder for the outputs (default: a temp folder)")
    add_report_flags(p)
    p.epilog = "Any --section.key=value argument is passed on to train.main, e.g. --schedule.epochs=2."
    args, overrides = p.parse_known_args(argv)
    bad = [o for o in overrides if not (o.startswith("--") and "." in o.split("=", 1)[0])]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")

    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        stages = []
        data = args.data
        if data is None:
            data = work / "shards"
            stages.append(("synthetic data", timed([py, "-m", "preprocess.synthetic", "--out", str(work / "parquet")])))
            stages.append(("shard", timed([py, "-m", "preprocess.shard", "--src", str(work / "parquet"), "--out",
                                           str(data), "--images-per-shard", "250", "--no-progress"])))
        run_dir = work / "run"
        stages.append(("train + eval", timed([py, "-m", "train.main", "--data", str(data), "--out", str(run_dir),
                                              "--config", args.config, *overrides])))
        stages.append(("grad-cam", timed([py, "-m", "viz.gradcam", "--checkpoint", str(run_dir / "checkpoints" / "best.pt"),
                                          "--data", str(data), "--output", str(work / "gradcam.png"), "--num-show", "6",
                                          "--no-progress"])))
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]

    last = metrics[-1]
    rows = [{"stage": name, "seconds": round(seconds, 1)} for name, seconds in stages]
    rows.append({"stage": "total", "seconds": round(sum(s for _, s in stages), 1)})
    mean_rate = sum(m["images_per_s"] for m in metrics) / len(metrics)
    top5 = f"{100 * last['top5']:.2f}%" if "top5" in last else "n/a"  # n/a: 5 classes or fewer
    summary = (f"final top-1 {100 * last['top1']:.2f}% (top-5 {top5}) on {last['val_images']} val "
               f"images after {last['epoch']} epochs; training {mean_rate:.0f} images/s averaged over epochs")
    for row in rows:
        print(f"{row['stage']:>16}: {row['seconds']:8.1f} s")
    print(summary)
    target = report_path(args.report, args.no_report)
    if target is not None:
        command = "python -m benchmarks.end_to_end " + shlex.join(argv if argv is not None else sys.argv[1:])
        append_result("End to end", rows, command=command.strip(), device=cpu_description(),
                      notes=f"data: {args.data or 'built-in synthetic set (10 classes, 1200 train / 300 val, 96 px)'}; "
                            f"preset {args.config}; {summary}", path=target)
        print(f"appended to {target}")
    print(f"end-to-end top-1: {100 * last['top1']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
