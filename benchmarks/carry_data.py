"""`python -m benchmarks.carry_data`: real-photo shards for a GPU machine that takes uploads of <= 64 MiB each.

    python -m benchmarks.carry_data pack   [--src ../shared/data/imagenette-144] [--carry .carry]
    python -m benchmarks.carry_data unpack --out /tmp/imagenette-shards [--carry .carry]

pack (here): shards an ImageFolder tree (Imagenette by default: 9,469 train / 3,925 val real photos of 10
ImageNet classes) with `preprocess.shard` (the ImageFolder source: shuffled train shards, default encode
settings), writes the shard folder as one plain tar stream and cuts it into parts of at most --part-mib MiB,
each in its own git-ignored folder `.carry/data-pNN/` (next to device-wheels' `.carry/whl-pNN/`), with
`data-p00/INDEX.json` (part count, bytes, SHA-256). Upload each part folder in its own call (`carry`).
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

REPO = Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout (or beside the folder holding a worktree)
DEFAULT_SRC = next((base / "shared" / "data" / "imagenette-144" for base in (REPO.parent, REPO.parent.parent)
                    if (base / "shared" / "data" / "imagenette-144").is_dir()), REPO.parent / "shared" / "data" / "imagenette-144")
PART_DIR = "data-p{:02d}"
PART_FILE = "data-part-{:02d}"
INDEX = "INDEX.json"
MIB = 1 << 20


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
    for old in existing_parts(carry):
        shutil.rmtree(old)
    writer = _SplitWriter(carry, part_bytes)
    with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        tar.add(shards, arcname="shards")
    writer.close()
    index = {"name": Path(src).name, "parts": len(writer.parts), "bytes": writer.size,
             "sha256": writer.sha.hexdigest(), "part_bytes": part_bytes,
             "manifest": json.loads((shards / "manifest.json").read_text())["splits"]["train"]["images"]}
    (carry / PART_DIR.format(0) / INDEX).write_text(json.dumps(index, indent=1))
    return index


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
    p = argparse.ArgumentParser(prog="python -m benchmarks.carry_data", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="command", required=True)
    pk = sub.add_parser("pack", help="shard --src and split the shards into upload-sized parts under --carry")
    pk.add_argument("--src", type=Path, default=DEFAULT_SRC, help=f"ImageFolder tree (default {DEFAULT_SRC})")
    pk.add_argument("--carry", type=Path, default=REPO / ".carry", help="git-ignored folder for the parts")
    pk.add_argument("--part-mib", type=int, default=56, help="largest part, MiB (an upload takes <= 64 MiB with "
                                                            "the checkout)")
    pk.add_argument("--quality", type=int, default=90, help="JPEG quality of the shards (preprocess.shard's default)")
    pk.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="encoding processes")
    up = sub.add_parser("unpack", help="check the uploaded parts and extract the shard folder")
    up.add_argument("--carry", type=Path, default=REPO / ".carry", help="folder holding data-pNN/")
    up.add_argument("--out", type=Path, required=True, help="shard folder to create (replaced if present)")
    args = p.parse_args(argv)
    try:
        if args.command == "pack":
            index = pack(args.src, args.carry, part_bytes=args.part_mib * MIB, quality=args.quality,
                         workers=args.workers)
            sizes = ", ".join(f"{PART_DIR.format(i)} {(args.carry / PART_DIR.format(i) / PART_FILE.format(i)).stat().st_size / MIB:.1f} MiB"
                              for i in range(index["parts"]))
            print(f"{index['parts']} parts ({index['bytes'] / MIB:.1f} MiB, {index['manifest']} train images): {sizes}")
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
