"""Input pipelines: DALI for training and validation, a torchvision DataLoader as baseline and fallback.

What the DALI pipelines compute is defined in `train.pipelines`; this module runs them per epoch and rank
(`TrainLoader`, `ValLoader`) and hands their outputs to torch.

Training (`TrainLoader`): readers.webdataset over the tar shards and their DALI indexes, sharded per
rank -> decoders.image_random_crop (area 0.08-1, aspect 3/4-4/3; "mixed" on a GPU, "cpu" otherwise)
-> resize to the epoch's resolution -> random flip + ImageNet normalisation in crop_mirror_normalize,
HWC -> a torch view without a copy (bf16: one cast): NCHW with channels_last strides; on a GPU the DALI
outputs are held until torch's stream is done with them (`_InFlight`). Labels are the int64 `.lbl` field.

How an epoch is made (what the trainer can rely on):
- One DALI pipeline per epoch, built by `.epoch(epoch, res)` and dropped at its end. That is how the
  resolution changes between epochs (progressive resizing) without restarting the process; it costs
  one pipeline build per epoch (index parsing + filling the shuffle buffer; `benchmarks.dataloader`
  reports it as "epoch setup s").
- The order and augmentation of epoch e are a pure function of (seed, e, world_size, batch_size), not
  of the epochs before it: the tar files are permuted with an RNG seeded by (seed, e), the same on
  every rank; DALI then gives rank r the contiguous sample range [N*r//W, N*(r+1)//W) of that order
  (disjoint, union = all), shuffled within a buffer of `shuffle_buffer` samples; reader and augmentation
  RNGs are seeded by (seed, e, r). A run resumed at an epoch boundary therefore needs no loader state.
- Every rank runs `len(loader) = (N // W) // batch_size` steps; the ranks' leftover samples (fewer than
  one batch, plus at most one for the uneven split) are dropped for that epoch only.
- Decoding (`decode`): "fused" is decoders.image_random_crop (decodes only the crop window); "split" is
  decoders.image + random_resized_crop, the fallback for GPUs where the fused mixed decoder fails
  (nvImageCodec 0.9, NVIDIA/nvImageCodec issue 55: an error on A100, a segfault on H100). "auto" uses
  fused, after checking it in a child process on a GPU (`train.decode_probe`: a segfault cannot be caught
  in-process), and switches to split if the first batch of the fused pipeline fails.
- The next epoch's pipeline can be built ahead (`prepare(epoch, res)`, in a thread, e.g. while validation
  runs); `.epoch()` then takes it, its first batch already decoded.
- GPU batches come back on torch's current stream (`pipe.run(stream)`): no host sync per batch.
- Mid-epoch resume uses DALI checkpointing: `state_dict()` holds (epoch, res, step) and the pipeline's
  serialized state; `load_state_dict()` + `.epoch(e, res)` rebuilds the epoch's pipeline from it and
  yields exactly the remaining batches of the uninterrupted run. The state is per rank.

Validation (`ValLoader`): decode -> resize the shorter side to res / crop_ratio -> centre crop res ->
normalise. Rank r reads the contiguous range [N*r//W, N*(r+1)//W) with the reader's padding of the
last batch; the padded samples are cut off here, so over all ranks every image is yielded exactly once
and the last batch of a rank may be short. Ranks may run one batch more or fewer than each other, so
evaluate with the unwrapped model and all-reduce sums afterwards.

Baseline (`build_baseline_loader`): PyTorch DataLoader workers read samples through the same .idx
files, decode with PIL and apply RandomResizedCrop + flip + normalise.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import io
import math
import os
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from preprocess.manifest import DatasetError, load_manifest, split_shards, split_size
from preprocess.writer import decode_lbl, read_index
from train import decode_probe

# The pipeline definitions and their settings live in train.pipelines; they are named here too, where the
# trainer, the benchmarks and the tests have always found them.
from train.pipelines import (  # noqa: F401
    ASPECT_RANGE, DALI_HW_DECODER_LOAD, HW_DECODER_LOAD_AUTO, MEAN, PREFETCH_DEPTH, SHUFFLE_BUFFER, STD,
    _check_loader_tuning, _dali_output_type, _decoder_args, _normalize, _read_webdataset, build_train_pipeline,
    build_val_pipeline, dali_available, dali_modules, default_hw_decoder_load, nvjpeg_paddings, val_transform)

STATE_VERSION = 1
DECODE_MODES = ("auto", "fused", "split")


def num_classes(data_dir) -> int:
    return int(load_manifest(data_dir)["num_classes"])


def manifest_max_side(manifest: dict) -> int | None:
    """Longest image side (pixels) the shards were written with, if the manifest says."""
    side = (manifest.get("settings") or {}).get("max_side")
    return int(side) if side else None


# ---------------------------------------------------------------------------------------------------
# Sharding and seeds: plain functions of (seed, epoch, rank) so that an epoch can be rebuilt anywhere.

def rank_range(total: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, stop) of the samples DALI's reader gives shard `rank` of `world_size` (its own formula)."""
    return total * rank // world_size, total * (rank + 1) // world_size


