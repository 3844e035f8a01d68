"""train.data on the CPU: batch format, exact coverage per rank, epoch order, mid-epoch resume, validation
exactness under DDP-style sharding, label agreement with the `webdataset` library, bad-shard errors.

Uses the session fixture `shards_dir` (tests/conftest.py): 10 classes, 200 train images in 4 shards,
70 val images in 2. Sample identity comes from the DALI reader's source info (`with_keys=True`).
"""

from __future__ import annotations

import collections
import io
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from preprocess.manifest import DatasetError, load_manifest, split_shards
from train import data
from train.data import (MEAN, STD, ShardDataset, TrainLoader, ValLoader, build_baseline_loader, num_classes,
                        rank_range, shards_in_range)

REPO = Path(__file__).resolve().parents[1]
LOW = min((0 - m) / s for m, s in zip(MEAN, STD))  # smallest value a normalised pixel can take
HIGH = max((1 - m) / s for m, s in zip(MEAN, STD))


def split_keys(data_dir: Path, split: str) -> list[str]:
    """Sample keys in stored order, from the DALI index files (4th field: `<key>.jpg`)."""
    keys = []
    for _, idx in split_shards(data_dir, split):
        keys += [line.split()[3].rsplit(".", 1)[0] for line in idx.read_text().splitlines()[1:]]
    return keys


def wds_labels(data_dir: Path, split: str) -> dict[str, int]:
    """key -> label as the `webdataset` library reads the `.cls` field."""
    import webdataset as wds

    urls = [str(tar) for tar, _ in split_shards(data_dir, split)]
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False).to_tuple("__key__", "cls")
    return {key: int(cls) for key, cls in dataset}


def run_epoch(loader: TrainLoader, epoch: int, res: int):
    """(keys, images, labels) of a whole epoch."""
    keys, images, labels = [], [], []
    for x, y, k in loader.epoch(epoch, res):
        keys += k
        images.append(x)
        labels.append(y)
    return keys, images, labels


@pytest.fixture(scope="module")
def damaged_copy(shards_dir, tmp_path_factory):
    """A fresh copy of the shards for a test to break."""
    def copy() -> Path:
        out = tmp_path_factory.mktemp("damaged") / "shards"
        shutil.copytree(shards_dir, out)
        return out
    return copy


# -- batch format ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_train_batches_have_the_asked_shape_dtype_layout_and_range(shards_dir, dtype):
    loader = TrainLoader(shards_dir, 16, seed=0, dtype=dtype)
    assert len(loader) == 200 // 16
    images, labels = next(iter(loader.epoch(0, 40)))
    assert images.shape == (16, 3, 40, 40) and images.dtype == dtype
    assert images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
    assert labels.dtype == torch.int64 and labels.shape == (16,)
    assert 0 <= labels.min() and labels.max() < num_classes(shards_dir) == 10
    x = images.float()
    assert torch.isfinite(x).all()
    assert LOW - 0.05 <= x.min() < 0 < x.max() <= HIGH + 0.05  # normalised, not 0..1 or 0..255


def test_resolution_changes_between_epochs_in_one_loader(shards_dir):
    loader = TrainLoader(shards_dir, 20, seed=0)
    shapes = [next(iter(loader.epoch(e, res)))[0].shape[-2:] for e, res in ((0, 32), (1, 48), (2, 24))]
    assert shapes == [(32, 32), (48, 48), (24, 24)]
    stale = loader.epoch(3, 32)
    next(stale)
    next(iter(loader.epoch(4, 32)))
    with pytest.raises(RuntimeError, match="replaced"):
        next(stale)  # an old epoch's iterator must not interleave with the new one


# -- coverage and order ---------------------------------------------------------------------------

def test_two_ranks_see_every_training_image_exactly_once(shards_dir):
    everything = split_keys(shards_dir, "train")
    seen = []
    for rank in (0, 1):
        loader = TrainLoader(shards_dir, 20, rank=rank, world_size=2, seed=5, with_keys=True)
        assert len(loader) == 5  # 200 images / 2 ranks / 20: nothing dropped
        keys, _, _ = run_epoch(loader, 3, 32)
        assert len(keys) == 100
        seen.append(keys)
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(everything)


def test_ranks_get_other_images_in_other_epochs(shards_dir):
    """The tar order is permuted per epoch (the same way on every rank), so a rank's share moves around."""
    loader = TrainLoader(shards_dir, 20, rank=0, world_size=2, seed=5, with_keys=True)
    shares = {frozenset(run_epoch(loader, epoch, 24)[0]) for epoch in range(4)}
    assert len(shares) > 1


