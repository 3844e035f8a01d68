"""`python -m benchmarks.dataloader`: steady-state images/s of the DALI training pipeline (train.data),
and with --baseline of the torchvision DataLoader path given the same CPU budget (threads = workers).

What is timed: after --warmup batches, every batch produced in --seconds of wall time (on a GPU the
device is synchronised at both ends). DALI runs the training pipeline continuously, its reader wrapping
around the data, so the figure does not depend on the dataset being large; what a new epoch costs
once (building its pipeline and reaching the first batch) is reported apart as "epoch setup s".
"CPU cores busy" is the CPU time of this process and its live children (DataLoader workers) divided by
the wall time; on a shared machine "images/s per busy core" is the steadier figure.
Without --data, photo-like JPEGs (benchmarks.photos, 500 px longest side, quality 90, ~100 KB like
preprocessed ImageNet) are written as shards to a temporary folder first.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from preprocess.cli import ArgumentParser
from benchmarks.report import add_report_flags, append_result, cpu_description, markdown_table, report_path
from preprocess.manifest import MANIFEST, load_manifest, split_shards
from preprocess.writer import ShardWriter, shard_name
from train import data

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def write_synthetic_shards(out: Path, images: int, *, classes: int = 10, max_side: int = 500, quality: int = 90,
                           per_shard: int = 64, seed: int = 0) -> Path:
    """A train split of photo-like JPEGs (label i % classes) as tar shards + manifest.json under `out`."""
    from benchmarks.photos import photo_jpegs

    split_dir = out / "train"
    split_dir.mkdir(parents=True, exist_ok=True)
    shards, writer = [], None
    for i, jpeg in enumerate(photo_jpegs(images, seed=seed, quality=quality, max_side=max_side)):
        if i % per_shard == 0:
            if writer is not None:
                shards.append(vars(writer.close()))
            writer = ShardWriter(split_dir, shard_name(len(shards)))
        writer.write(f"photo_{i:07d}", jpeg, i % classes)
    shards.append(vars(writer.close()))
    manifest = {"format_version": 1, "num_classes": classes,
                "classes": [{"index": c, "wnid": f"synthetic{c:04d}", "name": f"class {c}"} for c in range(classes)],
                "splits": {"train": {"images": images, "shards": shards,
                                     "per_class": [len(range(c, images, classes)) for c in range(classes)]}},
                "source": {"kind": "benchmarks.dataloader synthetic", "max_side": max_side, "quality": quality},
                "settings": {"max_side": max_side, "quality": quality, "images_per_shard": per_shard}}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads) and its live child processes."""
    times = os.times()
    total = times.user + times.system
    tick = os.sysconf("SC_CLK_TCK")
    me = os.getpid()
    for entry in Path("/proc").iterdir() if Path("/proc/self/stat").exists() else ():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[1]) == me:  # fields[1] is the parent pid; utime, stime are fields 11 and 12 after ")"
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def measure(batches, batch_size: int, seconds: float, warmup: int, sync) -> dict:
    """images/s and CPU cores busy over `seconds` of steady state, after `warmup` batches."""
    for _ in range(warmup):
        next(batches)
    sync()
    cpu0, t0, count = cpu_seconds(), time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        next(batches)
        count += 1
    sync()
    wall = time.perf_counter() - t0
    busy = (cpu_seconds() - cpu0) / wall
    rate = count * batch_size / wall
    return {"images/s": round(rate, 1), "CPU cores busy": round(busy, 2),
            "images/s per busy core": round(rate / busy, 1) if busy > 0 else "n/a", "batches": count}


def dali_batches(pipe, dtype, classes: int, device_id: int | None):
    """Batches as the trainer takes them (train.data's `_run_pipe`, `batch_to_torch`, `_InFlight`): on a GPU
    bound to torch's stream and cast to the training dtype, the DALI outputs held until torch is done."""
    in_flight = data._InFlight(device_id)
    try:
        while True:
            images, labels = data._run_pipe(pipe, device_id)
            yield data.batch_to_torch(images, labels, dtype, classes)
            in_flight.hold((images, labels))
    finally:
        in_flight.release()


