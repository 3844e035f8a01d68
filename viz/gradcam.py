"""`python -m viz.gradcam`: why the model is wrong, as pictures.

Evaluates a checkpoint on a validation split (the trainer's val preprocessing: resize the shorter side
to res / crop_ratio, centre-crop res, ImageNet normalisation), picks misclassified images (by default
the most confident mistakes) and draws one row per image: the crop the model saw, the Grad-CAM heatmap
of the predicted class and that of the true class. Writes the grid PNG, a JSON and a CSV list of the
selected images beside it, and prints the top-1 it measured. Never downloads weights.

Checkpoints: the trainer's best.pt / last.pt ({"model": state_dict, "config": ...}), a plain torchvision
ResNet state_dict (model_final.pth) or {"state_dict": ...} (an old model_best.pth.tar); "module." and
"_orig_mod." prefixes are stripped. Data: our shards (manifest.json + val/*.tar), an ImageFolder tree
(val/<wnid>/*.JPEG or <wnid>/*.JPEG) or a Tiny-ImageNet-200 val folder (images/ + val_annotations.txt).
"""

from __future__ import annotations

import argparse
import csv
import difflib
import io
import json
import os
import random
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytorch_grad_cam as pgc
import torch
import torchvision
import torchvision.transforms.functional as TF
import webdataset as wds
import yaml
from PIL import Image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from tqdm import tqdm

from preprocess.manifest import MANIFEST, DatasetError, load_manifest, split_shards
from preprocess.sources import (SPLIT_ALIASES, ClassInfo, SampleRef, SourceError, hash_order, image_files,
                                imagenet_classes, safe_key, unique_keys)
from train.data import MEAN as IMAGENET_MEAN, STD as IMAGENET_STD
from viz.render import GridRow, render_grid

DEFAULT_RES = 224  # px, when neither --res nor the checkpoint's config says
DEFAULT_CROP_RATIO = 0.875  # centre-crop side / resized shorter side (224/256)
FILES_PER_PART = 64  # images per unit of work handed to a loader worker (folder layouts)
SELECT_MODES = "confident | random | class=<name>"


class VizError(ValueError):
    """Input that cannot be used; the message names the path or flag and what is wrong."""


# ----------------------------------------------------------------------------- checkpoint

_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers
# (block type, blocks in layer3) -> torchvision constructor
_ARCHS = {("bottleneck", 6): "resnet50", ("bottleneck", 23): "resnet101", ("bottleneck", 36): "resnet152",
          ("basic", 2): "resnet18", ("basic", 6): "resnet34"}


@dataclass(frozen=True)
class LoadedModel:
    model: torch.nn.Module
    arch: str
    num_classes: int
    config: dict | None  # the trainer's resolved config: in the checkpoint, else the run folder's config.yaml
    blurpool: bool
    weights: str  # "model", or "ema" when the checkpoint carries EMA weights (the ones the trainer evaluates)


