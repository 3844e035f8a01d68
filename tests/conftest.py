"""Shared fixtures: a synthetic ImageNet-schema parquet set and its shards, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

from preprocess import shard, synthetic  # noqa: E402

NUM_CLASSES = 10
TRAIN_PER_CLASS = 20
VAL_PER_CLASS = 7
IMAGE_SIZE = 64  # pixels, longer side
IMAGES_PER_SHARD = 50


def write_synthetic_parquet(out: Path, classes: int = NUM_CLASSES, per_class: int = TRAIN_PER_CLASS,
                            val_per_class: int = VAL_PER_CLASS, size: int = IMAGE_SIZE, seed: int = 0,
                            extra_train_rows: list[dict] = ()) -> dict[str, list[dict]]:
    """Parquet files in the HF ImageNet schema under out/data; returns the rows written per split."""
    names = synthetic.class_names(classes)
    rows = {"train": synthetic.generate_split("train", classes, per_class, size, seed) + list(extra_train_rows),
            "val": synthetic.generate_split("val", classes, val_per_class, size, seed)}
    for split, split_rows in rows.items():
        synthetic.write_hf_parquet(split_rows, out, synthetic.SPLIT_FILE_NAMES[split], names, rows_per_file=120,
                                   rows_per_group=40)
    return rows


@pytest.fixture(scope="session")
def synthetic_parquet(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic-parquet")
    write_synthetic_parquet(out)
    return out


@pytest.fixture(scope="session")
def shards_dir(tmp_path_factory, synthetic_parquet) -> Path:
    """Shards of the synthetic set: 10 classes, 200 train images in 4 shards, 70 val images in 2."""
    out = tmp_path_factory.mktemp("shards")
    shard.run(str(synthetic_parquet), out, images_per_shard=IMAGES_PER_SHARD, workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def folder_shards_dir(tmp_path_factory) -> Path:
    """The same sizes as `shards_dir` (10 classes, 200 train / 70 val images), made without `datasets`:
    generated JPEG folders through the ImageFolder source, as on a bare GPU machine."""
    from benchmarks.toydata import toy_shards

    return toy_shards(tmp_path_factory.mktemp("folder") / "shards", classes=NUM_CLASSES, per_class=TRAIN_PER_CLASS,
                      val_per_class=VAL_PER_CLASS, size=IMAGE_SIZE, images_per_shard=IMAGES_PER_SHARD)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: on a shared 2-core machine, two threads that contend with other jobs
    run ~5x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_report_header(config) -> str:
    """The free disk where the tests write (their tmp folders): a full disk shows up as unrelated failures."""
    import tempfile

    from preprocess.writer import free_bytes

    root = Path(config.option.basetemp or tempfile.gettempdir())
    free_gib = free_bytes(root) / 2**30
    return f"disk: {free_gib:.1f} GiB free under {root} (the suite's tmp folders peak at a few GiB)"
