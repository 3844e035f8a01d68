"""`python -m benchmarks.peers`: our training loader against FFCV's and torchvision's, side by side on the same
photos with the same work per image, on the CPU.

The work per image, for every loader: random-resized-crop to --res px (area 0.08-1 of the image, aspect
3/4-4/3), horizontal flip with probability 1/2, ImageNet mean/std normalisation, float32 NCHW tensors in
batches of --batch-size (64), labels int64, a new random order every epoch, the last partial batch dropped.
- ours: `train.data.TrainLoader` (DALI CPU pipeline, fused decode + crop; a new pipeline each epoch, as the
  trainer runs it) over WebDataset shards that `preprocess.shard` writes from the photos;
- ffcv: `ffcv.loader.Loader` over a .beton of the same photos (RandomResizedCropRGBImageDecoder,
  RandomHorizontalFlip, NormalizeImage to float32, ToTensor, ToTorchImage; os_cache), written by FFCV's
  DatasetWriter with RGBImageField(max_resolution=500, jpeg_quality=90);
- torchvision: the project's baseline (`train.data.build_baseline_loader`: DataLoader worker processes, PIL
  decode, v2 RandomResizedCrop + flip + normalise) over the same shards as ours, so it reads the same JPEGs.
--threads is the CPU budget: DALI's threads, FFCV's workers (threads), DataLoader worker processes.

How it is timed: for each (threads, res) every loader is opened and runs one untimed warm-up epoch (which also
records the statistics of its output); then --rounds rounds, each timing --epochs whole epochs of every loader
in turn (ours, ffcv, torchvision, ours, ...), so that a change of load on a shared machine hits all of them.
A rate is the images of those epochs over their wall time, epoch starts included. The table gives the
median, min and max over the rounds, the CPU cores the process and its children kept busy, and the ratio of
the medians ours / that loader.

Data: --photos is an ImageFolder (DIR/<class>/*.JPEG, or DIR/train/<class>/*.JPEG whose train/ is used) or a
flat folder of <class>_<name>.JPEG files like ../shared/data/imagenet-samples; --repeat N lists every photo N
times under distinct names. The listing is linked (symlinks, not copies) into --cache, sharded there for ours
and torchvision and written there as a .beton for FFCV; both are reused by later runs on the same photos (the
shards only while preprocess.encode and its decoders' versions are unchanged: their folder name carries a digest).
A peer that cannot be imported is skipped with one line that says how to install it.

--writers: the shard writers instead of the loaders (issue 20 item 1, the writer half). Each writer writes the
same linked photos from scratch, --threads worker processes each, --rounds interleaved rounds (the order rotates by
one writer every round), the output deleted after each write:
- ours-auto / ours-always: `preprocess.shard.run` of the linked ImageFolder (train split) at --max-side 500
  --quality 90 and --reencode auto (its default: source JPEGs that are baseline, <= 500 px and no finer than q90
  are kept byte for byte) or always (every image decoded and re-encoded at q90);
- ffcv-jpg: FFCV's `DatasetWriter` with `RGBImageField(write_mode='jpg', max_resolution=500, jpeg_quality=90)`
  (its ImageNet size and quality; every image decoded by PIL, as torchvision's ImageFolder gives it, resized with
  OpenCV INTER_AREA when larger and re-encoded at q90: comparable with ours-always); ffcv-proportion: the
  write mode of FFCV's own ImageNet recipe (a random half of the images re-encoded, the other half stored as
  raw pixels: faster to write and decode, far larger); ffcv-raw: RGBImageField's default write mode (every
  image as raw pixels).
The time of a write is its whole wall time after the writer's module is imported: for ours (run in a child
process that imports only preprocess.shard, as its command does) the listing of the source, the encoding, the
tars, their SHA-256 checksums and the manifest, and with more than one worker the start of the (spawned) worker
processes; for FFCV (in this process) its forked worker processes and the .beton, its progress bar off.
Images/s per worker is the images written over that time over --threads; "output KB/image" is every byte the
writer left (ours: tars, their .idx/.json and the manifest; FFCV: the .beton, whose pages are allocated in 8 MB
steps per worker), "image KB/image" the stored images alone (the tars' .jpg members; the .beton's allocations).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import resource
import shlex
import shutil
import statistics
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from benchmarks.dataloader import cpu_seconds, print_table
from benchmarks.report import add_report_flags, append_result, cpu_description, git_commit, report_path
from preprocess.cli import ArgumentParser
from preprocess.sources import IMAGE_SUFFIXES
from train import data

PROG = "python -m benchmarks.peers"
SECTION = "Peers: ours vs FFCV vs torchvision (benchmarks.peers)"
PEERS = ("ours", "ffcv", "torchvision")
MAX_SIDE = 500  # px, longer side: FFCV's ImageNet max_resolution and preprocess.shard's default --max-side
QUALITY = 90  # JPEG quality: FFCV's ImageNet jpeg_quality and preprocess.shard's default --quality
FFCV_INSTALL = "apt-get install -y pkg-config libturbojpeg0-dev libopencv-dev && pip install ffcv"
WRITERS = ("ours-auto", "ours-always", "ffcv-jpg", "ffcv-proportion", "ffcv-raw")
DEFAULT_WRITERS = WRITERS[:4]
REFERENCE_WRITER = "ffcv-jpg"  # the ratios' denominator: FFCV's writer at its ImageNet size and quality
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "imagenet-rn50" / "peers"


class PhotosError(ValueError):
    """--photos cannot be used; the message names the folder and what was expected."""


# ---------------------------------------------------------------------------------------------------
# The photos -> a linked ImageFolder, shards for ours and torchvision, a .beton for FFCV.

def find_photos(root: Path) -> list[tuple[str, Path]]:
    """(class, path) of every image under `root`, sorted: class folders (of root/train when present), else
    the flat <class>_<name> files of root."""
    if not root.is_dir():
        raise PhotosError(f"--photos {root}: no such folder (the real-photo sets live in ../shared/data beside "
                          "the checkout, when it is there)")
    folder = root / "train" if (root / "train").is_dir() else root
    images = lambda d: sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    classes = sorted(d for d in folder.iterdir() if d.is_dir())
    found = [(d.name, p) for d in classes for p in images(d)]
    if found:
        return found
    flat = images(folder)
    if flat and all("_" in p.stem for p in flat):
        return [(p.stem.split("_", 1)[0], p) for p in flat]
    raise PhotosError(f"--photos {root}: no class folders with images; expected {folder}/<class>/*.JPEG or "
                      f"<class>_<name>.JPEG files")


def cache_dir(cache: Path, root: Path, photos: list[tuple[str, Path]], repeat: int) -> Path:
    """A folder per (photos, repeat): named after the photos and the digest of their listing (path, size,
    modification time), so that changed photos are prepared anew."""
    digest = hashlib.sha256(f"{root.resolve()}|{repeat}".encode())
    for label, path in photos:
        stat = path.stat()
        digest.update(f"{label}/{path.name}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return cache / f"{root.resolve().name}-x{repeat}-{digest.hexdigest()[:10]}"


def link_photos(photos: list[tuple[str, Path]], repeat: int, out: Path) -> list[tuple[Path, int]]:
    """out/train/<class>/[r<k>-]<name> -> the photo, every photo `repeat` times; (link, class index) of each."""
    labels = {name: i for i, name in enumerate(sorted({c for c, _ in photos}))}
    entries = []
    for k in range(repeat):
        for label, path in photos:
            link = out / "train" / label / (path.name if repeat == 1 else f"r{k:03d}-{path.name}")
            if not link.is_symlink():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(path.resolve())
            entries.append((link, labels[label]))
    return entries


def encoder_digest() -> str:
    """What the shards' bytes depend on besides the photos: preprocess.encode's source and its decoders' versions.
    Shards in --cache are kept per digest, so a changed encoder is never compared through shards it did not write."""
    import importlib.metadata

    from preprocess import encode

    digest = hashlib.sha256(Path(encode.__file__).read_bytes())
    for package in ("pillow", "simplejpeg"):
        try:
            digest.update(f"{package} {importlib.metadata.version(package)}".encode())
        except importlib.metadata.PackageNotFoundError:
            digest.update(f"{package} absent".encode())
    return digest.hexdigest()[:8]


def write_shards(folder: Path, out: Path, reencode: str, workers: int) -> Path:
    """Train shards of the linked ImageFolder at the project's defaults (max side 500 px, q90), once."""
    from preprocess import shard

    if not (out / "manifest.json").is_file():
        settings = shard.EncodeSettings(max_side=MAX_SIDE, quality=QUALITY, reencode=reencode)
        shard.run(str(folder), out, fmt="imagefolder", splits=("train",), settings=settings, workers=workers,
                  progress=False)
    return out


