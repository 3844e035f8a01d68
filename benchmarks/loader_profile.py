"""`python -m benchmarks.loader_profile`: where one CPU thread of our training loader spends its time, per stage
(issue 20 item 2), and optionally where FFCV's spends it on the same images.

Ours is profiled by building the training pipeline of `train.pipelines` stage by stage, each a complete DALI
pipeline with the same reader, seed and crop distribution (`random_crop_args`), one CPU thread:
  read       readers.webdataset over the shards, shuffle buffer as `train.data.TrainLoader` sets it;
  decode     + decoders.image_random_crop (decodes only the crop window; libjpeg-turbo through nvImageCodec);
  resize     + resize to --res x --res (linear, antialiased when shrinking: DALI's own CPU resampler);
  normalise  + random flip and crop_mirror_normalize to float32: `build_train_pipeline` itself.
Each stage's cost is its pipeline's time per image minus the previous one's, taken per round (the rounds run the
stages in turn, so a change of load hits all of them). The torch side of `TrainLoader` is timed apart:
`batch_to_torch` (DLPack view, label check) per image, and the pipeline built each epoch (`.epoch()`: build and
first batch, less one steady batch) over the images of an epoch.

--beton FILE (FFCV importable, e.g. /tmp/ffcv-venv; a .beton of the same photos as benchmarks.peers writes): the
calls FFCV's RandomResizedCropRGBImageDecoder and NormalizeImage make per image, timed one by one: imdecode of
the whole JPEG (libjpeg-turbo), resize_crop of the random crop (OpenCV INTER_AREA), and a one-pass uint8 ->
float32 normalisation compiled with numba as FFCV's is. Its Loader's own overhead is not in these rows.

Times are wall and CPU (all threads of this process) milliseconds per image, medians over --rounds.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

from benchmarks.dataloader import print_table
from benchmarks.report import add_report_flags, append_result, cpu_description, git_commit, report_path
from preprocess.cli import ArgumentParser

PROG = "python -m benchmarks.loader_profile"
SECTION = "Loader profile: ms per image by stage (benchmarks.loader_profile)"
STAGES = ("read", "decode", "resize", "normalise")
WHAT = {"read": "readers.webdataset (shuffled)", "decode": "+ decoders.image_random_crop (cpu)",
        "resize": "+ resize to res x res (linear, antialias)", "normalise": "+ flip, crop_mirror_normalize float32"}


def build_stage(stage: str, tars, idxs, *, batch_size: int, res: int, threads: int, shuffle_buffer: int, seed: int):
    """The training pipeline up to and including `stage`; "normalise" is `build_train_pipeline` itself."""
    from train import pipelines

    if stage == "normalise":
        return pipelines.build_train_pipeline(tars, idxs, batch_size=batch_size, res=res, seed=seed,
                                              num_threads=threads, shuffle_buffer=shuffle_buffer)
    Pipeline, fn, types = pipelines.dali_modules()
    pipe = Pipeline(batch_size=batch_size, num_threads=threads, device_id=None, seed=seed, enable_checkpointing=True,
                    exec_dynamic=True, prefetch_queue_depth=pipelines.PREFETCH_DEPTH)
    with pipe:
        outputs = pipelines._read_webdataset(fn, types, tars, idxs, world_size=1, rank=0,
                                             shuffle_buffer=shuffle_buffer)
        if stage != "read":
            images = fn.decoders.image_random_crop(outputs[0], output_type=types.RGB,
                                                   **pipelines.random_crop_args(0.08), **pipelines._decoder_args(None))
            if stage == "resize":
                images = fn.resize(images, resize_x=res, resize_y=res)
            outputs = (images, outputs[1])
        pipe.set_outputs(*outputs)
    pipe.build()
    return pipe


def time_runs(pipe, batches: int, convert=None) -> tuple[float, float, float]:
    """Wall and CPU seconds of `batches` pipeline runs, and the wall seconds of `convert` (when given: called on
    each run's outputs; its time is not in the first two)."""
    wall, cpu = time.perf_counter(), time.process_time()
    converting = converting_cpu = 0.0
    for _ in range(batches):
        outputs = pipe.run()
        if convert is not None:
            began, began_cpu = time.perf_counter(), time.process_time()
            convert(*outputs)
            converting += time.perf_counter() - began
            converting_cpu += time.process_time() - began_cpu
    return (time.perf_counter() - wall - converting, time.process_time() - cpu - converting_cpu, converting)


def profile_ours(data_dir: Path, *, batch_size: int, res: int, threads: int, rounds: int, batches: int) -> list[dict]:
    from preprocess.manifest import split_shards
    from train import data

    shards = split_shards(data_dir, "train")
    tars, idxs = [t for t, _ in shards], [i for _, i in shards]
    loader = data.TrainLoader(data_dir, batch_size, device="cpu", num_threads=threads, decode="fused")
    pipes = {s: build_stage(s, tars, idxs, batch_size=batch_size, res=res, threads=threads,
                            shuffle_buffer=loader.shuffle_buffer, seed=1) for s in STAGES}
    for pipe in pipes.values():
        time_runs(pipe, 2)
    per_image = 1e3 / (batches * batch_size)  # seconds per `batches` batches -> ms per image
    wall = {s: [] for s in STAGES}
    cpu = {s: [] for s in STAGES}
    torch_side, build = [], []
    classes = data.num_classes(data_dir)
    to_torch = lambda images, labels: data.batch_to_torch(images, labels, loader.dtype, classes)
    epoch_images = len(loader) * batch_size
    for r in range(rounds):
        for s, pipe in pipes.items():
            w, c, converting = time_runs(pipe, batches, to_torch if s == "normalise" else None)
            wall[s].append(w * per_image)
            cpu[s].append(c * per_image)
        torch_side.append(converting * per_image)
        began = time.perf_counter()
        next(iter(loader.epoch(r, res)))  # builds the epoch's pipeline and runs its first batch
        one_batch = wall["normalise"][-1] * batch_size / 1e3  # seconds
        build.append(max(time.perf_counter() - began - one_batch, 0.0) / epoch_images * 1e3)
    rows, previous = [], None
    for s in STAGES:
        step = wall[s] if previous is None else [a - b for a, b in zip(wall[s], wall[previous])]
        rows.append(row("ours", s, WHAT[s], wall[s], cpu[s], step))
        previous = s
    rows.append(row("ours", "to torch", "batch_to_torch: DLPack view, label check", None, None, torch_side))
    rows.append(row("ours", "epoch build", f"pipeline built per epoch, over {epoch_images} images", None, None, build))
    return with_shares(rows)


def row(loader: str, stage: str, what: str, wall, cpu, step) -> dict:
    median = lambda xs: round(statistics.median(xs), 3) if xs else "-"
    return {"loader": loader, "stage": stage, "adds": what, "pipeline ms/img": median(wall),
            "pipeline cpu ms/img": median(cpu), "stage ms/img": median(step)}


def with_shares(rows: list[dict]) -> list[dict]:
    total = sum(max(r["stage ms/img"], 0) for r in rows)
    for r in rows:
        r["share"] = f"{max(r['stage ms/img'], 0) / total:.0%}" if total > 0 else "-"
    return rows


def profile_ffcv(beton: Path, *, res: int, rounds: int, images: int) -> list[dict]:
    """FFCV's per-image calls (see the module docstring) over `images` random images of the .beton, per round."""
    import numpy as np
    from ffcv.fields.rgb_image import get_random_crop
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.reader import Reader
    from numba import njit

    from train.pipelines import ASPECT_RANGE, MEAN, STD

    reader = Reader(str(beton))
    image_field = list(reader.handlers).index("image")
    fields = reader.metadata[f"f{image_field}"]
    sizes = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
    raw = np.memmap(beton, dtype=np.uint8, mode="r")
    mean, inv_std = np.array(MEAN, np.float32) * 255, 1 / (np.array(STD, np.float32) * 255)

    @njit(fastmath=True)
    def normalise(src, out, mean, inv_std):  # what NormalizeImage compiles: one pass, uint8 -> float32
        for y in range(src.shape[0]):
            for x in range(src.shape[1]):
                for c in range(3):
                    out[y, x, c] = (src[y, x, c] - mean[c]) * inv_std[c]

    crop, out = np.empty((res, res, 3), np.uint8), np.empty((res, res, 3), np.float32)
    normalise(crop, out, mean, inv_std)  # compiled before timing
    get_random_crop(64, 64, (0.08, 1.0), ASPECT_RANGE)
    steps = {"decode": [], "resize": [], "normalise": []}
    rng = np.random.default_rng(0)
    for _ in range(rounds):
        spent = dict.fromkeys(steps, 0.0)
        for k in rng.permutation(len(fields))[:images]:
            f = fields[k]
            ptr, height, width = int(f["data_ptr"]), int(f["height"]), int(f["width"])
            jpeg, whole = np.array(raw[ptr:ptr + sizes[ptr]]), np.empty((height, width, 3), np.uint8)
            t0 = time.perf_counter()
            imdecode(jpeg, whole, height, width, height, width, 0, 0, 1, 1, False, False)
            t1 = time.perf_counter()
            i, j, h, w = get_random_crop(height, width, (0.08, 1.0), ASPECT_RANGE)
            t2 = time.perf_counter()
            resize_crop(whole, i, i + h, j, j + w, crop)
            t3 = time.perf_counter()
            normalise(crop, out, mean, inv_std)
            spent["decode"] += t1 - t0
            spent["resize"] += t3 - t2
            spent["normalise"] += time.perf_counter() - t3
        for name, seconds in spent.items():
            steps[name].append(seconds / min(images, len(fields)) * 1e3)
    what = {"decode": "imdecode, whole JPEG (libjpeg-turbo)", "resize": "resize_crop (OpenCV INTER_AREA)",
            "normalise": "uint8 -> float32 normalise (numba)"}
    return with_shares([row("ffcv", name, what[name], None, None, steps[name]) for name in steps])


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True,
                   help="shard folder from `python -m preprocess.shard` (its train split is read), e.g. the "
                        "shards-auto folder benchmarks.peers leaves in its --cache")
    p.add_argument("--beton", type=Path, default=None,
                   help="also profile FFCV's per-image calls on this .beton (needs ffcv importable)")
    p.add_argument("--res", type=int, default=128, help="output size in pixels (default 128)")
    p.add_argument("--threads", type=int, default=1, help="DALI threads (default 1: the per-core cost)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    p.add_argument("--rounds", type=int, default=5, help="rounds, the stages interleaved in each (default 5)")
    p.add_argument("--batches", type=int, default=30, help="batches per stage per round (default 30)")
    add_report_flags(p)
    p.add_argument("--notes", default="", help="free text stored with the --report entry")
    args = p.parse_args(argv)
    p.require_positive(args, *("res", "threads", "batch_size", "rounds", "batches"))
    if args.beton is not None and not args.beton.is_file():
        p.error(f"--beton {args.beton}: no such file")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    load_start, commit = os.getloadavg(), git_commit()
    rows = profile_ours(args.data, batch_size=args.batch_size, res=args.res, threads=args.threads,
                        rounds=args.rounds, batches=args.batches)
    if args.beton is not None:
        rows += profile_ffcv(args.beton, res=args.res, rounds=args.rounds, images=args.batches * args.batch_size)
    load_end = os.getloadavg()
    print_table(rows)
    target = report_path(args.report, args.no_report)
    if target is not None:
        load = "/".join(f"{x:.2f}" for x in load_start), "/".join(f"{x:.2f}" for x in load_end)
        notes = (f"Data: {args.data}. {args.res} px, batch {args.batch_size}, DALI threads {args.threads}, "
                 f"{args.rounds} rounds of {args.batches} batches per stage. Load average (1/5/15 min) {load[0]} at "
                 f"the start, {load[1]} at the end. {args.notes}").strip()
        command = f"{PROG} " + shlex.join(sys.argv[1:] if argv is None else argv)
        path = append_result(SECTION, rows, command, cpu_description(), notes, path=target, commit=commit)
        print(f"appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