def measure_dali(data_dir: Path, device: str, threads: int, res: int, batch_size: int, dtype: torch.dtype,
                 seconds: float, warmup: int, decode: str = "fused", hw_decoder_load: float = data.HW_DECODER_LOAD_AUTO,
                 prefetch_depth: int = data.PREFETCH_DEPTH) -> dict:
    manifest = load_manifest(data_dir)
    shards = split_shards(data_dir, "train", manifest)
    device_id = 0 if device == "gpu" else None
    sync = torch.cuda.synchronize if device == "gpu" else (lambda: None)
    start = time.perf_counter()
    pipe = data.build_train_pipeline([t for t, _ in shards], [i for _, i in shards], batch_size=batch_size, res=res,
                                     device_id=device_id, num_threads=threads, dtype=dtype, decode=decode,
                                     max_side=data.manifest_max_side(manifest), hw_decoder_load=hw_decoder_load,
                                     prefetch_depth=prefetch_depth)
    batches = dali_batches(pipe, dtype, int(manifest["num_classes"]), device_id)
    next(batches)
    sync()
    setup = time.perf_counter() - start
    result = measure(batches, batch_size, seconds, warmup, sync)
    load = data.default_hw_decoder_load(device_id) if hw_decoder_load == data.HW_DECODER_LOAD_AUTO else hw_decoder_load
    return {"pipeline": f"dali-{device}" + ("" if decode == "fused" else f"-{decode}"), "device": device,
            "threads": threads, "res": res, "batch": batch_size, **result, "epoch setup s": round(setup, 2),
            "dtype": str(dtype).removeprefix("torch."), "hw decoder load": load if device == "gpu" else "n/a",
            "prefetch": prefetch_depth}


def _python_rate(stop: threading.Event, counts: list) -> None:
    """Counts loop iterations of plain Python until `stop`: how far another thread gets while the GIL is held."""
    n = 0
    while not stop.is_set():
        for _ in range(1000):
            n += 1
        counts[0] = n


def _python_speed(seconds: float, during=None) -> tuple[float, float]:
    """(iterations/s of a counting thread, wall seconds) while `during()` runs, or for `seconds` alone."""
    stop, counts = threading.Event(), [0]
    thread = threading.Thread(target=_python_rate, args=(stop, counts), daemon=True)
    start = time.perf_counter()
    thread.start()
    if during is None:
        time.sleep(seconds)
    else:
        during()
    wall = time.perf_counter() - start
    stop.set()
    thread.join()
    return counts[0] / wall, wall


def measure_build(shards: int, device: str, threads: int, res: int, batch_size: int) -> dict:
    """Seconds to build the training pipeline over `shards` fabricated shards (2 small JPEGs each, so the
    index count is ImageNet's 1,281 at the default while the files stay tiny), the first batch after it,
    and how fast another Python thread ran meanwhile (DALI holds the GIL while it builds; the trainer
    builds the next epoch's pipeline during validation)."""
    from benchmarks.photos import photo_jpegs

    device_id = 0 if device == "gpu" else None
    with tempfile.TemporaryDirectory(prefix="dataloader-build-") as tmp:
        split_dir = Path(tmp) / "train"
        split_dir.mkdir()
        jpegs = list(photo_jpegs(2, seed=0, quality=90, max_side=64))
        tars, idxs = [], []
        for i in range(shards):
            writer = ShardWriter(split_dir, shard_name(i))
            for j, jpeg in enumerate(jpegs):
                writer.write(f"s{i:05d}_{j}", jpeg, j)
            writer.close()
            tars.append(writer.tar_path)
            idxs.append(writer.idx_path)
        alone, _ = _python_speed(0.5)
        box = {}

        def build():
            box["pipe"] = data.build_train_pipeline([str(t) for t in tars], [str(x) for x in idxs],
                                                    batch_size=batch_size, res=res, device_id=device_id,
                                                    num_threads=threads)

        during, build_s = _python_speed(0, build)
        start = time.perf_counter()
        data._run_pipe(box["pipe"], device_id)
        first_s = time.perf_counter() - start
        del box["pipe"]
    return {"pipeline": f"pipeline-build dali-{device}", "shards": shards, "threads": threads, "build s": round(build_s, 3),
            "first batch s": round(first_s, 3),
            "other Python thread during build, % of its speed": round(100 * during / alone, 1) if alone else "n/a"}