class _RGBPhotos:
    """FFCV's writer input: (PIL RGB image, label) per entry, as torchvision's ImageFolder gives them."""

    def __init__(self, entries: list[tuple[Path, int]]):
        self.entries = entries

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.entries[i]
        with Image.open(path) as image:
            return image.convert("RGB"), label


def write_beton(entries: list[tuple[Path, int]], out: Path, write_mode: str, workers: int) -> Path:
    """The .beton of the same entries with FFCV's ImageNet writer settings, once (written beside, then renamed)."""
    from ffcv.writer import DatasetWriter

    if not out.is_file():
        partial = out.with_name(out.name + ".partial")
        writer = DatasetWriter(str(partial), ffcv_fields(write_mode), num_workers=workers)
        writer.from_indexed_dataset(_RGBPhotos(entries))
        os.replace(partial, out)
    return out


def ffcv_fields(write_mode: str) -> dict:
    """FFCV's ImageNet fields: the image at max_resolution 500 px and jpeg_quality 90, the label."""
    from ffcv.fields import IntField, RGBImageField

    return {"image": RGBImageField(write_mode=write_mode, max_resolution=MAX_SIDE, jpeg_quality=QUALITY),
            "label": IntField()}


# ---------------------------------------------------------------------------------------------------
# The loaders, each as "a new epoch's iterator of (images, labels)" + "close".

