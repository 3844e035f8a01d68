"""`python -m benchmarks.viz_eval`: how fast viz evaluates a validation split and draws Grad-CAM rows.

Times the two stages of `viz.gradcam` / `viz.report` on one device: the evaluation pass (train.data's DALI
validation pipeline + train.engine.eval_logits on a randomly initialised torchvision model; the weights do
not change the speed), wall time from the first batch requested to the last prediction, pipeline build
included; and --cams Grad-CAM rows (each: the image fetched again, decoded, and the CAMs of two classes),
computed in one batched run. Without --data, photo-like JPEGs (benchmarks.photos, ~ImageNet's size after
preprocessing) are written as val shards to a temporary folder first. On a GPU, DALI decodes there too.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

from preprocess.cli import ArgumentParser
from benchmarks.report import add_report_flags, append_result, cpu_description, report_path
from preprocess.manifest import MANIFEST


def write_val_shards(out: Path, images: int, max_side: int) -> Path:
    """benchmarks.dataloader's synthetic shards, relabelled as a val split."""
    from benchmarks.dataloader import write_synthetic_shards

    write_synthetic_shards(out, images, max_side=max_side)
    (out / "train").rename(out / "val")
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["splits"] = {"val": manifest["splits"]["train"]}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(data_dir: Path, *, arch: str, device: torch.device, res: int, batch_size: int, threads: int,
            limit: int | None, cams: int, flip: bool) -> list[dict]:
    from viz.cam import cam_pairs
    from viz.datasets import open_data
    from viz.gradcam import run_evaluation
    from viz import loader

    data = open_data(data_dir)
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=len(data.classes)).eval().to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    amp = torch.bfloat16 if device.type == "cuda" else None
    result = run_evaluation(model, data, res=res, crop_ratio=0.875, batch_size=batch_size, limit=limit,
                            threads=threads, flip=flip, amp_dtype=amp, progress=False)
    sync(device)
    images = len(result.predictions)
    rows = [{"stage": "evaluate", "device": device.type, "arch": arch, "res": res, "batch": batch_size,
             "threads": threads, "flip": flip, "images": images, "seconds": round(result.seconds, 2),
             "images/s": round(images / result.seconds, 1)}]
    if cams:
        start = time.perf_counter()
        chosen = result.predictions[:cams]
        fetched = loader.fetch_images(data, [p.index for p in chosen], res=res, crop_ratio=0.875,
                                      device="gpu" if device.type == "cuda" else "cpu", num_threads=threads)
        stacked = torch.stack([fetched[p.index] for p in chosen])
        cam_pairs(model, model.layer4[-1], stacked, [p.predicted for p in chosen], [p.label for p in chosen])
        sync(device)
        seconds = time.perf_counter() - start
        rows.append({"stage": "gradcam rows", "device": device.type, "arch": arch, "res": res, "batch": 32,
                     "threads": threads, "flip": False, "images": len(chosen), "seconds": round(seconds, 2),
                     "images/s": round(len(chosen) / seconds, 1)})
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m benchmarks.viz_eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=None,
                   help="validation data (shards or a folder layout viz reads); default: synthetic val shards")
    p.add_argument("--images", type=int, default=512, help="synthetic images to write without --data (default 512)")
    p.add_argument("--max-side", type=int, default=500, help="longer side of the synthetic JPEGs, px (default 500)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--arch", default="resnet50", choices=["resnet18", "resnet50"])
    p.add_argument("--res", type=int, default=224, help="centre-crop side, px (default 224)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1), help="DALI threads")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    p.add_argument("--cams", type=int, default=20, help="Grad-CAM rows to time (default 20; 0: none)")
    p.add_argument("--flip", action="store_true", help="average with the mirror image (two forward passes)")
    add_report_flags(p)
    p.add_argument("--notes", default="", help="appended to the entry's notes")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks.viz_eval: error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="viz-eval-bench-") as tmp:
        if args.data is None:
            data_dir = write_val_shards(Path(tmp), args.images, args.max_side)
            source = f"{args.images} synthetic photo-like JPEGs as val shards, <= {args.max_side} px, quality 90"
        else:
            data_dir, source = args.data, str(args.data)
        rows = measure(data_dir, arch=args.arch, device=device, res=args.res, batch_size=args.batch_size,
                       threads=args.threads, limit=args.limit, cams=args.cams, flip=args.flip)
    for row in rows:
        print(", ".join(f"{k} {v}" for k, v in row.items()))
    target = report_path(args.report, args.no_report)
    if target is not None:
        name = torch.cuda.get_device_name(0) + " + " if device.type == "cuda" else ""
        notes = (f"data: {source}; random-init weights; evaluation time includes DALI pipeline build. 1-min load "
                 f"average at start {load:.2f} on {os.cpu_count()} cores (shared machine: other jobs may have "
                 f"been running). {args.notes}").strip()
        command = "python -m benchmarks.viz_eval " + shlex.join(sys.argv[1:] if argv is None else argv)
        path = append_result("viz evaluation", rows, command, name + cpu_description(), notes, path=target)
        print(f"appended to {path}")
    print(f"viz evaluate images/s: {rows[0]['images/s']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
