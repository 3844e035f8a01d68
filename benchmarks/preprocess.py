"""`python -m benchmarks.preprocess`: preprocessing throughput (images/s, per worker) and output bytes.

Two measurements on the same images:

1. The encoder alone, in this one process (= one worker), over source bytes already in memory:
   each variant of `preprocess.encode.reencode` in turn, `--rounds` times interleaved (so that load
   from other jobs hits all variants alike), best round kept, timed by the wall clock and by this
   process's CPU time (the steadier figure on a shared machine; the ratio to `before` uses it). `before` is the encoder as it was
   before issue 9 (decode at full size, always re-encode); `auto`, `keep` and `always` are the
   `--reencode` modes of `preprocess.shard`. Also: source and output bytes per image, how many
   images were kept unchanged, how fast the output decodes (one pass, PIL), which every training
   epoch pays again, and, over the resized images, the PSNR of the output against the ideal
   (full-size decode, one Lanczos pass, no JPEG encoding), mean, minimum and the largest drop of
   one image against `before`: what DCT-domain scaling may cost.
2. `preprocess.shard.run` end to end (read, encode, write tars) for each `--workers` count, with
   `--reencode` as given.

Sources: without --src, photo-like JPEGs at ImageNet's typical sizes (benchmarks.photos) written as
HF-schema parquet, so the figure can be produced anywhere; with --src, any input preprocess.shard
reads, or a flat folder of images (such as ../shared/data/imagenet-samples: class = the file name's
part before the first '_'). `--limit N` takes a fixed subset (every k-th file in sorted order) and
`--repeat R` lists each file R times, so that a small set still gives seconds of work.
"""

from __future__ import annotations

import io
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from preprocess.cli import ArgumentParser
from benchmarks.report import add_report_flags, append_result, cpu_description, report_path
from preprocess import encode, shard
from preprocess.sources import IMAGE_SUFFIXES, SourceError, image_files, open_source, read_bytes

VARIANTS = {  # name -> keyword arguments of encode.reencode besides max_side and quality
    "before": {"mode": "always", "draft_gap": None},  # the encoder before issue 9
    "auto": {"mode": "auto"},
    "keep": {"mode": "keep"},
    "always": {"mode": "always"},
    # Not measured by default: DCT scaling down to the target size itself (faster on 2-4x downscales,
    # but it loses fidelity there; see the PSNR columns).
    "auto-draft1": {"mode": "auto", "draft_gap": 1},
}
DEFAULT_VARIANTS = ["before", "auto", "keep", "always"]


def link_tree(src: Path, out: Path, limit: int | None = None, repeat: int = 1) -> Path:
    """An ImageFolder of symlinks to the images of `src` (an ImageFolder, or a flat folder of images)."""
    splits = [d for d in ("train", "val") if (src / d).is_dir()]
    if splits:
        files = [(split, p.parent.name, p) for split in splits for p in sorted((src / split).glob("*/*"))
                 if p.suffix.lower() in IMAGE_SUFFIXES]
    else:
        files = [("train", p.name.split("_", 1)[0], p) for p in image_files(src)]
    if not files:
        raise SourceError(f"--src {src}: no images found (expected train/<class>/* or image files)")
    if limit and limit < len(files):
        step = len(files) / limit
        files = [files[int(i * step)] for i in range(limit)]
    for split, label, path in files:
        folder = out / split / label
        folder.mkdir(parents=True, exist_ok=True)
        for r in range(repeat):
            name = path.name if r == 0 else f"{path.stem}__copy{r}{path.suffix}"
            (folder / name).symlink_to(path.resolve())
    return out


def source_images(src: str) -> list[bytes]:
    source = open_source(src)
    return [read_bytes(ref.location) for split in source.splits() for ref in source.refs(split)]