@dataclass
class Peer:
    name: str
    epoch: Callable[[], Iterable]
    close: Callable[[], None]


def peer_missing(name: str) -> str | None:
    """Why `name` cannot run here, with how to install it; None when it can."""
    if name == "ours" and not data.dali_available():
        return "ours: skipped (NVIDIA DALI is not importable; pip install -e '.[dali-cu12]')"
    try:
        if name == "ffcv":
            import ffcv.loader  # noqa: F401
        elif name == "torchvision":
            import torchvision  # noqa: F401
    except (ImportError, OSError) as exc:
        how = FFCV_INSTALL if name == "ffcv" else "pip install torchvision"
        return f"{name}: skipped (not importable: {exc}); install it with: {how}"
    return None


def open_ours(shards: Path, batch_size: int, threads: int, res: int) -> Peer:
    loader = data.TrainLoader(shards, batch_size, device="cpu", num_threads=threads, decode="fused")
    epochs = iter(range(10**9))
    return Peer("ours", lambda: loader.epoch(next(epochs), res), loader.close)


def open_ffcv(beton: Path, batch_size: int, threads: int, res: int) -> Peer:
    from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, Squeeze, ToTensor, ToTorchImage

    mean, std = np.array(data.MEAN) * 255, np.array(data.STD) * 255  # NormalizeImage works on uint8 pixels
    image = [RandomResizedCropRGBImageDecoder((res, res), scale=(0.08, 1.0), ratio=data.ASPECT_RANGE),
             RandomHorizontalFlip(), NormalizeImage(mean, std, np.float32), ToTensor(), ToTorchImage()]
    loader = Loader(str(beton), batch_size=batch_size, num_workers=threads, order=OrderOption.RANDOM, seed=0,
                    os_cache=True, drop_last=True,
                    pipelines={"image": image, "label": [IntDecoder(), ToTensor(), Squeeze()]})
    return Peer("ffcv", lambda: iter(loader), getattr(loader, "close", lambda: None))


def open_torchvision(shards: Path, batch_size: int, threads: int, res: int) -> Peer:
    loader = data.build_baseline_loader(shards, batch_size, res, num_workers=threads, seed=0)

    def close() -> None:  # the persistent workers end with their iterator
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None:
            iterator._shutdown_workers()

    return Peer("torchvision", lambda: iter(loader), close)


# ---------------------------------------------------------------------------------------------------
# Timing.

