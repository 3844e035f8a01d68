"""`python -m preprocess.synthetic`: a small, learnable stand-in for ImageNet in the HF parquet schema.

Each class is a shape in a colour of its own (a red disc, a green cross, ...) drawn at a random
place, size and angle over a cluttered background of random strokes and blobs, with grey decoys of
other classes' shapes. A CNN learns it within a few epochs on a CPU; a linear model on mean colour
does not reach 100% because of the decoys and colour jitter.

The files mimic `ILSVRC/imagenet-1k` exactly: `data/{train,validation}-0000K-of-0000N.parquet` with
`image` = struct{bytes, path}, `label` = ClassLabel (names in the `huggingface` schema metadata),
rows in shuffled order.
"""

from __future__ import annotations

import io
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from preprocess.cli import ArgumentParser

SHAPES = ("disc", "square", "triangle", "cross", "ring", "diamond", "bar", "chevron", "hourglass", "star")
HUES = ("red", "orange", "yellow", "green", "teal", "blue", "purple", "pink", "brown", "white")
RGB = {"red": (220, 40, 40), "orange": (240, 140, 20), "yellow": (235, 220, 40), "green": (40, 180, 60),
       "teal": (30, 170, 170), "blue": (40, 80, 220), "purple": (140, 60, 200), "pink": (240, 120, 190),
       "brown": (130, 80, 40), "white": (240, 240, 240)}
SPLIT_FILE_NAMES = {"train": "train", "val": "validation"}


def class_names(num_classes: int) -> list[str]:
    """Class c is shape c % 10 in colour (c + c // 10) % 10: distinct pairs for up to 100 classes."""
    if not 1 <= num_classes <= len(SHAPES) * len(HUES):
        raise ValueError(f"--classes {num_classes}: must be between 1 and {len(SHAPES) * len(HUES)}")
    return [f"{HUES[(c + c // len(SHAPES)) % len(HUES)]} {SHAPES[c % len(SHAPES)]}" for c in range(num_classes)]


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    def ring_points(radii, count, phase=0.0):
        return [(cx + radii[i % len(radii)] * math.cos(angle + phase + 2 * math.pi * i / count),
                 cy + radii[i % len(radii)] * math.sin(angle + phase + 2 * math.pi * i / count)) for i in range(count)]

    if shape == "square":
        return ring_points([r], 4, math.pi / 4)
    if shape == "triangle":
        return ring_points([r], 3)
    if shape == "diamond":
        return ring_points([r, 0.55 * r], 4)
    if shape == "star":
        return ring_points([r, 0.42 * r], 10)
    if shape == "cross":
        w = 0.33 * r
        pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]
    elif shape == "bar":
        pts = [(-r, -0.3 * r), (r, -0.3 * r), (r, 0.3 * r), (-r, 0.3 * r)]
    elif shape == "chevron":
        pts = [(-r, -0.6 * r), (0, 0.2 * r), (r, -0.6 * r), (r, 0.1 * r), (0, 0.9 * r), (-r, 0.1 * r)]
    elif shape == "hourglass":
        pts = [(-r, -r), (r, -r), (0.15 * r, 0), (r, r), (-r, r), (-0.15 * r, 0)]
    else:
        raise ValueError(shape)
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float, fill) -> None:
    if shape == "disc":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(2, int(0.3 * r)))
    else:
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=fill)


def make_image(label: int, num_classes: int, size: int, rng: np.random.Generator) -> Image.Image:
    """One image of class `label`: longer side `size` pixels, aspect 1:1, 4:3 or 3:4."""
    aspect = rng.choice([1.0, 0.75, 1.0 / 0.75])
    w, h = (size, round(size * aspect)) if aspect <= 1 else (round(size / aspect), size)
    base = rng.integers(40, 200, size=3)
    noise = rng.normal(0, 18, size=(h // 4 + 1, w // 4 + 1, 3))
    background = np.clip(base + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(background).resize((w, h), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(4, 10))):  # clutter strokes
        x0, y0, x1, y1 = rng.uniform(0, 1, 4) * [w, h, w, h]
        draw.line([x0, y0, x1, y1], fill=tuple(int(v) for v in rng.integers(0, 256, 3)), width=int(rng.integers(1, 4)))
    names = class_names(num_classes)
    for _ in range(int(rng.integers(0, 3))):  # grey decoys: shapes of any class, without the class colour
        decoy = names[int(rng.integers(num_classes))].split()[1]
        grey = int(rng.integers(60, 200))
        r = rng.uniform(0.08, 0.16) * min(w, h)
        _draw_shape(draw, decoy, rng.uniform(r, w - r), rng.uniform(r, h - r), r, rng.uniform(0, 2 * math.pi),
                    (grey, grey, grey))
    hue, shape = names[label].split()
    colour = np.clip(np.array(RGB[hue]) + rng.integers(-25, 26, 3), 0, 255)
    r = rng.uniform(0.18, 0.34) * min(w, h)
    _draw_shape(draw, shape, rng.uniform(r, w - r), rng.uniform(r, h - r), r, rng.uniform(0, 2 * math.pi),
                tuple(int(v) for v in colour))
    return image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0, 0.8))))


