"""train.data on a GPU ("mixed" decoding, tensors on cuda): skipped where torch sees no CUDA device.

These are the checks CI cannot run; on a GPU box run `python -m pytest tests/test_data_gpu.py` (or the whole
GPU suite, `python -m benchmarks.gpu_suite`). The shards come from generated JPEG folders (`folder_shards_dir`),
so these tests need no `datasets` package.
"""

from __future__ import annotations

import pytest
import torch

from train.data import TrainLoader, ValLoader

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (DALI 'mixed' decoder)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_batches_are_on_the_device_in_channels_last(folder_shards_dir, dtype):
    loader = TrainLoader(folder_shards_dir, 16, device="gpu", device_id=0, dtype=dtype)
    images, labels = next(iter(loader.epoch(0, 48)))
    assert images.device == torch.device("cuda", 0) and labels.device == torch.device("cuda", 0)
    assert images.shape == (16, 3, 48, 48) and images.dtype == dtype and labels.dtype == torch.int64
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(images.float()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_batches_do_not_change_under_a_slow_consumer(folder_shards_dir, dtype):
    """DALI must not reuse a batch's memory while torch's queued kernels still read it. Pass 1 waits for the
    device after every batch (reference checksums); pass 2 queues ~10 ms of GPU sleep before reading each
    batch and never waits, so the host runs far ahead of the device: its checksums must be the same."""
    loader = TrainLoader(folder_shards_dir, 8, device="gpu", device_id=0, dtype=dtype)
    reference = []
    for images, _ in loader.epoch(0, 64):
        torch.cuda.synchronize()
        reference.append(images.float().sum(dim=(1, 2, 3)).cpu())
    queued = []
    for images, _ in loader.epoch(0, 64):  # the same epoch again: the same batches
        torch.cuda._sleep(20_000_000)  # GPU cycles
        queued.append(images.float().sum(dim=(1, 2, 3)))
    torch.cuda.synchronize()
    assert len(queued) == len(reference)
    for got, want in zip(queued, reference):
        assert torch.equal(got.cpu(), want)


def test_gpu_validation_counts_every_image_once_over_two_ranks(folder_shards_dir):
    seen = []
    for rank in range(2):
        for images, labels, keys in ValLoader(folder_shards_dir, 16, rank=rank, world_size=2, res=48, device="gpu",
                                              device_id=0, with_keys=True):
            assert images.device.type == "cuda" and len(keys) == len(labels)
            seen += keys
    assert len(seen) == len(set(seen)) == 70


def test_gpu_and_cpu_agree_on_validation_labels(folder_shards_dir):
    def labels_by_key(device, device_id):
        out = {}
        for _, labels, keys in ValLoader(folder_shards_dir, 32, res=48, device=device, device_id=device_id, with_keys=True):
            out.update(zip(keys, labels.cpu().tolist()))
        return out

    assert labels_by_key("gpu", 0) == labels_by_key("cpu", None)


@pytest.mark.parametrize("decode", ["fused", "split"])
def test_gpu_decode_paths_give_every_training_image_once(folder_shards_dir, decode):
    loader = TrainLoader(folder_shards_dir, 20, device="gpu", device_id=0, dtype=torch.bfloat16, decode=decode,
                         with_keys=True)
    keys = []
    for images, labels, k in loader.epoch(0, 64):
        assert images.shape == (20, 3, 64, 64) and images.is_contiguous(memory_format=torch.channels_last)
        assert torch.isfinite(images.float()).all() and labels.device.type == "cuda"
        keys += k
    assert len(keys) == len(set(keys)) == 200
    assert loader.decode_used == decode


def test_gpu_auto_decode_checks_the_fused_decoder_and_says_what_it_chose(folder_shards_dir):
    loader = TrainLoader(folder_shards_dir, 16, device="gpu", device_id=0, dtype=torch.bfloat16)
    images, _ = next(iter(loader.epoch(0, 64)))
    assert images.shape == (16, 3, 64, 64)
    assert loader.decode_used in ("fused", "split")
    print(f"decode chosen on {torch.cuda.get_device_name(0)}: {loader.decode_used}; notes: {loader.notes}")


def test_gpu_epoch_built_ahead_in_a_thread_gives_the_same_batches(folder_shards_dir):
    def epoch_sums(loader):
        return [images.float().sum().item() for images, _ in loader.epoch(1, 64)]

    reference = epoch_sums(TrainLoader(folder_shards_dir, 20, device="gpu", device_id=0, decode="split"))
    ahead = TrainLoader(folder_shards_dir, 20, device="gpu", device_id=0, decode="split")
    ahead.prepare(1, 64)
    assert epoch_sums(ahead) == reference
