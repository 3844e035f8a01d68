"""`python -m viz.gradcam`: why the model is wrong, as pictures.

Evaluates a checkpoint on a validation split with the trainer's own validation input (train.data's DALI
pipeline: resize the shorter side to res / crop_ratio, centre-crop res, ImageNet normalisation) and its
own scoring (train.engine.eval_logits), so the top-1 printed is the trainer's for the same weights and
settings. Saves the predictions (<output stem>_predictions.csv + .json), picks misclassified images (by
default the most confident mistakes) and draws one row per image: the crop the model saw, the Grad-CAM
heatmap of the predicted class and that of the true class. Writes the grid PNG and a JSON and a CSV list
of the selected images beside it. Never downloads weights. The HTML report of a whole run is
`python -m viz.report`.

This module is the command line; the work is done by viz.weights (checkpoints), viz.datasets (layouts),
viz.loader (DALI batches), viz.evaluate (predictions), viz.select, viz.cam and viz.render.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from preprocess.cli import ArgumentParser
from preprocess.sources import ClassInfo  # noqa: F401  (re-exported: the classes of a ValData)
from train.data import MEAN as IMAGENET_MEAN, STD as IMAGENET_STD  # noqa: F401  (re-exported for callers)
from viz import evaluate as evaluation, loader
from viz.cam import CAM_METHODS, cam_pairs, compute_cams  # noqa: F401
from viz.datasets import LABEL_SPACES, ValData, match_model, needs_evidence, open_data
from viz.evaluate import Evaluation, Prediction, format_top5  # noqa: F401
from viz.render import GridRow, render_grid
from viz.select import SELECT_MODES, find_class, select_mistakes
from viz.weights import (DEFAULT_CROP_RATIO, DEFAULT_RES, WEIGHT_CHOICES, VizError, describe,  # noqa: F401
                         flip_setting, load_model, precision_setting, val_batch_size, val_settings)


@dataclass(frozen=True)
class Report:
    evaluated: int
    skipped: int
    top1: float  # fraction of evaluated images
    mistakes: int
    selected: list[Prediction]
    evaluation: Evaluation | None = None


def output_paths(png: Path) -> tuple[Path, Path]:
    return png.with_suffix(".json"), png.with_suffix(".csv")


def predictions_path(png: Path) -> Path:
    return png.with_name(f"{png.stem}_predictions.csv")


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


def run_evaluation(model: torch.nn.Module, data: ValData, *, res: int, crop_ratio: float, batch_size: int,
                   limit: int | None, threads: int, flip: bool, amp_dtype: torch.dtype | None = None,
                   progress: bool = True, meta: dict | None = None) -> Evaluation:
    """Evaluate `model` (on its device; DALI decodes on the GPU when the model is there) over the split."""
    device = next(model.parameters()).device
    dali_device = "gpu" if device.type == "cuda" else "cpu"
    total = data.size if limit is None else min(limit, data.size)
    batches = loader.batches(data, res=res, crop_ratio=crop_ratio, batch_size=batch_size, device=dali_device,
                             num_threads=threads, dtype=amp_dtype or torch.float32, limit=limit)
    result = evaluation.predict(model, batches, device=device, amp_dtype=amp_dtype, flip=flip, total=total,
                                progress=progress)
    if not result.predictions:
        raise VizError(f"--data {data.path}: no readable images ({len(result.skipped)} unreadable)")
    result.meta.update(meta or {})
    result.meta.update({"res": res, "crop_ratio": crop_ratio, "flip_tta": flip, "batch_size": batch_size,
                        "limit": limit, "precision": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
                        "device": str(device)})
    return result


def cam_rows(model: torch.nn.Module, target_layer: torch.nn.Module, data: ValData, selected: list[Prediction], *,
             res: int, crop_ratio: float, method: str = "gradcam", batch_size: int = 32,
             threads: int = 2) -> list[GridRow]:
    """One grid row per selected prediction: its crop and the CAMs of its predicted and its true class."""
    device = next(model.parameters()).device
    images = loader.fetch_images(data, [p.index for p in selected], res=res, crop_ratio=crop_ratio,
                                 device="gpu" if device.type == "cuda" else "cpu", num_threads=threads)
    selected = [p for p in selected if p.index in images]  # an image could vanish between the two passes
    stacked = torch.stack([images[p.index] for p in selected]) if selected else torch.zeros(0, 3, res, res)
    cams_predicted, cams_true = cam_pairs(model, target_layer, stacked, [p.predicted for p in selected],
                                          [p.label for p in selected], method, batch_size)
    classes = data.classes
    return [GridRow(Image.fromarray(loader.to_pixels(images[p.index])), cp, ct, rank, p.key, classes[p.label].name,
                    classes[p.predicted].name, p.confidence, p.true_prob)
            for rank, (p, cp, ct) in enumerate(zip(selected, cams_predicted, cams_true), 1)]


def explain(model: torch.nn.Module, target_layer: torch.nn.Module, data: ValData, png: Path, *,
            num_show: int = 20, how: str = "confident", seed: int = 0, class_index: int | None = None,
            method: str = "gradcam", res: int = DEFAULT_RES, crop_ratio: float = DEFAULT_CROP_RATIO,
            batch_size: int = 64, limit: int | None = None, workers: int = 2, progress: bool = True,
            title: str = "", meta: dict | None = None, flip: bool = False,
            amp_dtype: torch.dtype | None = None) -> Report:
    """Evaluate, save the predictions, select mistakes, draw their Grad-CAM grid to `png` and list them.

    `target_layer` is the layer whose activations Grad-CAM weighs (model.layer4[-1] for a ResNet); `title`
    names the model in the header; `meta` goes into the JSON lists as is; `workers` are DALI threads."""
    result = run_evaluation(model, data, res=res, crop_ratio=crop_ratio, batch_size=batch_size, limit=limit,
                            threads=workers, flip=flip, amp_dtype=amp_dtype, progress=progress, meta=meta)
    predictions = result.predictions
    selected = select_mistakes(predictions, num_show, how, seed, class_index)
    rows = cam_rows(model, target_layer, data, selected, res=res, crop_ratio=crop_ratio, method=method,
                    batch_size=min(batch_size, 32), threads=workers)
    classes = data.classes
    of_class = f" of true class '{classes[class_index].name}'" if class_index is not None else ""
    what = {"confident": "most confident mistake", "random": "random mistake"}[how] + ("" if len(rows) == 1 else "s")
    shown = (f"{len(rows)} {what}{of_class} (of {result.mistakes} misclassified)" if rows
             else f"no misclassified images{of_class}")
    header = (shown,
              f"top-1 {result.top1:.2%} on {len(predictions)} images" + (f" | {title}" if title else ""),
              f"columns: input crop ({res} px) | {method}: predicted class | {method}: true class")
    report = Report(len(predictions), len(result.skipped), result.top1, result.mistakes,
                    [p for p in selected if any(r.key == p.key for r in rows)], result)
    try:
        evaluation.save(predictions_path(png), result)
        render_grid(rows, header).save(png)
        write_lists(png, report, classes, meta or {})
    except OSError as exc:
        raise VizError(f"--output {png}: cannot write ({exc.strerror or exc})") from exc
    return report


# ----------------------------------------------------------------------------- CLI

def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(
        prog="python -m viz.gradcam",
        description="Evaluate a checkpoint on validation data with the trainer's own pipeline and draw Grad-CAM "
                    "heatmaps of its mistakes: one row per image (input crop | CAM of the predicted class | CAM of "
                    "the true class). Also writes <output>.json and <output>.csv listing the images, "
                    "<output>_predictions.csv (+ .json) with every image's top-5, and prints the measured top-1.")
    p.add_argument("--checkpoint", "--checkpoint_path", dest="checkpoint", required=True,
                   help="best.pt / last.pt of the trainer, model_final.pth, PyTorch's ImageNet-example "
                        "model_best.pth.tar, or any torchvision ResNet state_dict")
    p.add_argument("--data", "--validation_img_path", dest="data", required=True,
                   help="validation data: shards folder (manifest.json + val/*.tar), ImageFolder (val/<wnid>/*.JPEG "
                        "or <wnid>/*.JPEG) or a Tiny-ImageNet val folder (images/ + val_annotations.txt)")
    p.add_argument("--output", "--out", "--output_path", dest="output", required=True, type=Path,
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
    add_model_flags(p)
    p.add_argument("--num-threads", "--workers", dest="workers", type=int, metavar="N",
                   default=min(8, max(1, (os.cpu_count() or 1) - 1)),
                   help="DALI decoding threads (default: cores - 1, at most 8; --workers is the old name)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    return p.parse_args(argv)


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared with viz.report: how the checkpoint is evaluated."""
    p.add_argument("--weights", default="auto", choices=WEIGHT_CHOICES,
                   help="of our checkpoints: the EMA or the raw weights; auto: EMA when there are any, as the "
                        "trainer validated them (default auto)")
    p.add_argument("--blurpool", default="auto", choices=["auto", "on", "off"],
                   help="anti-aliased strided convs as the trainer builds them; auto: as the checkpoint's config (or "
                        "the run folder's config.yaml) says, else off (default auto)")
    p.add_argument("--flip-tta", default="auto", choices=["auto", "on", "off"],
                   help="average each image's prediction with its left-right mirror (the CAMs use the image as "
                        "is); auto: as the checkpoint's config says, else off (default auto)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast dtype of evaluation; auto: the checkpoint config's run.precision (fp32 on a CPU)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per forward pass (default: the checkpoint config's val.batch_size, else 64)")
    p.add_argument("--res", type=int, default=None,
                   help="centre-crop side, px (default: the checkpoint config's val.res, else 224)")
    p.add_argument("--crop-ratio", type=float, default=None,
                   help="crop side / resized shorter side (default: the checkpoint config's val.crop_ratio, else 0.875)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N images of the split")
    p.add_argument("--label-space", default="auto", choices=LABEL_SPACES,
                   help="when the data has fewer classes than the model: imagenet (each class folder's wnid -> its "
                        "index in the model's class list, ImageNet-1k's for a 1000-output model without one) or "
                        "folder (class i of the data -> output i, as a model trained on those folders); auto: "
                        "decided from the model's predictions on the first 128 images, and printed (default auto)")


