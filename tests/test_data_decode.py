"""train.data's decode paths on the CPU: the split path (decoders.image + random_resized_crop), the automatic
fallback to it when the first fused batch fails, the child-process probe, epochs built ahead in a thread, and
nvJPEG buffer sizes derived from the shards' largest image. Uses the session fixture `shards_dir`."""

from __future__ import annotations

import pytest
import torch

from preprocess.manifest import DatasetError, split_shards
from train import data, decode_probe
from train.data import TrainLoader, nvjpeg_paddings


def epoch_batches(loader: TrainLoader, epoch: int, res: int) -> list:
    return list(loader.epoch(epoch, res))


def test_split_decode_gives_every_image_once_in_the_trainers_format(shards_dir):
    loader = TrainLoader(shards_dir, 20, dtype=torch.bfloat16, decode="split", with_keys=True)
    keys = []
    for images, labels, k in loader.epoch(0, 40):
        assert images.shape == (20, 3, 40, 40) and images.dtype == torch.bfloat16
        assert images.is_contiguous(memory_format=torch.channels_last) and labels.dtype == torch.int64
        keys += k
    assert len(keys) == len(set(keys)) == 200
    fused = TrainLoader(shards_dir, 20, dtype=torch.bfloat16, decode="fused")
    assert not torch.equal(next(iter(fused.epoch(0, 40)))[0], next(iter(loader.epoch(0, 40)))[0])


def test_split_decode_resumes_mid_epoch_exactly(shards_dir):
    make = lambda: TrainLoader(shards_dir, 20, seed=3, decode="split")  # noqa: E731
    reference = epoch_batches(make(), 0, 32)
    loader = make()
    batches = loader.epoch(0, 32)
    for _ in range(3):
        next(batches)
    state = loader.state_dict()
    assert state["decode"] == "split" and state["dali_checkpoint"]
    resumed = TrainLoader(shards_dir, 20, seed=3)  # decode="auto" takes the saved path
    resumed.load_state_dict(state)
    rest = list(resumed.epoch(0, 32))
    assert resumed.decode_used == "split" and len(rest) == len(reference) - 3
    assert all(torch.equal(a[0], b[0]) for a, b in zip(rest, reference[3:]))
    with pytest.raises(ValueError, match="decode 'split' -> 'fused'"):
        TrainLoader(shards_dir, 20, seed=3, decode="fused").load_state_dict(state)


class _FailingRun:
    """A real pipeline whose runs fail like the fused mixed decoder on an affected GPU."""

    def __init__(self, pipe):
        self.pipe = pipe

    def run(self, *args):
        raise RuntimeError("Critical error in pipeline:\n[nvImageCodec] internal error while decoding (simulated)")

    def checkpoint(self):
        return self.pipe.checkpoint()


@pytest.fixture
def fused_fails(monkeypatch):
    real = data.build_train_pipeline

    def build(*args, decode="fused", **kwargs):
        pipe = real(*args, decode=decode, **kwargs)
        return _FailingRun(pipe) if decode == "fused" else pipe

    monkeypatch.setattr(data, "build_train_pipeline", build)


def test_auto_falls_back_to_split_when_the_first_fused_batch_fails(shards_dir, fused_fails):
    reference = epoch_batches(TrainLoader(shards_dir, 20, seed=1, decode="split"), 0, 32)
    loader = TrainLoader(shards_dir, 20, seed=1)
    with pytest.warns(RuntimeWarning, match="fused decoder failed.*simulated.*data.decode=split"):
        batches = epoch_batches(loader, 0, 32)
    assert loader.decode_used == "split" and len(loader.notes) == 1
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, reference))
    assert len(epoch_batches(loader, 1, 32)) == len(loader)  # later epochs go straight to the split path
    assert len(loader.notes) == 1


def test_explicit_fused_decode_does_not_fall_back(shards_dir, fused_fails):
    with pytest.raises(DatasetError, match="simulated"):
        epoch_batches(TrainLoader(shards_dir, 20, decode="fused"), 0, 32)


def test_probe_runs_the_fused_decoder_in_a_child_and_reports_a_failure(shards_dir, tmp_path):
    shards = split_shards(shards_dir, "train")
    tars, idxs = [t for t, _ in shards], [i for _, i in shards]
    ok, detail = decode_probe.probe(tars, idxs, device_id=None, res=32, batch_size=8, max_side=500)
    assert ok, detail
    broken = tmp_path / "broken.tar"
    broken.write_bytes(b"\0" * 4096)  # the index points at members that are not there
    ok, detail = decode_probe.probe([broken], idxs[:1], device_id=None, res=32, batch_size=8, max_side=500)
    assert not ok and detail.startswith("exit status 1")


def test_epoch_built_ahead_gives_the_same_batches_and_is_used(shards_dir, monkeypatch):
    reference = epoch_batches(TrainLoader(shards_dir, 20, seed=2), 1, 32)
    builds = []
    real = data.build_train_pipeline
    monkeypatch.setattr(data, "build_train_pipeline", lambda *a, **k: builds.append(k["res"]) or real(*a, **k))
    loader = TrainLoader(shards_dir, 20, seed=2)
    loader.prepare(1, 32)
    loader._prepared.thread.join()
    batches = epoch_batches(loader, 1, 32)
    assert builds == [32] and loader.built_ahead  # built once, in the thread
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, reference))
    loader.prepare(2, 48)  # planned, then another epoch is asked for: dropped, the asked one is built
    assert len(epoch_batches(loader, 3, 32)) == len(loader) and builds == [32, 48, 32] and not loader.built_ahead


def test_nvjpeg_buffers_are_sized_for_the_shards_largest_image(shards_dir):
    pads = nvjpeg_paddings(500)
    assert 18 * 500 * 500 <= pads["device_memory_padding"] <= 8 << 20  # was 211 MB per thread
    assert 12 * 500 * 500 <= pads["host_memory_padding"] <= 4 << 20  # was 140 MB pinned, twice, per thread
    assert pads["device_memory_padding"] % (1 << 20) == 0 and pads["preallocate_width_hint"] == 500
    assert nvjpeg_paddings(None) == {}  # unknown size: DALI's defaults
    assert TrainLoader(shards_dir, 20).max_side == 500  # from manifest.json's settings
