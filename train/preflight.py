"""Pre-flight checks that run before anything heavy: memory for the preset on this device, disk for the run
folder, shard checksums.

Memory: a run that needs more than the machine has is killed by the kernel's OOM killer with no message
(the default rn50 preset on a 24 GB CPU box reaches 24 GB in ~20 s), so the trainer estimates its peak per
process first and refuses in one line with the fix. The estimate:
  weights + gradients + SGD momentum (+ EMA copy), 4 bytes per parameter each;
  activations saved for backward, measured by one forward of the real architecture on the meta device
    (no memory, no compute) at the largest training resolution, x batch, x ACTIVATION_PEAK for the
    backward's transient gradients (CPU, measured: peak RSS / estimate = 1.17-1.39 for ResNet-18/50 at
    64-128 px), x AMP_SAVING under bf16/fp16 autocast;
  the input pipeline: the shuffle buffer of encoded samples, decoded images, prefetched output batches;
  a fixed BASE for the interpreter, torch and DALI.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch

from preprocess.manifest import split_shards
from preprocess.writer import file_sha256, free_bytes  # file_sha256: the checksum in the manifest
from train import checkpoint
from train.config import Config
from train.data import manifest_max_side

GIB = 2**30
ACTIVATION_PEAK = 1.5
AMP_SAVING = 0.6  # most saved activations are half precision under autocast; BatchNorm keeps some fp32
BASE = 1.0 * GIB  # Python, torch, DALI libraries and their arenas
HEADROOM = 0.9  # refuse above this fraction of what is available: the page cache and other jobs need some


def max_image_side(manifest: dict) -> int:
    """The shards' longest image side (pixels); 500, preprocess.shard's default, when the manifest is silent."""
    return manifest_max_side(manifest) or 500


def bytes_per_sample(manifest: dict) -> int:
    """Mean encoded size of a training sample in the shards."""
    train = manifest["splits"]["train"]
    return sum(s["bytes"] for s in train["shards"]) // max(int(train["images"]), 1)


def activation_bytes_per_image(cfg_model, num_classes: int, res: int) -> int:
    """Bytes saved for backward by one image's forward pass at `res` px (fp32), parameters left out."""
    from train.model import build_model

    with torch.device("meta"):
        model = build_model(cfg_model, num_classes)
    weights = {id(t.untyped_storage()) for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if id(storage) not in weights:
            saved[id(storage)] = storage.nbytes()  # by storage: a tensor saved by two ops counts once
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        # two images: BatchNorm in training mode refuses one image at a 1x1 feature map (small resolutions)
        model(torch.empty(2, 3, res, res, device="meta"))
    return sum(saved.values()) // 2


@functools.lru_cache(maxsize=16)
def parameter_count(model_cfg, num_classes: int) -> int:
    """Parameters of the configured model, built on the meta device (no memory, no compute); memory and disk
    pre-flight both ask, once per process."""
    from train.model import build_model

    with torch.device("meta"):
        return sum(p.numel() for p in build_model(model_cfg, num_classes).parameters())


def estimate_memory(cfg: Config, num_classes: int, *, amp_dtype: torch.dtype | None, max_side: int,
                    sample_bytes: int = 110_000, shuffle_buffer: int = 4096) -> dict[str, int]:
    """Peak bytes per process by part: states, activations, input pipeline, base."""
    params = parameter_count(cfg.model, num_classes)
    copies = 3 + (1 if cfg.ema.enabled else 0)  # weights, gradients, momentum (+ EMA)
    res = max(cfg.schedule.res_min, cfg.schedule.res_max)
    activations = activation_bytes_per_image(cfg.model, num_classes, res) * cfg.data.batch_size * ACTIVATION_PEAK
    if amp_dtype is not None:
        activations *= AMP_SAVING
    out_bytes = 4 if amp_dtype is None else 2
    pipeline = (shuffle_buffer * sample_bytes  # encoded samples held to shuffle
                + cfg.data.batch_size * max_side * max_side * 3  # decoded uint8 images of one batch
                + 2 * cfg.data.batch_size * res * res * 3 * out_bytes  # prefetched output batches
                + 2 * cfg.val.batch_size * cfg.val.res * cfg.val.res * 3 * out_bytes)
    return {"weights, gradients, optimizer": params * 4 * copies, "activations": int(activations),
            "input pipeline": int(pipeline), "base": int(BASE)}


def available_memory(device: torch.device, local_processes: int) -> tuple[int, str]:
    """(bytes one process may use, where that figure comes from)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free, f"free on {torch.cuda.get_device_name(device)}"
    available = _meminfo_available()
    limit = _cgroup_limit()
    where = "available RAM"
    if limit is not None and limit < available:
        available, where = limit, "the cgroup's memory limit"
    if local_processes > 1:
        where += f" shared by {local_processes} processes"
    return available // local_processes, where


def _meminfo_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _cgroup_limit() -> int | None:
    """What this cgroup (v2) may still allocate, or None without a limit."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        stat = dict(line.split() for line in Path("/sys/fs/cgroup/memory.stat").read_text().splitlines())
    except (OSError, ValueError):
        return None
    reclaimable = int(stat.get("inactive_file", 0))  # page cache the kernel drops before it OOM-kills
    return None if limit == "max" else max(int(limit) - used + reclaimable, 0)


def memory_problem(estimate: dict[str, int], available: tuple[int, str], cfg: Config, device_type: str) -> str | None:
    """One line with the estimate, what is there and the fix, when the run would not fit; None when it fits."""
    need = sum(estimate.values())
    have, where = available
    if need <= HEADROOM * have:
        return None
    per_image = estimate["activations"] / cfg.data.batch_size
    fixed = need - estimate["activations"]
    fits = max(int((HEADROOM * have - fixed) // per_image), 0) if per_image else 0
    parts = ", ".join(f"{name} {value / GIB:.1f}" for name, value in estimate.items())
    keep = max(2, -(-cfg.data.batch_size // max(fits, 1)))  # micro-batches that keep the recipe's step size
    micro = -(-cfg.data.batch_size // keep)
    batch = (f"a smaller --data.batch_size (about {fits} fits; --data.batch_size={micro} --optim.accum_steps={keep} "
             f"keeps about {cfg.data.batch_size} images per optimizer step)" if fits >= 1
             else "a smaller model or resolution")
    smoke = " or --config smoke (the CPU demo preset)" if device_type == "cpu" else ""
    return (f"pre-flight: batch {cfg.data.batch_size} at {max(cfg.schedule.res_min, cfg.schedule.res_max)} px "
            f"({cfg.model.arch}) needs about {need / GIB:.1f} GiB per process ({parts} GiB) but {where} is "
            f"{have / GIB:.1f} GiB; use {batch}{smoke}, or --run.memory_check=false if you know better")


def run_disk_need(cfg: Config, num_classes: int) -> dict[str, int]:
    """Bytes the run folder can come to hold at its largest, by part. A checkpoint is the weights, the SGD
    momentum (and the EMA copy) at 4 bytes per parameter; at one moment there can be last.pt, the temporary
    file of the write in progress, `checkpoint.keep` older epoch ends and an older best.pt (hard links where
    the files are the same); at the end model_final.pth and model.safetensors hold the weights once more each."""
    params = parameter_count(cfg.model, num_classes)
    checkpoint_bytes = params * 4 * (2 + (1 if cfg.ema.enabled else 0))
    return {"checkpoints": checkpoint_bytes * (cfg.checkpoint.keep + 3), "final weights": params * 4 * 2}


def disk_problem(run_dir: Path, need: dict[str, int], free: int | None = None) -> str | None:
    """One line when the disk of `run_dir` cannot take what the run still writes (what the folder already
    holds counts as written); None when it can. A run that meets a full disk stops at a save (exit 4) with
    its last checkpoint intact, but possibly hours in: this says so before the first step."""
    run_dir = Path(run_dir)
    if free is None:
        free = free_bytes(run_dir)
    seen, held = set(), 0
    for path in run_dir.rglob("*") if run_dir.is_dir() else ():
        if path.suffix in (".pt", ".pth", ".safetensors") and path.is_file():
            stat = path.stat()
            if (stat.st_dev, stat.st_ino) not in seen:
                seen.add((stat.st_dev, stat.st_ino))
                held += stat.st_size
    more = sum(need.values()) - held
    if more <= free:
        return None
    parts = ", ".join(f"{name} {value / GIB:.2f}" for name, value in need.items())
    return (f"pre-flight: the run folder {run_dir} is on a disk with {free / GIB:.2f} GiB free, but this run writes "
            f"up to {more / GIB:.2f} GiB more ({parts} GiB at most, less {held / GIB:.2f} GiB already there); free "
            f"space, pick an --out on a larger disk, or keep fewer epoch ends (--checkpoint.keep)")


VERIFIED_FILE = ".verified.json"  # in the shard folder: {tar path: [size, mtime_ns, sha256]} of shards checked


def read_verified(data_dir: Path) -> dict:
    return checkpoint.read_json_dict(Path(data_dir) / VERIFIED_FILE)


def write_verified(data_dir: Path, cache: dict) -> None:
    """Remember verified shards; a read-only shard folder just means checking again next time."""
    try:
        checkpoint.write_text_atomic(Path(data_dir) / VERIFIED_FILE, json.dumps(cache, indent=0, sort_keys=True))
    except OSError:
        pass


def verify_checksums(data_dir: Path, manifest: dict, part: int = 0, parts: int = 1,
                     verified: dict | None = None) -> tuple[list[str], dict]:
    """(one line per shard whose SHA-256 differs from the manifest's, {tar: [size, mtime_ns, sha256]} of the
    shards found good) for this process's share: every `parts`-th shard from `part`, so the processes of a
    node check their node's copy together. A shard in `verified` with the same size, mtime and checksum as
    the manifest's is not read again."""
    bad, good = [], {}
    verified = verified or {}
    shards = [(entry, tar) for split in ("train", "val")
              for entry, (tar, _idx) in zip(manifest["splits"][split]["shards"], split_shards(data_dir, split, manifest))]
    for entry, tar in shards[part::parts]:
        if not entry.get("sha256"):
            continue
        stat = tar.stat()
        seen = [stat.st_size, stat.st_mtime_ns, entry["sha256"]]
        if verified.get(str(tar)) == seen:
            good[str(tar)] = seen
        elif file_sha256(tar) == entry["sha256"]:
            good[str(tar)] = seen
        else:
            bad.append(f"{tar}: SHA-256 differs from {Path(data_dir) / 'manifest.json'} (changed or damaged after "
                       f"preprocess.shard)")
    return bad, good
