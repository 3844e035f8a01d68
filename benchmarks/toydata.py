"""Toy shards without the `datasets` package: generated JPEGs in ImageFolder folders -> preprocess.shard.

For machines that have only torch and the image libraries (a bare GPU box): the learnable shapes of
`preprocess.synthetic` are written as `train/<wnid>/*.JPEG` and `val/<wnid>/*.JPEG`, then sharded
through the ImageFolder source like any real photo folder (so the train shards come out shuffled).
"""

from __future__ import annotations

from pathlib import Path

from preprocess import shard, synthetic


def write_image_folders(root: Path, *, classes: int = 10, per_class: int = 20, val_per_class: int = 7,
                        size: int = 64, seed: int = 0) -> Path:
    """root/{train,val}/n<8 digits>/<split>_<i>.JPEG: class c is the folder sorted c-th."""
    for split, count in (("train", per_class), ("val", val_per_class)):
        for i, row in enumerate(synthetic.generate_split(split, classes, count, size, seed)):
            folder = Path(root) / split / f"n{row['label']:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{split}_{i:06d}.JPEG").write_bytes(row["image"]["bytes"])
    return Path(root)


def toy_shards(out: Path, *, classes: int = 10, per_class: int = 20, val_per_class: int = 7, size: int = 64,
               images_per_shard: int = 50, seed: int = 0, workers: int = 1) -> Path:
    """Shards of a generated ImageFolder tree (kept beside them in out/../<name>-src)."""
    out = Path(out)
    src = out.with_name(out.name + "-src")
    if not (src / "val").is_dir():
        write_image_folders(src, classes=classes, per_class=per_class, val_per_class=val_per_class, size=size,
                            seed=seed)
    shard.run(str(src), out, images_per_shard=images_per_shard, workers=workers, progress=False)
    return out
