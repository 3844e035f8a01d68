"""DALI pipeline definitions: what the training and validation pipelines compute, and the settings they take.

The same definitions run on the CPU (device_id=None, "cpu" operators) and on a GPU ("mixed" decoding). They
know nothing of epochs, ranks' resume state or torch tensors: `train.data` builds one pipeline per epoch from
them and turns its outputs into torch batches; `train.decode_probe` builds one in a child process to test the
fused GPU decoder.
"""

from __future__ import annotations

import torch

MEAN = (0.485, 0.456, 0.406)  # ImageNet RGB mean, fraction of 255
STD = (0.229, 0.224, 0.225)
ASPECT_RANGE = (3 / 4, 4 / 3)  # random-resized-crop width/height range
SHUFFLE_BUFFER = 4096  # samples DALI holds to shuffle a rank's reads (~450 MB at ImageNet's ~110 KB/image)
# nvJPEG scratch per decoder thread, in bytes per pixel of the largest image in the shards. NVIDIA's ResNet-50
# example pads 211 MB GPU + 140 MB pinned host memory for ImageNet's ~12 Mpx originals (~17 and ~12 B/px);
# our shards hold images of at most `max_side` px (500 by default: 0.25 Mpx), so a few MB suffice.
NVJPEG_DEVICE_BYTES_PER_PIXEL = 18
NVJPEG_HOST_BYTES_PER_PIXEL = 12
MIB = 1 << 20
DALI_HW_DECODER_LOAD = 0.65  # DALI's default share of a batch for the hardware JPEG decoder
HW_DECODER_LOAD_AUTO = -1.0  # hw_decoder_load value meaning "choose by GPU" (default_hw_decoder_load)
PREFETCH_DEPTH = 2  # batches DALI prepares ahead (its prefetch_queue_depth default)


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def dali_modules():
    """(Pipeline, fn, types) of NVIDIA DALI, or a clear ImportError saying how to get it or what to use instead."""
    try:
        from nvidia.dali import Pipeline, fn, types
    except ImportError as exc:
        raise ImportError("NVIDIA DALI is not installed: `pip install -e '.[dali-cu12]'` (nvidia-dali-cuda120) for a "
                          "CUDA 12 driver or `.[dali-cu13]` (nvidia-dali-cuda130) for CUDA 13 (nvidia-smi shows the "
                          "driver's CUDA version; Linux x86-64/aarch64), or use train.data.build_baseline_loader "
                          "(torchvision DataLoader)") from exc
    return Pipeline, fn, types


