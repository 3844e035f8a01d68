"""`python -m benchmarks.carry_data`: real-photo shards for a GPU machine that takes uploads of <= 64 MiB each.

    python -m benchmarks.carry_data pack   [--profile quick|full] [--src ../shared/data/imagenette-144] [--carry .carry]
    python -m benchmarks.carry_data unpack --out /tmp/imagenette-shards [--carry .carry]

pack (here): shards an ImageFolder tree (Imagenette by default: 9,469 train / 3,925 val real photos of 10
ImageNet classes) with `preprocess.shard` (the ImageFolder source: shuffled train shards, default encode
settings), writes the shard folder as one plain tar stream and cuts it into parts of at most --part-mib MiB,
each in its own git-ignored folder `.carry/data-pNN/` (next to device-wheels' `.carry/whl-pNN/`), with
`data-p00/INDEX.json` (part count, bytes, SHA-256).
  --profile full   every photo, parts of 56 MiB (Imagenette-144: 3 parts): each part in its own upload call
  --profile quick  a class-balanced subset (the same number of randomly chosen photos of every class, a quarter
                   as many val as train photos) sized to one part of <= 12 MiB (~100 train + 25 val photos per
                   class), small enough to ride in the same call as the last wheel part: what
                   `benchmarks.gpu_suite --profile quick` trains on
unpack (there): checks that every part is present and the SHA-256 matches, then extracts the shard folder.
The photos never enter git: .carry/ is ignored.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tarfile
from pathlib import Path
from preprocess.cli import ArgumentParser

REPO = Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout (or beside the folder holding a worktree)
DEFAULT_SRC = next((base / "shared" / "data" / "imagenette-144" for base in (REPO.parent, REPO.parent.parent)
                    if (base / "shared" / "data" / "imagenette-144").is_dir()), REPO.parent / "shared" / "data" / "imagenette-144")
PART_DIR = "data-p{:02d}"
PART_FILE = "data-part-{:02d}"
INDEX = "INDEX.json"
MIB = 1 << 20
QUICK_MIB = 12  # the quick profile's one part: beside a wheel part of <= ~48 MiB and the checkout, <= 64 MiB
QUICK_VAL_FRACTION = 0.25  # val photos per class, as a fraction of the train photos per class
SAMPLE_OVERHEAD = 3300  # bytes a sample adds beside its source JPEG (tar headers, .lbl, index; ~3.1 KB measured)
UPLOAD_MIB = 64  # what one device call carries in all (parts + checkout)


class CarryError(RuntimeError):
    """Parts missing or damaged, or nothing to pack; the message says what to do."""


class _SplitWriter:
    """A write-only file that cuts what it is given into numbered part files of at most `limit` bytes."""

    def __init__(self, carry: Path, limit: int):
        self.carry, self.limit = carry, limit
        self.parts: list[Path] = []
        self.size = 0
        self.sha = hashlib.sha256()
        self._file = None
        self._left = 0

    def write(self, data) -> int:
        view = memoryview(data)
        self.sha.update(view)
        self.size += len(view)
        while len(view):
            if self._left == 0:
                self._next()
            n = min(self._left, len(view))
            self._file.write(view[:n])
            self._left -= n
            view = view[n:]
        return len(data)

    def _next(self) -> None:
        if self._file is not None:
            self._file.close()
        folder = self.carry / PART_DIR.format(len(self.parts))
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / PART_FILE.format(len(self.parts))
        self.parts.append(path)
        self._file = open(path, "wb")
        self._left = self.limit

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class _JoinedReader:
    """A read-only file over the part files in order, hashing what it reads."""

    def __init__(self, parts: list[Path]):
        self.parts = list(parts)
        self.sha = hashlib.sha256()
        self.size = 0
        self._file = None

    def read(self, n: int = -1) -> bytes:
        chunks = []
        while n != 0:
            if self._file is None:
                if not self.parts:
                    break
                self._file = open(self.parts.pop(0), "rb")
            chunk = self._file.read(n if n > 0 else -1)
            if not chunk:
                self._file.close()
                self._file = None
                continue
            chunks.append(chunk)
            if n > 0:
                n -= len(chunk)
        data = b"".join(chunks)
        self.sha.update(data)
        self.size += len(data)
        return data


def class_files(src: Path, split: str) -> dict[str, list[Path]]:
    """wnid -> sorted image files of one split of an ImageFolder tree."""
    from preprocess.sources import image_files

    folder = Path(src) / split
    return {d.name: image_files(d) for d in sorted(folder.iterdir()) if d.is_dir()} if folder.is_dir() else {}


def balanced_subset(src: Path, dest: Path, train_per_class: int, val_per_class: int, seed: int = 0) -> dict:
    """dest/{train,val}/<wnid>/ holding links to the same number of photos of every class of `src`, chosen at
    random (seeded by the class); returns {split: per-class count}. Raises CarryError if a class has fewer."""
    import random

    shutil.rmtree(dest, ignore_errors=True)
    counts = {}
    for split, want in (("train", train_per_class), ("val", val_per_class)):
        files = class_files(src, split)
        if not files:
            raise CarryError(f"--src {src}: no {split}/<wnid>/ folders")
        short = {w: len(f) for w, f in files.items() if len(f) < want}
        if short:
            raise CarryError(f"--src {src}: {split} classes with fewer than {want} photos: {short}")
        for wnid, paths in files.items():
            chosen = random.Random(f"{seed}:{split}:{wnid}").sample(paths, want)
            folder = dest / split / wnid
            folder.mkdir(parents=True)
            for path in sorted(chosen):
                (folder / path.name).symlink_to(path.resolve())
        counts[split] = want
    return counts


def quick_counts(src: Path, max_bytes: int) -> tuple[int, int]:
    """(train, val) photos per class whose shards should fit in max_bytes, from the source's mean file size."""
    files = [p for paths in class_files(src, "train").values() for p in paths]
    if not files:
        raise CarryError(f"--src {src}: no train/<wnid>/*.JPEG photos")
    classes = len(class_files(src, "train"))
    per_sample = sum(p.stat().st_size for p in files) / len(files) + SAMPLE_OVERHEAD
    per_class = max_bytes / per_sample / classes  # train + val photos of one class
    train = int(per_class / (1 + QUICK_VAL_FRACTION))
    return train, max(1, int(train * QUICK_VAL_FRACTION))