def test_steps_per_epoch_are_equal_on_every_rank_and_drop_only_the_tail(shards_dir):
    lengths = {TrainLoader(shards_dir, 16, rank=r, world_size=3).__len__() for r in range(3)}
    assert lengths == {200 // 3 // 16}
    loader = TrainLoader(shards_dir, 16, rank=2, world_size=3, with_keys=True)
    keys, _, _ = run_epoch(loader, 0, 24)
    assert len(keys) == len(set(keys)) == 4 * 16


def test_epochs_differ_and_the_same_seed_repeats_them(shards_dir):
    first = TrainLoader(shards_dir, 20, seed=1, with_keys=True)
    keys0, images0, _ = run_epoch(first, 0, 32)
    keys1, _, _ = run_epoch(first, 1, 32)
    assert sorted(keys0) == sorted(keys1) and keys0 != keys1

    again = TrainLoader(shards_dir, 20, seed=1, with_keys=True)
    keys1_fresh, _, _ = run_epoch(again, 1, 32)  # epoch 1 does not depend on having run epoch 0
    keys0_again, images0_again, _ = run_epoch(again, 0, 32)
    assert keys1_fresh == keys1 and keys0_again == keys0
    assert all(torch.equal(a, b) for a, b in zip(images0, images0_again))

    other_seed, _, _ = run_epoch(TrainLoader(shards_dir, 20, seed=2, with_keys=True), 0, 32)
    assert other_seed != keys0


def test_one_and_two_dali_threads_give_bit_identical_batches(shards_dir):
    """README: data.num_threads is a speed knob only (RESUME_SAFE): the random crops and flips follow the
    pipeline's seed, not which thread decoded a sample."""
    one = run_epoch(TrainLoader(shards_dir, 20, seed=3, num_threads=1, with_keys=True), 1, 32)
    two = run_epoch(TrainLoader(shards_dir, 20, seed=3, num_threads=2, with_keys=True), 1, 32)
    assert one[0] == two[0] and len(one[1]) == len(two[1]) == 10
    assert all(torch.equal(a, b) for a, b in zip(one[1], two[1]))
    assert all(torch.equal(a, b) for a, b in zip(one[2], two[2]))
    other = run_epoch(TrainLoader(shards_dir, 20, seed=4, num_threads=2, with_keys=True), 1, 32)
    assert not all(torch.equal(a, b) for a, b in zip(one[1], other[1]))  # the comparison can tell batches apart


# -- resume ---------------------------------------------------------------------------------------

RESUME_SCRIPT = """
import pickle, sys, torch
from train.data import TrainLoader
state = pickle.load(open(sys.argv[1], "rb"))
loader = TrainLoader(sys.argv[2], 16, rank=1, world_size=2, seed=7)
loader.load_state_dict(state)
torch.save(list(loader.epoch(2, 40)), sys.argv[3])
"""


def test_state_saved_mid_epoch_resumes_bitwise_in_a_new_process(shards_dir, tmp_path):
    reference = list(TrainLoader(shards_dir, 16, rank=1, world_size=2, seed=7).epoch(2, 40))
    assert len(reference) == 6

    loader = TrainLoader(shards_dir, 16, rank=1, world_size=2, seed=7)
    batches = loader.epoch(2, 40)
    for _ in range(2):
        next(batches)
    state = pickle.loads(pickle.dumps(loader.state_dict()))
    assert state["epoch"] == 2 and state["step"] == 2 and state["dali_checkpoint"]
    (tmp_path / "state.pkl").write_bytes(pickle.dumps(state))
    subprocess.run([sys.executable, "-c", RESUME_SCRIPT, str(tmp_path / "state.pkl"), str(shards_dir),
                    str(tmp_path / "rest.pt")], cwd=REPO, check=True, timeout=120)
    rest = torch.load(tmp_path / "rest.pt")
    assert len(rest) == 4
    for (x, y), (rx, ry) in zip(rest, reference[2:]):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_resume_in_process_and_at_epoch_boundaries(shards_dir):
    make = lambda: TrainLoader(shards_dir, 20, seed=4)  # noqa: E731
    reference = [list(make().epoch(e, 32)) for e in (0, 1)]

    loader = make()
    batches = loader.epoch(0, 32)
    next(batches)
    mid = loader.state_dict()
    list(batches)
    end = loader.state_dict()
    assert end["step"] == len(loader) and end["dali_checkpoint"] == ""

    resumed = make()
    resumed.load_state_dict(mid)
    assert resumed.state_dict() == mid  # saving again before continuing keeps the position
    rest = resumed.epoch(0, 32)
    again = make()
    again.load_state_dict(resumed.state_dict())  # saved right after continuing, before a batch
    rest, rest_again = list(rest), list(again.epoch(0, 32))
    assert len(rest) == len(rest_again) == len(reference[0]) - 1
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[0], c[0])
               for a, b, c in zip(rest, reference[0][1:], rest_again))

    after_end = make()
    after_end.load_state_dict(end)
    assert list(after_end.epoch(0, 32)) == []  # the saved epoch was complete
    after_end.load_state_dict(end)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(after_end.epoch(1, 32), reference[1]))


