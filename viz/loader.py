"""Validation batches for viz, decoded by DALI exactly as the trainer's validation decodes them.

Shards are read by `train.data.ValLoader` itself (the object the trainer evaluates with). Folder images
(and single images fetched again for Grad-CAM) go through a DALI pipeline that applies the same three
operators as `train.data.build_val_pipeline` (decode RGB -> resize the shorter side to res / crop_ratio
-> centre-crop res + ImageNet normalisation), fed with the encoded bytes instead of a tar reader; a test
checks that both give the same tensors. GPU when `device="gpu"`, CPU otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from preprocess.manifest import DatasetError, split_shards
from viz.datasets import ValData
from viz.weights import VizError


@dataclass
class Batch:
    indices: list[int]  # positions in the split's evaluation order
    keys: list[str]
    labels: list[int]  # in the model's output space
    images: torch.Tensor  # [B, 3, res, res], normalised, on the decoding device
    skipped: list[str]  # keys of unreadable images met since the previous batch


class BytesDecoder:
    """encoded images -> the trainer's validation tensors, one DALI pipeline reused batch after batch."""

    def __init__(self, res: int, crop_ratio: float, batch_size: int, *, device: str = "cpu",
                 num_threads: int = 2, dtype: torch.dtype = torch.float32):
        self.res, self.crop_ratio, self.batch_size = res, crop_ratio, batch_size
        self.device_id = None if device == "cpu" else torch.cuda.current_device()
        self.num_threads, self.dtype = max(1, num_threads), dtype
        self._pipe = None

    def _build(self):
        from train.data import dali_modules, val_transform

        Pipeline, fn, types = dali_modules()
        pipe = Pipeline(batch_size=self.batch_size, num_threads=self.num_threads, device_id=self.device_id, seed=0,
                        exec_dynamic=True, prefetch_queue_depth=1)
        with pipe:
            jpegs = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            # any image size: without max_side, DALI sizes nvJPEG's buffers itself
            images = val_transform(jpegs, res=self.res, crop_ratio=self.crop_ratio, device_id=self.device_id,
                                   dtype=self.dtype)
            pipe.set_outputs(images)
        pipe.build()
        return pipe

    def _run(self, encoded: list[bytes]) -> torch.Tensor:
        if self._pipe is None:
            self._pipe = self._build()
        self._pipe.feed_input("encoded", [np.frombuffer(e, dtype=np.uint8) for e in encoded])
        try:
            (images,) = self._pipe.run()
        except RuntimeError:
            self._pipe = None  # DALI leaves a failed pipeline unusable
            raise
        if self.device_id is None:
            nhwc = torch.from_dlpack(images.as_tensor())
        else:
            with torch.cuda.device(self.device_id):
                nhwc = torch.from_dlpack(images.as_tensor())
        # NCHW view with channels_last strides, as train.data.batch_to_torch makes it; the copy owns its
        # memory, so DALI may reuse its buffer for the next batch.
        return nhwc.permute(0, 3, 1, 2).to(self.dtype).clone()

    def decode(self, encoded: list[bytes]) -> tuple[torch.Tensor, list[int]]:
        """(images of the readable inputs, positions of the unreadable ones). A batch that fails is
        decoded one image at a time to find the culprits; the others are kept."""
        if not encoded:
            return torch.zeros(0, 3, self.res, self.res, dtype=self.dtype), []
        try:
            return self._run(encoded), []
        except RuntimeError:
            pass
        good, bad = [], []
        for i, one in enumerate(encoded):
            try:
                good.append(self._run([one]))
            except RuntimeError:
                bad.append(i)
        images = torch.cat(good) if good else torch.zeros(0, 3, self.res, self.res, dtype=self.dtype)
        return images, bad


def _map(labels: list[int], label_map) -> list[int]:
    return [label_map[label] for label in labels] if label_map is not None else labels