def jpeg_bytes(image: Image.Image, quality: int = 92) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def generate_split(split: str, num_classes: int, per_class: int, size: int, seed: int) -> list[dict]:
    """Rows {"image": {"bytes", "path"}, "label"} in a shuffled order, like the HF release."""
    rows = []
    for label in range(num_classes):
        for i in range(per_class):
            # One generator per image: any image can be regenerated alone, whatever the others are.
            rng = np.random.default_rng([seed, 0 if split == "train" else 1, label, i])
            path = (f"s{label:08d}_{i:05d}.JPEG" if split == "train"
                    else f"SYNTHETIC_val_{label * per_class + i + 1:08d}.JPEG")
            rows.append({"image": {"bytes": jpeg_bytes(make_image(label, num_classes, size, rng)), "path": path},
                         "label": label})
    order = np.random.default_rng([seed, 2 if split == "train" else 3]).permutation(len(rows))
    return [rows[i] for i in order]


def write_hf_parquet(rows: list[dict], out_dir: Path, split_file_name: str, names: list[str],
                     rows_per_file: int = 500, rows_per_group: int = 100) -> list[Path]:
    """Write rows as `data/<split>-0000K-of-0000N.parquet` with `datasets`' own schema metadata."""
    from datasets import ClassLabel, Dataset, Features, Image as HFImage
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    features = Features({"image": HFImage(), "label": ClassLabel(names=names)})
    data_dir = Path(out_dir) / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    chunks = [rows[i:i + rows_per_file] for i in range(0, len(rows), rows_per_file)]
    paths = []
    for k, chunk in enumerate(chunks):
        path = data_dir / f"{split_file_name}-{k:05d}-of-{len(chunks):05d}.parquet"
        table = Dataset.from_dict({"image": [r["image"] for r in chunk], "label": [r["label"] for r in chunk]},
                                  features=features)
        table.to_parquet(str(path), batch_size=rows_per_group)
        paths.append(path)
    return paths


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m preprocess.synthetic",
                                description="Write a small learnable image-classification set as parquet files in "
                                            "the schema of the Hugging Face ILSVRC/imagenet-1k release.")
    p.add_argument("--out", "--output", dest="out", required=True, type=Path, help="output folder (parquet files go to OUT/data/)")
    p.add_argument("--classes", type=int, default=10, help="number of classes, 1-100 (default 10)")
    p.add_argument("--per-class", type=int, default=120, help="training images per class (default 120)")
    p.add_argument("--val-per-class", type=int, default=None, help="validation images per class (default: per-class / 4)")
    p.add_argument("--size", type=int, default=96, help="longer image side, pixels (default 96)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same bytes (default 0)")
    args = p.parse_args(argv)
    try:
        names = class_names(args.classes)
        if args.per_class < 1 or args.size < 16:
            raise ValueError(f"--per-class must be >= 1 and --size >= 16 (got {args.per_class}, {args.size})")
    except ValueError as exc:
        print(f"preprocess.synthetic: error: {exc}", file=sys.stderr)
        return 2
    val_per_class = args.val_per_class if args.val_per_class is not None else max(1, args.per_class // 4)
    for split, per_class in (("train", args.per_class), ("val", val_per_class)):
        rows = generate_split(split, args.classes, per_class, args.size, args.seed)
        files = write_hf_parquet(rows, args.out, SPLIT_FILE_NAMES[split], names)
        print(f"{split}: {len(rows)} images ({args.classes} classes) in {len(files)} parquet file(s) under {args.out / 'data'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
