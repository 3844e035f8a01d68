"""Write WebDataset tar shards with a DALI index beside each, atomically and byte-reproducibly.

A sample is three tar members sharing a key: `<key>.jpg` (JPEG bytes), `<key>.cls` (class index as
ASCII digits, the WebDataset convention) and `<key>.lbl` (the same index as 8 bytes of little-endian
int64, so DALI's webdataset reader gets an integer label without parsing text).
Every header field that could vary between runs (mtime, owner, mode) is fixed, so the same samples
give the same bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import shutil
import struct
import tarfile
from dataclasses import dataclass
from pathlib import Path

TAR_BLOCK = 512  # bytes
INDEX_VERSION = "v1.2"  # DALI's webdataset index format
EXTENSIONS = ("jpg", "cls", "lbl")
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


def encode_label(label: int) -> dict[str, bytes]:
    """The label fields of a sample: ASCII digits for WebDataset, int64 LE for DALI."""
    return {"cls": str(int(label)).encode("ascii"), "lbl": struct.pack("<q", int(label))}


def decode_lbl(data: bytes) -> int:
    return struct.unpack("<q", data)[0]


def shard_name(index: int) -> str:
    return f"shard-{index:06d}"


@dataclass(frozen=True)
class ShardInfo:
    name: str  # file stem, e.g. shard-000003
    images: int
    bytes: int
    sha256: str


@contextlib.contextmanager
def _naming(path: Path):
    """An OSError of a write to an open file names no file (a full disk: "[Errno 28] No space left on
    device"); raised again with `path`, so that the one-line error can say which file failed."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None or exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc


class ShardWriter:
    """Writes one shard to `<stem>.tar.tmp` / `<stem>.idx.tmp`; `close()` renames both into place.

    Until `close()` returns nothing under the final names exists, so a killed run leaves only
    `.tmp` files, which the next run discards.
    """

    def __init__(self, directory: Path, stem: str):
        self.directory = Path(directory)
        self.stem = stem
        self.tar_path = self.directory / f"{stem}.tar"
        self.idx_path = self.directory / f"{stem}.idx"
        self._tmp_tar = self.tar_path.with_suffix(".tar.tmp")
        self._file = open(self._tmp_tar, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self._index_lines: list[str] = []
        self._keys: set[str] = set()

    def write(self, key: str, jpeg: bytes, label: int) -> None:
        if not _KEY_RE.match(key):
            raise ValueError(f"sample key {key!r} must be letters, digits, '_' or '-' (no dots)")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r} in {self.tar_path}")
        self._keys.add(key)
        fields = {"jpg": jpeg, **encode_label(label)}
        entries = []
        with _naming(self._tmp_tar):
            for ext in EXTENSIONS:
                data = fields[ext]
                name = f"{key}.{ext}"
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o644
                info.uname = info.gname = ""
                header_offset = self._tar.offset
                self._tar.addfile(info, io.BytesIO(data))
                entries.append(f"{ext} {header_offset + TAR_BLOCK} {len(data)} {name}")
        self._index_lines.append(" ".join(entries))

    def __len__(self) -> int:
        return len(self._index_lines)

    def close(self) -> ShardInfo:
        if not self._index_lines:
            self.abort()
            raise ValueError(f"shard {self.tar_path} would be empty")
        with _naming(self._tmp_tar):
            self._tar.close()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        tmp_idx = self.idx_path.with_suffix(".idx.tmp")
        with _naming(tmp_idx):
            tmp_idx.write_text(f"{INDEX_VERSION} {len(self._index_lines)}\n" + "\n".join(self._index_lines) + "\n")
        os.replace(tmp_idx, self.idx_path)
        os.replace(self._tmp_tar, self.tar_path)
        return ShardInfo(self.stem, len(self), self.tar_path.stat().st_size, file_sha256(self.tar_path))

    def abort(self) -> None:
        """Drop the shard in progress. Called on an error, often a failed write: flushing what is buffered
        may fail the same way, which must not hide the error that led here."""
        for close in (self._tar.close, self._file.close):
            try:
                close()
            except OSError:
                pass
        self._tmp_tar.unlink(missing_ok=True)


def free_bytes(path) -> int:
    """Free bytes on the disk that holds `path`, or would hold it (its nearest existing parent folder)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_index(path: Path) -> list[dict[str, tuple[int, int]]]:
    """Parse a DALI index: one dict per sample mapping extension -> (offset, size)."""
    lines = Path(path).read_text().splitlines()
    version, count = lines[0].split()
    if version != INDEX_VERSION or int(count) != len(lines) - 1:
        raise ValueError(f"{path}: not a {INDEX_VERSION} index with {count} samples")
    samples = []
    for line in lines[1:]:
        parts = line.split()
        samples.append({parts[i]: (int(parts[i + 1]), int(parts[i + 2])) for i in range(0, len(parts), 4)})
    return samples
