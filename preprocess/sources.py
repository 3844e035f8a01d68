"""Readers for the three input layouts: HF ImageNet-1k parquet, ImageFolder, Tiny-ImageNet-200.

Each source lists its samples cheaply as `SampleRef`s (key, label, where to find the bytes), in the
source's own order (parquet row order; folders: class folder, then file name), and the bytes of a ref
are read later, inside a worker. The class index is the position of the class in the source's class
list: the sorted WordNet ids for folder layouts, the ClassLabel order for parquet (which for
ILSVRC/imagenet-1k is the same sorted-wnid order that torchvision uses).

Parquet may be local or remote: `--src` takes any fsspec URL of a folder, a file or a glob
(`s3://bucket/imagenet/data`, `hf://datasets/ILSVRC/imagenet-1k/data`). Credentials come from the
usual places (AWS_* variables, ~/.aws, an instance role; HF_TOKEN or `hf auth login`) and an
S3-compatible endpoint from AWS_ENDPOINT_URL; nothing here stores or prints them, and a failure to reach
or read a remote source is one line (preprocess.remote).

Every ref carries a fingerprint (`stamp`) of the item its bytes come from, taken while listing: size and
mtime for a local file (the content hash for a file in the Hugging Face cache, whose blobs are named by
it), the ETag or content hash a remote store lists (else size and modification time). A shard records
the stamps of its samples, so a source item replaced under the same name is noticed on a re-run.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import pyarrow.parquet as pq

from preprocess.remote import (RemoteError, check_url, explained, is_url, public_url,  # noqa: F401  (re-exported)
                               unreachable)

HF_REPO = "ILSVRC/imagenet-1k"
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# Our split name -> how the split is spelled in file names / folder names of each layout.
SPLIT_ALIASES = {"train": ("train",), "val": ("validation", "val", "valid"), "test": ("test",)}


class SourceError(ValueError):
    """Input that cannot be read; the message names the path and what is wrong."""


@dataclass(frozen=True)
class ClassInfo:
    wnid: str | None
    name: str


@dataclass(frozen=True)
class SampleRef:
    key: str  # unique within its split; safe as a WebDataset key
    label: int
    location: tuple  # ("parquet", file, row_group, row) or ("file", path)
    stamp: str = ""  # fingerprint of the file the bytes come from; not part of the shard's contents


def imagenet_classes() -> list[ClassInfo]:
    """The 1000 ILSVRC-2012 classes in class-index (sorted wnid) order."""
    table = Path(__file__).with_name("imagenet_classes.tsv").read_text().splitlines()
    return [ClassInfo(*line.split("\t")) for line in table]


@lru_cache(maxsize=1)
def _imagenet_names() -> dict[str, str]:
    return {c.wnid: c.name for c in imagenet_classes()}


def safe_key(name: str) -> str:
    """A file name's stem with anything but letters, digits, '_' and '-' replaced by '_'."""
    stem = Path(name).name.rsplit(".", 1)[0] if "." in Path(name).name else Path(name).name
    return re.sub(r"[^A-Za-z0-9_\-]", "_", stem) or "_"


def unique_keys(keys: list[str]) -> list[str]:
    """Append _1, _2, ... to repeated keys, in order, so every key of a split is unique."""
    seen: dict[str, int] = {}
    out = []
    for key in keys:
        n = seen.get(key, 0)
        seen[key] = n + 1
        out.append(key if n == 0 else f"{key}_{n}")
    return out


def hash_order(refs: list[SampleRef]) -> list[SampleRef]:
    """A fixed pseudo-random order (by SHA-1 of the key): folder layouts list images class by
    class, and class-sorted shards would starve the loader's shuffle buffer of variety."""
    return sorted(refs, key=lambda r: hashlib.sha1(r.key.encode()).hexdigest())


def read_bytes(location: tuple) -> bytes:
    kind = location[0]
    if kind == "file":
        return Path(location[1]).read_bytes()
    if kind == "parquet":
        _, file, row_group, row = location
        return _row_group_images(file, row_group)[row] or b""
    raise ValueError(f"unknown location kind {kind!r}")