def test_resume_refuses_another_epoch_resolution_or_setup(shards_dir):
    loader = TrainLoader(shards_dir, 20, seed=4)
    batches = loader.epoch(0, 32)
    next(batches)
    state = loader.state_dict()
    fresh = TrainLoader(shards_dir, 20, seed=4)
    fresh.load_state_dict(state)
    with pytest.raises(ValueError, match="epoch 0"):
        fresh.epoch(1, 32)
    fresh.load_state_dict(state)
    with pytest.raises(ValueError, match="res 32"):
        fresh.epoch(0, 48)
    with pytest.raises(ValueError, match="seed"):
        TrainLoader(shards_dir, 20, seed=5).load_state_dict(state)


# -- validation -----------------------------------------------------------------------------------

@pytest.mark.parametrize("world_size,batch_size", [(1, 16), (2, 16), (3, 8), (4, 64)])
def test_validation_counts_every_image_exactly_once(shards_dir, world_size, batch_size):
    everything = split_keys(shards_dir, "val")
    assert len(everything) == 70
    seen, lengths = [], []
    for rank in range(world_size):
        loader = ValLoader(shards_dir, batch_size, rank=rank, world_size=world_size, res=32, with_keys=True)
        for pass_ in range(2):  # a second pass must give the same share again
            keys = []
            for images, labels, k in loader:
                assert images.shape == (len(k), 3, 32, 32) and labels.shape == (len(k),)
                assert images.is_contiguous(memory_format=torch.channels_last)
                keys += k
            if pass_ == 0:
                seen += keys
                first = keys
            assert keys == first
        lengths.append(len(loader))
        assert len(loader) == len(first)
    assert sorted(seen) == sorted(everything)
    assert sum(lengths) == 70


def test_validation_pass_after_an_abandoned_one_is_still_exact(shards_dir):
    loader = ValLoader(shards_dir, 8, rank=1, world_size=2, res=32, with_keys=True)
    full = [k for _, _, ks in loader for k in ks]
    partial = iter(loader)
    next(partial)
    del partial
    assert [k for _, _, ks in loader for k in ks] == full


def test_validation_is_an_exact_centre_crop_normalised(shards_dir):
    """At res 56 and crop_ratio 0.875 a 64x64 image is not resized, so the output is exactly its centre 56x56."""
    images, _, keys = next(iter(ValLoader(shards_dir, 16, res=56, with_keys=True)))
    assert keys == split_keys(shards_dir, "val")[:16]  # no shuffling in validation
    dataset = ShardDataset(split_shards(shards_dir, "val"))
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    checked = 0
    for i in range(16):
        image = Image.open(io.BytesIO(dataset.read(i)[0])).convert("RGB")
        if image.size != (64, 64):
            continue
        pixels = torch.tensor(np.asarray(image)).permute(2, 0, 1).float() / 255
        expected = ((pixels - mean) / std)[:, 4:60, 4:60]
        assert torch.allclose(images[i], expected, atol=1e-5)
        checked += 1
    assert checked >= 2


# -- labels ---------------------------------------------------------------------------------------

def test_labels_match_webdataset_library_and_manifest_counts(shards_dir):
    manifest = load_manifest(shards_dir)
    for split in ("train", "val"):
        truth = wds_labels(shards_dir, split)
        if split == "train":
            keys, _, labels = run_epoch(TrainLoader(shards_dir, 20, seed=0, with_keys=True), 0, 24)
            labels = torch.cat(labels).tolist()
        else:
            batches = list(ValLoader(shards_dir, 16, res=24, with_keys=True))
            keys = [k for _, _, ks in batches for k in ks]
            labels = torch.cat([y for _, y, _ in batches]).tolist()
        assert len(keys) == len(truth) == manifest["splits"][split]["images"]
        assert {k: lab for k, lab in zip(keys, labels)} == truth
        counts = collections.Counter(labels)
        assert [counts[c] for c in range(manifest["num_classes"])] == manifest["splits"][split]["per_class"]


