"""`python -m viz.validate --checkpoint F --data D [--real-labels real.json]`: top-1 / top-5 of a model file on a
validation set, and nothing else (no Grad-CAM, no pictures).

The evaluation is viz.gradcam's (prepare + match_labels + run_evaluation): the file's own settings (BlurPool,
val res, crop ratio, flip-TTA, precision, class list), the trainer's DALI validation transform and
train.engine.eval_logits, so on our shards the top-1 is the trainer's, image for image. D may be our shards,
an ImageFolder, Tiny-ImageNet's val folder or ImageNet-V2's class-index folders `0`..`999` (viz.datasets).

--real-labels FILE adds ImageNet-ReaL (Beyer et al. 2020, "Are we done with ImageNet?"): real.json holds one
list of ImageNet-1k class indices per validation image, in validation-file order (list i is
ILSVRC2012_val_<i+1, 8 digits>); a prediction is right when it is in its image's list, and images with an
empty list are left out. Images are matched to lists by that number in their file name (or shard key).

Writes OUT.json (the numbers and how they were measured; `python -m viz.report --extra-results OUT.json`
shows them), OUT.csv (the same in one row) and OUT_predictions.csv (+ .json: every image's top-5).
Default OUT: RUN/validate/<data name>[-real].json, RUN being the checkpoint's run folder.
Exit status: 0 done; 2 bad arguments or data (one line on stderr); 130 interrupted.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
from pathlib import Path

from preprocess.cli import ArgumentParser
from preprocess.sources import imagenet_classes
from train.artifact import commit
from viz import evaluate as evaluation
from viz.datasets import ValData, open_data
from viz.evaluate import TOP_K, Evaluation, format_top5
from viz.gradcam import add_model_flags, check_numbers, match_labels, prepare, run_evaluation
from viz.weights import VizError, describe

FORMAT_VERSION = 1
TOOL = "viz.validate"  # marks a results file for viz.report --extra-results
REAL_IMAGES = 50_000  # lists in ImageNet-ReaL's real.json: one per ILSVRC-2012 validation image
VAL_FILE = re.compile(r"ILSVRC2012_val_(\d{8})")
CSV_COLUMNS = ["checkpoint", "dataset", "layout", "data", "images", "top1", "top5", "real_top1", "real_top5",
               "real_images", "arch", "blurpool", "res", "crop_ratio", "flip_tta", "precision"]
LAYOUT_NAMES = {"shards": "shards", "imagefolder": "ImageFolder", "tiny-imagenet": "Tiny-ImageNet val",
                "imagenet-v2": "ImageNet-V2"}


# ----------------------------------------------------------------------------- ImageNet-ReaL

def read_real_labels(path: str | Path) -> list[list[int]]:
    """real.json: a list of lists of ImageNet-1k class indices, one per validation image."""
    path = Path(path)
    try:
        lists = json.loads(path.read_text())
    except OSError as exc:
        raise VizError(f"--real-labels {path}: cannot read ({exc.strerror or exc})") from exc
    except ValueError as exc:
        raise VizError(f"--real-labels {path}: not JSON ({exc})") from exc
    if not isinstance(lists, list) or not lists:
        raise VizError(f"--real-labels {path}: expected a list of label lists (ImageNet-ReaL's real.json)")
    for i, labels in enumerate(lists):
        if not isinstance(labels, list) or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < 1000
                                                   for c in labels):
            raise VizError(f"--real-labels {path}: entry {i} is {labels!r}, expected a list of class indices 0-999")
    return lists


def real_position(key: str) -> int | None:
    """0 for ILSVRC2012_val_00000001(.JPEG, _n01751748, ...): the image's place in validation-file order."""
    match = VAL_FILE.search(key)
    return int(match.group(1)) - 1 if match else None


def check_real_keys(keys: list[str], lists: list[list[int]], source: str = "--real-labels") -> None:
    """Every image must name its validation file (ILSVRC2012_val_<n>) and have a list in `lists`."""
    unnamed = sorted(k for k in keys if real_position(k) is None)
    if unnamed:
        raise VizError(f"{source}: {len(unnamed)} of {len(keys)} images are not named like "
                       f"ILSVRC2012_val_00000001 (e.g. {unnamed[0]!r}); ReaL's lists follow the ImageNet "
                       f"validation files' order")
    beyond = sorted((real_position(k), k) for k in keys if real_position(k) >= len(lists))
    if beyond:
        raise VizError(f"{source}: holds {len(lists)} lists, {len(beyond)} images need more (e.g. {beyond[0][1]!r} "
                       f"needs list {beyond[0][0] + 1})")