def strip_prefixes(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        while key.startswith(_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def detect_arch(state: dict) -> str | None:
    """The torchvision ResNet whose parameter names `state` has, or None."""
    if "fc.weight" not in state or "conv1.weight" not in state:
        return None
    block = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
    layer3_blocks = len({k.split(".")[1] for k in state if k.startswith("layer3.")})
    return _ARCHS.get((block, layer3_blocks))


def run_config(checkpoint: Path) -> dict | None:
    """RUN_DIR/config.yaml of a checkpoint saved as RUN_DIR/model_final.pth or RUN_DIR/checkpoints/*.pt."""
    for folder in (checkpoint.parent, checkpoint.parent.parent):
        if (folder / "config.yaml").is_file():
            try:
                config = yaml.safe_load((folder / "config.yaml").read_text())
            except yaml.YAMLError as exc:
                raise VizError(f"{folder / 'config.yaml'}: not valid YAML ({exc})") from exc
            return config if isinstance(config, dict) else None
    return None


def load_model(path: str | Path, num_classes: int | None = None, blurpool: bool | None = None) -> LoadedModel:
    """A torchvision ResNet in eval mode with the checkpoint's weights; never downloads anything.

    blurpool=None follows the trainer's config (BlurPool changes the function but not the state_dict, so
    a BlurPool model evaluated without it loses accuracy)."""
    path = Path(path)
    if not path.is_file():
        raise VizError(f"--checkpoint {path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and weights-only errors all mean the same to the user
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VizError(f"--checkpoint {path}: not a weights-only PyTorch checkpoint ({reason[:200]})") from exc
    config, weights = None, "model"
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        state, config = obj["model"], obj.get("config")
        ema = obj.get("ema")
        if isinstance(ema, dict) and isinstance(ema.get("model"), dict):
            state, weights = ema["model"], "ema"
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        state = obj["state_dict"]
    else:
        state = obj
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise VizError(f"--checkpoint {path}: expected a state_dict, or a dict with one under 'model' or 'state_dict'")
    state = strip_prefixes(state)
    arch = detect_arch(state)
    if arch is None:
        raise VizError(f"--checkpoint {path}: not a torchvision ResNet-18/34/50/101/152 state_dict "
                       f"(keys like {', '.join(list(state)[:3])})")
    classes = int(state["fc.weight"].shape[0])
    if num_classes is not None and num_classes != classes:
        raise VizError(f"--checkpoint {path}: has {classes} classes (fc.weight rows), --num-classes says {num_classes}")
    model = getattr(torchvision.models, arch)(weights=None, num_classes=classes)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{len(v)} {what} (e.g. {v[0]})" for what, v in
                 (("missing", missing), ("unexpected", unexpected), ("with a wrong shape", wrong)) if v]
        raise VizError(f"--checkpoint {path}: weights do not fit torchvision {arch}: {'; '.join(parts)}")
    model.load_state_dict(state, strict=False)  # only num_batches_tracked may be absent
    config = config if isinstance(config, dict) else run_config(path)
    if blurpool is None:
        blurpool = bool(((config or {}).get("model") or {}).get("blurpool", False))
    if blurpool:
        from train.model import add_blurpool  # the trainer's own definition, so both compute the same function

        add_blurpool(model)
    return LoadedModel(model.eval(), arch, classes, config, blurpool, weights)


def flip_setting(config: dict | None) -> bool:
    """Whether the trainer averaged each validation image with its mirror (its top-1 then matches ours)."""
    return bool(((config or {}).get("val") or {}).get("flip_tta", False))


def val_settings(config: dict | None) -> tuple[int, float]:
    """(res, crop_ratio) from the trainer's config, or the ImageNet defaults 224 / 0.875."""
    val = (config or {}).get("val") or {}
    return int(val.get("res", DEFAULT_RES)), float(val.get("crop_ratio", DEFAULT_CROP_RATIO))


# ----------------------------------------------------------------------------- preprocessing

def val_crop(image: Image.Image, res: int, crop_ratio: float) -> Image.Image:
    """The trainer's val view: shorter side resized to res / crop_ratio (bilinear), centre crop res x res."""
    image = TF.resize(image.convert("RGB"), round(res / crop_ratio), interpolation=TF.InterpolationMode.BILINEAR,
                      antialias=True)
    return TF.center_crop(image, [res, res])


def normalize(crop: Image.Image) -> torch.Tensor:
    """(3, H, W) float tensor, ImageNet mean/std normalised."""
    return TF.normalize(TF.to_tensor(crop), IMAGENET_MEAN, IMAGENET_STD)


# ----------------------------------------------------------------------------- data layouts

@dataclass(frozen=True)
class Part:
    """A unit of loading work: one tar shard, or a run of image files; `offset` = index of its first image."""
    offset: int
    count: int
    tar: str | None = None
    files: tuple[tuple[str, int, str], ...] = ()  # (key, label, path) when tar is None


@dataclass(frozen=True)
class ValData:
    layout: str  # "shards", "imagefolder" or "tiny-imagenet"
    path: str
    classes: tuple[ClassInfo, ...]  # indexed by the model's output
    parts: tuple[Part, ...]
    label_map: tuple[int, ...] | None = None  # dataset label -> model output, when they differ
    note: str = ""

    @property
    def size(self) -> int:
        return sum(p.count for p in self.parts)


def _folder_classes(wnids: list[str]) -> tuple[ClassInfo, ...]:
    names = {c.wnid: c.name for c in imagenet_classes()}
    return tuple(ClassInfo(w, names.get(w, w)) for w in wnids)


def _class_dirs(folder: Path) -> list[Path]:
    """Subfolders holding images directly (ImageFolder classes)."""
    return sorted(d for d in folder.iterdir() if d.is_dir() and image_files(d))


def _file_parts(refs: list[tuple[str, int]]) -> tuple[Part, ...]:
    """Parts of a folder layout from (path, label) in listing order. Folders list class by class; the
    fixed pseudo-random order of the shards (by key) keeps `--limit N` from seeing a single class."""
    keys = unique_keys([safe_key(Path(path).name) for path, _ in refs])
    ordered = hash_order([SampleRef(key, label, ("file", path)) for key, (path, label) in zip(keys, refs)])
    files = [(r.key, r.label, r.location[1]) for r in ordered]
    return tuple(Part(i, len(files[i:i + FILES_PER_PART]), files=tuple(files[i:i + FILES_PER_PART]))
                 for i in range(0, len(files), FILES_PER_PART))


def _shard_data(root: Path) -> ValData:
    manifest = load_manifest(root)
    shards = split_shards(root, "val", manifest)
    counts = [int(s["images"]) for s in manifest["splits"]["val"]["shards"]]
    parts, offset = [], 0
    for (tar, _), count in zip(shards, counts):
        parts.append(Part(offset, count, tar=str(tar)))
        offset += count
    classes = tuple(ClassInfo(c.get("wnid"), c.get("name") or c.get("wnid") or str(c["index"]))
                    for c in sorted(manifest["classes"], key=lambda c: c["index"]))
    return ValData("shards", str(root), classes, tuple(parts))


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
    return ValData("imagefolder", str(val), _folder_classes(wnids), _file_parts(refs))


def _tiny_val(val: Path) -> ValData:
    annotations = val / "val_annotations.txt"
    rows = []
    for n, line in enumerate(annotations.read_text().splitlines(), 1):
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
    return ValData("tiny-imagenet", str(val), _folder_classes(wnids), _file_parts(refs))


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


# ----------------------------------------------------------------------------- loading

def _part_samples(part: Part):
    """(index, key, label, encoded image bytes) of every image of a part, in order."""
    if part.tar is None:
        for i, (key, label, path) in enumerate(part.files):
            yield part.offset + i, key, label, Path(path).read_bytes()
        return
    samples = wds.WebDataset([part.tar], shardshuffle=False, nodesplitter=None, workersplitter=None,
                             empty_check=False)
    for i, sample in enumerate(samples):
        yield part.offset + i, sample["__key__"], int(sample["cls"].decode("ascii")), sample.get("jpg", b"")


class Batches(torch.utils.data.IterableDataset):
    """Decoded, val-preprocessed batches: (indices, keys, labels, images, crops or None, skipped keys).

    Loader workers take whole parts (worker w: parts w, w + W, ...); `limit` and `wanted` are global
    image indices, so the result does not depend on the number of workers."""

    def __init__(self, data: ValData, res: int, crop_ratio: float, batch_size: int, limit: int | None = None,
                 wanted: set[int] | None = None, with_crops: bool = False):
        self.data, self.res, self.crop_ratio, self.batch_size = data, res, crop_ratio, batch_size
        self.limit = data.size if limit is None else min(limit, data.size)
        self.wanted, self.with_crops = wanted, with_crops

    def _wanted_in(self, part: Part) -> bool:
        if part.offset >= self.limit:
            return False
        return self.wanted is None or any(part.offset <= i < part.offset + part.count for i in self.wanted)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        batch, skipped = [], []
        for j, part in enumerate(self.data.parts):
            if j % workers != worker or not self._wanted_in(part):
                continue
            for index, key, label, encoded in _part_samples(part):
                if index >= self.limit:
                    break
                if self.wanted is not None and index not in self.wanted:
                    continue
                try:
                    crop = val_crop(Image.open(io.BytesIO(encoded)), self.res, self.crop_ratio)
                except Exception:  # a corrupt image is counted, never a crash
                    skipped.append(key)
                    continue
                if self.data.label_map is not None:
                    label = self.data.label_map[label]
                batch.append((index, key, label, normalize(crop), crop if self.with_crops else None))
                if len(batch) == self.batch_size:
                    yield self._collate(batch, skipped)
                    batch, skipped = [], []
        if batch or skipped:
            yield self._collate(batch, skipped)

    def _collate(self, batch, skipped):
        images = torch.stack([b[3] for b in batch]) if batch else torch.zeros(0, 3, self.res, self.res)
        crops = [np.asarray(b[4]) for b in batch] if self.with_crops else None
        return [b[0] for b in batch], [b[1] for b in batch], [b[2] for b in batch], images, crops, skipped


def _as_is(batch):
    return batch


def load_batches(dataset: Batches, workers: int):
    # collate_fn=_as_is: the dataset batches itself, and its crops must stay numpy arrays.
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_as_is)


# ----------------------------------------------------------------------------- evaluation and selection

@dataclass(frozen=True)
class Prediction:
    index: int  # position in the split
    key: str
    label: int
    predicted: int
    confidence: float  # softmax probability of the predicted class
    true_prob: float  # softmax probability of the true class


def evaluate(model: torch.nn.Module, batches, device: torch.device, total: int | None = None,
             progress: bool = True, flip: bool = False) -> tuple[list[Prediction], list[str]]:
    """Predictions for every readable image (in split order) and the keys of unreadable ones; with `flip`
    the logits are averaged with those of the left-right mirror, as the trainer's validation does."""
    model.eval()
    predictions, skipped = [], []
    with torch.inference_mode(), tqdm(total=total, unit="img", desc="evaluating", disable=not progress,
                                      dynamic_ncols=True) as bar:
        for indices, keys, labels, images, _, bad in batches:
            skipped += bad
            bar.update(len(indices) + len(bad))
            if not indices:
                continue
            images = images.to(device)
            logits = model(images).float()
            if flip:
                logits = (logits + model(torch.flip(images, dims=[3])).float()) / 2
            probs = torch.softmax(logits, dim=1).cpu()
            confidence, predicted = probs.max(dim=1)
            true_prob = probs[torch.arange(len(labels)), torch.tensor(labels)]
            predictions += [Prediction(i, k, l, int(p), float(c), float(t)) for i, k, l, p, c, t in
                            zip(indices, keys, labels, predicted, confidence, true_prob)]
    return sorted(predictions, key=lambda p: p.index), skipped


def find_class(name: str, classes) -> int:
    """Index of the class called `name` (or with that wnid), case-insensitive."""
    wanted = name.strip().lower()
    for i, c in enumerate(classes):
        if wanted in (c.name.lower(), (c.wnid or "").lower()):
            return i
    close = difflib.get_close_matches(wanted, [c.name.lower() for c in classes], n=3)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise VizError(f"--select class={name}: no such class{hint}")


def select_mistakes(predictions: list[Prediction], num_show: int, how: str = "confident", seed: int = 0,
                    class_index: int | None = None) -> list[Prediction]:
    """Misclassified predictions, most confident first. how="random" draws them with `seed` instead of
    taking the top; `class_index` keeps only mistakes whose true class it is."""
    mistakes = [p for p in predictions if p.predicted != p.label]
    if class_index is not None:
        mistakes = [p for p in mistakes if p.label == class_index]
    if how == "random":
        mistakes = random.Random(seed).sample(sorted(mistakes, key=lambda p: p.index), min(num_show, len(mistakes)))
    return sorted(mistakes, key=lambda p: (-p.confidence, p.index))[:num_show]


# ----------------------------------------------------------------------------- Grad-CAM

# --method name -> grad-cam class; all weigh the activations of one target layer
CAM_METHODS = {"gradcam": pgc.GradCAM, "gradcam++": pgc.GradCAMPlusPlus, "hirescam": pgc.HiResCAM,
               "xgradcam": pgc.XGradCAM, "layercam": pgc.LayerCAM, "eigencam": pgc.EigenCAM,
               "eigengradcam": pgc.EigenGradCAM, "scorecam": pgc.ScoreCAM, "ablationcam": pgc.AblationCAM}


def compute_cams(model: torch.nn.Module, target_layer: torch.nn.Module, images: torch.Tensor,
                 categories: list[int], method: str = "gradcam", batch_size: int = 32) -> np.ndarray:
    """(N, H, W) heatmaps in [0, 1]: where `target_layer`'s features raise the score of each image's category."""
    if len(images) == 0:
        return np.zeros((0, *images.shape[-2:]), dtype=np.float32)
    device = next(model.parameters()).device
    heatmaps = []
    with CAM_METHODS[method](model=model, target_layers=[target_layer]) as cam:
        for start in range(0, len(images), batch_size):
            targets = [ClassifierOutputTarget(int(c)) for c in categories[start:start + batch_size]]
            heatmaps.append(cam(input_tensor=images[start:start + batch_size].to(device), targets=targets))
    return np.concatenate(heatmaps).astype(np.float32)


# ----------------------------------------------------------------------------- the report

@dataclass(frozen=True)
class Report:
    evaluated: int
    skipped: int
    top1: float  # fraction of evaluated images
    mistakes: int
    selected: list[Prediction]


def output_paths(png: Path) -> tuple[Path, Path]:
    return png.with_suffix(".json"), png.with_suffix(".csv")


def write_lists(png: Path, report: Report, classes, meta: dict) -> None:
    """The selected images as JSON (with run metadata) and CSV, beside the PNG."""
    rows = [{"rank": rank, "key": p.key, "true": classes[p.label].name, "true_index": p.label,
             "predicted": classes[p.predicted].name, "predicted_index": p.predicted,
             "confidence": round(p.confidence, 6), "true_prob": round(p.true_prob, 6)}
            for rank, p in enumerate(report.selected, 1)]
    json_path, csv_path = output_paths(png)
    summary = {**meta, "evaluated": report.evaluated, "skipped": report.skipped, "top1": round(report.top1, 6),
               "misclassified": report.mistakes, "images": rows}
    json_path.write_text(json.dumps(summary, indent=1) + "\n")
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["rank", "key", "true", "true_index", "predicted", "predicted_index",
                                               "confidence", "true_prob"])
        writer.writeheader()
        writer.writerows(rows)