def compare_encoders(images: list[bytes], variants: list[str], max_side: int, quality: int, rounds: int) -> list[dict]:
    """One row per variant: best-of-`rounds` images/s in this process (wall clock, and per CPU-second of
    this process, which other jobs on a shared machine disturb far less), bytes, images kept unchanged."""
    wall = {v: float("inf") for v in variants}
    cpu = {v: float("inf") for v in variants}
    outputs: dict[str, list] = {}
    for _ in range(rounds):
        for v in variants:
            start, start_cpu = time.perf_counter(), time.process_time()
            results = []
            for data in images:
                try:
                    results.append(encode.reencode(data, max_side=max_side, quality=quality, **VARIANTS[v]))
                except encode.UndecodableImage:
                    results.append(None)
            wall[v] = min(wall[v], time.perf_counter() - start)
            cpu[v] = min(cpu[v], time.process_time() - start_cpu)
            outputs[v] = results
    source_bytes = sum(len(d) for d in images)
    references: dict[bytes, np.ndarray] = {}
    fidelity = {v: {i: _psnr(r.jpeg, _reference(images[i], (r.width, r.height), references))
                    for i, r in enumerate(outputs[v]) if r is not None and "resized" in r.fixes} for v in variants}
    rows = []
    for v in variants:
        psnr = list(fidelity[v].values())
        worst = (min(p - fidelity["before"][i] for i, p in fidelity[v].items() if i in fidelity["before"])
                 if "before" in fidelity and fidelity[v] else "")
        done = [r for r in outputs[v] if r is not None]
        out_bytes = sum(len(r.jpeg) for r in done)
        start_cpu = time.process_time()
        for r in done:  # what every training epoch pays again (PIL's libjpeg-turbo, as DALI's CPU decoder)
            Image.open(io.BytesIO(r.jpeg)).load()
        decode_cpu = max(time.process_time() - start_cpu, 1e-9)
        rows.append({
            "encoder": v, "images": len(images), "seconds": round(wall[v], 2),
            "images/s per worker": round(len(images) / wall[v], 1),
            "images per CPU-s": round(len(images) / cpu[v], 1),
            "x before (CPU)": round(cpu["before"] / cpu[v], 2) if "before" in cpu else "",
            "source KB/image": round(source_bytes / len(images) / 1000, 1),
            "output KB/image": round(out_bytes / max(1, len(done)) / 1000, 1),
            "output/source bytes": round(out_bytes / source_bytes, 3),
            "kept unchanged": sum("passthrough" in r.fixes for r in done), "resized": sum("resized" in r.fixes for r in done),
            "skipped": len(images) - len(done), "output decodes per CPU-s": round(len(done) / decode_cpu, 1),
            "resized PSNR dB mean": round(float(np.mean(psnr)), 2) if psnr else "",
            "resized PSNR dB min": round(float(np.min(psnr)), 2) if psnr else "",
            "worst dB vs before": round(worst, 2) if worst != "" else "",
        })
    return rows


def _reference(data: bytes, size: tuple[int, int], cache: dict) -> np.ndarray:
    """The ideal of a resized image: full-size decode, one Lanczos pass, no JPEG encoding."""
    if data not in cache:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        cache[data] = np.asarray(image.resize(size, Image.Resampling.LANCZOS), dtype=np.float64)
    return cache[data]


def _psnr(jpeg: bytes, reference: np.ndarray) -> float:
    pixels = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.float64)
    return float(10 * np.log10(255 ** 2 / max(np.mean((pixels - reference) ** 2), 1e-10)))


