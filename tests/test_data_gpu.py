"""train.data on a GPU ("mixed" decoding, tensors on cuda): skipped where torch sees no CUDA device.

These are the checks CI cannot run; on a GPU box run `python -m pytest tests/test_data_gpu.py`.
"""

from __future__ import annotations

import pytest
import torch

from train.data import TrainLoader, ValLoader

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (DALI 'mixed' decoder)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_batches_are_on_the_device_in_channels_last(shards_dir, dtype):
    loader = TrainLoader(shards_dir, 16, device="gpu", device_id=0, dtype=dtype)
    images, labels = next(iter(loader.epoch(0, 48)))
    assert images.device == torch.device("cuda", 0) and labels.device == torch.device("cuda", 0)
    assert images.shape == (16, 3, 48, 48) and images.dtype == dtype and labels.dtype == torch.int64
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(images.float()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_batches_do_not_change_under_a_slow_consumer(shards_dir, dtype):
    """DALI must not reuse a batch's memory while torch's queued kernels still read it. Pass 1 waits for the
    device after every batch (reference checksums); pass 2 queues ~10 ms of GPU sleep before reading each
    batch and never waits, so the host runs far ahead of the device: its checksums must be the same."""
    loader = TrainLoader(shards_dir, 8, device="gpu", device_id=0, dtype=dtype)
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


def test_gpu_validation_counts_every_image_once_over_two_ranks(shards_dir):
    seen = []
    for rank in range(2):
        for images, labels, keys in ValLoader(shards_dir, 16, rank=rank, world_size=2, res=48, device="gpu",
                                              device_id=0, with_keys=True):
            assert images.device.type == "cuda" and len(keys) == len(labels)
            seen += keys
    assert len(seen) == len(set(seen)) == 70


def test_gpu_and_cpu_agree_on_validation_labels(shards_dir):
    def labels_by_key(device, device_id):
        out = {}
        for _, labels, keys in ValLoader(shards_dir, 32, res=48, device=device, device_id=device_id, with_keys=True):
            out.update(zip(keys, labels.cpu().tolist()))
        return out

    assert labels_by_key("gpu", 0) == labels_by_key("cpu", None)
