"""Which validation images there are, under which labels and class names: the layouts viz reads.

- our shards (manifest.json + val/*.tar): read by train.data's own validation loader;
- an ImageFolder tree (val/<wnid>/*.JPEG or <wnid>/*.JPEG; the class list is train/'s when there is one);
- a Tiny-ImageNet-200 val folder (images/ + val_annotations.txt; classes from wnids.txt).
Folder images are listed in a fixed pseudo-random order (by key, as the shards are written), so
`--limit N` sees many classes, not the first one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from preprocess.manifest import MANIFEST, DatasetError, load_manifest, split_size
from preprocess.sources import (SPLIT_ALIASES, ClassInfo, SampleRef, SourceError, hash_order, image_files,
                                imagenet_classes, safe_key, unique_keys)
from viz.weights import VizError


@dataclass(frozen=True)
class ValData:
    layout: str  # "shards", "imagefolder" or "tiny-imagenet"
    path: str  # the shards root, or the folder of the split
    classes: tuple[ClassInfo, ...]  # indexed by the model's output
    size: int  # images in the split
    files: tuple[tuple[str, int, str], ...] = ()  # (key, label, path) of a folder layout, in evaluation order
    label_map: tuple[int, ...] | None = None  # dataset label -> model output, when they differ
    note: str = ""


def _folder_classes(wnids: list[str]) -> tuple[ClassInfo, ...]:
    names = {c.wnid: c.name for c in imagenet_classes()}
    return tuple(ClassInfo(w, names.get(w, w)) for w in wnids)


def _class_dirs(folder: Path) -> list[Path]:
    """Subfolders holding images directly (ImageFolder classes)."""
    return sorted(d for d in folder.iterdir() if d.is_dir() and image_files(d))


def _ordered_files(refs: list[tuple[str, int]]) -> tuple[tuple[str, int, str], ...]:
    """(key, label, path) from (path, label), keys unique, in the shards' order (SHA-1 of the key)."""
    keys = unique_keys([safe_key(Path(path).name) for path, _ in refs])
    ordered = hash_order([SampleRef(key, label, ("file", path)) for key, (path, label) in zip(keys, refs)])
    return tuple((r.key, r.label, r.location[1]) for r in ordered)


def _folder_data(layout: str, path: Path, wnids: list[str], refs: list[tuple[str, int]]) -> ValData:
    files = _ordered_files(refs)
    return ValData(layout, str(path), _folder_classes(wnids), len(files), files)


def _shard_data(root: Path) -> ValData:
    manifest = load_manifest(root)
    classes = tuple(ClassInfo(c.get("wnid"), c.get("name") or c.get("wnid") or str(c["index"]))
                    for c in sorted(manifest["classes"], key=lambda c: c["index"]))
    if "val" not in manifest.get("splits", {}):
        raise VizError(f"--data {root}: {MANIFEST} lists no 'val' split")
    return ValData("shards", str(root), classes, split_size(manifest, "val"))


def _image_folder(val: Path) -> ValData:
    train = next((val.parent / a for a in SPLIT_ALIASES["train"] if (val.parent / a).is_dir()), None)
    own = [d.name for d in _class_dirs(val)]
    # The class list is that of training (a val folder may lack some classes), else the folder's own.
    wnids = sorted(d.name for d in train.iterdir() if d.is_dir()) if train is not None and train != val else own
    index = {w: i for i, w in enumerate(wnids)}
    unknown = [w for w in own if w not in index]
    if unknown:
        raise VizError(f"--data {val / unknown[0]}: class folder not among the {len(wnids)} classes of {train}")
    refs = [(str(p), index[w]) for w in own for p in image_files(val / w)]
    return _folder_data("imagefolder", val, wnids, refs)


def _tiny_val(val: Path) -> ValData:
    annotations = val / "val_annotations.txt"
    rows = []
    for n, line in enumerate(annotations.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise VizError(f"--data {annotations}:{n}: expected '<file>\\t<wnid>...', got {line!r}")
        rows.append((fields[0], fields[1]))
    root = val.parent
    if (root / "wnids.txt").is_file():
        wnids = sorted(set((root / "wnids.txt").read_text().split()))
    elif (root / "train").is_dir():
        wnids = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    else:
        wnids = sorted({w for _, w in rows})
    index = {w: i for i, w in enumerate(wnids)}
    images = val / "images" if (val / "images").is_dir() else val
    refs = []
    for name, wnid in rows:
        if wnid not in index:
            raise VizError(f"--data {annotations}: class {wnid} of {name} is not in {root / 'wnids.txt'}")
        if (images / name).is_file():
            refs.append((str(images / name), index[wnid]))
    if not refs:
        raise VizError(f"--data {images}: none of the images listed in {annotations} exist")
    return _folder_data("tiny-imagenet", val, wnids, refs)


def open_data(path: str | Path) -> ValData:
    """The validation split at `path`, whichever of the supported layouts it is."""
    p = Path(path)
    if not p.exists():
        raise VizError(f"--data {path}: no such directory")
    if not p.is_dir():
        raise VizError(f"--data {path}: not a directory")
    try:
        if (p / MANIFEST).is_file():
            return _shard_data(p)
        if p.name == "val" and (p.parent / MANIFEST).is_file():
            return _shard_data(p.parent)
        for tiny in (p, p / "val"):
            if (tiny / "val_annotations.txt").is_file():
                return _tiny_val(tiny)
        for name in SPLIT_ALIASES["val"]:
            if (p / name).is_dir() and _class_dirs(p / name):
                return _image_folder(p / name)
        if len(_class_dirs(p)) >= 2:  # one subfolder of images is more likely not a dataset at all
            return _image_folder(p)
    except (DatasetError, SourceError) as exc:
        raise VizError(str(exc)) from exc
    except OSError as exc:
        raise VizError(f"--data {exc.filename or path}: {exc.strerror or exc}") from exc
    raise VizError(f"--data {path}: not a validation set: expected manifest.json + val/*.tar (python -m "
                   f"preprocess.shard), val/<wnid>/*.JPEG, <wnid>/*.JPEG, or a Tiny-ImageNet val folder "
                   f"(images/ + val_annotations.txt)")


def match_model(data: ValData, num_classes: int) -> ValData:
    """`data` with labels in the model's output space. A 1000-class model on a subset of ImageNet
    (e.g. Tiny-ImageNet's 200 classes) gets each wnid's ImageNet index."""
    if len(data.classes) == num_classes:
        return data
    imagenet = imagenet_classes()
    index = {c.wnid: i for i, c in enumerate(imagenet)}
    if num_classes == len(imagenet) and all(c.wnid in index for c in data.classes):
        return replace(data, classes=tuple(imagenet), label_map=tuple(index[c.wnid] for c in data.classes),
                       note=f"{len(data.classes)} classes mapped to the 1000 ImageNet classes by wnid")
    raise VizError(f"--data {data.path}: has {len(data.classes)} classes, the checkpoint {num_classes}; "
                   f"cannot tell which output is which class")