def measure(src: str, out: Path, workers: int, settings: shard.EncodeSettings, per_shard: int) -> dict:
    source = open_source(src)
    splits = tuple(s for s in ("train", "val") if s in source.splits())
    start = time.perf_counter()
    manifest = shard.run(src, out, splits=splits, settings=settings, images_per_shard=per_shard, workers=workers,
                         progress=False)
    seconds = time.perf_counter() - start
    images = sum(s["source_images"] for s in manifest["splits"].values())
    kept = sum(s["fixed"].get("passthrough", 0) for s in manifest["splits"].values())
    tar_bytes = sum(sh["bytes"] for s in manifest["splits"].values() for sh in s["shards"])
    return {"workers": workers, "images": images, "seconds": round(seconds, 2),
            "images/s": round(images / seconds, 1), "images/s per worker": round(images / seconds / workers, 1),
            "reencode": settings.reencode, "kept unchanged": kept, "tar KB/image": round(tar_bytes / images / 1000, 1)}


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m benchmarks.preprocess",
                                description="Measure preprocessing: the encoder's images/s and output bytes per image "
                                            "(before/auto/always, one process) and preprocess.shard's images/s in "
                                            "total and per worker.")
    p.add_argument("--src", default=None, help="data to shard: any preprocess.shard input or a flat folder of images "
                                               "(default: generate photo-like ImageNet-size JPEGs)")
    p.add_argument("--images", type=int, default=400, help="generated images when no --src (default 400)")
    p.add_argument("--limit", type=int, default=None, help="use a fixed subset of this many --src images "
                                                           "(every k-th in sorted order; folder sources only)")
    p.add_argument("--repeat", type=int, default=1, help="list each --src image this many times (default 1)")
    p.add_argument("--workers", type=int, nargs="*", default=[1, os.cpu_count() or 1],
                   help="worker counts to measure preprocess.shard with (default: 1 and all cores; none to skip)")
    p.add_argument("--encoders", nargs="*", default=DEFAULT_VARIANTS, choices=list(VARIANTS),
                   help=f"encoder variants to compare in one process (default: {' '.join(DEFAULT_VARIANTS)}; "
                        f"none to skip)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the encoder comparison, best kept (default 2)")
    p.add_argument("--max-side", type=int, default=500, help="pixels (default 500)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    p.add_argument("--reencode", default="auto", choices=encode.MODES, help="mode of the preprocess.shard runs (default auto)")
    p.add_argument("--images-per-shard", type=int, default=50, help="(default 50: enough shards to keep workers busy)")
    add_report_flags(p)
    args = p.parse_args(argv)
    if not args.workers and not args.encoders:
        p.error("nothing to measure: give --workers or --encoders")

    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        src = args.src
        if src is None:
            from benchmarks.photos import write_photo_parquet

            src = str(write_photo_parquet(Path(tmp) / "parquet", train=args.images * 4 // 5, val=args.images // 5))
        elif Path(src).is_dir() and (image_files(Path(src)) or (Path(src) / "train").is_dir()):
            if args.limit or args.repeat > 1 or not (Path(src) / "train").is_dir():
                src = str(link_tree(Path(src), Path(tmp) / "src", args.limit, args.repeat))
        elif args.limit or args.repeat > 1:
            p.error("--limit and --repeat take a folder --src (an ImageFolder or a flat folder of images)")
        encoder_rows = (compare_encoders(source_images(src), args.encoders, args.max_side, args.quality, args.rounds)
                        if args.encoders else [])
        settings = shard.EncodeSettings(args.max_side, args.quality, args.reencode)
        rows = [measure(src, Path(tmp) / f"out-{w}", w, settings, args.images_per_shard) for w in args.workers]

    for table in (encoder_rows, rows):
        if table:
            print(" | ".join(table[0]))
            for row in table:
                print(" | ".join(str(v) for v in row.values()))
    target = report_path(args.report, args.no_report)
    if target is not None:
        data = args.src or f"{args.images} generated photo-like JPEGs (benchmarks.photos), quality 95"
        subset = (f", fixed subset of {args.limit}" if args.limit else "") + (f", each listed {args.repeat}x" if args.repeat > 1 else "")
        command = "python -m benchmarks.preprocess " + shlex.join(argv if argv is not None else sys.argv[1:])
        notes = (f"data: {data}{subset}; --max-side {args.max_side} --quality {args.quality}. "
                 f"1-min load average at start {load:.2f} on {os.cpu_count()} cores (shared machine: other jobs may "
                 f"have been running).")
        if encoder_rows:
            append_result("Preprocessing encoder", encoder_rows, command=command, device=cpu_description(),
                          notes=notes + f" One process, source bytes in memory, best of {args.rounds} interleaved "
                                        "rounds by wall clock and by this process's CPU time (x before uses CPU "
                                        "time). before = full-size decode and re-encode of every image (the "
                                        "encoder before issue 9); auto/keep/always = the --reencode modes.",
                          path=target)
        if rows:
            append_result("Preprocessing", rows, command=command, device=cpu_description(), notes=notes,
                          path=target)
        print(f"appended to {target}")
    if encoder_rows:
        print("encoder images per CPU-s (x before): " + ", ".join(
            f"{r['encoder']} {r['images per CPU-s']} ({r['x before (CPU)']})" for r in encoder_rows))
    if rows:
        print(f"preprocess images/s per worker: {rows[0]['images/s per worker']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