def existing_parts(carry: Path) -> list[Path]:
    return sorted(p for p in Path(carry).glob("data-p[0-9][0-9]") if p.is_dir())


def pack(src: Path, carry: Path, *, part_bytes: int = 56 * MIB, quality: int = 90, workers: int = 1,
         images_per_shard: int = 1000, progress: bool = True) -> dict:
    """Shard `src` under carry/<name>-shards, then split its tar stream into carry/data-pNN/. Returns the index."""
    from preprocess.shard import EncodeSettings, run

    if not (Path(src) / "train").is_dir():
        raise CarryError(f"--src {src}: no train/ folder (expected an ImageFolder tree: train/<wnid>/*.JPEG)")
    carry = Path(carry)
    shards = carry / f"{Path(src).name}-shards"
    run(str(src), shards, settings=EncodeSettings(quality=quality), images_per_shard=images_per_shard,
        workers=workers, progress=progress)
    return _split(shards, carry, part_bytes, name=Path(src).name)


def pack_quick(src: Path, carry: Path, *, max_bytes: int = QUICK_MIB * MIB, quality: int = 90, workers: int = 1,
               progress: bool = True, seed: int = 0) -> dict:
    """A class-balanced subset of `src` as ONE part carry/data-p00 of at most max_bytes (the subset shrinks
    until its shards fit). Returns the index, with the photos per class."""
    from preprocess.shard import EncodeSettings, run

    src, carry = Path(src), Path(carry)
    if not (src / "train").is_dir():
        raise CarryError(f"--src {src}: no train/ folder (expected an ImageFolder tree: train/<wnid>/*.JPEG)")
    train, val = quick_counts(src, max_bytes)
    classes = len(class_files(src, "train"))
    name = f"{src.name}-quick"
    for _attempt in range(4):
        if train < 1:
            break
        subset, shards = carry / f"{name}-src", carry / f"{name}-shards"
        counts = balanced_subset(src, subset, train, val, seed=seed)
        shutil.rmtree(shards, ignore_errors=True)
        per_shard = -(-train * classes // 4)  # 4 train shards
        run(str(subset), shards, settings=EncodeSettings(quality=quality), images_per_shard=per_shard,
            workers=workers, progress=progress)
        size = _stream_size(shards)
        if size <= max_bytes:
            index = _split(shards, carry, max_bytes, name=f"{src.name} (quick: {train} train + {val} val photos "
                                                              f"per class)", profile="quick", per_class=counts)
            return index
        scale = max_bytes / size * 0.98
        train, val = int(train * scale), max(1, int(val * scale))
    raise CarryError(f"--src {src}: could not fit a class-balanced subset in {max_bytes / MIB:.1f} MiB")


class _Counter:
    """A write-only file that only counts bytes."""

    size = 0

    def write(self, data) -> int:
        self.size += len(data)
        return len(data)


def _stream_size(shards: Path) -> int:
    """Bytes of the plain tar stream `_split` writes for the shard folder."""
    counter = _Counter()
    with tarfile.open(fileobj=counter, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        tar.add(shards, arcname="shards")
    return counter.size


def _split(shards: Path, carry: Path, part_bytes: int, *, name: str, **extra) -> dict:
    """The shard folder as one plain tar stream cut into carry/data-pNN/ (earlier parts removed)."""
    for old in existing_parts(carry):
        shutil.rmtree(old)
    writer = _SplitWriter(carry, part_bytes)
    with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        tar.add(shards, arcname="shards")
    writer.close()
    manifest = json.loads((shards / "manifest.json").read_text())
    index = {"name": name, "parts": len(writer.parts), "bytes": writer.size, "sha256": writer.sha.hexdigest(),
             "part_bytes": part_bytes, "manifest": manifest["splits"]["train"]["images"],
             "val_images": manifest["splits"]["val"]["images"], **extra}
    (carry / PART_DIR.format(0) / INDEX).write_text(json.dumps(index, indent=1))
    return index


def beside_last_wheel_part(carry: Path, index: dict) -> str:
    """One line: whether the data parts fit in the same call as the last wheel part (<= UPLOAD_MIB in all)."""
    wheels = sorted(Path(carry).glob("whl-p[0-9][0-9]"))
    if not wheels:
        return "no wheel parts under .carry yet (../shared/tools/device-wheels pack makes them)"
    last = sum(f.stat().st_size for f in wheels[-1].rglob("*") if f.is_file())
    total = last + index["bytes"]
    verdict = "fits" if total <= (UPLOAD_MIB - 4) * MIB else "does NOT fit: upload the data in its own call"
    return (f"{wheels[-1].name} ({last / MIB:.1f} MiB) + the data ({index['bytes'] / MIB:.1f} MiB) = "
            f"{total / MIB:.1f} MiB: {verdict} (one call carries {UPLOAD_MIB} MiB with the checkout's ~2 MiB)")


def unpack(carry: Path, out: Path) -> dict:
    """Check the parts under `carry` and extract their shard folder to `out` (replaced if present)."""
    carry, out = Path(carry), Path(out)
    index_path = carry / PART_DIR.format(0) / INDEX
    if not index_path.is_file():
        raise CarryError(f"{index_path}: missing; upload .carry/data-p00 (made by `python -m benchmarks.carry_data "
                         "pack`) before unpacking")
    index = json.loads(index_path.read_text())
    parts = [carry / PART_DIR.format(i) / PART_FILE.format(i) for i in range(index["parts"])]
    missing = [str(p.parent.name) for p in parts if not p.is_file()]
    if missing:
        raise CarryError(f"parts missing under {carry}: {', '.join(missing)} of {index['parts']}; the machine lost "
                         "its files between uploads: upload them again, back to back")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    reader = _JoinedReader(parts)
    with tarfile.open(fileobj=reader, mode="r|") as tar:
        tar.extractall(tmp, filter="data")
    reader.read()  # the tar end padding, so the hash covers every byte
    if reader.sha.hexdigest() != index["sha256"] or reader.size != index["bytes"]:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CarryError(f"parts under {carry} do not add up to what was packed ({reader.size} of {index['bytes']} "
                         "bytes, or another SHA-256); upload them again")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp / "shards", out)
    shutil.rmtree(tmp, ignore_errors=True)
    return index


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m benchmarks.carry_data", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="command", required=True)
    pk = sub.add_parser("pack", help="shard --src and split the shards into upload-sized parts under --carry")
    pk.add_argument("--profile", choices=["full", "quick"], default="full",
                    help=f"full: every photo in parts of --part-mib; quick: a class-balanced subset in one part of "
                         f"<= --part-mib (default {QUICK_MIB} MiB), for gpu_suite's quick profile")
    pk.add_argument("--src", type=Path, default=DEFAULT_SRC, help=f"ImageFolder tree (default {DEFAULT_SRC})")
    pk.add_argument("--carry", type=Path, default=REPO / ".carry", help="git-ignored folder for the parts")
    pk.add_argument("--part-mib", type=float, default=None, help="largest part, MiB (default 56 for full: an upload "
                                                                "takes <= 64 MiB with the checkout; 12 for quick)")
    pk.add_argument("--quality", type=int, default=90, help="JPEG quality of the shards (preprocess.shard's default)")
    pk.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="encoding processes")
    up = sub.add_parser("unpack", help="check the uploaded parts and extract the shard folder")
    up.add_argument("--carry", type=Path, default=REPO / ".carry", help="folder holding data-pNN/")
    up.add_argument("--out", "--output", dest="out", type=Path, required=True, help="shard folder to create (replaced if present)")
    args = p.parse_args(argv)
    try:
        if args.command == "pack":
            if args.profile == "quick":
                index = pack_quick(args.src, args.carry, max_bytes=int((args.part_mib or QUICK_MIB) * MIB),
                                   quality=args.quality, workers=args.workers)
            else:
                index = pack(args.src, args.carry, part_bytes=int((args.part_mib or 56) * MIB), quality=args.quality,
                             workers=args.workers)
            sizes = ", ".join(f"{PART_DIR.format(i)} {(args.carry / PART_DIR.format(i) / PART_FILE.format(i)).stat().st_size / MIB:.1f} MiB"
                              for i in range(index["parts"]))
            print(f"{index['name']}: {index['parts']} part(s) ({index['bytes'] / MIB:.1f} MiB, {index['manifest']} "
                  f"train + {index['val_images']} val images): {sizes}")
            if args.profile == "quick":
                print(beside_last_wheel_part(args.carry, index))
                print("carry it with the last wheel part (carry: [\".carry/whl-pNN\", \".carry/data-p00\"]); "
                      "benchmarks.gpu_suite unpacks it there")
            else:
                print("upload each folder in its own call (carry: [\".carry/data-pNN\"]), then on the machine: "
                      "python3 -m benchmarks.carry_data unpack --out /tmp/imagenette-shards")
        else:
            index = unpack(args.carry, args.out)
            print(f"{args.out}: {index['name']} shards unpacked from {index['parts']} parts, SHA-256 checked")
    except CarryError as exc:
        print(f"carry_data: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