def stat_stamp(st: os.stat_result) -> str:
    return f"size={st.st_size},mtime_ns={st.st_mtime_ns}"


def local_stamp(path: str) -> str:
    """Size and mtime of a local file; for a link into the Hugging Face cache, the blob's content hash
    (its name), which survives a re-download that changes the mtime."""
    real = Path(os.path.realpath(path))
    if real.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", real.name):
        return f"blob={real.name}"
    return stat_stamp(real.stat())


def remote_stamp(info: dict) -> str:
    """A remote file's fingerprint from its listing entry: a content hash or ETag where the store gives
    one (Hub LFS sha256 or git blob id, S3 ETag, GCS md5), else size and modification time."""
    lfs = info.get("lfs") or {}
    for kind, value in (("sha256", lfs.get("sha256") or lfs.get("oid")), ("blob", info.get("blob_id")),
                        ("etag", info.get("ETag") or info.get("etag")), ("md5", info.get("md5Hash"))):
        if value:
            return f"{kind}={str(value).strip(chr(34))}"
    modified = next((info[k] for k in ("LastModified", "last_modified", "mtime", "updated") if info.get(k)), "")
    return f"size={info.get('size')},modified={modified}"


def open_parquet(file: str) -> pq.ParquetFile:
    """A ParquetFile for a local path or an fsspec URL (remote reads fetch only the byte ranges needed)."""
    if not is_url(file):
        return pq.ParquetFile(file)
    import fsspec  # only remote sources need it

    return pq.ParquetFile(fsspec.open(file, "rb").open(), pre_buffer=True)


@lru_cache(maxsize=2)
def _row_group_images(file: str, row_group: int) -> list:
    """The `image.bytes` column of one row group; cached because a shard reads its rows in order."""
    return row_group_images(file, row_group)


def row_group_images(file: str, row_group: int) -> list[bytes | None]:
    """The `image.bytes` of every row of one row group, in row order."""
    with explained(file):
        table = open_parquet(file).read_row_group(row_group, columns=["image.bytes"])
    return _leaf(table, "image", "bytes").to_pylist()


def _leaf(table, struct: str, field: str):
    """A nested column; pyarrow returns it flat or still inside its struct depending on the reader."""
    flat = table.flatten()
    return flat.column(f"{struct}.{field}") if f"{struct}.{field}" in flat.column_names else flat.column(field)


