"""Photo-like JPEGs at ImageNet's typical sizes, for benchmarks that must run without the dataset.

Pixel content is smooth structure plus fine texture, so that a 500x375 image at quality 90 weighs
roughly what an ImageNet photo does (~100 KB) and costs a decoder about as much.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

# (width, height) and how often it occurs; most ImageNet images are ~500x375/333 or their
# portrait twins, a minority are larger camera originals that preprocessing must shrink.
SIZES = [((500, 375), 0.45), ((500, 333), 0.2), ((375, 500), 0.15), ((800, 600), 0.1), ((1600, 1200), 0.1)]


def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    coarse = rng.uniform(0, 255, (max(2, height // 48), max(2, width // 48), 3)).astype(np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    image += rng.normal(0, 14, (height, width, 1))  # luminance grain
    image += rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def photo_jpegs(count: int, seed: int = 0, quality: int = 90, max_side: int | None = None):
    """Yield `count` JPEG byte strings; `max_side` caps the size (as preprocessed shards hold them)."""
    rng = np.random.default_rng(seed)
    sizes, weights = zip(*SIZES)
    for _ in range(count):
        w, h = sizes[rng.choice(len(sizes), p=np.array(weights) / sum(weights))]
        if max_side and max(w, h) > max_side:
            scale = max_side / max(w, h)
            w, h = round(w * scale), round(h * scale)
        out = io.BytesIO()
        photo_like(rng, w, h).save(out, format="JPEG", quality=quality)
        yield out.getvalue()


def write_photo_parquet(out: Path, train: int, val: int, classes: int = 100, seed: int = 0) -> Path:
    """HF ImageNet-schema parquet (data/train-*.parquet, data/validation-*.parquet) of photo-like JPEGs."""
    from preprocess.synthetic import SPLIT_FILE_NAMES, write_hf_parquet

    names = [f"class {c}" for c in range(classes)]
    for split, count in (("train", train), ("val", val)):
        rows = [{"image": {"bytes": jpeg, "path": f"photo_{split}_{i:07d}.JPEG"}, "label": i % classes}
                for i, jpeg in enumerate(photo_jpegs(count, seed=seed + (split == "val"), quality=95))]
        write_hf_parquet(rows, out, SPLIT_FILE_NAMES[split], names, rows_per_file=1000)
    return out