def real_accuracy(predictions, classes, lists: list[list[int]], *, outputs: int | None,
                  source: str = "--real-labels") -> dict:
    """ReaL top-1 (and top-5) of `predictions`: right when the predicted ImageNet class is in the image's list.

    `classes` are the model's outputs (ValData.classes after match_labels); each is turned into its
    ImageNet-1k index by wnid, so a model whose class list is ImageNet-1k's in another order is scored right."""
    imagenet = {c.wnid: i for i, c in enumerate(imagenet_classes())}
    to_imagenet = {i: imagenet.get(c.wnid) for i, c in enumerate(classes)}
    if not any(v is not None for v in to_imagenet.values()):
        raise VizError(f"{source}: the model's classes are not ImageNet-1k wnids; ReaL labels are ImageNet-1k "
                       f"class indices")
    check_real_keys([p.key for p in predictions], lists, source)
    counted = top1 = top5 = 0
    for p in predictions:
        labels = set(lists[real_position(p.key)])
        if not labels:  # no label the raters agreed on: left out, as in the paper
            continue
        counted += 1
        top1 += to_imagenet[p.predicted] in labels
        top5 += any(to_imagenet[c] in labels for c in (p.top5 or (p.predicted,)))
    if not counted:
        raise VizError(f"{source}: every evaluated image has an empty list: no ReaL accuracy")
    return {"real_top1": round(top1 / counted, 6),
            "real_top5": None if (outputs or TOP_K + 1) <= TOP_K else round(top5 / counted, 6),
            "real_images": counted, "real_left_out": len(predictions) - counted, "real_lists": len(lists)}


# ----------------------------------------------------------------------------- the numbers

def dataset_name(data: ValData) -> str:
    folder = Path(data.path)
    name = folder.name if folder.name not in ("val", "validation", "valid") else f"{folder.parent.name}/{folder.name}"
    return f"{LAYOUT_NAMES.get(data.layout, data.layout)}: {name}"


def default_output(checkpoint: str | Path, data_path: str | Path, real: bool) -> Path:
    """RUN/validate/<data name>[-real].json, RUN: the run folder of `checkpoint` (or the folder holding it)."""
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        run = checkpoint
    else:
        run = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    data = Path(data_path).resolve()
    name = data.name if data.name not in ("val", "validation", "valid") else f"{data.parent.name}-{data.name}"
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "data"
    return run / "validate" / f"{name}{'-real' if real else ''}.json"


def results(result: Evaluation, data: ValData, setup, *, checkpoint: str, data_arg: str,
            real: dict | None) -> dict:
    loaded, summary = setup.loaded, result.summary()
    info = loaded.info
    out = {
        "tool": TOOL, "format_version": FORMAT_VERSION,
        "checkpoint": str(checkpoint), "data": str(data_arg), "layout": data.layout, "dataset": dataset_name(data),
        "label_space": data.note or "the data set's own",
        "images": summary["images"], "skipped": summary["skipped"], "correct": summary["correct"],
        "top1": summary["top1"], "top5": summary["top5"], "outputs": summary["outputs"],
        **(real or {}),
        "arch": loaded.arch, "blurpool": loaded.blurpool, "weights": loaded.weights, "classes": loaded.num_classes,
        "res": setup.res, "crop_ratio": setup.crop_ratio, "flip_tta": setup.flip,
        "precision": evaluation.precision_name(setup.amp_dtype), "batch_size": setup.batch_size,
        "device": str(setup.device), "limit": result.meta.get("limit"), "settings_assumed": loaded.assumed,
        "seconds": summary["seconds"], "images_per_s": summary["images_per_s"], "commit": commit(),
    }
    if "trainer_top1" in info:
        out.update(trainer_top1=info["trainer_top1"], trainer_top5=info.get("trainer_top5"),
                   trainer_images=info.get("trainer_images"), trainer_epoch=info.get("epoch"))
    return out


def _cell(value) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def write(out: Path, numbers: dict, result: Evaluation) -> tuple[Path, Path, Path]:
    """OUT.json, OUT.csv (one row) and OUT_predictions.csv (+ .json); each written to a temporary name first."""
    csv_path, predictions = out.with_suffix(".csv"), out.with_name(f"{out.stem}_predictions.csv")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        evaluation.save(predictions, result)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(numbers, indent=1) + "\n")
        csv_tmp = csv_path.with_name(f".{csv_path.name}.tmp")
        with csv_tmp.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(CSV_COLUMNS)
            row = {**numbers, "top5": numbers["top5"] if numbers["top5"] is not None else "n/a"}
            if "real_top1" in numbers and numbers["real_top5"] is None:
                row["real_top5"] = "n/a"
            writer.writerow([_cell(row.get(c)) for c in CSV_COLUMNS])
        tmp.replace(out)
        csv_tmp.replace(csv_path)
    except OSError as exc:
        raise VizError(f"--output {out}: cannot write ({exc.strerror or exc})") from exc
    return out, csv_path, predictions


def trainer_line(numbers: dict) -> str:
    """How the trainer's own top-1 of these weights compares, when the file carries it."""
    if "trainer_top1" not in numbers:
        return ""
    same = (numbers.get("trainer_images") == numbers["images"]
            and round(numbers["trainer_top1"] * numbers["images"]) == numbers["correct"])
    verdict = ("the same count of correct images" if same else
               "a different count: other images or settings than the trainer's validation")
    return (f"the trainer's own validation of these weights (epoch {numbers.get('trainer_epoch')}): top-1 "
            f"{numbers['trainer_top1']:.2%} on {numbers.get('trainer_images')} images: {verdict}")