def run_epochs(peer: Peer, epochs: int, stats: bool = False) -> dict:
    """Images, wall seconds and CPU cores busy over `epochs` whole epochs; with `stats`, what the batches were
    (shape and dtype of the last, per-channel mean and std over all)."""
    cpu0, t0, images = cpu_seconds(), time.perf_counter(), 0
    total = squares = None
    batch = None
    for _ in range(epochs):
        for batch in peer.epoch():
            images += len(batch[0])
            if stats:
                x = batch[0].double()
                sums, sq = x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3))
                total, squares = (sums, sq) if total is None else (total + sums, squares + sq)
    wall = time.perf_counter() - t0
    result = {"images": images, "seconds": wall, "cores busy": (cpu_seconds() - cpu0) / wall}
    if stats and batch is not None:
        n = images * batch[0].shape[2] * batch[0].shape[3]
        mean = total / n
        result.update(shape=list(batch[0].shape), dtype=str(batch[0].dtype).removeprefix("torch."),
                      label_dtype=str(batch[1].dtype).removeprefix("torch."), mean=mean.tolist(),
                      std=(squares / n - mean * mean).clamp(min=0).sqrt().tolist())
    return result


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def measure_config(openers: dict[str, Callable[[], Peer]], threads: int, res: int, rounds: int, epochs: int) -> dict:
    """{peer: {"warmup": run_epochs(stats=True), "rounds": [run_epochs(...), ...]}} for one (threads, res)."""
    peers, results = {}, {}
    try:
        for name, opener in openers.items():
            peers[name] = opener()
            warm = run_epochs(peers[name], 1, stats=True)
            results[name] = {"warmup": warm, "rounds": []}
            progress(f"  warm-up  {name:<11} threads {threads}, {res} px: {warm['images'] / warm['seconds']:,.0f} "
                     f"img/s (1 epoch, {warm['seconds']:.1f} s)")
        for r in range(rounds):
            for name, peer in peers.items():
                timed = run_epochs(peer, epochs)
                results[name]["rounds"].append(timed)
                progress(f"  round {r + 1}/{rounds} {name:<11} threads {threads}, {res} px: "
                         f"{timed['images'] / timed['seconds']:,.0f} img/s ({epochs} epoch{'s' * (epochs > 1)}, "
                         f"{timed['seconds']:.1f} s, {timed['cores busy']:.2f} cores busy)")
    finally:
        for peer in peers.values():
            peer.close()
    return results


def summarise(results: dict, threads: int, res: int, photos: str) -> list[dict]:
    """One row per loader: median/min/max images/s over the rounds, the ratio of the medians ours / it."""
    rates = {name: [t["images"] / t["seconds"] for t in r["rounds"]] for name, r in results.items()}
    ours = statistics.median(rates["ours"]) if rates.get("ours") else None
    rows = []
    for name, r in results.items():
        warm, median = r["warmup"], statistics.median(rates[name])
        rows.append({
            "photos": photos, "threads": threads, "res": res, "loader": name, "rounds": len(rates[name]),
            "median img/s": round(median, 1), "min img/s": round(min(rates[name]), 1),
            "max img/s": round(max(rates[name]), 1),
            "cores busy": round(statistics.median(t["cores busy"] for t in r["rounds"]), 2),
            "ours / it": "-" if name == "ours" or ours is None else round(ours / median, 2),
            "output": f"{warm['dtype']} {'x'.join(map(str, warm['shape']))}",
            "mean": round(statistics.fmean(warm["mean"]), 3), "std": round(statistics.fmean(warm["std"]), 3)})
    return rows


# ---------------------------------------------------------------------------------------------------
# The writers (--writers): each writes the same photos from scratch, timed as a whole.

# Ours runs in a child process that imports only preprocess.shard, as `python -m preprocess.shard` does: its
# worker processes are spawned and import the main module, which here (benchmarks.peers: torch, DALI) would
# cost them seconds that the real command does not pay. The child times shard.run itself, so neither side
# counts the interpreter's start or its imports; FFCV (whose import takes ~10 s) writes from this process.
_OURS_CHILD = """
import json, resource, sys, time
from pathlib import Path
from preprocess import shard

spec = json.loads(sys.argv[1])
cpu = lambda: sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                     resource.getrusage(resource.RUSAGE_CHILDREN)))
settings = shard.EncodeSettings(max_side=spec["max_side"], quality=spec["quality"], reencode=spec["reencode"])
cpu0, t0 = cpu(), time.perf_counter()
manifest = shard.run(spec["src"], Path(spec["out"]), fmt="imagefolder", splits=("train",), settings=settings,
                     images_per_shard=spec["images_per_shard"], workers=spec["workers"], progress=False)
seconds = time.perf_counter() - t0
print(json.dumps({"images": manifest["splits"]["train"]["images"], "seconds": seconds, "cpu": cpu() - cpu0}))
"""