class HFParquetSource:
    """The `ILSVRC/imagenet-1k` parquet release (or anything in its schema), read without network."""

    format = "hf-parquet"
    # Image bytes are cheap to read only in row order (a row costs its whole row group), so a shuffled
    # split is written in two passes (see preprocess.shard).
    sequential = True

    def __init__(self, src: str):
        self.src = src
        if is_url(src):
            listing = _list_remote_parquet(src)
            self.files = sorted(listing)
            self.stamps = {f: remote_stamp(listing[f]) for f in self.files}
        else:
            self.files = find_parquet_files(src)
            self.stamps = {f: local_stamp(f) for f in self.files}
        if not self.files:
            raise SourceError(f"--src {public_url(src)}: no .parquet files found")
        self.by_split: dict[str, list[str]] = {}
        for f in self.files:
            split = split_of_parquet(f)
            if split is not None:
                self.by_split.setdefault(split, []).append(f)
        if not self.by_split:
            raise SourceError(f"--src {public_url(src)}: parquet files found, but none named "
                              f"train-*/validation-*/test-* "
                              f"(e.g. {Path(self.files[0]).name}); name them by split as the HF release does")
        self.classes = self._read_classes(self.files[0])

    @staticmethod
    def _read_classes(file: str) -> list[ClassInfo]:
        from datasets import ClassLabel, Features  # heavy import, only needed here

        with explained(file):
            schema = open_parquet(file).schema_arrow
        file = public_url(file)
        missing = [c for c in ("image", "label") if c not in schema.names]
        if missing:
            raise SourceError(f"{file}: parquet without {'/'.join(missing)} column(s) (has {schema.names}); "
                              f"expected the {HF_REPO} schema: image=struct<bytes,path>, label=ClassLabel")
        image_type = schema.field("image").type
        if not (hasattr(image_type, "get_field_index") and image_type.get_field_index("bytes") >= 0):
            raise SourceError(f"{file}: column 'image' is {image_type}, expected struct<bytes: binary, path: string>")
        try:
            features = Features.from_arrow_schema(schema)
            label = features["label"]
        except Exception as exc:  # schema metadata written by something other than `datasets`
            raise SourceError(f"{file}: cannot read the class names from the 'huggingface' schema metadata ({exc})") from exc
        if not isinstance(label, ClassLabel):
            raise SourceError(f"{file}: 'label' is {type(label).__name__}, expected a ClassLabel with class names")
        names = list(label.names)
        if len(names) == 1000:
            wnids = [c.wnid for c in imagenet_classes()]
            return [ClassInfo(w, n) for w, n in zip(wnids, names)]
        return [ClassInfo(None, n) for n in names]

    def splits(self) -> list[str]:
        return sorted(self.by_split)

    def refs(self, split: str) -> list[SampleRef]:
        files = self.by_split.get(split, [])
        # Only the small path/label columns are read here; remote files are listed 16 at a time.
        if is_url(self.src):
            with ThreadPoolExecutor(16) as pool:
                listed = list(pool.map(_list_rows, files))
        else:
            listed = [_list_rows(f) for f in files]
        keys, labels, locations = [], [], []
        for file, rows in zip(files, listed):
            for path, label, rg, row in rows:
                keys.append(safe_key(path) if path else f"{split}_{len(keys):08d}")
                labels.append(-1 if label is None else int(label))
                locations.append(("parquet", file, rg, row))
        return [SampleRef(k, l, loc, self.stamps[loc[1]]) for k, l, loc in zip(unique_keys(keys), labels, locations)]


def _list_rows(file: str) -> list[tuple]:
    """(image.path, label, row group, row) of every row of one parquet file, without the image bytes."""
    with explained(file):
        pf = open_parquet(file)
        if "label" not in pf.schema_arrow.names or "image" not in pf.schema_arrow.names:
            raise SourceError(f"{public_url(file)}: parquet without image/label columns (has {pf.schema_arrow.names})")
        rows = []
        for rg in range(pf.num_row_groups):
            table = pf.read_row_group(rg, columns=["image.path", "label"])
            paths = _leaf(table, "image", "path").to_pylist()
            labels = table.column("label").to_pylist()
            rows += [(path, label, rg, row) for row, (path, label) in enumerate(zip(paths, labels))]
    return rows


def find_parquet_files(src: str) -> list[str]:
    """The .parquet files under a folder, a single file or a glob; local paths or fsspec URLs, sorted."""
    if is_url(src):
        return sorted(_list_remote_parquet(src))
    path = Path(src)
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        return sorted(str(p) for p in path.rglob("*.parquet"))
    return sorted(glob.glob(src, recursive=True))


def _list_remote_parquet(src: str) -> dict[str, dict]:
    """URL -> listing entry (size, ETag or hash, ...) of the .parquet files under a remote folder, file or glob."""
    check_url(src)
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(src)
    except ImportError as exc:  # e.g. s3fs missing for s3://
        raise SourceError(f"--src {public_url(src)}: {exc}") from exc
    fs.invalidate_cache()  # the stamps must be today's, not a listing an earlier run() in this process cached
    with explained(src, "--src"):
        if glob.has_magic(path):
            found = fs.glob(path, detail=True)
        elif fs.isfile(path):
            found = {path: fs.info(path)}
        else:
            found = fs.find(path, detail=True)
        if not found:
            try:  # fsspec's HTTP file system answers "nothing there" for a server it cannot reach
                fs.info(path)
            except FileNotFoundError as exc:
                if unreachable(exc):
                    raise
    return {fs.unstrip_protocol(p): info for p, info in found.items() if p.endswith(".parquet")}