def nvjpeg_paddings(max_side: int | None) -> dict:
    """nvJPEG buffer sizes (bytes, whole MiB) and hardware-decoder size hints for images of at most
    `max_side` px; without a known size, DALI's own defaults (16 MiB GPU, 8 MiB host) apply."""
    if not max_side:
        return {}
    pixels = max_side * max_side
    return {"device_memory_padding": -(-NVJPEG_DEVICE_BYTES_PER_PIXEL * pixels // MIB) * MIB,
            "host_memory_padding": -(-NVJPEG_HOST_BYTES_PER_PIXEL * pixels // MIB) * MIB,
            "preallocate_width_hint": max_side, "preallocate_height_hint": max_side}


# ---------------------------------------------------------------------------------------------------
# DALI pipeline definitions. The same definitions run on the CPU (device_id=None) and on a GPU.

def _dali_output_type(dtype: torch.dtype):
    """DALI's output type for a requested torch dtype; bf16 is not a DALI type, it is cast from fp16."""
    _, _, types = dali_modules()
    table = {torch.float32: types.FLOAT, torch.float16: types.FLOAT16, torch.bfloat16: types.FLOAT16}
    if dtype not in table:
        raise ValueError(f"dtype {dtype}: expected torch.float32, torch.float16 or torch.bfloat16")
    return table[dtype]


def _read_webdataset(fn, types, tars, idxs, *, world_size, rank, shuffle_buffer=0, pad_last_batch=False):
    """jpegs (uint8 bytes) and labels (int64 [1]) of this rank's share of the samples.

    lazy_init: the index files are parsed at the first run, not in `build()`. DALI holds the GIL for all of
    build() (1.2 s for ImageNet's 1,281 .idx files, during which other Python threads stall) but releases it
    while running, so an epoch's pipeline built ahead during validation no longer stalls the validation."""
    return fn.readers.webdataset(
        paths=[str(t) for t in tars], index_paths=[str(i) for i in idxs], ext=["jpg", "lbl"],
        dtypes=[types.UINT8, types.INT64], missing_component_behavior="error",
        num_shards=world_size, shard_id=rank, random_shuffle=shuffle_buffer > 0,
        initial_fill=max(shuffle_buffer, 1), pad_last_batch=pad_last_batch, stick_to_shard=pad_last_batch,
        lazy_init=True, name="reader")


def default_hw_decoder_load(device_id: int | None) -> float:
    """The share of each batch for the GPU's hardware JPEG decoder when asked for "auto": 0.9 on compute
    capability 9.x (H100/H200: NVIDIA's MLPerf runs use 0.99), else DALI's own default 0.65 (tuned on A100)."""
    if device_id is None or not torch.cuda.is_available():
        return DALI_HW_DECODER_LOAD
    return 0.9 if torch.cuda.get_device_capability(device_id)[0] == 9 else DALI_HW_DECODER_LOAD


def _decoder_args(device_id, max_side: int | None = None, hw_decoder_load: float = HW_DECODER_LOAD_AUTO) -> dict:
    """Decoder placement; on a GPU, nvJPEG's per-thread buffers sized for the shards' largest image and the
    share of each batch sent to the hardware JPEG decoder (the rest: CUDA decode with host Huffman decoding)."""
    if device_id is None:
        return {"device": "cpu"}
    load = default_hw_decoder_load(device_id) if hw_decoder_load == HW_DECODER_LOAD_AUTO else hw_decoder_load
    return {"device": "mixed", "hw_decoder_load": load, **nvjpeg_paddings(max_side)}


def random_crop_args(min_area: float) -> dict:
    """The training crop's distribution (area min_area..1 of the image, aspect ASPECT_RANGE), as the arguments of
    decoders.image_random_crop and random_resized_crop; benchmarks.loader_profile builds its stages with it."""
    return {"random_area": [min_area, 1.0], "random_aspect_ratio": list(ASPECT_RANGE), "num_attempts": 10}


def _normalize(fn, images, dtype, **kwargs):
    return fn.crop_mirror_normalize(images, dtype=dtype, output_layout="HWC",
                                    mean=[255 * m for m in MEAN], std=[255 * s for s in STD], **kwargs)


def val_transform(jpegs, *, res: int, crop_ratio: float, device_id: int | None, dtype: torch.dtype,
                  max_side: int | None = None, hw_decoder_load: float = HW_DECODER_LOAD_AUTO):
    """The validation graph, encoded bytes -> normalised HWC res x res centre crops: decode, resize the shorter
    side to res / crop_ratio, crop the centre. Call it inside a DALI pipeline's `with` block. The trainer's
    validation and viz's folder decoder both build their graphs with it, so they see the same pixels.
    max_side: the largest image side, to size nvJPEG's buffers on a GPU (None: DALI sizes them itself)."""
    _, fn, types = dali_modules()
    images = fn.decoders.image(jpegs, output_type=types.RGB, **_decoder_args(device_id, max_side, hw_decoder_load))
    images = fn.resize(images, resize_shorter=res / crop_ratio)
    return _normalize(fn, images, _dali_output_type(dtype), crop=(res, res))


def build_train_pipeline(tars, idxs, *, batch_size: int, res: int, world_size: int = 1, rank: int = 0,
                         seed: int = 0, device_id: int | None = None, num_threads: int = 2,
                         dtype: torch.dtype = torch.float32, min_area: float = 0.08,
                         shuffle_buffer: int = SHUFFLE_BUFFER, checkpoint: str | bytes | None = None,
                         decode: str = "fused", max_side: int | None = None, prefetch_depth: int = PREFETCH_DEPTH,
                         hw_decoder_load: float = HW_DECODER_LOAD_AUTO):
    """A built, checkpointable training pipeline: outputs (images HWC res x res, labels [B, 1] int64).

    decode: "fused" (decoders.image_random_crop, decodes only the crop) or "split" (decoders.image, then
    random_resized_crop on the decoder's device: the fallback when the fused mixed decoder fails).
    prefetch_depth: batches prepared ahead of the one returned (each holds a decoded batch in memory).
    hw_decoder_load: share of each batch for the hardware JPEG decoder on a GPU, or HW_DECODER_LOAD_AUTO (-1:
    default_hw_decoder_load)."""
    if decode not in ("fused", "split"):
        raise ValueError(f"decode {decode!r}: expected 'fused' or 'split'")
    _check_loader_tuning(prefetch_depth, hw_decoder_load)
    Pipeline, fn, types = dali_modules()
    pipe = Pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                    enable_checkpointing=True, checkpoint=checkpoint, exec_dynamic=True,
                    prefetch_queue_depth=prefetch_depth)
    crop = random_crop_args(min_area)
    with pipe:
        jpegs, labels = _read_webdataset(fn, types, tars, idxs, world_size=world_size, rank=rank,
                                         shuffle_buffer=shuffle_buffer)
        decoder = _decoder_args(device_id, max_side, hw_decoder_load)
        if decode == "fused":
            images = fn.decoders.image_random_crop(jpegs, output_type=types.RGB, **crop, **decoder)
            images = fn.resize(images, resize_x=res, resize_y=res)
        else:
            images = fn.decoders.image(jpegs, output_type=types.RGB, **decoder)
            images = fn.random_resized_crop(images, size=[res, res], **crop)
        images = _normalize(fn, images, _dali_output_type(dtype), mirror=fn.random.coin_flip(probability=0.5))
        pipe.set_outputs(images, labels)
    pipe.build()
    return pipe


def build_val_pipeline(tars, idxs, *, batch_size: int, res: int, crop_ratio: float = 224 / 256,
                       world_size: int = 1, rank: int = 0, device_id: int | None = None, num_threads: int = 2,
                       dtype: torch.dtype = torch.float32, max_side: int | None = None,
                       prefetch_depth: int = PREFETCH_DEPTH, hw_decoder_load: float = HW_DECODER_LOAD_AUTO):
    """A built validation pipeline; each pass is ceil(ceil(N / W) / B) batches, padded with the last sample."""
    _check_loader_tuning(prefetch_depth, hw_decoder_load)
    Pipeline, fn, types = dali_modules()
    pipe = Pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=0, exec_dynamic=True,
                    prefetch_queue_depth=prefetch_depth)
    with pipe:
        jpegs, labels = _read_webdataset(fn, types, tars, idxs, world_size=world_size, rank=rank,
                                         pad_last_batch=True)
        images = val_transform(jpegs, res=res, crop_ratio=crop_ratio, device_id=device_id, dtype=dtype,
                               max_side=max_side, hw_decoder_load=hw_decoder_load)
        pipe.set_outputs(images, labels)
    pipe.build()
    return pipe


def _check_loader_tuning(prefetch_depth: int, hw_decoder_load: float) -> None:
    if isinstance(prefetch_depth, bool) or not isinstance(prefetch_depth, int) or prefetch_depth < 1:
        raise ValueError(f"prefetch_depth {prefetch_depth!r}: must be an integer >= 1 (batches prepared ahead)")
    if hw_decoder_load != HW_DECODER_LOAD_AUTO and not 0 <= hw_decoder_load <= 1:
        raise ValueError(f"hw_decoder_load {hw_decoder_load}: must be in [0, 1] (share of each batch for the "
                         f"hardware JPEG decoder) or {HW_DECODER_LOAD_AUTO:g} (by GPU)")