# -- baseline -------------------------------------------------------------------------------------

def test_baseline_loader_yields_normalised_batches_with_the_shards_labels(shards_dir):
    loader = build_baseline_loader(shards_dir, 32, 40, num_workers=0, seed=0)
    batches = list(loader)
    assert len(batches) == 200 // 32
    images, labels = batches[0]
    assert images.shape == (32, 3, 40, 40) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert LOW - 0.05 <= images.min() < 0 < images.max() <= HIGH + 0.05
    dataset = loader.dataset
    truth = wds_labels(shards_dir, "train")
    keys = split_keys(shards_dir, "train")
    assert [dataset.read(i)[1] for i in range(len(dataset))] == [truth[k] for k in keys]
    val = list(build_baseline_loader(shards_dir, 32, 40, num_workers=0, split="val"))
    assert sum(len(y) for _, y in val) == 70


# -- bad input ------------------------------------------------------------------------------------

def test_missing_shard_is_named(damaged_copy):
    data_dir = damaged_copy()
    missing = data_dir / "train" / "shard-000001.tar"
    missing.unlink()
    for make in (lambda: TrainLoader(data_dir, 8), lambda: build_baseline_loader(data_dir, 8, 32, num_workers=0)):
        with pytest.raises(DatasetError, match=str(missing)):
            make()
    ValLoader(data_dir, 8)  # the val split is intact


def _first_sample(data_dir: Path, split: str, shard: int) -> tuple[Path, dict]:
    tar, idx = split_shards(data_dir, split)[shard]
    parts = idx.read_text().splitlines()[1].split()
    return tar, {parts[i]: (int(parts[i + 1]), int(parts[i + 2])) for i in range(0, len(parts), 4)}


def _overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_corrupt_shard_gives_an_error_naming_it(damaged_copy):
    data_dir = damaged_copy()
    tar, sample = _first_sample(data_dir, "train", 2)
    offset, size = sample["jpg"]
    _overwrite(tar, offset, bytes(256))  # same size: only the checksum can tell
    with pytest.raises(DatasetError, match=f"{tar}.*damaged"):
        for _ in TrainLoader(data_dir, 10, seed=0).epoch(0, 32):
            pass
    with pytest.raises(DatasetError, match=str(tar)):
        for _ in build_baseline_loader(data_dir, 200, 32, num_workers=0):
            pass


def test_corrupt_label_is_caught(damaged_copy):
    data_dir = damaged_copy()
    tar, sample = _first_sample(data_dir, "val", 0)
    _overwrite(tar, sample["lbl"][0], (-3).to_bytes(8, "little", signed=True))
    with pytest.raises(DatasetError, match="label -3 outside"):
        list(ValLoader(data_dir, 70, res=24))


def test_without_dali_the_baseline_still_works_and_dali_loaders_say_what_to_do(shards_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # makes `import nvidia.dali` fail
    assert not data.dali_available()
    with pytest.raises(ImportError, match="build_baseline_loader"):
        TrainLoader(shards_dir, 8)
    images, _ = next(iter(build_baseline_loader(shards_dir, 8, 32, num_workers=0)))
    assert images.shape == (8, 3, 32, 32)


def test_helpers_agree_with_dali_sharding():
    assert [rank_range(70, 3, r) for r in range(3)] == [(0, 23), (23, 46), (46, 70)]
    assert shards_in_range([50, 50, 50, 50], 40, 110) == [0, 1, 2]
    assert shards_in_range([50, 50, 50, 50], 50, 100) == [1]


def test_errors_for_bad_arguments(shards_dir):
    with pytest.raises(ValueError, match="lower the batch size"):
        TrainLoader(shards_dir, 101, world_size=2)
    with pytest.raises(ValueError, match="rank 2"):
        ValLoader(shards_dir, 8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="dtype"):
        TrainLoader(shards_dir, 8, dtype=torch.int8)
    with pytest.raises(DatasetError, match="nope: no such directory"):
        TrainLoader(shards_dir / "nope", 8)
    assert json.loads((shards_dir / "manifest.json").read_text())["num_classes"] == num_classes(shards_dir)
