"""benchmarks.loader_profile: its stages are the training pipeline cut short, and it prints and reports a row
per stage."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import loader_profile
from preprocess.manifest import split_shards
from train.data import dali_available
from train.pipelines import MEAN, STD

pytestmark = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")


def normalised(pixels: np.ndarray) -> np.ndarray:
    return (pixels.astype(np.float32) - np.float32(255) * np.array(MEAN, np.float32)) / (
        np.float32(255) * np.array(STD, np.float32))


def test_the_resize_stage_is_the_training_pipeline_before_its_flip_and_normalisation(shards_dir):
    shards = split_shards(shards_dir, "train")
    tars, idxs = [t for t, _ in shards], [i for _, i in shards]
    settings = dict(batch_size=8, res=24, threads=1, shuffle_buffer=32, seed=3)
    resized = loader_profile.build_stage("resize", tars, idxs, **settings)
    full = loader_profile.build_stage("normalise", tars, idxs, **settings)
    flips = set()
    for _ in range(3):
        (small, _), (images, _) = resized.run(), full.run()
        for i in range(len(images)):
            pixels, image = np.array(small[i]), np.array(images[i])
            assert pixels.shape == (24, 24, 3) and pixels.dtype == np.uint8
            errors = [np.abs(normalised(p) - image).max() for p in (pixels, pixels[:, ::-1])]
            assert min(errors) < 1e-5, errors  # the same crop, resized the same: equal up to float rounding
            flips.add(int(np.argmin(errors)))
    assert flips == {0, 1}  # the comparison can tell a flipped image from an unflipped one


def test_prints_a_row_per_stage_and_appends_them_to_the_report(shards_dir, tmp_path, capsys):
    target = tmp_path / "BENCH.md"
    argv = ["--data", str(shards_dir), "--res", "24", "--batch-size", "8", "--rounds", "2", "--batches", "2",
            "--report", str(target)]
    assert loader_profile.main(argv) == 0
    out = capsys.readouterr().out
    lines = {line.split()[1]: line for line in out.splitlines() if line.split()[:1] == ["ours"]}
    assert set(lines) == {"read", "decode", "resize", "normalise", "to", "epoch"}, out
    section = target.read_text().split(f"## {loader_profile.SECTION}", 1)[1]
    assert "| ours | decode |" in section and "--batches 2" in section and "Load average" in section


def test_bad_flags_are_refused(tmp_path, capsys):
    for argv in (["--data", str(tmp_path), "--rounds", "0"], ["--data", str(tmp_path), "--beton", str(tmp_path / "x")]):
        with pytest.raises(SystemExit):
            loader_profile.parse_args(argv)
    assert "--rounds 0: must be at least 1" in capsys.readouterr().err
