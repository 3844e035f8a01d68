"""`python -m preprocess.shard`: ImageNet-1k (HF parquet, ImageFolder, Tiny-ImageNet) -> WebDataset shards.

    python -m preprocess.shard --out /mnt/nvme/shards                 # HF cache, train + val
    python -m preprocess.shard --src ~/tiny-imagenet-200 --out shards

Each split's samples are planned into shards of `--images-per-shard` before any work starts, so a
shard's contents do not depend on the number of workers or on where an earlier run stopped. A shard
is complete when its `<name>.json` summary exists (written last, atomically); re-running the same
command verifies complete shards by SHA-256 and redoes the rest, so a killed run finishes with the
same bytes as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from preprocess.encode import UndecodableImage, reencode
from preprocess.manifest import FORMAT_VERSION, MANIFEST
from preprocess.sources import (SampleRef, SourceError, classes_json, describe, open_source, read_bytes,
                                refs_digest)
from preprocess.writer import ShardWriter, file_sha256, shard_name

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class EncodeSettings:
    max_side: int = 500  # pixels, longer side (FFCV's ImageNet setting)
    quality: int = 90  # JPEG quality

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ShardTask:
    split: str
    index: int
    refs: tuple[SampleRef, ...]
    num_classes: int
    settings: EncodeSettings
    out_dir: str

    @property
    def summary_path(self) -> Path:
        return Path(self.out_dir) / self.split / f"{shard_name(self.index)}.json"

    def plan_id(self) -> str:
        return f"{self.settings.digest()}:{refs_digest(list(self.refs))}"


def plan(refs: list[SampleRef], per_shard: int) -> list[list[SampleRef]]:
    return [refs[i:i + per_shard] for i in range(0, len(refs), per_shard)]


def write_shard(task: ShardTask) -> dict:
    """Encode and write one shard, then its summary; returns the summary. Runs in a worker."""
    directory = Path(task.out_dir) / task.split
    writer = ShardWriter(directory, shard_name(task.index))
    per_class = [0] * task.num_classes
    fixed: Counter = Counter()
    fixed_keys: list[dict] = []
    skipped: list[dict] = []
    try:
        for ref in task.refs:
            if not (0 <= ref.label < task.num_classes) and task.split != "test":
                skipped.append({"key": ref.key, "reason": f"label {ref.label} outside 0..{task.num_classes - 1}"})
                continue
            try:
                result = reencode(read_bytes(ref.location), max_side=task.settings.max_side,
                                  quality=task.settings.quality)
            except UndecodableImage as exc:
                skipped.append({"key": ref.key, "reason": str(exc)})
                continue
            writer.write(ref.key, result.jpeg, ref.label)
            if ref.label >= 0:
                per_class[ref.label] += 1
            fixed.update(result.fixes)
            conversions = [f for f in result.fixes if f != "resized"]
            if conversions:
                fixed_keys.append({"key": ref.key, "fixes": conversions})
        info = writer.close() if len(writer) else None
    except BaseException:
        writer.abort()
        raise
    summary = {
        "name": shard_name(task.index), "plan": task.plan_id(), "planned": len(task.refs),
        "images": info.images if info else 0, "bytes": info.bytes if info else 0,
        "sha256": info.sha256 if info else None, "per_class": per_class, "fixed": dict(sorted(fixed.items())),
        "fixed_keys": fixed_keys, "skipped": skipped,
    }
    tmp = task.summary_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, task.summary_path)
    return summary


def _write_indexed(task: ShardTask) -> tuple[str, int, dict]:
    return task.split, task.index, write_shard(task)


def completed_summary(task: ShardTask, verify: bool = True) -> dict | None:
    """The summary of an already-written shard of the same plan whose tar still checks out, else None."""
    try:
        summary = json.loads(task.summary_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if summary.get("plan") != task.plan_id():
        return None
    if summary["images"] == 0:
        return summary
    tar = task.summary_path.with_suffix(".tar")
    if not tar.is_file() or not tar.with_suffix(".idx").is_file() or tar.stat().st_size != summary["bytes"]:
        return None
    if verify and file_sha256(tar) != summary["sha256"]:
        return None
    return summary


def clean_split_dir(directory: Path, keep: set[str]) -> None:
    """Drop temp files of a killed run and shards that are not part of the current plan."""
    for p in directory.iterdir():
        stem = p.name.split(".", 1)[0]
        if p.name.endswith(".tmp") or (stem.startswith("shard-") and stem not in keep):
            p.unlink()


def split_manifest(summaries: list[dict], num_classes: int) -> dict:
    per_class = [0] * num_classes
    fixed: Counter = Counter()
    for s in summaries:
        per_class = [a + b for a, b in zip(per_class, s["per_class"])]
        fixed.update(s["fixed"])
    return {
        "images": sum(s["images"] for s in summaries),
        "source_images": sum(s["planned"] for s in summaries),
        "shards": [{k: s[k] for k in ("name", "images", "bytes", "sha256")} for s in summaries if s["images"]],
        "per_class": per_class,
        "fixed": dict(sorted(fixed.items())),
        "fixed_keys": [f for s in summaries for f in s["fixed_keys"]],
        "skipped": [k for s in summaries for k in s["skipped"]],
    }


def check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise SourceError(f"--out {out}: not writable ({exc.strerror or exc}); choose a folder you can write to") from exc


def run(src: str | None, out: Path, *, fmt: str = "auto", splits: tuple[str, ...] = ("train", "val"),
        settings: EncodeSettings = EncodeSettings(), images_per_shard: int = 1000, workers: int = 1,
        progress: bool = True) -> dict:
    """Shard `src` into `out` and return the manifest (also written to `out/manifest.json`)."""
    source = open_source(src, fmt)
    missing = [s for s in splits if s not in source.splits()]
    if missing:
        raise SourceError(f"--splits: {','.join(missing)} not in the source (it has {','.join(source.splits())})")
    all_refs = {split: source.refs(split) for split in splits}
    for split, refs in all_refs.items():
        if not refs:
            raise SourceError(f"--src {src}: split {split!r} has no images")
    check_writable(out)

    num_classes = len(source.classes)
    tasks = []
    for split, refs in all_refs.items():
        (out / split).mkdir(exist_ok=True)
        shards = plan(refs, images_per_shard)
        clean_split_dir(out / split, {shard_name(i) for i in range(len(shards))})
        tasks += [ShardTask(split, i, tuple(r), num_classes, settings, str(out)) for i, r in enumerate(shards)]

    summaries: dict[tuple[str, int], dict] = {}
    todo = []
    for task in tasks:
        done = completed_summary(task)
        if done is not None:
            summaries[(task.split, task.index)] = done
        else:
            todo.append(task)

    total = sum(len(t.refs) for t in tasks)
    start = time.perf_counter()
    bar = tqdm(total=total, initial=total - sum(len(t.refs) for t in todo), unit="img", disable=not progress,
               desc="sharding", dynamic_ncols=True, smoothing=0.05)
    if workers <= 1:
        results = map(_write_indexed, todo)
        pool = None
    else:
        pool = mp.get_context("spawn").Pool(workers)
        results = pool.imap_unordered(_write_indexed, todo)
    try:
        for split, index, summary in results:
            summaries[(split, index)] = summary
            bar.update(summary["planned"])
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    elapsed = time.perf_counter() - start

    manifest = {
        "format_version": FORMAT_VERSION,
        "source": describe(source),
        "settings": {**asdict(settings), "images_per_shard": images_per_shard},
        "num_classes": num_classes,
        "classes": classes_json(source.classes),
        "splits": {split: split_manifest([summaries[(split, i)] for i in range(len(plan(refs, images_per_shard)))],
                                         num_classes)
                   for split, refs in all_refs.items()},
    }
    tmp = out / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)
    manifest["_stats"] = {"seconds": elapsed, "encoded": sum(len(t.refs) for t in todo),
                          "verified_shards": len(tasks) - len(todo)}
    return manifest


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m preprocess.shard",
        description="Convert ImageNet-1k (Hugging Face parquet, ImageFolder or Tiny-ImageNet-200) into WebDataset "
                    "tar shards with DALI index files and a manifest.json. Re-running the same command resumes "
                    "and verifies; the same input and settings give byte-identical shards.")
    p.add_argument("--out", required=True, type=Path, help="output folder (train/, val/, manifest.json go here)")
    p.add_argument("--src", default=None,
                   help="input: a folder or glob of HF parquet files, an ImageFolder root or a Tiny-ImageNet-200 "
                        "root (default: ILSVRC/imagenet-1k in the local Hugging Face cache)")
    p.add_argument("--format", default="auto", choices=["auto", "hf-parquet", "imagefolder", "tiny-imagenet"],
                   help="input layout (default: detected from --src)")
    p.add_argument("--max-side", type=int, default=500, help="longer image side after resizing, pixels (default 500; never upscales)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the re-encoded images, 1-100 (default 90)")
    p.add_argument("--images-per-shard", type=int, default=1000, help="images per tar shard (default 1000, ~100 MB at 500 px)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel encoding processes (default: all cores)")
    p.add_argument("--splits", default="train,val", help="comma-separated splits to write: train,val[,test] (default train,val)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    args = p.parse_args(argv)
    return args


def validate(args: argparse.Namespace) -> tuple[str, ...]:
    if args.max_side < 16:
        raise SourceError(f"--max-side {args.max_side}: must be at least 16 pixels")
    if not 1 <= args.quality <= 100:
        raise SourceError(f"--quality {args.quality}: must be between 1 and 100")
    if args.images_per_shard < 1:
        raise SourceError(f"--images-per-shard {args.images_per_shard}: must be at least 1")
    if args.workers < 1:
        raise SourceError(f"--workers {args.workers}: must be at least 1")
    splits = tuple(s.strip() for s in args.splits.split(",") if s.strip())
    bad = [s for s in splits if s not in SPLITS]
    if not splits or bad:
        raise SourceError(f"--splits {args.splits}: choose from {','.join(SPLITS)}")
    return splits


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        splits = validate(args)
        manifest = run(args.src, args.out, fmt=args.format, splits=splits,
                       settings=EncodeSettings(args.max_side, args.quality), images_per_shard=args.images_per_shard,
                       workers=args.workers, progress=not args.no_progress)
    except SourceError as exc:
        print(f"preprocess.shard: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("preprocess.shard: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    stats = manifest.pop("_stats")
    for split, info in manifest["splits"].items():
        fixes = ", ".join(f"{k} {v}" for k, v in info["fixed"].items()) or "none"
        print(f"{split}: {info['images']} images in {len(info['shards'])} shards; fixed: {fixes}; "
              f"skipped: {len(info['skipped'])}")
    rate = stats["encoded"] / stats["seconds"] if stats["seconds"] > 0 else 0.0
    reused = f"; {stats['verified_shards']} shards were already complete (checksums verified)" if stats["verified_shards"] else ""
    print(f"encoded {stats['encoded']} images in {stats['seconds']:.1f} s ({rate:.0f} images/s, "
          f"{args.workers} workers){reused}; manifest: {args.out / MANIFEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