def explain(model: torch.nn.Module, target_layer: torch.nn.Module, data: ValData, png: Path, *,
            num_show: int = 20, how: str = "confident", seed: int = 0, class_index: int | None = None,
            method: str = "gradcam", res: int = DEFAULT_RES, crop_ratio: float = DEFAULT_CROP_RATIO,
            batch_size: int = 64, limit: int | None = None, workers: int = 0, progress: bool = True,
            title: str = "", meta: dict | None = None, flip: bool = False) -> Report:
    """Evaluate, select mistakes, draw their Grad-CAM grid to `png` and list them beside it.

    `target_layer` is the layer whose activations Grad-CAM weighs (model.layer4[-1] for a ResNet); `title`
    names the model in the header; `meta` goes into the JSON list as is."""
    device = next(model.parameters()).device
    dataset = Batches(data, res, crop_ratio, batch_size, limit)
    predictions, skipped = evaluate(model, load_batches(dataset, workers), device, dataset.limit, progress, flip)
    if not predictions:
        raise VizError(f"--data {data.path}: no readable images ({len(skipped)} unreadable)")
    top1 = sum(p.predicted == p.label for p in predictions) / len(predictions)
    mistakes = sum(p.predicted != p.label for p in predictions)
    selected = select_mistakes(predictions, num_show, how, seed, class_index)

    crops: dict[int, np.ndarray] = {}
    images: dict[int, torch.Tensor] = {}
    if selected:
        again = Batches(data, res, crop_ratio, batch_size, limit, wanted={p.index for p in selected}, with_crops=True)
        for indices, _, _, batch, batch_crops, _ in load_batches(again, min(workers, len(selected))):
            crops.update(zip(indices, batch_crops))
            images.update(zip(indices, batch))
    selected = [p for p in selected if p.index in images]  # an image could vanish between the two passes
    stacked = torch.stack([images[p.index] for p in selected]) if selected else torch.zeros(0, 3, res, res)
    cams_predicted = compute_cams(model, target_layer, stacked, [p.predicted for p in selected], method, batch_size)
    cams_true = compute_cams(model, target_layer, stacked, [p.label for p in selected], method, batch_size)

    classes = data.classes
    rows = [GridRow(Image.fromarray(crops[p.index]), cp, ct, rank, p.key, classes[p.label].name,
                    classes[p.predicted].name, p.confidence, p.true_prob)
            for rank, (p, cp, ct) in enumerate(zip(selected, cams_predicted, cams_true), 1)]
    of_class = f" of true class '{classes[class_index].name}'" if class_index is not None else ""
    what = {"confident": "most confident mistakes", "random": "random mistakes"}[how]
    shown = (f"{len(rows)} {what}{of_class} (of {mistakes} misclassified)" if rows
             else f"no misclassified images{of_class}")
    header = (shown,
              f"top-1 {top1:.2%} on {len(predictions)} images" + (f" | {title}" if title else ""),
              f"columns: input crop ({res} px) | {method}: predicted class | {method}: true class")
    report = Report(len(predictions), len(skipped), top1, mistakes, selected)
    try:
        render_grid(rows, header).save(png)
        write_lists(png, report, classes, meta or {})
    except OSError as exc:
        raise VizError(f"--output {png}: cannot write ({exc.strerror or exc})") from exc
    return report