def shard_batches(data: ValData, *, res: int, crop_ratio: float, batch_size: int, device: str, num_threads: int,
                  dtype: torch.dtype, limit: int):
    """train.data.ValLoader over the shards (one rank), cut after `limit` images."""
    from train.data import ValLoader

    try:
        loader = ValLoader(data.path, batch_size, res=res, crop_ratio=crop_ratio, device=device,
                           num_threads=num_threads, dtype=dtype, with_keys=True)
    except (DatasetError, ValueError) as exc:
        raise VizError(f"--data {data.path}: {exc}") from exc
    seen = 0
    try:
        for images, labels, keys in loader:
            keep = min(len(keys), limit - seen)
            yield Batch(list(range(seen, seen + keep)), list(keys[:keep]),
                        _map(labels[:keep].tolist(), data.label_map), images[:keep], [])
            seen += keep
            if seen >= limit:
                break
    except DatasetError as exc:
        raise VizError(str(exc)) from exc


def folder_batches(data: ValData, *, res: int, crop_ratio: float, batch_size: int, device: str, num_threads: int,
                   dtype: torch.dtype, limit: int):
    """The folder's images in its listed order, decoded by `BytesDecoder`; unreadable ones are skipped."""
    decoder = BytesDecoder(res, crop_ratio, batch_size, device=device, num_threads=num_threads, dtype=dtype)
    files = data.files[:limit]
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        encoded = []
        for _, _, path in chunk:
            try:
                encoded.append(Path(path).read_bytes())
            except OSError as exc:
                raise VizError(f"--data {path}: cannot read ({exc.strerror or exc})") from exc
        images, bad = decoder.decode(encoded)
        kept = [i for i in range(len(chunk)) if i not in set(bad)]
        yield Batch([start + i for i in kept], [chunk[i][0] for i in kept],
                    _map([chunk[i][1] for i in kept], data.label_map), images, [chunk[i][0] for i in bad])


def batches(data: ValData, *, res: int, crop_ratio: float, batch_size: int, device: str = "cpu",
            num_threads: int = 2, dtype: torch.dtype = torch.float32, limit: int | None = None):
    """Batches of the first `limit` images (all by default) of the split, in its evaluation order."""
    limit = data.size if limit is None else min(limit, data.size)
    make = shard_batches if data.layout == "shards" else folder_batches
    return make(data, res=res, crop_ratio=crop_ratio, batch_size=batch_size, device=device,
                num_threads=num_threads, dtype=dtype, limit=limit)


def read_encoded(data: ValData, indices: list[int]) -> dict[int, bytes]:
    """The encoded bytes of the images at `indices` of the evaluation order (random access)."""
    if data.layout != "shards":
        return {i: Path(data.files[i][2]).read_bytes() for i in indices}
    from train.data import ShardDataset

    shards = ShardDataset(split_shards(data.path, "val"))  # ValLoader's order: tars in manifest order
    return {i: shards.read(i)[0] for i in indices}


def fetch_images(data: ValData, indices: list[int], *, res: int, crop_ratio: float, device: str = "cpu",
                 num_threads: int = 2, batch_size: int = 64) -> dict[int, torch.Tensor]:
    """The model inputs (float32 [3, res, res], CPU) of the images at `indices`, as evaluation saw them."""
    encoded = read_encoded(data, sorted(set(indices)))
    decoder = BytesDecoder(res, crop_ratio, batch_size, device=device, num_threads=num_threads)
    out: dict[int, torch.Tensor] = {}
    order = list(encoded)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        images, bad = decoder.decode([encoded[i] for i in chunk])
        kept = [i for j, i in enumerate(chunk) if j not in set(bad)]
        out.update(zip(kept, images.float().cpu()))
    return out


def to_pixels(image: torch.Tensor) -> np.ndarray:
    """A normalised [3, H, W] model input back to the uint8 RGB crop it was made from."""
    from train.data import MEAN, STD

    mean = torch.tensor(MEAN)[:, None, None]
    std = torch.tensor(STD)[:, None, None]
    rgb = (image.float().cpu() * std + mean) * 255
    return rgb.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