def epoch_shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The order of the tar files in epoch `epoch`; identical on every rank, so rank ranges stay disjoint."""
    return np.random.default_rng([seed, epoch]).permutation(num_shards).tolist()


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed (31 bits, what DALI accepts) of a rank's reader shuffle and augmentation in one epoch."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0] & 0x7FFF_FFFF)


def shards_in_range(sizes: list[int], start: int, stop: int) -> list[int]:
    """Positions (in the given order) of the shards holding any of the samples [start, stop)."""
    hits, first = [], 0
    for i, size in enumerate(sizes):
        if first < stop and first + size > start:
            hits.append(i)
        first += size
    return hits


# ---------------------------------------------------------------------------------------------------
# DALI outputs -> torch, and errors -> messages that name the file.

def _sample_keys(images) -> list[str]:
    """Sample keys (tar member name without extension) from DALI's source info "<tar>:<offset>:<key>.jpg"."""
    return [images[i].source_info().rsplit(":", 1)[-1].rsplit(".", 1)[0] for i in range(len(images))]


class _InFlight:
    """Holds the DALI outputs of GPU batches until torch's stream is done with them.

    The torch tensors of `batch_to_torch` share DALI's memory (and the bf16 cast is queued, not done, when
    it returns), but freeing that memory is ordered on DALI's stream, not torch's: without this, DALI could
    hand a buffer to a later batch while torch's kernels still read it. Each batch is kept until an event
    recorded after the consumer queued its step has passed, at most `limit` batches deep. The consumer must
    not keep the yielded tensors past its next batch (the trainer does not)."""

    def __init__(self, device_id: int | None, limit: int = 8):
        self.device = None if device_id is None else torch.device("cuda", device_id)
        self.limit = limit
        self._held: collections.deque = collections.deque()

    def hold(self, outputs) -> None:
        if self.device is None:  # CPU pipelines: the host already waited for everything
            return
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self._held.append((outputs, event))
        while self._held and (len(self._held) > self.limit or self._held[0][1].query()):
            self._held.popleft()[1].synchronize()

    def release(self) -> None:
        while self._held:
            self._held.popleft()[1].synchronize()