# ----------------------------------------------------------------------------- CLI

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m viz.gradcam",
        description="Evaluate a checkpoint on validation data and draw Grad-CAM heatmaps of its mistakes: one row "
                    "per image (input crop | CAM of the predicted class | CAM of the true class). Also writes "
                    "<output>.json and <output>.csv listing the images, and prints the measured top-1.")
    p.add_argument("--checkpoint", "--checkpoint_path", dest="checkpoint", required=True,
                   help="best.pt / last.pt of the trainer, model_final.pth, or any torchvision ResNet state_dict")
    p.add_argument("--data", "--validation_img_path", dest="data", required=True,
                   help="validation data: shards folder (manifest.json + val/*.tar), ImageFolder (val/<wnid>/*.JPEG "
                        "or <wnid>/*.JPEG) or a Tiny-ImageNet val folder (images/ + val_annotations.txt)")
    p.add_argument("--output", "--output_path", dest="output", required=True, type=Path,
                   help="grid PNG to write; the .json and .csv lists go beside it")
    p.add_argument("--num-show", "--num_show", dest="num_show", type=int, default=20,
                   help="misclassified images to show, one row each (default 20)")
    p.add_argument("--num-classes", "--num_classes", dest="num_classes", type=int, default=None,
                   help="expected class count; an error if the checkpoint has another (default: trust the checkpoint)")
    p.add_argument("--select", default="confident",
                   help=f"which mistakes: {SELECT_MODES} (mistakes whose true class has that name or wnid); "
                        f"always shown most confident first (default confident)")
    p.add_argument("--seed", type=int, default=0, help="seed of --select random (default 0)")
    p.add_argument("--method", default="gradcam", choices=list(CAM_METHODS), help="CAM method (default gradcam)")
    p.add_argument("--blurpool", default="auto", choices=["auto", "on", "off"],
                   help="anti-aliased strided convs as the trainer builds them; auto: as the checkpoint's config (or "
                        "the run folder's config.yaml) says, else off (default auto)")
    p.add_argument("--flip-tta", default="auto", choices=["auto", "on", "off"],
                   help="average each image's prediction with its left-right mirror (the CAMs use the image as "
                        "is); auto: as the checkpoint's config says, else off (default auto)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--res", type=int, default=None,
                   help="centre-crop side, px (default: the checkpoint config's val.res, else 224)")
    p.add_argument("--crop-ratio", type=float, default=None,
                   help="crop side / resized shorter side (default: the checkpoint config's val.crop_ratio, else 0.875)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N images of the split")
    p.add_argument("--workers", type=int, default=min(8, max(1, (os.cpu_count() or 1) - 1)),
                   help="image decoding processes (default: cores - 1, at most 8; 0: decode in this process)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    return p.parse_args(argv)


def _check_args(args: argparse.Namespace) -> str:
    """The selection mode ("confident" or "random") after checking every numeric flag."""
    for flag, value, least in (("--num-show", args.num_show, 1), ("--batch-size", args.batch_size, 1),
                               ("--res", args.res, 8), ("--limit", args.limit, 1), ("--workers", args.workers, 0),
                               ("--num-classes", args.num_classes, 1)):
        if value is not None and value < least:
            raise VizError(f"{flag} {value}: must be at least {least}")
    if args.crop_ratio is not None and not 0 < args.crop_ratio <= 1:
        raise VizError(f"--crop-ratio {args.crop_ratio}: must be in (0, 1]")
    if args.select in ("confident", "random"):
        return args.select
    if args.select.startswith("class=") and args.select[6:].strip():
        return "confident"
    raise VizError(f"--select {args.select}: expected {SELECT_MODES}")


def _device(name: str | None) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise VizError("--device cuda: CUDA is not available on this machine; use --device cpu")
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def run(args: argparse.Namespace) -> Report:
    how = _check_args(args)
    out = Path(args.output)
    if out.suffix.lower() != ".png":
        raise VizError(f"--output {out}: expected a .png file name")
    loaded = load_model(args.checkpoint, args.num_classes, {"auto": None, "on": True, "off": False}[args.blurpool])
    data = open_data(args.data)
    data = match_model(data, loaded.num_classes)
    class_index = find_class(args.select[6:], data.classes) if args.select.startswith("class=") else None
    res, crop_ratio = val_settings(loaded.config)
    flip = {"auto": flip_setting(loaded.config), "on": True, "off": False}[args.flip_tta]
    res, crop_ratio = args.res or res, args.crop_ratio or crop_ratio
    device = _device(args.device)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VizError(f"--output {out}: cannot create {out.parent} ({exc.strerror or exc})") from exc
    details = [d for d, on in (("BlurPool", loaded.blurpool), ("EMA weights", loaded.weights == "ema")) if on]
    model_text = f"{loaded.arch} ({', '.join(details)})" if details else loaded.arch
    print(f"{model_text} with {loaded.num_classes} classes from {args.checkpoint}; {data.layout} data at {data.path}: "
          f"{data.size} images" + (f" ({data.note})" if data.note else ""))
    meta = {"checkpoint": str(args.checkpoint), "data": str(args.data), "arch": loaded.arch,
            "blurpool": loaded.blurpool, "weights": loaded.weights, "select": args.select,
            "method": args.method, "res": res, "crop_ratio": crop_ratio, "flip_tta": flip}
    model = loaded.model.to(device)
    return explain(model, model.layer4[-1], data, out, num_show=args.num_show, how=how, seed=args.seed,
                   class_index=class_index, method=args.method, res=res, crop_ratio=crop_ratio,
                   batch_size=args.batch_size, limit=args.limit, workers=args.workers,
                   progress=not args.no_progress, title=Path(args.checkpoint).name, meta=meta, flip=flip)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        report = run(args)
    except VizError as exc:
        print(f"viz.gradcam: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("viz.gradcam: interrupted", file=sys.stderr)
        return 130
    out = Path(args.output)
    json_path, csv_path = output_paths(out)
    skipped = f"; {report.skipped} unreadable images skipped" if report.skipped else ""
    print(f"top-1 {report.top1:.2%} ({report.evaluated - report.mistakes}/{report.evaluated} images){skipped}")
    if not report.selected:
        print("no misclassified images to show" + (f" for --select {args.select}" if args.select != "confident" else ""))
    else:
        print(f"{report.mistakes} misclassified; showing {len(report.selected)} ({args.select})")
    print(f"wrote {out}, {json_path}, {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
