"""`python -m benchmarks.train_step`: training images/s of one ResNet-50 step per resolution, on synthetic tensors.

    python -m benchmarks.train_step --res 160 192 224 --batch-size 256 [--compile] [--device cuda] [--steps 50]

Two steps are timed at each resolution (forward, backward, SGD update; no data loading):
  ours       the trainer's step (train.engine.train_step): the rn50 recipe model (BlurPool), channels_last,
             bf16 autocast where the GPU has it (else fp16 + GradScaler), fp32 on the CPU, fused SGD on a GPU;
             its input is what the trainer's loader delivers: images in the autocast dtype (bf16), NHWC;
             --compile: torch.compile
  reference  plain torchvision resnet50 in NCHW, fp16 autocast + GradScaler on a GPU, fp32 on the CPU, eager
"% of peak" divides the achieved FLOP rate by the GPU's dense bf16 tensor peak (table below). FLOPs per
image: 24.6 GFLOP at 224 px (3 x 8.2 GFLOP forward), scaled by (res/224)^2; BlurPool's extra FLOPs are
not counted, so the figure is useful-work utilisation. Results are printed; `--report FILE` appends them
as an entry in section "Train step" (docs/BENCHMARKS.md keeps the ones worth keeping).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from preprocess.cli import ArgumentParser
from benchmarks.report import add_report_flags, append_result, cpu_description, report_path

TRAIN_GFLOP_224 = 24.6  # forward + backward of ResNet-50 per 224 px image
# Dense bf16 tensor-core peaks in TFLOP/s (vendor datasheets, without sparsity); first match wins.
BF16_PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0),
                    ("L40S", 362.0), ("L40", 181.0), ("A10G", 70.0), ("L4", 121.0)]


def bf16_peak_tflops(device_name: str) -> float | None:
    for key, peak in BF16_PEAK_TFLOPS:
        if key in device_name:
            return peak
    return None


def train_gflop(res: int) -> float:
    return TRAIN_GFLOP_224 * (res / 224) ** 2


def build_step(kind: str, device: torch.device, batch_size: int, res: int, compile_model: bool,
               precision: str = "auto", arch: str = "resnet50"):
    """A zero-argument callable doing one training step, and a description of its settings."""
    import torchvision

    from train.config import ModelConfig, OptimConfig
    from train.engine import pick_precision, train_step
    from train.model import build_model, build_optimizer

    cuda = device.type == "cuda"
    if kind == "ours":
        model = build_model(ModelConfig(arch=arch), num_classes=1000).to(device, memory_format=torch.channels_last)
        optimizer = build_optimizer(model, OptimConfig(), lr=0.1)
        amp_dtype = pick_precision(precision, device.type)
        memory_format = torch.channels_last
        criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
        if compile_model:
            model = torch.compile(model, dynamic=False)  # as the trainer: one static graph per resolution
    else:
        model = getattr(torchvision.models, arch)(num_classes=1000).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        amp_dtype = torch.float16 if cuda else None
        memory_format = torch.contiguous_format
        criterion = nn.CrossEntropyLoss()
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    # The trainer's loader hands over images already in the autocast dtype; the reference gets fp32.
    input_dtype = (amp_dtype or torch.float32) if kind == "ours" else torch.float32
    images = torch.randn(batch_size, 3, res, res, device=device, dtype=input_dtype).contiguous(
        memory_format=memory_format)
    labels = torch.randint(0, 1000, (batch_size,), device=device)
    precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16+GradScaler"}[amp_dtype]
    settings = {"precision": precision, "input": str(input_dtype).removeprefix("torch."),
                "layout": "NHWC" if memory_format == torch.channels_last else "NCHW",
                "compile": compile_model and kind == "ours"}
    return (lambda: train_step(model, images, labels, optimizer, criterion, scaler, amp_dtype)), settings


def time_steps(step, device: torch.device, warmup: int, steps: int) -> float:
    """Seconds per step after `warmup` untimed steps."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps


def run(resolutions: list[int], batch_size: int, device: torch.device, steps: int, warmup: int,
        compile_model: bool, kinds=("ours", "reference"), precision: str = "auto", json_path=None,
        arch: str = "resnet50") -> list[dict]:
    """One row per (resolution, kind); each row is also appended to `json_path` (JSON lines) as soon as it
    is measured, so a run stopped by a time limit keeps what it measured."""
    peak = bf16_peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    rows = []
    for res in resolutions:
        for kind in kinds:
            step, settings = build_step(kind, device, batch_size, res, compile_model, precision, arch)
            began = time.perf_counter()
            seconds = time_steps(step, device, warmup, steps)
            images_per_s = batch_size / seconds
            tflops = images_per_s * train_gflop(res) / 1000
            rows.append({"step": kind, "res": res, "batch": batch_size, **settings,
                         "images/s": round(images_per_s, 1), "TFLOP/s": round(tflops, 2),
                         "% of bf16 peak": f"{100 * tflops / peak:.1f}" if peak else "n/a",
                         "warm-up + timed s": round(time.perf_counter() - began, 1)})
            print(" | ".join(f"{k} {v}" for k, v in rows[-1].items()), flush=True)
            if json_path:
                with open(json_path, "a") as f:
                    f.write(json.dumps(rows[-1]) + "\n")
            del step
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--res", type=int, nargs="+", default=[160, 192, 224], help="resolutions, pixels (default 160 192 224)")
    p.add_argument("--batch-size", type=int, default=256, help="images per step (default 256)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile our step (not the reference)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per measurement (default 30)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; 10 with --compile)")
    p.add_argument("--only", choices=["ours", "reference"], default=None, help="time one of the two steps only")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="our step's autocast dtype (auto: as the trainer picks it)")
    p.add_argument("--json", type=Path, default=None, help="also append each row to this file as a JSON line")
    p.add_argument("--arch", choices=["resnet50", "resnet18"], default="resnet50",
                   help="resnet18 only for quick CPU dry runs (the FLOP figures assume resnet50)")
    add_report_flags(p)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    if min(args.res) < 32 or args.batch_size < 1 or args.steps < 1:
        p.error("--res must be >= 32 pixels, --batch-size and --steps >= 1")

    device = torch.device(args.device)
    if device.type == "cuda":  # the trainer's runtime settings (train.main.configure_runtime)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if device.type == "cpu":
        torch.manual_seed(0)
    warmup = args.warmup if args.warmup is not None else (10 if args.compile else 3)
    load = os.getloadavg()[0]
    kinds = (args.only,) if args.only else ("ours", "reference")
    rows = run(args.res, args.batch_size, device, args.steps, warmup, args.compile, kinds, args.precision, args.json,
               args.arch)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_description()
    command = "python -m benchmarks.train_step " + " ".join(sys.argv[1:] if argv is None else argv)
    notes = (f"Synthetic tensors, no data loading; {warmup} warm-up + {args.steps} timed steps; torch "
             f"{torch.__version__}, {torch.get_num_threads()} CPU threads. FLOPs: 24.6 GFLOP per 224 px image "
             f"x (res/224)^2. 1-min load average at start {load:.2f}"
             + (" (shared machine: other jobs may have been running)." if device.type == "cpu" else "."))
    target = report_path(args.report, args.no_report)
    if target is not None:
        append_result("Train step", rows, command, name, notes, path=target)
        print(f"appended to {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