def batch_to_torch(images, labels, dtype: torch.dtype, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of a DALI batch without a copy (bf16: one cast): images [B, 3, H, W] channels_last, labels
    int64 [B]. On a GPU the DALI outputs must outlive torch's use of them: see `_InFlight`."""
    from nvidia.dali.backend import TensorListGPU

    on_gpu = isinstance(images, TensorListGPU)
    device = torch.device("cuda", images.device_id()) if on_gpu else torch.device("cpu")
    with torch.cuda.device(device) if on_gpu else contextlib.nullcontext():
        nhwc = torch.from_dlpack(images.as_tensor())  # DALI's dynamic executor never reuses a held buffer
    nchw = nhwc.permute(0, 3, 1, 2)
    if nchw.dtype != dtype:
        nchw = nchw.to(dtype)  # fp16 -> bf16; keeps the channels_last strides
    targets = torch.from_dlpack(labels.as_tensor()).view(-1)
    low, high = torch.aminmax(targets)
    if low < 0 or high >= classes:
        raise DatasetError(f"label {int(low) if low < 0 else int(high)} outside 0..{classes - 1} in a batch: "
                           "a `.lbl` field is damaged or the shards belong to another manifest")
    if on_gpu:
        # An async copy is safe only from memory torch owns (its pinned allocator keeps a block until the copy
        # is done); DALI may reuse its own buffer. pin_memory() would hand back DALI's buffer itself when that
        # is already pinned, so the labels are copied into a new pinned tensor.
        targets = torch.empty(targets.shape, dtype=targets.dtype, pin_memory=True).copy_(targets)
    return nchw, targets.to(device, non_blocking=True)


def _damaged_shards(tars: list[Path], infos: list[dict]) -> list[str]:
    """The tars whose sha256 differs from the manifest's (read in full: only called after a failure)."""
    from preprocess.writer import file_sha256

    return [str(t) for t, info in zip(tars, infos) if info.get("sha256") and file_sha256(t) != info["sha256"]]


def _pipeline_error(exc: Exception, tars: list[Path], infos: list[dict], split: str) -> DatasetError:
    """A DatasetError naming the shard(s) that broke a pipeline run, checked against the manifest."""
    detail = str(exc).strip().splitlines()
    # DALI's message is a traceback; its last line naming a failure or error is the useful one.
    reason = next((line for line in reversed(detail) if "failure" in line or "rror" in line),
                  detail[-1] if detail else "")
    damaged = _damaged_shards(tars, infos)
    if damaged:
        return DatasetError(f"{', '.join(damaged)}: contents differ from manifest.json (sha256); the shard is "
                            f"damaged, delete it and re-run `python -m preprocess.shard` (DALI: {reason})")
    checked = "match their manifest checksums" if any(i.get("sha256") for i in infos) else "have no checksums"
    return DatasetError(f"DALI failed reading split {split!r} from {tars[0].parent} (shards {tars[0].name}.."
                        f"{tars[-1].name}, which {checked}): {reason}")


# ---------------------------------------------------------------------------------------------------

def _check_common(batch_size: int, rank: int, world_size: int, device: str) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size}: must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank}, world_size {world_size}: need 0 <= rank < world_size")
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device {device!r}: expected 'cpu' or 'gpu'")


def _resolve_device_id(device: str, device_id: int | None) -> int | None:
    """DALI's device_id: None runs every operator on the CPU."""
    if device == "cpu":
        return None
    if not torch.cuda.is_available():
        raise RuntimeError("device='gpu' but torch sees no CUDA device; use device='cpu'")
    return torch.cuda.current_device() if device_id is None else device_id


def _open_split(data_dir, split: str):
    """(tar/idx pairs, manifest shard entries, image count, class count, max image side) of one split."""
    manifest = load_manifest(data_dir)
    return (split_shards(data_dir, split, manifest), manifest["splits"][split]["shards"],
            split_size(manifest, split), int(manifest["num_classes"]), manifest_max_side(manifest))


def _run_pipe(pipe, device_id: int | None):
    """One batch. On a GPU the outputs are bound to torch's current stream: torch's kernels wait for DALI's
    on the device instead of the host waiting for each batch."""
    if device_id is None:
        return pipe.run()
    return pipe.run(torch.cuda.current_stream(device_id))


PROBE_TIMEOUT_S = 60.0  # the fused-decoder probe's child process; longer counts as a failure
_PROBED: dict[tuple, tuple[bool, str]] = {}  # (device_id, batch_size, dtype, max_side) -> the probe's verdict


class _Prepared:
    """An epoch's pipeline being built (and its first batch run) in a background thread."""

    def __init__(self, key: tuple, work):
        self.key, self.result, self.error = key, None, None
        self.thread = threading.Thread(target=self._target, args=(work,), name=f"dali-prepare-{key}", daemon=True)
        self.thread.start()

    def _target(self, work) -> None:
        try:
            self.result = work()
        except BaseException as exc:  # handed to the consumer, raised there
            self.error = exc

    def take(self):
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.result