def writer_job(name: str, folder: Path, entries: list[tuple[Path, int]], out: Path, workers: int,
               images_per_shard: int) -> Callable[[], dict]:
    """A call that writes the photos with writer `name` into `out` (a folder for ours, a .beton for FFCV) and
    returns the images written, the wall seconds of the write and the CPU seconds it took (children included)."""
    peer, mode = name.split("-", 1)
    if peer == "ours":
        spec = json.dumps({"src": str(folder), "out": str(out), "reencode": mode, "max_side": MAX_SIDE,
                           "quality": QUALITY, "images_per_shard": images_per_shard, "workers": workers})

        def write() -> dict:
            import subprocess

            from benchmarks.report import REPO

            done = subprocess.run([sys.executable, "-c", _OURS_CHILD, spec], cwd=REPO, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{name}: preprocess.shard exited {done.returncode}: {done.stderr.strip()[-2000:]}")
            return json.loads(done.stdout.strip().splitlines()[-1])
        return write

    def write_ffcv() -> dict:
        import functools

        import ffcv.writer

        if not isinstance(ffcv.writer.tqdm, functools.partial):  # its progress bar, off
            ffcv.writer.tqdm = functools.partial(ffcv.writer.tqdm, disable=True)
        cpu0, t0 = _cpu_total(), time.perf_counter()
        ffcv.writer.DatasetWriter(str(out), ffcv_fields(mode), num_workers=workers).from_indexed_dataset(
            _RGBPhotos(entries))
        seconds = time.perf_counter() - t0
        _reap_children()
        return {"images": len(entries), "seconds": seconds, "cpu": _cpu_total() - cpu0}
    return write_ffcv


def _cpu_total() -> float:
    """CPU seconds of this process and of its children that have been waited for."""
    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def _reap_children(timeout: float = 30.0) -> None:
    """Wait for FFCV's writer processes to end (it never joins them), so that their CPU time counts."""
    deadline = time.monotonic() + timeout
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.01)


def output_bytes(out: Path) -> int:
    """Every byte the writer left: the file, or all the files under the folder."""
    if out.is_file():
        return out.stat().st_size
    return sum(p.stat().st_size for p in out.rglob("*") if p.is_file())


def image_bytes(out: Path) -> int:
    """The stored images alone: the .jpg members of our tars, or the allocations of FFCV's .beton (its only
    variable-size field is the image)."""
    if out.is_file():
        from ffcv.reader import Reader

        return int(Reader(str(out)).alloc_table["size"].sum())
    total = 0
    for tar in sorted(out.rglob("*.tar")):
        with tarfile.open(tar) as archive:
            total += sum(m.size for m in archive.getmembers() if m.name.endswith(".jpg"))
    return total


def remove(out: Path) -> None:
    if out.is_dir():
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()


def time_write(write: Callable[[], dict], out: Path) -> dict:
    """Images, wall seconds, CPU cores busy and bytes of one write of `out` from scratch; `out` is removed
    after it has been measured."""
    remove(out)
    timed = write()
    result = {"images": timed["images"], "seconds": timed["seconds"], "cores busy": timed["cpu"] / timed["seconds"],
              "bytes": output_bytes(out), "image bytes": image_bytes(out)}
    remove(out)
    return result


def measure_writers(jobs: dict[str, Callable[[], int]], outs: dict[str, Path], workers: int, rounds: int) -> dict:
    """{writer: [time_write(...) per round]}; round r starts with the r-th writer, so that no writer always
    runs first (or right after the same one)."""
    names = list(jobs)
    results = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            timed = time_write(jobs[name], outs[name])
            results[name].append(timed)
            progress(f"  round {r + 1}/{rounds} {name:<15} workers {workers}: "
                     f"{timed['images'] / timed['seconds'] / workers:,.1f} img/s per worker ({timed['images']:,} "
                     f"images, {timed['seconds']:.1f} s, {timed['cores busy']:.2f} cores busy, "
                     f"{timed['bytes'] / timed['images'] / 1000:.1f} KB/image)")
    return results