def validate(args: argparse.Namespace) -> tuple[dict, tuple[Path, ...]]:
    check_numbers(args)
    if args.num_threads < 1:
        raise VizError(f"--num-threads {args.num_threads}: must be at least 1")
    lists = read_real_labels(args.real_labels) if args.real_labels else None
    setup = prepare(args.checkpoint, num_classes=None, weights=args.weights, blurpool=args.blurpool,
                    flip_tta=args.flip_tta, device=args.device, precision=args.precision,
                    batch_size=args.batch_size, res=args.res, crop_ratio=args.crop_ratio)
    data = match_labels(setup, open_data(args.data), args.label_space, threads=args.num_threads)
    out = Path(args.output) if args.output else default_output(args.checkpoint, args.data, lists is not None)
    if out.suffix.lower() != ".json":
        raise VizError(f"--output {out}: expected a .json file name (the .csv goes beside it)")
    print(f"{describe(setup.loaded)} with {setup.loaded.num_classes} classes from {args.checkpoint}; {data.layout} "
          f"data at {data.path}: {data.size} images")
    if lists is not None and data.files:  # folder layouts: the names are known before the evaluation
        limit = data.size if args.limit is None else args.limit
        check_real_keys([key for key, _, _ in data.files[:limit]], lists, f"--real-labels {args.real_labels}")
    result = run_evaluation(setup.model, data, res=setup.res, crop_ratio=setup.crop_ratio,
                            batch_size=setup.batch_size, limit=args.limit, threads=args.num_threads, flip=setup.flip,
                            amp_dtype=setup.amp_dtype, progress=not args.no_progress,
                            meta={"checkpoint": str(args.checkpoint), "data": str(args.data)})
    real = None
    if lists is not None:
        real = real_accuracy(result.predictions, data.classes, lists, outputs=result.meta.get("outputs"),
                             source=f"--real-labels {args.real_labels}")
    numbers = results(result, data, setup, checkpoint=args.checkpoint, data_arg=args.data, real=real)
    return numbers, write(out, numbers, result)


def report_lines(numbers: dict) -> list[str]:
    lines = [f"{numbers['dataset']}: top-1 {numbers['top1']:.2%} ({numbers['correct']}/{numbers['images']} images), "
             f"top-5 {format_top5(numbers['top5'])}"
             + (f", {numbers['images_per_s']:.0f} images/s" if numbers.get("images_per_s") else "")
             + (f"; {numbers['skipped']} unreadable images skipped" if numbers["skipped"] else "")]
    if "real_top1" in numbers:
        lists = (f"; real.json holds {numbers['real_lists']:,} lists, not ReaL's {REAL_IMAGES:,}"
                 if numbers["real_lists"] != REAL_IMAGES else "")
        lines.append(f"ImageNet-ReaL: top-1 {numbers['real_top1']:.2%}, top-5 {format_top5(numbers['real_top5'])} "
                     f"on {numbers['real_images']} images ({numbers['real_left_out']} with an empty label list "
                     f"left out{lists})")
    if trainer_line(numbers):
        lines.append(trainer_line(numbers))
    return lines


# ----------------------------------------------------------------------------- CLI

def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(
        prog="python -m viz.validate",
        description="Top-1 / top-5 of a model file on a validation set with the file's own settings and the "
                    "trainer's validation pipeline; --real-labels adds ImageNet-ReaL accuracy. Prints the numbers "
                    "and writes OUT.json, OUT.csv and OUT_predictions.csv (every image's top-5).")
    p.add_argument("--checkpoint", required=True,
                   help="model.safetensors, best.pt / last.pt, model_final.pth, a run folder, PyTorch's "
                        "ImageNet-example model_best.pth.tar or any torchvision ResNet state_dict")
    p.add_argument("--data", required=True,
                   help="shards folder (manifest.json + val/*.tar), ImageFolder (val/<wnid>/*.JPEG), Tiny-ImageNet "
                        "val folder (images/ + val_annotations.txt) or ImageNet-V2 (<class index 0-999>/*.jpeg)")
    p.add_argument("--real-labels", default=None, metavar="FILE",
                   help="ImageNet-ReaL's real.json (one list of class indices per validation image, in file order; "
                        "images named ILSVRC2012_val_<n>): also report ReaL top-1/top-5")
    p.add_argument("--output", "--out", dest="output", default=None, metavar="OUT.json",
                   help="results file; OUT.csv and OUT_predictions.csv go beside it "
                        "(default RUN/validate/<data name>[-real].json)")
    add_model_flags(p)
    p.add_argument("--num-threads", type=int, default=min(8, max(1, (os.cpu_count() or 1) - 1)),
                   help="DALI decoding threads (default: cores - 1, at most 8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        numbers, written = validate(args)
    except VizError as exc:
        print(f"viz.validate: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("viz.validate: interrupted", file=sys.stderr)
        return 130
    for line in report_lines(numbers):
        print(line)
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