def split_of_parquet(file: str) -> str | None:
    name = Path(file).name.lower()
    for split, aliases in SPLIT_ALIASES.items():
        if any(name.startswith(a + "-") or name.startswith(a + ".") or name.startswith(a + "_") for a in aliases):
            return split
    return None


def image_files(folder: Path) -> list[Path]:
    return [p for p, _ in stamped_image_files(folder)]


def stamped_image_files(folder: Path) -> list[tuple[Path, str]]:
    """(path, stamp) of the image files in `folder`, sorted; one stat per file (links are followed)."""
    found = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if Path(entry.name).suffix.lower() in IMAGE_SUFFIXES and entry.is_file():
                found.append((Path(entry.path), stat_stamp(entry.stat())))
    return sorted(found)


def _split_dir(root: Path, split: str) -> Path | None:
    for alias in SPLIT_ALIASES[split]:
        if (root / alias).is_dir():
            return root / alias
    return None


def _named(wnids: list[str], names: dict[str, str]) -> list[ClassInfo]:
    return [ClassInfo(w, names.get(w) or _imagenet_names().get(w) or w) for w in wnids]


class ImageFolderSource:
    """`train/<wnid>/*.JPEG`, `val/<wnid>/*.JPEG` (torchvision ImageFolder layout)."""

    format = "imagefolder"
    sequential = False  # any file can be read at any time

    def __init__(self, src: str):
        self.root = Path(src)
        train = _split_dir(self.root, "train")
        if train is None:
            raise SourceError(f"--src {src}: no train/ folder; expected train/<wnid>/*.JPEG and val/<wnid>/*.JPEG")
        wnids = sorted(d.name for d in train.iterdir() if d.is_dir())
        if not wnids:
            raise SourceError(f"{train}: no class folders; expected {train}/<wnid>/*.JPEG")
        self.classes = _named(wnids, {})
        self._index = {w: i for i, w in enumerate(wnids)}

    def splits(self) -> list[str]:
        return [s for s in ("train", "val", "test") if _split_dir(self.root, s) is not None]

    def refs(self, split: str) -> list[SampleRef]:
        folder = _split_dir(self.root, split)
        refs = []
        for class_dir in sorted(d for d in folder.iterdir() if d.is_dir()):
            if class_dir.name not in self._index:
                raise SourceError(f"{class_dir}: class {class_dir.name!r} is not among the train/ classes")
            label = self._index[class_dir.name]
            refs += [SampleRef(safe_key(p.name), label, ("file", str(p)), stamp)
                     for p, stamp in stamped_image_files(class_dir)]
        return _with_unique_keys(refs)