def summarise_writers(results: dict, workers: int, photos: str) -> list[dict]:
    """One row per writer: median/min/max images/s per worker over the rounds, output bytes per image, and the
    ratios of the medians it / ffcv-jpg (rate and bytes)."""
    rates = {name: [t["images"] / t["seconds"] / workers for t in rs] for name, rs in results.items()}
    per_image = {name: statistics.median(t["bytes"] / t["images"] for t in rs) for name, rs in results.items()}
    reference = REFERENCE_WRITER if REFERENCE_WRITER in results else None
    rows = []
    for name, rs in results.items():
        median = statistics.median(rates[name])
        rows.append({
            "photos": photos, "workers": workers, "writer": name, "rounds": len(rs), "images": rs[-1]["images"],
            "median img/s per worker": round(median, 1), "min img/s per worker": round(min(rates[name]), 1),
            "max img/s per worker": round(max(rates[name]), 1),
            "cores busy": round(statistics.median(t["cores busy"] for t in rs), 2),
            "output KB/image": round(per_image[name] / 1000, 2),
            "image KB/image": round(statistics.median(t["image bytes"] / t["images"] for t in rs) / 1000, 2),
            "rate / ffcv-jpg": "-" if reference is None or name == reference
            else round(median / statistics.median(rates[reference]), 2),
            "bytes / ffcv-jpg": "-" if reference is None or name == reference
            else round(per_image[name] / per_image[reference], 2)})
    return rows