def measure_baseline(data_dir: Path, workers: int, res: int, batch_size: int, seconds: float, warmup: int) -> dict:
    # Enough samples that no epoch boundary (and its worker restart stall) falls in the timed window.
    loader = data.build_baseline_loader(data_dir, batch_size, res, num_workers=workers, num_samples=batch_size * 10**6)
    start = time.perf_counter()
    batches = iter(loader)
    next(batches)
    setup = time.perf_counter() - start
    try:
        result = measure(batches, batch_size, seconds, warmup, lambda: None)
    finally:
        del batches  # shuts the workers down
    return {"pipeline": "torchvision-dataloader", "device": "cpu", "threads": workers, "res": res,
            "batch": batch_size, **result, "epoch setup s": round(setup, 2)}


def print_table(rows: list[dict]) -> None:
    columns = list(dict.fromkeys(c for row in rows for c in row))  # the union, in first-seen order
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in rows:
        print("  ".join(str(row.get(c, "")).rjust(w) for c, w in zip(columns, widths)))


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m benchmarks.dataloader", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, default=None,
                   help="shard folder from `python -m preprocess.shard` (its train split is read); "
                        "default: write synthetic photo-like shards to a temporary folder")
    p.add_argument("--device", choices=["cpu", "cuda", "gpu"], default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where DALI decodes and augments: cpu, or cuda ('mixed' decoder on cuda:0; 'gpu' is accepted "
                        "for it); default cuda when torch sees one")
    p.add_argument("--res", type=int, nargs="+", default=[160],
                   help="output resolution(s) in pixels; one row per value; the last line reports the first")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch")
    p.add_argument("--threads", type=int, default=None,
                   help="DALI CPU threads, and DataLoader workers for --baseline (the same CPU budget); default: "
                        "all cores on cpu, min(8, cores per GPU) on gpu, what one trainer process gets")
    p.add_argument("--seconds", type=float, default=30.0, help="timed wall seconds per measurement")
    p.add_argument("--warmup", type=int, default=5, help="untimed batches before each measurement")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="DALI output precision (default: what the trainer feeds the model: bf16 on a GPU that has "
                        "it, else fp16; fp32 on the CPU like the baseline)")
    p.add_argument("--baseline", action="store_true", help="also measure the torchvision DataLoader path")
    p.add_argument("--decode", choices=["fused", "split", "both"], default="fused",
                   help="DALI decode path: fused (decoders.image_random_crop), split (decoders.image + "
                        "random_resized_crop, the trainer's fallback) or both")
    p.add_argument("--hw-decoder-load", type=float, nargs="+", default=[data.HW_DECODER_LOAD_AUTO],
                   help="share (0-1) of each batch for the GPU's hardware JPEG decoder, one measurement per value; "
                        f"{data.HW_DECODER_LOAD_AUTO:g} = the trainer's choice (0.9 on H100/H200, else DALI's 0.65); "
                        "ignored on the CPU")
    p.add_argument("--prefetch-depth", type=int, default=data.PREFETCH_DEPTH,
                   help="batches DALI prepares ahead (the trainer's --data.prefetch_depth)")
    p.add_argument("--build-shards", type=int, default=0,
                   help="also time building the training pipeline over this many fabricated shards (ImageNet's "
                        "train split has 1281 at the default 1000 images per shard) and the first batch after it, "
                        "and how fast another Python thread runs meanwhile")
    p.add_argument("--json", type=Path, default=None, help="also append each row to this file as a JSON line")
    p.add_argument("--images", type=int, default=320, help="synthetic images to write when no --data")
    p.add_argument("--max-side", type=int, default=500, help="longest side of synthetic images, pixels")
    add_report_flags(p)
    p.add_argument("--notes", default="", help="free text stored with the result (e.g. what else ran on the machine)")
    args = p.parse_args(argv)
    args.device = "gpu" if args.device in ("cuda", "gpu") else "cpu"  # DALI's name for its GPU operators
    if args.threads is None:
        cores = os.cpu_count() or 1
        # What one trainer process gets: the host's cores shared by its GPUs, at most 8 (DALI threads per GPU).
        args.threads = min(8, max(1, cores // max(1, torch.cuda.device_count()))) if args.device == "gpu" else cores
    for load in args.hw_decoder_load:
        try:  # the loader's own check of its tuning values, now rather than from inside a pipeline
            data._check_loader_tuning(args.prefetch_depth, load)
        except ValueError as exc:
            p.error(f"--prefetch-depth/--hw-decoder-load: {exc}")
    if args.build_shards < 0:
        p.error(f"--build-shards {args.build_shards}: must be 0 (off) or more")
    for name in ("batch_size", "threads", "warmup", "images", "max_side"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be positive")
    if min(args.res) < 8:
        p.error(f"--res {min(args.res)}: must be at least 8 pixels")
    if args.seconds <= 0:
        p.error(f"--seconds {args.seconds}: must be > 0")
    if args.device == "gpu" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device; use --device cpu")
    if args.data is not None:
        load_manifest(args.data)  # a clear error now rather than from inside a pipeline
    return args


def describe(device: str) -> str:
    cpu = cpu_description()
    return f"{torch.cuda.get_device_name(0)} + {cpu}" if device == "gpu" else cpu


def run(args: argparse.Namespace, data_dir: Path) -> list[dict]:
    default = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if args.device == "gpu" else "fp32"
    dtype = DTYPES[args.dtype or default]
    rows = []
    decodes = ["fused", "split"] if args.decode == "both" else [args.decode]

    def keep(row: dict) -> None:  # written at once: a run stopped by a time limit keeps what it measured
        rows.append(row)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")

    loads = args.hw_decoder_load if args.device == "gpu" else [data.HW_DECODER_LOAD_AUTO]
    for res in args.res:
        for decode in decodes:
            for load in loads:
                keep(measure_dali(data_dir, args.device, args.threads, res, args.batch_size, dtype, args.seconds,
                                  args.warmup, decode, load, args.prefetch_depth))
        if args.baseline:
            keep(measure_baseline(data_dir, args.threads, res, args.batch_size, args.seconds, args.warmup))
    if args.build_shards:
        keep(measure_build(args.build_shards, args.device, args.threads, args.res[0], args.batch_size))
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="dataloader-bench-") as tmp:
        if args.data is None:
            data_dir = write_synthetic_shards(Path(tmp), args.images, max_side=args.max_side)
            source = f"{args.images} synthetic photo-like JPEGs (benchmarks.photos), <= {args.max_side} px, quality 90"
        else:
            data_dir, source = args.data, str(args.data)
        rows = run(args, data_dir)
    build_rows = [r for r in rows if r["pipeline"].startswith("pipeline-build")]
    rows = [r for r in rows if not r["pipeline"].startswith("pipeline-build")]
    print_table(rows)
    if build_rows:
        print()
        print_table(build_rows)
    target = report_path(args.report, args.no_report)
    if target is not None:
        notes = (f"data: {source}. 1-min load average at start {load:.2f} on {os.cpu_count()} cores "
                 f"(shared machine: other jobs may have been running). {args.notes}").strip()
        if build_rows:
            notes += "\n\nPipeline build (`--build-shards`):\n\n" + markdown_table(build_rows)
        command = "python -m benchmarks.dataloader " + shlex.join(sys.argv[1:] if argv is None else argv)
        path = append_result("Dataloader", rows, command, describe(args.device), notes, path=target)
        print(f"appended to {path}")
    first = next(r for r in rows if r["pipeline"].startswith("dali-"))
    print(f"dali-{args.device} images/s: {first['images/s']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
