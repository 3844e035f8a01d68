"""Which validation images there are, under which labels and class names: the layouts viz reads.

- our shards (manifest.json + val/*.tar): read by train.data's own validation loader;
- an ImageFolder tree (val/<wnid>/*.JPEG or <wnid>/*.JPEG; the class list is train/'s when there is one);
- a Tiny-ImageNet-200 val folder (images/ + val_annotations.txt; classes from wnids.txt);
- ImageNet-V2's layout: class-index folders `0`..`999` (a folder's name is its ImageNet-1k class index, not a
  position in sorted order: torchvision's ImageFolder would read folder `10` as class 2).
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

IMAGENET_CLASSES = 1000  # ImageNet-V2's folder names are indices into these


@dataclass(frozen=True)
class ValData:
    layout: str  # "shards", "imagefolder", "tiny-imagenet" or "imagenet-v2"
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


def _is_index_folder(name: str) -> bool:
    return name.isdigit() and name.isascii() and str(int(name)) == name and int(name) < IMAGENET_CLASSES


def _imagenet_v2(folder: Path) -> ValData:
    """ImageNet-V2: images in folders named by their ImageNet-1k class index; the classes are ImageNet-1k's."""
    classes = imagenet_classes()
    refs = [(str(p), int(d.name)) for d in _class_dirs(folder) for p in image_files(d)]
    files = _ordered_files(refs)
    return ValData("imagenet-v2", str(folder), tuple(classes), len(files), files,
                   note="ImageNet-V2 layout: each folder's name is its ImageNet-1k class index")


def _folder_layout(folder: Path) -> ValData:
    """ImageNet-V2 when every class folder is named by an ImageNet-1k index (0..999), else an ImageFolder."""
    names = [d.name for d in _class_dirs(folder)]
    if names and all(_is_index_folder(n) for n in names):
        return _imagenet_v2(folder)
    return _image_folder(folder)


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
                return _folder_layout(p / name)
        if len(_class_dirs(p)) >= 2:  # one subfolder of images is more likely not a dataset at all
            return _folder_layout(p)
    except (DatasetError, SourceError) as exc:
        raise VizError(str(exc)) from exc
    except OSError as exc:
        raise VizError(f"--data {exc.filename or path}: {exc.strerror or exc}") from exc
    raise VizError(f"--data {path}: not a validation set: expected manifest.json + val/*.tar (python -m "
                   f"preprocess.shard), val/<wnid>/*.JPEG, <wnid>/*.JPEG, a Tiny-ImageNet val folder "
                   f"(images/ + val_annotations.txt) or ImageNet-V2's <class index>/*.jpeg")


LABEL_SPACES = ("auto", "imagenet", "folder")
# --label-space auto picks folder order when at least this share of the model's top-1 predictions are
# outputs 0..K-1 (and more than land on the data's wnid indices): a model trained on K folders puts nearly
# all there, an ImageNet model about K/1000 plus its hits.
FOLDER_SHARE = 0.5


def _wnid_map(data: ValData, num_classes: int, model_classes) -> tuple[tuple[ClassInfo, ...], tuple[int, ...]] | None:
    """(the model's classes, data label -> model output) by wnid, when every class of `data` has a wnid in the
    model's class list (its card's; ImageNet-1k's for a 1000-output model without one), else None."""
    if model_classes is None and num_classes == 1000:
        model_classes = imagenet_classes()
    if model_classes is None or len(model_classes) != num_classes:
        return None
    index = {c.wnid: i for i, c in enumerate(model_classes) if c.wnid}
    if not all(c.wnid in index for c in data.classes):
        return None
    return tuple(model_classes), tuple(index[c.wnid] for c in data.classes)


def needs_evidence(data: ValData, num_classes: int, model_classes=None) -> bool:
    """Whether --label-space auto has to look at the model's predictions: the data has fewer classes than the
    model, and folder order and the wnid index would label its images differently."""
    if len(data.classes) >= num_classes:
        return False
    mapped = _wnid_map(data, num_classes, model_classes)
    return mapped is None or mapped[1] != tuple(range(len(data.classes)))