def main_writers(args: argparse.Namespace, photos: list[tuple[str, Path]], argv) -> int:
    """--writers: the shard writers side by side (see the module's docstring)."""
    load_start, commit = os.getloadavg(), git_commit()
    writers = list(dict.fromkeys(args.writers or DEFAULT_WRITERS))
    skipped = {}
    if any(name.startswith("ffcv") for name in writers):
        why = peer_missing("ffcv")
        if why is not None:
            skipped["ffcv"] = why
            print(why, flush=True)
    run_writers = [name for name in writers if name.split("-", 1)[0] not in skipped]

    total = len(photos) * args.repeat
    folder = cache_dir(args.cache, args.photos, photos, args.repeat)
    entries = link_photos(photos, args.repeat, folder / "photos")
    for path in {path.resolve() for path, _ in entries}:  # the sources in the page cache, untimed
        path.read_bytes()
    work = folder / "writers"
    work.mkdir(parents=True, exist_ok=True)
    label = f"{args.photos.resolve().name} x{args.repeat}" if args.repeat > 1 else args.photos.resolve().name
    progress(f"writers: {total:,} images ({len(photos):,} photos x {args.repeat}), max side {MAX_SIDE} px, "
             f"q{QUALITY}, written under {work}")
    rows = []
    try:
        for workers in args.threads:
            outs = {name: work / (f"{name}-w{workers}" + (".beton" if name.startswith("ffcv") else ""))
                    for name in run_writers}
            jobs = {name: writer_job(name, folder / "photos", entries, outs[name], workers,
                                     args.images_per_shard) for name in run_writers}
            progress(f"workers {workers}:")
            results = measure_writers(jobs, outs, workers, args.rounds)
            for row in summarise_writers(results, workers, label):
                rows.append(row)
                if args.json:
                    rounds = results[row["writer"]]
                    with open(args.json, "a") as f:
                        f.write(json.dumps({**row, "round img/s per worker": [
                            round(t["images"] / t["seconds"] / workers, 1) for t in rounds],
                            "round seconds": [round(t["seconds"], 2) for t in rounds],
                            "output bytes": rounds[-1]["bytes"], "image bytes": rounds[-1]["image bytes"]}) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load_end = os.getloadavg()

    print_table(rows)
    for workers in args.threads:
        ratios = [f"{r['writer']}/{REFERENCE_WRITER} {r['rate / ffcv-jpg']}x images/s per worker, "
                  f"{r['bytes / ffcv-jpg']}x bytes" for r in rows
                  if r["workers"] == workers and r["writer"] != REFERENCE_WRITER and r["rate / ffcv-jpg"] != "-"]
        print(f"workers {workers}: " + ("; ".join(ratios) or f"no ratios ({REFERENCE_WRITER} did not run)"))
    target = report_path(args.report, args.no_report)
    if target is not None:
        notes = (f"Writers. Photos: {args.photos} ({len(photos):,} photos x {args.repeat} = {total:,} images), every "
                 f"writer from scratch, {args.rounds} interleaved rounds (the order rotated each round). ours-auto/"
                 f"ours-always: preprocess.shard.run of the linked ImageFolder, --max-side {MAX_SIDE} --quality "
                 f"{QUALITY} --images-per-shard {args.images_per_shard} --reencode auto/always, timed whole (listing, "
                 f"encoding, tars, SHA-256 checksums, manifest); ffcv-<mode>: DatasetWriter + RGBImageField("
                 f"write_mode=<mode>, max_resolution={MAX_SIDE}, jpeg_quality={QUALITY}) from PIL RGB images, timed "
                 f"whole. Ratios are of the medians, it / {REFERENCE_WRITER}; ours-always re-encodes every image as "
                 f"ffcv-jpg does.")
        record(target, argv, args, rows, notes, load_start, load_end, skipped, commit)
    return 0


def record(target: Path, argv, args: argparse.Namespace, rows: list[dict], notes: str, load_start, load_end,
           skipped: dict, commit: str) -> None:
    """Append the run to --report's file: `notes`, then the versions, the load over the run, the skipped
    peers and --notes."""
    load = "/".join(f"{x:.2f}" for x in load_start), "/".join(f"{x:.2f}" for x in load_end)
    notes = (f"{notes} {versions()}. Load average (1/5/15 min) {load[0]} at the start, {load[1]} at the end. "
             + " ".join(skipped.values()) + " " + args.notes).strip()
    command = f"{PROG} " + shlex.join(sys.argv[1:] if argv is None else argv)
    path = append_result(SECTION, rows, command, cpu_description(), notes, path=target, commit=commit)
    print(f"appended to {path}")


# ---------------------------------------------------------------------------------------------------
# The command.

def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=Path, required=True,
                   help="the photos: DIR/<class>/*.JPEG, DIR/train/<class>/*.JPEG (e.g. ../shared/data/imagenette-144) "
                        "or DIR/<class>_<name>.JPEG (e.g. ../shared/data/imagenet-samples)")
    p.add_argument("--repeat", type=int, default=1,
                   help="list every photo this many times, under distinct names (symlinks), e.g. 25 makes the 120 "
                        "imagenet-samples 3,000 images (default 1)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                   help="CPU budgets to measure: DALI threads = FFCV workers = DataLoader workers (default 1 2)")
    p.add_argument("--res", type=int, nargs="+", default=[128, 176], help="output sizes in pixels (default 128 176)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per (threads, res), loaders interleaved (default 5)")
    p.add_argument("--epochs", type=int, default=1, help="whole epochs per loader per round (default 1)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    p.add_argument("--peers", nargs="+", choices=PEERS, default=list(PEERS),
                   help="loaders to run, in this order within a round (default: ours ffcv torchvision); ours is "
                        "needed for the ratios")
    p.add_argument("--reencode", choices=["auto", "always"], default="auto",
                   help="preprocess.shard --reencode for our shards: auto (its default: source JPEGs that already "
                        "are baseline, <= 500 px and no finer than q90 are kept byte for byte) or always (every "
                        "image decoded and re-encoded at q90, as FFCV's writer does) (default auto)")
    p.add_argument("--ffcv-write-mode", choices=["jpg", "proportion", "smart", "raw"], default="jpg",
                   help="RGBImageField write_mode of the .beton: jpg stores every image as a q90 JPEG, like our "
                        "shards; FFCV's own ImageNet recipe uses proportion (half the images stored as raw pixels, "
                        "which decode faster and take ~5x the space) (default jpg)")
    p.add_argument("--writers", nargs="*", choices=WRITERS, default=None, metavar="WRITER",
                   help="compare the shard writers instead of the loaders: images/s per worker and output bytes per "
                        f"image of each WRITER ({', '.join(WRITERS)}; given alone: {' '.join(DEFAULT_WRITERS)}), "
                        "--threads worker processes each, ratios to ffcv-jpg; --res, --epochs, --batch-size, --peers, "
                        "--reencode and --ffcv-write-mode are for the loaders only")
    p.add_argument("--images-per-shard", type=int, default=1000,
                   help="--writers: preprocess.shard --images-per-shard of ours (default 1000, its default; the work "
                        "is shared out by shard, so with few images and 2 workers a smaller value balances them)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                   help=f"where the linked photos, shards and .beton are kept for later runs (default {DEFAULT_CACHE})")
    p.add_argument("--json", type=Path, default=None,
                   help="also append each table row, with its per-round rates, to this file as a JSON line")
    add_report_flags(p)
    p.add_argument("--notes", default="", help="free text stored with the --report entry")
    args = p.parse_args(argv)
    p.require_positive(args, *("repeat", "rounds", "epochs", "batch_size", "images_per_shard"))
    if min(args.threads) < 1:
        p.error(f"--threads {min(args.threads)}: must be at least 1")
    if min(args.res) < 8:
        p.error(f"--res {min(args.res)}: must be at least 8 pixels")
    if "ours" not in args.peers:
        p.error("--peers: include ours (the ratios are ours / each peer)")
    args.peers = list(dict.fromkeys(args.peers))
    if args.writers and not any(name.startswith("ours") for name in args.writers):
        p.error("--writers: include ours-auto or ours-always (the comparison is ours against FFCV's)")
    return args


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for package in ("nvidia-dali-cuda120", "nvidia-dali-cuda130", "ffcv", "torch", "torchvision", "pillow"):
        try:
            found.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            pass
    return ", ".join(found)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        photos = find_photos(args.photos)
    except PhotosError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    if args.writers is not None:
        return main_writers(args, photos, argv)
    total = len(photos) * args.repeat
    if total // args.batch_size < 1:
        print(f"{PROG}: error: --photos {args.photos}: {total} images, fewer than one batch of {args.batch_size}; "
              "raise --repeat or lower --batch-size", file=sys.stderr)
        return 2
    load_start, commit = os.getloadavg(), git_commit()  # the code that runs: a long run may outlive HEAD
    skipped = {name: why for name in args.peers if (why := peer_missing(name))}
    for line in skipped.values():
        print(line, flush=True)
    if "ours" in skipped:
        return 1
    run_peers = [name for name in args.peers if name not in skipped]

    workers = os.cpu_count() or 1
    folder = cache_dir(args.cache, args.photos, photos, args.repeat)
    entries = link_photos(photos, args.repeat, folder / "photos")
    started = time.perf_counter()
    shards = write_shards(folder / "photos", folder / f"shards-{args.reencode}-{encoder_digest()}", args.reencode, workers)
    progress(f"ours, torchvision: {total:,} images ({len(photos):,} photos x {args.repeat}) as shards at "
             f"preprocess.shard --max-side {MAX_SIDE} --quality {QUALITY} --reencode {args.reencode}: {shards} "
             f"({time.perf_counter() - started:.1f} s)")
    beton = None
    if "ffcv" in run_peers:
        started = time.perf_counter()
        beton = write_beton(entries, folder / f"ffcv-{args.ffcv_write_mode}.beton", args.ffcv_write_mode, workers)
        progress(f"ffcv: the same images as a .beton, RGBImageField(write_mode={args.ffcv_write_mode!r}, "
                 f"max_resolution={MAX_SIDE}, jpeg_quality={QUALITY}): {beton} "
                 f"({time.perf_counter() - started:.1f} s)")

    label = f"{args.photos.resolve().name} x{args.repeat}" if args.repeat > 1 else args.photos.resolve().name
    rows = []
    for threads in args.threads:
        for res in args.res:
            openers = {"ours": lambda: open_ours(shards, args.batch_size, threads, res),
                       "ffcv": lambda: open_ffcv(beton, args.batch_size, threads, res),
                       "torchvision": lambda: open_torchvision(shards, args.batch_size, threads, res)}
            progress(f"threads {threads}, {res} px:")
            results = measure_config({name: openers[name] for name in run_peers}, threads, res, args.rounds,
                                     args.epochs)
            for row in summarise(results, threads, res, label):
                rows.append(row)
                if args.json:
                    rates = [round(t["images"] / t["seconds"], 1) for t in results[row["loader"]]["rounds"]]
                    warm = results[row["loader"]]["warmup"]
                    with open(args.json, "a") as f:
                        f.write(json.dumps({**row, "round img/s": rates, "images per epoch": warm["images"],
                                            "channel mean": warm["mean"], "channel std": warm["std"],
                                            "label dtype": warm["label_dtype"]}) + "\n")
    load_end = os.getloadavg()

    print_table(rows)
    for threads in args.threads:
        for res in args.res:
            ratios = [f"ours/{r['loader']} {r['ours / it']}x" for r in rows
                      if r["threads"] == threads and r["res"] == res and r["loader"] != "ours"]
            print(f"threads {threads}, {res} px: " + (", ".join(ratios) or "no peer ran"))
    target = report_path(args.report, args.no_report)
    if target is not None:
        notes = (f"Photos: {args.photos} ({len(photos):,} photos x {args.repeat} = {total:,} images). Ours and "
                 f"torchvision read shards of preprocess.shard --max-side {MAX_SIDE} --quality {QUALITY} --reencode "
                 f"{args.reencode}; ffcv a .beton of RGBImageField(write_mode={args.ffcv_write_mode!r}, "
                 f"max_resolution={MAX_SIDE}, jpeg_quality={QUALITY}). Batch {args.batch_size}, {args.epochs} "
                 f"epoch(s) per loader per round after a warm-up epoch.")
        record(target, argv, args, rows, notes, load_start, load_end, skipped, commit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