class TrainLoader:
    """Training batches of one rank, one DALI pipeline per epoch; see the module docstring for the contract."""

    def __init__(self, data_dir, batch_size, *, rank=0, world_size=1, seed=0, device="cpu", device_id=None,
                 num_threads=2, dtype=torch.float32, min_area=0.08, split="train", shuffle_buffer=SHUFFLE_BUFFER,
                 with_keys=False, decode="auto", prefetch_depth=PREFETCH_DEPTH, hw_decoder_load=HW_DECODER_LOAD_AUTO):
        _check_common(batch_size, rank, world_size, device)
        _check_loader_tuning(prefetch_depth, hw_decoder_load)
        if not 0 < min_area <= 1:
            raise ValueError(f"min_area {min_area}: must be in (0, 1]")
        if decode not in DECODE_MODES:
            raise ValueError(f"decode {decode!r}: expected one of {', '.join(DECODE_MODES)}")
        _dali_output_type(dtype)
        self._shards, self._infos, self._total, self._classes, self.max_side = _open_split(data_dir, split)
        self._split = split
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.device_id = _resolve_device_id(device, device_id)
        self.num_threads, self.dtype, self.min_area = num_threads, dtype, min_area
        self.prefetch_depth, self.hw_decoder_load = prefetch_depth, hw_decoder_load
        self.shuffle_buffer = min(shuffle_buffer, self._total // world_size)
        self.with_keys = with_keys
        self.decode = decode
        # The decode path in use: the explicit choice, or for "auto" what the probe / a failed batch decided.
        self.decode_used: str | None = None if decode == "auto" else decode
        self.notes: list[str] = []  # what the loader decided on its own (fallbacks), for the run's log
        if len(self) == 0:
            raise ValueError(f"batch_size {batch_size} > {self._total // world_size} training images per rank "
                             f"({self._total} in {split!r} over {world_size} ranks): lower the batch size")
        self._pipe = None
        self._epoch, self._res, self._step = -1, 0, 0
        self._resume: dict | None = None
        self._prepared: _Prepared | None = None
        self.wait_seconds = 0.0  # how long the last .epoch() call took to get its pipeline ready
        self.built_ahead = False  # whether that pipeline came from prepare()

    def __len__(self) -> int:
        return self._total // self.world_size // self.batch_size

    def _epoch_shards(self, epoch: int):
        order = epoch_shard_order(len(self._shards), self.seed, epoch)
        return [self._shards[i] for i in order], [self._infos[i] for i in order]

    # -- decode path -----------------------------------------------------------------------------------

    def _note(self, message: str) -> None:
        self.notes.append(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _resolve_decode(self, tars, idxs, res: int) -> str:
        """The decode path for the next pipeline: for "auto" on a GPU, the fused decoder is first tried
        in a child process, because its known failure there is a segfault."""
        if self.decode_used is not None:
            return self.decode_used
        if self.device_id is None:  # the CPU decoder is not affected
            self.decode_used = "fused"
            return "fused"
        # At the real batch size (DALI sizes the hardware decoder by it), once per process and setting
        key = (self.device_id, self.batch_size, self.dtype, self.max_side)
        if key not in _PROBED:
            _PROBED[key] = decode_probe.probe(tars, idxs, device_id=self.device_id, res=res, batch_size=self.batch_size,
                                 max_side=self.max_side, dtype=self.dtype, timeout=PROBE_TIMEOUT_S)
        ok, detail = _PROBED[key]
        self.decode_used = "fused" if ok else "split"
        if not ok:
            self._note(f"train.data: the fused GPU decoder (decoders.image_random_crop, mixed) failed a test "
                       f"run ({detail}); using decoders.image + random_resized_crop instead (data.decode=split)")
        return self.decode_used

    def _open(self, epoch: int, res: int, checkpoint, host_sync_first: bool):
        """(pipeline, its first outputs (None when resuming from a DALI checkpoint), tars, infos) for one
        epoch; with decode="auto", a fused pipeline whose first batch fails is replaced by a split one."""
        shards, infos = self._epoch_shards(epoch)
        tars, idxs = [t for t, _ in shards], [i for _, i in shards]
        mode = self._resolve_decode(tars, idxs, res)
        failed = None  # why the fused first batch failed, reported once the split path works
        while True:
            try:
                pipe = build_train_pipeline(
                    tars, idxs, batch_size=self.batch_size, res=res, world_size=self.world_size, rank=self.rank,
                    seed=epoch_seed(self.seed, epoch, self.rank), device_id=self.device_id,
                    num_threads=self.num_threads, dtype=self.dtype, min_area=self.min_area,
                    shuffle_buffer=self.shuffle_buffer, checkpoint=checkpoint, decode=mode, max_side=self.max_side,
                    prefetch_depth=self.prefetch_depth, hw_decoder_load=self.hw_decoder_load)
                if checkpoint is not None:  # a resumed epoch: its state must stay that of before any batch
                    return pipe, None, tars, infos
                first = pipe.run() if host_sync_first else _run_pipe(pipe, self.device_id)
                if failed is not None:
                    self.decode_used = "split"
                    self._note(f"train.data: the first batch of the fused decoder failed ({failed}); using "
                               "decoders.image + random_resized_crop instead (data.decode=split)")
                return pipe, first, tars, infos
            except RuntimeError as exc:
                if self.decode == "auto" and mode == "fused" and checkpoint is None:
                    detail = [line for line in str(exc).strip().splitlines() if line.strip()]
                    failed, mode = (detail[-1].strip() if detail else repr(exc)), "split"
                    continue
                share = rank_range(self._total, self.world_size, self.rank)
                mine = shards_in_range([i["images"] for i in infos], *share) or list(range(len(tars)))
                raise _pipeline_error(exc, [tars[i] for i in mine], [infos[i] for i in mine], self._split) from exc

    def prepare(self, epoch: int, res: int) -> None:
        """Start building epoch `epoch`'s pipeline at `res` px in a background thread (e.g. during
        validation); the next `.epoch(epoch, res)` takes it. Ignored while a loaded mid-epoch state waits."""
        if self._resume is not None or res < 1 or self._prepared is not None:
            return
        self._prepared = _Prepared((epoch, res), lambda: self._open(epoch, res, None, host_sync_first=True))

    def close(self) -> None:
        """Wait for a pipeline being built ahead and drop it (before the process exits)."""
        prepared, self._prepared = self._prepared, None
        if prepared is not None:
            prepared.thread.join()

    def _take_prepared(self, epoch: int, res: int, start: int):
        prepared, self._prepared = self._prepared, None
        if prepared is None:
            return None
        if prepared.key != (epoch, res) or start != 0:  # another epoch than planned: dropped
            prepared.thread.join()
            return None
        try:
            return prepared.take()
        except RuntimeError:
            return None  # built again by the caller, which reports the error with its context

    def epoch(self, epoch: int, res: int):
        """Iterator over the (images, labels) of `epoch` at `res` pixels, continuing a loaded state if any."""
        if res < 1:
            raise ValueError(f"res {res}: must be a positive number of pixels")
        began = time.perf_counter()
        start, checkpoint = self._take_resume(epoch, res)
        self._epoch, self._res, self._step = epoch, res, start
        self._pipe = None  # free the previous epoch's buffers before allocating new ones
        opened = self._take_prepared(epoch, res, start)
        self.built_ahead = opened is not None
        if start == len(self):
            self.wait_seconds = time.perf_counter() - began
            return iter(())
        if opened is None:
            opened = self._open(epoch, res, checkpoint, host_sync_first=False)
        self._pipe = opened[0]
        self.wait_seconds = time.perf_counter() - began
        return self._batches(*opened, start)

    def _batches(self, pipe, first, tars, infos, start: int):
        in_flight = _InFlight(self.device_id)
        try:
            for step in range(start, len(self)):
                if self._pipe is not pipe:
                    raise RuntimeError(f"this iterator of epoch {self._epoch} was replaced by a later .epoch() call")
                if first is not None:
                    (images, labels), first = first, None
                else:
                    try:
                        images, labels = _run_pipe(pipe, self.device_id)
                    except RuntimeError as exc:
                        share = rank_range(self._total, self.world_size, self.rank)
                        mine = shards_in_range([i["images"] for i in infos], *share)
                        raise _pipeline_error(exc, [tars[i] for i in mine], [infos[i] for i in mine],
                                              self._split) from exc
                self._step = step + 1
                batch = batch_to_torch(images, labels, self.dtype, self._classes)
                yield (*batch, _sample_keys(images)) if self.with_keys else batch
                in_flight.hold((images, labels))
        finally:
            in_flight.release()
        if self._pipe is pipe:
            self._pipe = None

    # -- resume --------------------------------------------------------------------------------------

    def _fingerprint(self) -> dict:
        return {"seed": self.seed, "rank": self.rank, "world_size": self.world_size, "batch_size": self.batch_size,
                "steps": len(self), "min_area": self.min_area, "shuffle_buffer": self.shuffle_buffer}

    def state_dict(self) -> dict:
        """Where this rank stands: valid between two batches; plain ints, floats and ASCII strings."""
        if self._resume is not None:  # loaded but not yet continued: still the same position
            return dict(self._resume)
        mid_epoch = self._pipe is not None and 0 < self._step < len(self)
        checkpoint = base64.b64encode(self._pipe.checkpoint()).decode("ascii") if mid_epoch else ""
        return {"version": STATE_VERSION, "epoch": self._epoch, "res": self._res, "step": self._step,
                "dali_checkpoint": checkpoint, "decode": self.decode_used or "", **self._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}, expected {STATE_VERSION}")
        expected = self._fingerprint()
        changed = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
        mid_epoch = 0 < state["step"] < state["steps"]
        saved_decode = state.get("decode") or "fused"  # states from before the split path were fused
        if mid_epoch and self.decode != "auto" and saved_decode != self.decode:
            changed["decode"] = (saved_decode, self.decode)
        if changed and mid_epoch:
            raise ValueError("cannot resume mid-epoch with a different loader setup (saved, now): "
                             + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
        if self.decode == "auto" and state.get("decode"):
            self.decode_used = state["decode"]  # the path this run chose (or fell back to) before
        self._resume = dict(state)


    def _take_resume(self, epoch: int, res: int) -> tuple[int, bytes | None]:
        """(first step, DALI checkpoint) for `.epoch(epoch, res)`, consuming a loaded state."""
        state, self._resume = self._resume, None
        if state is None or state["step"] == 0 or (state["step"] >= state["steps"] and state["epoch"] != epoch):
            return 0, None  # nothing loaded, or saved at an epoch boundary
        if state["epoch"] != epoch:
            raise ValueError(f"the loaded loader state stopped at step {state['step']} of epoch {state['epoch']}; "
                             f"call .epoch({state['epoch']}, {state['res']}) to finish it, not .epoch({epoch}, ...)")
        if state["res"] != res:
            raise ValueError(f"epoch {epoch} was saved at res {state['res']}, resumed at res {res}: the resolution "
                             "schedule must give the same value for the same epoch")
        if state["step"] >= len(self):
            return len(self), None
        return state["step"], base64.b64decode(state["dali_checkpoint"])


class ValLoader:
    """This rank's disjoint share of the validation images, each exactly once; see the module docstring."""

    def __init__(self, data_dir, batch_size, *, rank=0, world_size=1, res=224, crop_ratio=224 / 256, device="cpu",
                 device_id=None, num_threads=2, dtype=torch.float32, split="val", with_keys=False,
                 prefetch_depth=PREFETCH_DEPTH, hw_decoder_load=HW_DECODER_LOAD_AUTO):
        _check_common(batch_size, rank, world_size, device)
        _check_loader_tuning(prefetch_depth, hw_decoder_load)
        self.prefetch_depth, self.hw_decoder_load = prefetch_depth, hw_decoder_load
        if not 0 < crop_ratio <= 1:
            raise ValueError(f"crop_ratio {crop_ratio}: must be in (0, 1] (crop side / resized shorter side)")
        _dali_output_type(dtype)
        self._shards, self._infos, self._total, self._classes, self.max_side = _open_split(data_dir, split)
        self._split = split
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.res, self.crop_ratio, self.dtype, self.num_threads = res, crop_ratio, dtype, num_threads
        self.device_id = _resolve_device_id(device, device_id)
        self.with_keys = with_keys
        self._start, self._stop = rank_range(self._total, world_size, rank)
        # Every rank's pipeline pads its range to the largest rank's size; a pass is that many batches.
        self._batches_per_pass = math.ceil(math.ceil(self._total / world_size) / batch_size)
        self._pipe = None
        self._unread = 0  # batches left of a pass the caller abandoned

    def __len__(self) -> int:
        return self._stop - self._start

    def _pipeline(self):
        if self._pipe is None:
            tars, idxs = [t for t, _ in self._shards], [i for _, i in self._shards]
            try:
                self._pipe = build_val_pipeline(
                    tars, idxs, batch_size=self.batch_size, res=self.res, crop_ratio=self.crop_ratio,
                    world_size=self.world_size, rank=self.rank, device_id=self.device_id,
                    num_threads=self.num_threads, dtype=self.dtype, max_side=self.max_side,
                    prefetch_depth=self.prefetch_depth, hw_decoder_load=self.hw_decoder_load)
            except RuntimeError as exc:
                raise _pipeline_error(exc, tars, self._infos, self._split) from exc
        return self._pipe

    def _run(self, pipe):
        try:
            outputs = _run_pipe(pipe, self.device_id)
        except RuntimeError as exc:
            mine = shards_in_range([i["images"] for i in self._infos], self._start, self._stop)
            raise _pipeline_error(exc, [self._shards[i][0] for i in mine], [self._infos[i] for i in mine],
                                  self._split) from exc
        self._unread -= 1
        return outputs

    def __iter__(self):
        if len(self) == 0:
            return
        pipe = self._pipeline()
        while self._unread > 0:  # finish an abandoned pass so that this one starts at the range's first image
            self._run(pipe)
        self._unread = self._batches_per_pass
        in_flight = _InFlight(self.device_id)
        try:
            for b in range(self._batches_per_pass):
                images, labels = self._run(pipe)
                keep = min(self.batch_size, len(self) - b * self.batch_size)  # the rest is padding
                if keep <= 0:
                    continue
                batch_images, batch_labels = batch_to_torch(images, labels, self.dtype, self._classes)
                batch = (batch_images[:keep], batch_labels[:keep])
                yield (*batch, _sample_keys(images)[:keep]) if self.with_keys else batch
                in_flight.hold((images, labels))
        finally:
            in_flight.release()


# ---------------------------------------------------------------------------------------------------
# Baseline: torchvision DataLoader over the same shards.

class ShardDataset(torch.utils.data.Dataset):
    """Random access to (jpeg bytes, label) of tar shards through their DALI index files."""

    def __init__(self, shards: list[tuple[Path, Path]], transform=None):
        self.tars = [str(tar) for tar, _ in shards]
        rows = []
        for t, (tar, idx) in enumerate(shards):
            for sample in read_index(idx):
                if "jpg" not in sample or "lbl" not in sample:
                    raise DatasetError(f"{idx}: a sample lacks a .jpg or .lbl member; "
                                       "re-run `python -m preprocess.shard`")
                rows.append((t, *sample["jpg"], sample["lbl"][0]))
        self.samples = np.array(rows, dtype=np.int64).reshape(-1, 4)  # tar, jpg offset, jpg bytes, lbl offset
        self.transform = transform
        self._fds: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def _fd(self, tar: int) -> int:
        # pread() takes no file position, so descriptors inherited by forked workers are safe to share.
        if tar not in self._fds:
            self._fds[tar] = os.open(self.tars[tar], os.O_RDONLY)
        return self._fds[tar]

    def read(self, i: int) -> tuple[bytes, int]:
        tar, offset, size, lbl_offset = (int(v) for v in self.samples[i])
        fd = self._fd(tar)
        jpeg = os.pread(fd, size, offset)
        label = os.pread(fd, 8, lbl_offset)
        if len(jpeg) != size or len(label) != 8:
            raise DatasetError(f"{self.tars[tar]}: sample at byte {offset} is cut short; "
                               "re-run `python -m preprocess.shard`")
        return jpeg, decode_lbl(label)

    def __getitem__(self, i: int):
        from PIL import Image

        jpeg, label = self.read(i)
        try:
            image = Image.open(io.BytesIO(jpeg))
            image = image.convert("RGB")  # decodes; raises on damaged data
        except Exception as exc:  # PIL raises OSError, ValueError or SyntaxError depending on the damage
            tar, offset = self.tars[int(self.samples[i][0])], int(self.samples[i][1])
            raise DatasetError(f"{tar}: the JPEG at byte {offset} does not decode ({exc})") from exc
        return (self.transform(image) if self.transform else image), label

    def __del__(self):
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass


def baseline_transform(res: int, train: bool, crop_ratio: float = 224 / 256):
    """torchvision v2 transforms on PIL images: the recipe's train or eval preprocessing -> normalised float32."""
    from torchvision.transforms import v2

    if train:
        geometry = [v2.RandomResizedCrop(res, scale=(0.08, 1.0), ratio=ASPECT_RANGE, antialias=True),
                    v2.RandomHorizontalFlip()]
    else:
        geometry = [v2.Resize(round(res / crop_ratio), antialias=True), v2.CenterCrop(res)]
    return v2.Compose([*geometry, v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])


def build_baseline_loader(data_dir, batch_size, res, *, num_workers, split="train", seed=0, num_samples=None):
    """A torchvision DataLoader over the shards yielding (images float32 [B,3,res,res], labels int64 [B]).

    Training splits are shuffled (seeded) and drop the last partial batch; `num_samples` draws that many
    samples per pass (several permutations back to back), which benchmarks use to avoid epoch stalls.
    """
    train = split == "train"
    dataset = ShardDataset(split_shards(data_dir, split), baseline_transform(res, train))
    sampler = None
    if train:
        sampler = torch.utils.data.RandomSampler(dataset, num_samples=num_samples,
                                                 generator=torch.Generator().manual_seed(seed))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                       drop_last=train, persistent_workers=num_workers > 0)