def check_numbers(args: argparse.Namespace) -> None:
    for flag, value, least in (("--num-show", getattr(args, "num_show", None), 1),
                               ("--batch-size", args.batch_size, 1), ("--res", args.res, 8),
                               ("--limit", args.limit, 1), ("--workers", getattr(args, "workers", None), 0),
                               ("--num-classes", getattr(args, "num_classes", None), 1)):
        if value is not None and value < least:
            raise VizError(f"{flag} {value}: must be at least {least}")
    if args.crop_ratio is not None and not 0 < args.crop_ratio <= 1:
        raise VizError(f"--crop-ratio {args.crop_ratio}: must be in (0, 1]")


def _check_args(args: argparse.Namespace) -> str:
    """The selection mode ("confident" or "random") after checking every numeric flag."""
    check_numbers(args)
    if args.select in ("confident", "random"):
        return args.select
    if args.select.startswith("class=") and args.select[6:].strip():
        return "confident"
    raise VizError(f"--select {args.select}: expected {SELECT_MODES}")


def pick_device(name: str | None) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise VizError("--device cuda: CUDA is not available on this machine; use --device cpu")
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


@dataclass(frozen=True)
class Setup:
    """A checkpoint ready to evaluate and the settings it is evaluated with."""
    loaded: object  # viz.weights.LoadedModel
    model: torch.nn.Module
    res: int
    crop_ratio: float
    flip: bool
    batch_size: int
    amp_dtype: torch.dtype | None
    device: torch.device


