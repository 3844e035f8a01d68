"""`python -m benchmarks.preprocess`: preprocessing throughput (images/s, per worker) of preprocess.shard.

Without --src it writes photo-like JPEGs at ImageNet's typical sizes (benchmarks.photos) as HF-schema
parquet first, so the figure can be produced anywhere; with --src it shards real data. Only the
sharding is timed (reading parquet, decoding, resizing to --max-side, re-encoding, writing tars).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from preprocess import shard


def measure(src: str, out: Path, workers: int, max_side: int, quality: int, per_shard: int) -> dict:
    start = time.perf_counter()
    manifest = shard.run(src, out, settings=shard.EncodeSettings(max_side, quality), images_per_shard=per_shard,
                         workers=workers, progress=False)
    seconds = time.perf_counter() - start
    images = sum(s["source_images"] for s in manifest["splits"].values())
    return {"workers": workers, "images": images, "seconds": round(seconds, 2),
            "images/s": round(images / seconds, 1), "images/s per worker": round(images / seconds / workers, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.preprocess",
                                description="Measure preprocess.shard throughput: images/s in total and per worker.")
    p.add_argument("--src", default=None, help="data to shard (default: generate photo-like ImageNet-size JPEGs)")
    p.add_argument("--images", type=int, default=400, help="generated images when no --src (default 400)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, os.cpu_count() or 1],
                   help="worker counts to measure (default: 1 and all cores)")
    p.add_argument("--max-side", type=int, default=500, help="pixels (default 500)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    p.add_argument("--images-per-shard", type=int, default=50, help="(default 50: enough shards to keep workers busy)")
    p.add_argument("--report", type=Path, default=None, help="markdown file to append to (default docs/BENCHMARKS.md)")
    p.add_argument("--no-report", action="store_true", help="print only")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        src = args.src
        if src is None:
            from benchmarks.photos import write_photo_parquet

            src = str(write_photo_parquet(Path(tmp) / "parquet", train=args.images * 4 // 5, val=args.images // 5))
        rows = [measure(src, Path(tmp) / f"out-{w}", w, args.max_side, args.quality, args.images_per_shard)
                for w in args.workers]

    header = list(rows[0])
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(str(row[h]) for h in header))
    if not args.no_report:
        from benchmarks.report import append_result, cpu_description

        data = args.src or f"{args.images} generated photo-like JPEGs (benchmarks.photos), quality 95"
        append_result("Preprocessing", rows, command="python -m benchmarks.preprocess " + shlex.join(argv or sys.argv[1:]),
                      device=cpu_description(), notes=f"data: {data}; --max-side {args.max_side} --quality {args.quality}",
                      path=args.report)
    print(f"preprocess images/s per worker: {rows[0]['images/s per worker']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
