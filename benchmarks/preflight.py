"""How good the trainer's pre-flight is: its memory estimate against a real training step's peak memory, and
the SHA-256 rate that prices `--data.verify=sha256`.

    python -m benchmarks.preflight [--cases resnet18:64:128,resnet50:32:64] [--shards DIR] [--report FILE]

Each case `arch:batch:res` runs two SGD steps of the trainer's model (BlurPool, channels_last, label
smoothing, fp32) in a fresh process on the CPU and reads its peak RSS (VmHWM, reset through /proc/self/clear_refs
once torch is imported) over what the interpreter and torch held before the model existed; the estimate is train.preflight's, for the same settings, without the input
pipeline and the fixed base (neither is in the measured process). Ratio > 1: the estimate is on the safe
side. The hash rate is measured on the shards of --shards (or 256 MiB of random bytes). Prints a table;
`--report FILE` appends it (docs/BENCHMARKS.md holds the ones worth keeping).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from preprocess.cli import ArgumentParser
from benchmarks.report import add_report_flags, append_result, cpu_description, report_path

STEP = r"""
import json, sys, torch
from train import config
from train.model import build_model, build_optimizer
arch, batch, res = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(1)
cfg = config.resolve("rn50", [f"model.arch={arch}", f"data.batch_size={batch}"])
def status_kib(key):  # a /proc/self/status line, in KiB
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))
before = status_kib("VmRSS")  # resident now, what the interpreter and torch hold
try:  # reset the peak to what is resident now (Linux >= 4.0), so the import's own high-water mark does not count
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass  # older kernel: VmHWM stays the process's peak, measured from its resident size
model = build_model(cfg.model, 1000).to(memory_format=torch.channels_last)
optimizer = build_optimizer(model, cfg.optim, 0.1)
criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
for _ in range(2):
    images = torch.randn(batch, 3, res, res).to(memory_format=torch.channels_last)
    loss = criterion(model(images), torch.randint(0, 1000, (batch,)))
    optimizer.zero_grad(); loss.backward(); optimizer.step()
print(json.dumps({"peak": (status_kib("VmHWM") - before) * 1024}))
"""


def measure_case(arch: str, batch: int, res: int) -> dict:
    from train import config, preflight

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", STEP, arch, str(batch), str(res)], capture_output=True, text=True,
                         env=env, timeout=1800, check=True).stdout
    peak = json.loads(out.strip().splitlines()[-1])["peak"]
    if peak <= 0:  # the step stayed under the import's own high-water mark: nothing to compare
        raise RuntimeError(f"{arch} batch {batch} at {res} px: too small to measure (peak RSS did not rise); "
                           f"use a larger case")
    cfg = config.resolve("rn50", [f"model.arch={arch}", f"data.batch_size={batch}", f"schedule.res_min={res}",
                                  f"schedule.res_max={res}", "schedule.res_multiple=1"])
    parts = preflight.estimate_memory(cfg, 1000, amp_dtype=None, max_side=res)
    estimate = parts["weights, gradients, optimizer"] + parts["activations"]
    return {"case": f"{arch}, batch {batch}, {res} px", "estimate MiB": round(estimate / 2**20),
            "measured peak MiB": round(peak / 2**20), "estimate / measured": round(estimate / peak, 2)}


def hash_rate(shards: Path | None, mib: int = 256) -> dict:
    from train import preflight

    if shards is not None:
        files = sorted(shards.glob("*/*.tar"))
        size = sum(f.stat().st_size for f in files)
        start = time.perf_counter()
        for f in files:
            preflight.file_sha256(f)
        what = f"{len(files)} shards of {shards}"
    else:
        data = os.urandom(mib * 2**20)
        size, start = len(data), time.perf_counter()
        hashlib.sha256(data).hexdigest()
        what = f"{mib} MiB in memory"
    seconds = time.perf_counter() - start
    return {"case": f"SHA-256 of {what}", "GiB/s": round(size / 2**30 / seconds, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m benchmarks.preflight", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="resnet18:64:128,resnet50:32:64,resnet50:64:96",
                        help="comma-separated arch:batch:res (pixels) training steps to measure")
    parser.add_argument("--shards", type=Path, help="a shard folder to hash (default: random bytes in memory)")
    parser.add_argument("--hash-mib", type=int, default=256, help="MiB of random bytes to hash without --shards")
    add_report_flags(parser)
    args = parser.parse_args(argv)
    rows = []
    for case in args.cases.split(","):
        try:
            arch, batch, res = case.split(":")
            rows.append(measure_case(arch, int(batch), int(res)))
        except ValueError:
            parser.error(f"--cases: {case!r} is not arch:batch:res")
        print(rows[-1], flush=True)
    rows.append(hash_rate(args.shards, args.hash_mib))
    print(rows[-1])
    target = report_path(args.report, args.no_report)
    if target is not None:
        load = os.getloadavg()[0]
        append_result("Pre-flight", rows, "python -m benchmarks.preflight " + " ".join(argv or sys.argv[1:]),
                      f"{cpu_description()}, load average {load:.1f}", path=target)
        print(f"appended to {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