def prepare(checkpoint: str, *, num_classes: int | None, weights: str, blurpool: str, flip_tta: str,
            device: str | None, precision: str, batch_size: int | None, res: int | None,
            crop_ratio: float | None) -> Setup:
    """The model on its device with the evaluation settings: flags first, then the checkpoint's config."""
    from train.engine import pick_precision

    loaded = load_model(checkpoint, num_classes, {"auto": None, "on": True, "off": False}[blurpool], weights)
    card = loaded.card  # the file's own settings (its card, its config, its run folder's), else the defaults
    flip = {"auto": card["flip_tta"], "on": True, "off": False}[flip_tta]
    torch_device = pick_device(device)
    wanted = card["precision"] if precision == "auto" else precision
    try:
        amp_dtype = pick_precision(wanted, torch_device.type)
    except ValueError as exc:
        raise VizError(f"--precision {precision}: {exc}") from exc
    model = loaded.model.to(torch_device)
    setup = Setup(loaded, model, res or card["val_res"], crop_ratio or card["crop_ratio"], flip,
                  batch_size or card["val_batch_size"], amp_dtype, torch_device)
    if loaded.assumed:
        note = assumed_note(checkpoint, setup, flags={"--blurpool": blurpool != "auto", "--res": res is not None,
                                                      "--crop-ratio": crop_ratio is not None,
                                                      "--flip-tta": flip_tta != "auto"})
        if note:
            print(note)
    return setup


def assumed_note(checkpoint, setup: Setup, flags: dict[str, bool]) -> str:
    """One line naming the settings assumed for a file that stores none ('' when flags gave them all)."""
    parts = [(f"{setup.loaded.arch} {'with' if setup.loaded.blurpool else 'without'} BlurPool", "--blurpool"),
             (f"val {setup.res} px", "--res"), (f"crop {setup.crop_ratio:g}", "--crop-ratio"),
             ("flip-TTA" if setup.flip else "no flip-TTA", "--flip-tta")]
    assumed = [text for text, flag in parts if not flags.get(flag)]
    if not assumed:
        return ""
    given = [flag for _, flag in parts if flags.get(flag)]
    return (f"no settings stored with {checkpoint}: assuming {', '.join(assumed)}"
            + (f" ({', '.join(given)} as given)" if given else "")
            + "; a BlurPool model needs its model.safetensors, checkpoint or run folder")