def match_model(data: ValData, num_classes: int, *, label_space: str = "auto", argmaxes: list[int] | None = None,
                model_classes=None) -> ValData:
    """`data` with labels in the model's output space.

    With as many classes as the model: as they are (by wnid when the model's class list has them in another
    order). With fewer: "imagenet" gives each wnid its index in the model's class list (ImageNet-1k's for a
    1000-output model, e.g. Tiny-ImageNet's 200 classes); "folder" takes data class i as output i (a model
    trained on those folders with a larger head); "auto" decides from `argmaxes`, the model's top-1 outputs
    on some of the images (without them: by wnid when possible). `note` says which and why."""
    if label_space not in LABEL_SPACES:
        raise VizError(f"--label-space {label_space}: expected one of {', '.join(LABEL_SPACES)}")
    k = len(data.classes)
    mapped = _wnid_map(data, num_classes, model_classes)
    if k == num_classes:
        if mapped is not None and mapped[1] != tuple(range(k)) and label_space != "folder":
            return replace(data, classes=mapped[0], label_map=mapped[1],
                           note=f"the {k} classes put in the model's class order by wnid")
        return data
    if k > num_classes:
        v2 = (" (ImageNet-V2 layout: folders named 0..999 are ImageNet-1k class indices; a model of fewer "
              "classes cannot be scored on them)" if data.layout == "imagenet-v2" else "")
        raise VizError(f"--data {data.path}: has {k} classes, the checkpoint {num_classes}; "
                       f"cannot tell which output is which class{v2}")
    unused = tuple(ClassInfo(None, f"output {i}") for i in range(k, num_classes))
    folder = replace(data, classes=tuple(data.classes) + unused, label_map=None)

    def by_wnid(why: str) -> ValData:
        return replace(data, classes=mapped[0], label_map=mapped[1],
                       note=f"{k} classes mapped to the model's {num_classes} classes by wnid (ImageNet index){why}")

    if label_space == "folder":
        return replace(folder, note=f"folder order: data class i is model output i, 0-{k - 1} of {num_classes} "
                                    f"(--label-space folder)")
    if label_space == "imagenet":
        if mapped is None:
            raise VizError(f"--label-space imagenet: the {k} classes of {data.path} are not all wnids of the "
                           f"model's {num_classes} classes")
        return by_wnid(" (--label-space imagenet)")
    if mapped is not None and (mapped[1] == tuple(range(k)) or argmaxes is None):
        return by_wnid("")
    if not argmaxes:
        raise VizError(f"--data {data.path}: has {k} classes, the checkpoint {num_classes}; cannot tell which "
                       f"output is which class (--label-space folder: data class i is output i)")
    n, below = len(argmaxes), sum(a < k for a in argmaxes)
    targets = set(mapped[1]) if mapped is not None else set()
    at_wnids = sum(a in targets for a in argmaxes)
    evidence = f"of the model's top-1 predictions on {n} images, {below} are outputs 0-{k - 1}"
    if mapped is not None:
        evidence += f" and {at_wnids} the ImageNet indices of the data's wnids"
    if below >= FOLDER_SHARE * n and below > at_wnids:
        return replace(folder, note=f"folder order (data class i is output i): {evidence}; --label-space imagenet "
                                    f"overrides" if mapped is not None else
                                    f"folder order (data class i is output i; the class folders are not wnids of the "
                                    f"model's classes): {evidence}")
    if mapped is None:
        raise VizError(f"--data {data.path}: has {k} classes, the checkpoint {num_classes}, and its class folders are "
                       f"not wnids of the model's classes; {evidence}, too few for folder order: pass "
                       f"--label-space folder to score output i as class i anyway")
    return by_wnid(f": {evidence}; --label-space folder overrides")