class TinyImageNetSource:
    """Tiny-ImageNet-200: wnids.txt, words.txt, train/<wnid>/images/*, val/images/* + val_annotations.txt."""

    format = "tiny-imagenet"
    sequential = False

    def __init__(self, src: str):
        self.root = Path(src)
        annotations = self.root / "val" / "val_annotations.txt"
        if not annotations.is_file():
            raise SourceError(f"--src {src}: {annotations} missing; not a Tiny-ImageNet-200 folder")
        wnids_file = self.root / "wnids.txt"
        if wnids_file.is_file():
            wnids = sorted(w.strip() for w in wnids_file.read_text().split() if w.strip())
        else:
            wnids = sorted(d.name for d in (self.root / "train").iterdir() if d.is_dir())
        words = {}
        words_file = self.root / "words.txt"
        if words_file.is_file():
            for line in words_file.read_text().splitlines():
                if "\t" in line:
                    wnid, name = line.split("\t", 1)
                    words[wnid] = name.strip()
        self.classes = _named(wnids, words)
        self._index = {w: i for i, w in enumerate(wnids)}
        self._val_labels = {}
        for n, line in enumerate(annotations.read_text().splitlines(), 1):
            parts = line.split("\t")
            if len(parts) < 2 or parts[1] not in self._index:
                raise SourceError(f"{annotations}:{n}: expected '<file>\\t<wnid>\\t...' with a known wnid, got {line!r}")
            self._val_labels[parts[0]] = self._index[parts[1]]

    def splits(self) -> list[str]:
        return ["train", "val"]

    def refs(self, split: str) -> list[SampleRef]:
        refs = []
        if split == "train":
            for wnid, label in self._index.items():
                folder = self.root / "train" / wnid / "images"
                if not folder.is_dir():
                    folder = self.root / "train" / wnid
                refs += [SampleRef(safe_key(p.name), label, ("file", str(p)), stamp)
                         for p, stamp in stamped_image_files(folder)]
        elif split == "val":
            folder = self.root / "val" / "images"
            for p, stamp in stamped_image_files(folder):
                if p.name not in self._val_labels:
                    raise SourceError(f"{p}: not listed in {self.root / 'val' / 'val_annotations.txt'}")
                refs.append(SampleRef(safe_key(p.name), self._val_labels[p.name], ("file", str(p)), stamp))
        return _with_unique_keys(refs)


def _with_unique_keys(refs: list[SampleRef]) -> list[SampleRef]:
    keys = unique_keys([r.key for r in refs])
    return [replace(r, key=k) for k, r in zip(keys, refs)]


def default_hf_src() -> str:
    """Where `hf download ILSVRC/imagenet-1k --repo-type dataset` left the parquet files."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(HF_REPO, repo_type="dataset", local_files_only=True)
    except Exception as exc:
        raise SourceError(
            f"no --src given and {HF_REPO} is not in the local Hugging Face cache ({type(exc).__name__}). "
            f"Accept the terms at https://huggingface.co/datasets/{HF_REPO}, run `hf auth login`, then "
            f"`hf download {HF_REPO} --repo-type dataset` (~160 GB), or pass --src DIR") from exc


def open_source(src: str | None, fmt: str = "auto"):
    if src is None:
        src = default_hf_src()
        fmt = "hf-parquet" if fmt == "auto" else fmt
    if is_url(src):
        if fmt not in ("auto", "hf-parquet"):
            raise SourceError(f"--src {public_url(src)}: remote sources must be parquet (--format hf-parquet)")
        return HFParquetSource(src)
    path = Path(src)
    if not path.exists() and not glob.glob(src):
        raise SourceError(f"--src {src}: no such file or directory")
    if path.is_dir() and not any(path.iterdir()):
        raise SourceError(f"--src {src}: the folder is empty")
    if fmt == "auto":
        if path.is_dir() and (path / "val" / "val_annotations.txt").is_file():
            fmt = "tiny-imagenet"
        elif find_parquet_files(src):
            fmt = "hf-parquet"
        elif path.is_dir() and _split_dir(path, "train") is not None:
            fmt = "imagefolder"
        else:
            raise SourceError(f"--src {src}: found no parquet files, no train/<class>/ folders and no "
                              f"val/val_annotations.txt; pass --format if the layout is one of these")
    return {"hf-parquet": HFParquetSource, "imagefolder": ImageFolderSource,
            "tiny-imagenet": TinyImageNetSource}[fmt](src)


def describe(source) -> dict:
    src = str(getattr(source, "src", None) or source.root)
    return {"format": source.format, "path": public_url(src) if is_url(src) else str(Path(src).resolve())}


def classes_json(classes: list[ClassInfo]) -> list[dict]:
    return [{"index": i, "wnid": c.wnid, "name": c.name} for i, c in enumerate(classes)]


def refs_digest(refs: list[SampleRef]) -> str:
    """Identifies exactly which samples (keys, labels, order) a shard was planned from; the stamps are
    checked apart, so that the same samples from another copy of the source plan the same shard."""
    return hashlib.sha256(json.dumps([(r.key, r.label) for r in refs]).encode()).hexdigest()