def label_space_argmaxes(setup: Setup, data: ValData, *, threads: int, images: int = 128) -> list[int]:
    """The model's top-1 class for the first `images` images of `data` (the evidence for --label-space auto)."""
    from train.engine import eval_logits

    dali_device = "gpu" if setup.device.type == "cuda" else "cpu"
    batches = loader.batches(data, res=setup.res, crop_ratio=setup.crop_ratio,
                             batch_size=min(setup.batch_size, images), device=dali_device, num_threads=threads,
                             dtype=setup.amp_dtype or torch.float32, limit=images)
    argmaxes = []
    setup.model.eval()
    with torch.inference_mode():
        for batch in batches:
            if batch.indices:
                logits = eval_logits(setup.model, batch.images.to(setup.device), amp_dtype=setup.amp_dtype,
                                     flip_tta=setup.flip)
                argmaxes += logits.argmax(dim=1).tolist()
    return argmaxes


def match_labels(setup: Setup, data: ValData, label_space: str, *, threads: int) -> ValData:
    """`data` with labels in the model's output space; when the data set has fewer classes than the model and
    the space is not given, the model's own predictions decide it (printed, with the reason)."""
    card_classes = setup.loaded.card.get("classes")
    model_classes = [ClassInfo(c.get("wnid"), c.get("name") or c.get("wnid") or str(i))
                     for i, c in enumerate(card_classes)] if card_classes else None
    argmaxes = None
    if label_space == "auto" and needs_evidence(data, setup.loaded.num_classes, model_classes):
        argmaxes = label_space_argmaxes(setup, data, threads=threads)
    matched = match_model(data, setup.loaded.num_classes, label_space=label_space, argmaxes=argmaxes,
                          model_classes=model_classes)
    if matched.note:
        print(f"label space: {matched.note}")
    return matched


def run(args: argparse.Namespace) -> Report:
    how = _check_args(args)
    out = Path(args.output)
    if out.suffix.lower() != ".png":
        raise VizError(f"--output {out}: expected a .png file name")
    setup = prepare(args.checkpoint, num_classes=args.num_classes, weights=args.weights, blurpool=args.blurpool,
                    flip_tta=args.flip_tta, device=args.device, precision=args.precision,
                    batch_size=args.batch_size, res=args.res, crop_ratio=args.crop_ratio)
    loaded = setup.loaded
    data = match_labels(setup, open_data(args.data), args.label_space, threads=max(1, args.workers))
    class_index = find_class(args.select[6:], data.classes) if args.select.startswith("class=") else None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VizError(f"--output {out}: cannot create {out.parent} ({exc.strerror or exc})") from exc
    print(f"{describe(loaded)} with {loaded.num_classes} classes from {args.checkpoint}; {data.layout} data at "
          f"{data.path}: {data.size} images")  # match_labels printed the label space
    meta = {"checkpoint": str(args.checkpoint), "data": str(args.data), "arch": loaded.arch,
            "blurpool": loaded.blurpool, "weights": loaded.weights, "select": args.select,
            "method": args.method, "res": setup.res, "crop_ratio": setup.crop_ratio, "flip_tta": setup.flip,
            "label_space": data.note or "the data set's own"}
    return explain(setup.model, setup.model.layer4[-1], data, out, num_show=args.num_show, how=how, seed=args.seed,
                   class_index=class_index, method=args.method, res=setup.res, crop_ratio=setup.crop_ratio,
                   batch_size=setup.batch_size, limit=args.limit, workers=max(1, args.workers),
                   progress=not args.no_progress, title=Path(args.checkpoint).name, meta=meta, flip=setup.flip,
                   amp_dtype=setup.amp_dtype)


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
    summary = report.evaluation.summary()
    speed = f", {summary['images_per_s']:.0f} images/s" if summary["images_per_s"] else ""
    print(f"top-1 {report.top1:.2%} ({report.evaluated - report.mistakes}/{report.evaluated} images), "
          f"top-5 {format_top5(report.evaluation.top5)}{speed}{skipped}")
    if not report.selected:
        print("no misclassified images to show" + (f" for --select {args.select}" if args.select != "confident" else ""))
    else:
        print(f"{report.mistakes} misclassified; showing {len(report.selected)} ({args.select})")
    print(f"wrote {out}, {json_path}, {csv_path}, {predictions_path(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
