"""`python -m viz.predict --checkpoint F --data DIR_OR_FILE [...] --output CSV`: the top-5 classes of any images.

Each image goes through the trainer's validation transform (train.data.val_transform, via viz.loader's
BytesDecoder: decode RGB -> resize the shorter side to res / crop_ratio -> centre crop res -> normalise) with
the model file's own settings (its card: BlurPool, val res, crop ratio, flip-TTA, precision, class list), and
is scored by viz.gradcam's evaluation (train.engine.eval_logits). Folders are searched recursively for image
files (.jpg .jpeg .png .bmp .gif .webp .tif .tiff), in sorted order; files are taken as given.

CSV: one row per readable image, in input order:
    path, class1, wnid1, name1, prob1, ..., class5, wnid5, name5, prob5
(class: the model's output index; prob: softmax probability, of the logits averaged over the image and its
mirror with flip-TTA). CSV.json beside it: the model, the settings, the counts and the unreadable files,
which are skipped and counted, never fatal. A file without a class list names its outputs by ImageNet-1k's
classes when it has 1000 of them (and says so), else "output i".
Exit status: 0 done; 2 bad arguments, no readable image, or an unreadable model (one line on stderr).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

from preprocess.cli import ArgumentParser
from preprocess.sources import IMAGE_SUFFIXES, ClassInfo, imagenet_classes
from viz import evaluate as evaluation
from viz.datasets import ValData
from viz.evaluate import TOP_K, Evaluation
from viz.gradcam import check_numbers, prepare, run_evaluation
from viz.weights import WEIGHT_CHOICES, VizError, describe

SHOWN = 10  # rows printed on the console


def list_images(sources: list[str]) -> list[Path]:
    """The image files of `sources` (folders searched recursively, sorted; files as given), each once."""
    found: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif path.is_file():
            found.append(path)
        else:
            raise VizError(f"--data {source}: no such file or directory")
    unique = list(dict.fromkeys(found))
    if not unique:
        raise VizError(f"--data {' '.join(sources)}: no image files ({' '.join(sorted(IMAGE_SUFFIXES))})")
    return unique


def output_classes(card: dict, num_classes: int) -> tuple[tuple[ClassInfo, ...], str]:
    """(the model's outputs as classes, where their names come from)."""
    if card.get("classes"):
        return tuple(ClassInfo(c.get("wnid"), c.get("name") or c.get("wnid") or f"output {i}")
                     for i, c in enumerate(card["classes"])), "the model file's class list"
    if num_classes == 1000:
        return tuple(imagenet_classes()), "assumed ImageNet-1k's 1000 classes in wnid order (the file has no list)"
    return tuple(ClassInfo(None, f"output {i}") for i in range(num_classes)), "none stored: outputs are numbered"


def image_set(files: list[Path], classes: tuple[ClassInfo, ...]) -> ValData:
    """The files as a ValData in input order (key: the path; there is no true label, 0 stands in)."""
    return ValData("files", str(files[0].parent), classes, len(files), tuple((str(p), 0, str(p)) for p in files))


def columns(k: int) -> list[str]:
    return ["path"] + [f"{name}{rank}" for rank in range(1, k + 1) for name in ("class", "wnid", "name", "prob")]


def rows(result: Evaluation, data: ValData) -> list[list]:
    out = []
    for p in result.predictions:
        row = [data.files[p.index][2]]
        for c, prob in zip(p.top5, p.top5_probs):
            row += [c, data.classes[c].wnid or "", data.classes[c].name, f"{prob:.6g}"]
        out.append(row)
    return out


def write(path: Path, result: Evaluation, data: ValData, meta: dict) -> Path:
    """CSV (one row per image) and CSV.json; written to temporary names first."""
    k = min(TOP_K, result.meta.get("outputs") or TOP_K)
    summary = {**meta, "images": len(result.predictions), "unreadable": len(result.skipped),
               "unreadable_files": result.skipped, "seconds": round(result.seconds, 3), "top_k": k,
               "columns": columns(k)}
    json_path = path.with_suffix(".json")
    tmp, json_tmp = path.with_name(f".{path.name}.tmp"), json_path.with_name(f".{json_path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns(k))
            writer.writerows(rows(result, data))
        json_tmp.write_text(json.dumps(summary, indent=1) + "\n")
        tmp.replace(path)
        json_tmp.replace(json_path)
    except OSError as exc:
        raise VizError(f"--output {path}: cannot write ({exc.strerror or exc})") from exc
    return json_path


def predict(args: argparse.Namespace) -> tuple[Evaluation, ValData, Path]:
    check_numbers(args)
    if args.num_threads < 1:
        raise VizError(f"--num-threads {args.num_threads}: must be at least 1")
    out = Path(args.output)
    if out.suffix.lower() != ".csv":
        raise VizError(f"--output {out}: expected a .csv file name (the .json goes beside it)")
    files = list_images(args.data)
    setup = prepare(args.checkpoint, num_classes=None, weights=args.weights, blurpool=args.blurpool,
                    flip_tta=args.flip_tta, device=args.device, precision=args.precision,
                    batch_size=args.batch_size, res=args.res, crop_ratio=args.crop_ratio)
    classes, names = output_classes(setup.loaded.card, setup.loaded.num_classes)
    data = image_set(files, classes)
    print(f"{describe(setup.loaded)} with {setup.loaded.num_classes} classes from {args.checkpoint} (val "
          f"{setup.res} px, crop {setup.crop_ratio:g}, flip-TTA {'on' if setup.flip else 'off'}); class names: "
          f"{names}; {len(files)} images")
    meta = {"checkpoint": str(args.checkpoint), "data": list(args.data), "arch": setup.loaded.arch,
            "blurpool": setup.loaded.blurpool, "weights": setup.loaded.weights, "class_names": names}
    result = run_evaluation(setup.model, data, res=setup.res, crop_ratio=setup.crop_ratio,
                            batch_size=setup.batch_size, limit=None, threads=args.num_threads, flip=setup.flip,
                            amp_dtype=setup.amp_dtype, progress=not args.no_progress, meta=meta)
    meta.update({k: result.meta[k] for k in ("res", "crop_ratio", "flip_tta", "batch_size", "precision", "device")})
    return result, data, write(out, result, data, meta)


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(
        prog="python -m viz.predict",
        description="Top-5 classes and probabilities of each image in folders or files, with the model file's own "
                    "settings and the trainer's validation transform. Writes a CSV (one row per image) and a .json "
                    "summary beside it.")
    p.add_argument("--checkpoint", required=True,
                   help="model.safetensors, best.pt / last.pt, model_final.pth, a run folder, PyTorch's "
                        "ImageNet-example model_best.pth.tar or any torchvision ResNet state_dict")
    p.add_argument("--data", required=True, nargs="+", metavar="DIR_OR_FILE",
                   help="image files and/or folders (searched recursively)")
    p.add_argument("--output", "--out", dest="output", required=True, help="CSV to write (its .json summary goes beside it)")
    p.add_argument("--weights", default="auto", choices=WEIGHT_CHOICES,
                   help="of our checkpoints: the EMA or the raw weights (default auto: EMA when there are any)")
    p.add_argument("--blurpool", default="auto", choices=["auto", "on", "off"],
                   help="auto: as the model file says, else off (default auto)")
    p.add_argument("--flip-tta", default="auto", choices=["auto", "on", "off"],
                   help="average each image with its mirror; auto: as the model file says (default auto)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast dtype; auto: the model file's (fp32 on a CPU)")
    p.add_argument("--batch-size", type=int, default=None, help="images per forward pass (default: the file's)")
    p.add_argument("--res", type=int, default=None, help="centre-crop side, px (default: the file's val res)")
    p.add_argument("--crop-ratio", type=float, default=None,
                   help="crop side / resized shorter side (default: the file's)")
    p.add_argument("--num-threads", type=int, default=min(8, max(1, (os.cpu_count() or 1) - 1)),
                   help="DALI decoding threads (default: cores - 1, at most 8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    args = p.parse_args(argv)
    args.limit = None  # check_numbers' flags that predict does not have
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result, data, json_path = predict(args)
    except VizError as exc:
        print(f"viz.predict: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("viz.predict: interrupted", file=sys.stderr)
        return 130
    for p in result.predictions[:SHOWN]:
        best = data.classes[p.predicted]
        print(f"{data.files[p.index][2]}: {best.name} ({p.confidence:.1%})")
    if len(result.predictions) > SHOWN:
        print(f"... {len(result.predictions) - SHOWN} more in {args.output}")
    skipped = f"; {len(result.skipped)} unreadable files skipped (listed in {json_path})" if result.skipped else ""
    print(f"wrote {args.output} ({len(result.predictions)} images) and {json_path}{skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
