"""`python -m benchmarks.preprocess`: preprocessing throughput (images/s, per worker) and output bytes.

Two measurements on the same images:

1. The encoder alone, in this one process (= one worker), over source bytes already in memory:
   each variant of `preprocess.encode.reencode` in turn, `--rounds` times interleaved, the order rotated
   by one each round (so that load
   from other jobs hits all variants alike), best round kept, timed by the wall clock and by this
   process's CPU time (the steadier figure on a shared machine; the ratio to `before` uses it). `before` is the encoder as it was
   before issue 9 (decode at full size, always re-encode); `auto`, `keep` and `always` are the
   `--reencode` modes of `preprocess.shard`. Also: source and output bytes per image, how many
   images were kept unchanged, how fast the output decodes (one pass, PIL), which every training
   epoch pays again, and, over the resized images, the PSNR of the output against the ideal
   (full-size decode, one Lanczos pass, no JPEG encoding), mean, minimum and the largest drop of
   one image against `before`: what DCT-domain scaling may cost. Issue 20's candidates (CANDIDATES: `issue9`,
   `auto` as it was before issue 20, and variants of it with another decoder, resizer or JPEG encoder) are
   measured the same way; the last five columns compare every variant with `issue9` (or `auto` when
   `issue9` is not measured): CPU-time ratio, output bytes, and the PSNR against the source (output
   decoded vs the ideal for resized images, vs the source decoded for the others; over the images that
   the baseline re-encodes, an image passed through counting 99 dB), mean and worst image.
2. `preprocess.shard.run` end to end (read, encode, write tars) for each `--workers` count, with
   `--reencode` as given.

Sources: without --src, photo-like JPEGs at ImageNet's typical sizes (benchmarks.photos) written as
HF-schema parquet, so the figure can be produced anywhere; with --src, any input preprocess.shard
reads, or a flat folder of images (such as ../shared/data/imagenet-samples: class = the file name's
part before the first '_'). `--limit N` takes a fixed subset (every k-th file in sorted order) and
`--repeat R` lists each file R times, so that a small set still gives seconds of work.
"""

from __future__ import annotations

import io
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from preprocess.cli import ArgumentParser
from benchmarks.report import add_report_flags, append_result, cpu_description, report_path
from preprocess import encode, shard
from preprocess.sources import IMAGE_SUFFIXES, SourceError, image_files, open_source, read_bytes

VARIANTS = {  # name -> keyword arguments of encode.reencode besides max_side and quality
    "before": {"mode": "always", "draft_gap": None},  # the encoder before issue 9
    "auto": {"mode": "auto"},
    "keep": {"mode": "keep"},
    "always": {"mode": "always"},
    # Not measured by default: libjpeg-turbo's M/8 scaled decode leaving another gap for Lanczos than
    # encode.DRAFT_GAP (1.6): smaller is faster on 2-4x downscales and loses fidelity (see the PSNR columns).
    "auto-draft1": {"mode": "auto", "draft_gap": 1},
    "auto-gap1.25": {"mode": "auto", "draft_gap": 1.25},
    "auto-gap1.75": {"mode": "auto", "draft_gap": 1.75},
    "auto-gap2": {"mode": "auto", "draft_gap": 2},
}
# Issue 20 item 3's candidates: another decoder, resizer or JPEG encoder than encode.reencode's, with `auto`'s
# pass-through (see candidate()). `issue9` is `auto` as it was from issue 9 to issue 20: Pillow's decode, at
# 1/2, 1/4 or 1/8 scale (draft) for >= 4x downscales only; the others change one step of it.
CANDIDATES = {
    "issue9": {},
    "issue9-draft1.5": {"draft_gap": 1.5},  # draft() leaving 1.5x: 1/2 scale for >= 3x
    "simplejpeg-decode": {"decoder": "simplejpeg"},
    "simplejpeg-encode": {"encoder": "simplejpeg"},
    "pil-ycbcr": {"decoder": "pil-ycbcr"},  # no colour conversion: decode, resize, encode in YCbCr
    "pil-reduce": {"reducing_gap": 1.0},  # Pillow's reduce() by 2 for >= 2x downscales before Lanczos
    "pil-bicubic": {"resizer": "bicubic"},
    "cv2-area": {"resizer": "area"},  # OpenCV's INTER_AREA, as FFCV's writer
    "cv2-prefilter": {"resizer": "prefilter"},  # OpenCV: Lanczos-3 kernel at full size, then cubic sampling
    "cv2-all": {"decoder": "cv2", "resizer": "area", "encoder": "cv2"},  # FFCV's writer's steps
}
DEFAULT_VARIANTS = ["before", "auto", "keep", "always"]


def candidate(data: bytes, *, max_side: int, quality: int, decoder: str = "pil", resizer: str = "lanczos",
              encoder: str = "pil", draft_gap: float = 2, reducing_gap: float = 3.0) -> encode.EncodeResult:
    """`auto` as from issue 9 to issue 20 (Pillow's decode, draft() leaving `draft_gap`, Lanczos, Pillow's
    encoder), or with another decoder, resizer or JPEG encoder, for RGB and grayscale JPEGs (anything
    else goes to encode.reencode itself): what issue 20's candidates would give."""
    import cv2

    cv2.setNumThreads(1)  # one worker = one core, as in preprocess.shard
    image = Image.open(io.BytesIO(data))
    if image.format != "JPEG" or image.mode not in ("RGB", "L"):
        return encode.reencode(data, max_side=max_side, quality=quality)
    source = image.size
    size = encode.fit_within(*source, max_side)
    keepable = size == source and encode._keepable(image, data)
    if keepable and encode._no_finer_than(image, quality):
        image.draft(None, (1, 1))
        image.load()
        return encode.EncodeResult(data, *source, ["passthrough"])
    gray = image.mode == "L"
    want = (int(size[0] * draft_gap), int(size[1] * draft_gap)) if size != source else (0, 0)
    if decoder == "pil-ycbcr" and not gray:  # no colour conversion: decode, resize and encode YCbCr
        drafted = image.draft("YCbCr", want if size != source else source)
        if size != source:
            image = image.resize(size, Image.Resampling.LANCZOS, box=drafted[1] if drafted else None,
                                 reducing_gap=reducing_gap)
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=quality, subsampling="4:2:0", optimize=False)
        if keepable and out.tell() >= len(data):
            return encode.EncodeResult(data, *source, ["passthrough"])
        return encode.EncodeResult(out.getvalue(), size[0], size[1], ["resized"] if size != source else [])
    # Pixels stay a PIL image unless a step needs an array, so that `issue9` costs what reencode did.
    if decoder in ("pil", "pil-ycbcr"):
        if size != source:
            image.draft(None, want)
        image.load()
        pixels = image
    elif decoder == "simplejpeg":
        import simplejpeg

        # libjpeg-turbo also scales by 3/8, 5/8, ... (slow, and unlike Pillow's draft): ask for 1/2, 1/4, 1/8 only
        scale = max([s for s in (1, 2, 4, 8) if -(-source[0] // s) >= want[0] and -(-source[1] // s) >= want[1]]
                    if size != source else [], default=1)
        pixels = simplejpeg.decode_jpeg(data, colorspace="GRAY" if gray else "RGB",
                                        min_width=-(-source[0] // scale), min_height=-(-source[1] // scale))
        pixels = pixels[:, :, 0] if gray else pixels
    else:  # cv2: scaled decodes come as IMREAD_REDUCED_*; full size here, as FFCV does
        pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_COLOR_RGB)
    if size != source:
        w, h = pixels.size if isinstance(pixels, Image.Image) else (pixels.shape[1], pixels.shape[0])
        eighths = round(8 * w / source[0])  # DCT scaling by M/8: decoded width = ceil(source width * M / 8)
        box = (0, 0, source[0] * eighths / 8, source[1] * eighths / 8) if eighths < 8 else None
        if resizer == "area":
            pixels = cv2.resize(np.asarray(pixels), size, interpolation=cv2.INTER_AREA)
        elif resizer == "prefilter":  # Lanczos-3 stretched to the scale, then cubic sampling of the band-limited image
            pixels = cv2.resize(cv2.sepFilter2D(np.asarray(pixels), -1, _lanczos_taps(w / size[0]),
                                                _lanczos_taps(h / size[1]), borderType=cv2.BORDER_REFLECT_101),
                                size, interpolation=cv2.INTER_CUBIC)
        else:
            im = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
            pixels = im.resize(size, Image.Resampling.BICUBIC if resizer == "bicubic" else Image.Resampling.LANCZOS,
                               box=box, reducing_gap=reducing_gap)
    if encoder == "pil":
        result = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
        result = result.convert("RGB") if gray else result
        if "comment" in image.info:  # Pillow's encoder writes a Pillow-decoded source's comment again
            result.info["comment"] = image.info["comment"]
        out = io.BytesIO()
        result.save(out, format="JPEG", quality=quality, subsampling="4:2:0", optimize=False)
        jpeg = out.getvalue()
    else:
        pixels = np.asarray(pixels)
        pixels = np.repeat(pixels[:, :, None], 3, axis=2) if gray else pixels
        if encoder == "simplejpeg":
            import simplejpeg

            jpeg = simplejpeg.encode_jpeg(np.ascontiguousarray(pixels), quality, colorsubsampling="420")
        else:
            jpeg = cv2.imencode(".jpg", np.ascontiguousarray(pixels[:, :, ::-1]),
                                [cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
                                 cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420])[1].tobytes()
    if keepable and len(jpeg) >= len(data):
        return encode.EncodeResult(data, *source, ["passthrough"])
    return encode.EncodeResult(jpeg, size[0], size[1], ["resized"] if size != source else [])


def _lanczos_taps(scale: float) -> np.ndarray:
    """Pillow's Lanczos-3 kernel stretched by `scale` (> 1), at integer offsets, summing to 1."""
    x = np.arange(-int(np.ceil(3 * scale)), int(np.ceil(3 * scale)) + 1, dtype=np.float64)
    taps = np.where(np.abs(x) < 3 * scale, np.sinc(x / scale) * np.sinc(x / (3 * scale)), 0.0)
    return (taps / taps.sum()).astype(np.float32)


def link_tree(src: Path, out: Path, limit: int | None = None, repeat: int = 1) -> Path:
    """An ImageFolder of symlinks to the images of `src` (an ImageFolder, or a flat folder of images)."""
    splits = [d for d in ("train", "val") if (src / d).is_dir()]
    if splits:
        files = [(split, p.parent.name, p) for split in splits for p in sorted((src / split).glob("*/*"))
                 if p.suffix.lower() in IMAGE_SUFFIXES]
    else:
        files = [("train", p.name.split("_", 1)[0], p) for p in image_files(src)]
    if not files:
        raise SourceError(f"--src {src}: no images found (expected train/<class>/* or image files)")
    if limit and limit < len(files):
        step = len(files) / limit
        files = [files[int(i * step)] for i in range(limit)]
    for split, label, path in files:
        folder = out / split / label
        folder.mkdir(parents=True, exist_ok=True)
        for r in range(repeat):
            name = path.name if r == 0 else f"{path.stem}__copy{r}{path.suffix}"
            (folder / name).symlink_to(path.resolve())
    return out


def source_images(src: str) -> list[bytes]:
    source = open_source(src)
    return [read_bytes(ref.location) for split in source.splits() for ref in source.refs(split)]


def compare_encoders(images: list[bytes], variants: list[str], max_side: int, quality: int, rounds: int) -> list[dict]:
    """One row per variant: best-of-`rounds` images/s in this process (wall clock, and per CPU-second of
    this process, which other jobs on a shared machine disturb far less), bytes, images kept unchanged."""
    wall = {v: float("inf") for v in variants}
    cpu = {v: float("inf") for v in variants}
    outputs: dict[str, list] = {}
    for round_ in range(rounds):
        shift = round_ % len(variants)  # the order rotates each round: no variant always runs first
        for v in variants[shift:] + variants[:shift]:
            start, start_cpu = time.perf_counter(), time.process_time()
            results = []
            for data in images:
                try:
                    results.append(encode.reencode(data, max_side=max_side, quality=quality, **VARIANTS[v])
                                   if v in VARIANTS else candidate(data, max_side=max_side, quality=quality,
                                                                   **CANDIDATES[v]))
                except encode.UndecodableImage:
                    results.append(None)
            wall[v] = min(wall[v], time.perf_counter() - start)
            cpu[v] = min(cpu[v], time.process_time() - start_cpu)
            outputs[v] = results
    source_bytes = sum(len(d) for d in images)
    references: dict[bytes, np.ndarray] = {}
    fidelity = {v: {i: _psnr(r.jpeg, _reference(images[i], (r.width, r.height), references))
                    for i, r in enumerate(outputs[v]) if r is not None and "resized" in r.fixes} for v in variants}
    # Against the source: the output decoded vs the ideal (resized images) or the source decoded (the
    # others), over the images that `auto` (today's default) re-encodes; an image passed through scores 99.
    base = next((v for v in ("issue9", "auto") if v in variants), variants[0])
    redone = [i for i, r in enumerate(outputs[base]) if r is not None and "passthrough" not in r.fixes]
    against_source = {v: {i: (99.0 if "passthrough" in outputs[v][i].fixes else
                              _psnr(outputs[v][i].jpeg, _reference(images[i], (outputs[v][i].width,
                                                                               outputs[v][i].height), references)))
                          for i in redone if outputs[v][i] is not None} for v in variants}
    base_bytes = sum(len(r.jpeg) for r in outputs[base] if r is not None)
    rows = []
    for v in variants:
        psnr = list(fidelity[v].values())
        worst = (min(p - fidelity["before"][i] for i, p in fidelity[v].items() if i in fidelity["before"])
                 if "before" in fidelity and fidelity[v] else "")
        done = [r for r in outputs[v] if r is not None]
        out_bytes = sum(len(r.jpeg) for r in done)
        start_cpu = time.process_time()
        for r in done:  # what every training epoch pays again (PIL's libjpeg-turbo, as DALI's CPU decoder)
            Image.open(io.BytesIO(r.jpeg)).load()
        decode_cpu = max(time.process_time() - start_cpu, 1e-9)
        rows.append({
            "encoder": v, "images": len(images), "seconds": round(wall[v], 2),
            "images/s per worker": round(len(images) / wall[v], 1),
            "images per CPU-s": round(len(images) / cpu[v], 1),
            "x before (CPU)": round(cpu["before"] / cpu[v], 2) if "before" in cpu else "",
            "source KB/image": round(source_bytes / len(images) / 1000, 1),
            "output KB/image": round(out_bytes / max(1, len(done)) / 1000, 1),
            "output/source bytes": round(out_bytes / source_bytes, 3),
            "kept unchanged": sum("passthrough" in r.fixes for r in done), "resized": sum("resized" in r.fixes for r in done),
            "skipped": len(images) - len(done), "output decodes per CPU-s": round(len(done) / decode_cpu, 1),
            "resized PSNR dB mean": round(float(np.mean(psnr)), 2) if psnr else "",
            "resized PSNR dB min": round(float(np.min(psnr)), 2) if psnr else "",
            "worst dB vs before": round(worst, 2) if worst != "" else "",
            f"x {base} (CPU)": round(cpu[base] / cpu[v], 2),
            f"bytes / {base}": round(out_bytes / base_bytes, 4),
            f"PSNR dB mean ({base} re-encoded)": (round(float(np.mean(list(against_source[v].values()))), 3)
                                                  if against_source[v] else ""),
            f"mean dB vs {base}": (round(float(np.mean([p - against_source[base][i]
                                                        for i, p in against_source[v].items()])), 3)
                                   if against_source[v] else ""),
            f"worst dB vs {base}": (round(min(p - against_source[base][i] for i, p in against_source[v].items()), 2)
                                    if against_source[v] else ""),
        })
    return rows


def _reference(data: bytes, size: tuple[int, int], cache: dict) -> np.ndarray:
    """The ideal of a resized image: full-size decode, one Lanczos pass, no JPEG encoding."""
    if (data, size) not in cache:
        bands = Image.open(io.BytesIO(data)).convert("RGB").split()
        if bands[0].size != size:  # in 32-bit float: no rounding to 8 bits between or after the two passes
            bands = [band.convert("F").resize(size, Image.Resampling.LANCZOS) for band in bands]
        cache[(data, size)] = np.stack([np.asarray(band, dtype=np.float64) for band in bands], axis=2)
    return cache[(data, size)]


def _psnr(jpeg: bytes, reference: np.ndarray) -> float:
    pixels = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.float64)
    return float(10 * np.log10(255 ** 2 / max(np.mean((pixels - reference) ** 2), 1e-10)))


def measure(src: str, out: Path, workers: int, settings: shard.EncodeSettings, per_shard: int) -> dict:
    source = open_source(src)
    splits = tuple(s for s in ("train", "val") if s in source.splits())
    start = time.perf_counter()
    manifest = shard.run(src, out, splits=splits, settings=settings, images_per_shard=per_shard, workers=workers,
                         progress=False)
    seconds = time.perf_counter() - start
    images = sum(s["source_images"] for s in manifest["splits"].values())
    kept = sum(s["fixed"].get("passthrough", 0) for s in manifest["splits"].values())
    tar_bytes = sum(sh["bytes"] for s in manifest["splits"].values() for sh in s["shards"])
    return {"workers": workers, "images": images, "seconds": round(seconds, 2),
            "images/s": round(images / seconds, 1), "images/s per worker": round(images / seconds / workers, 1),
            "reencode": settings.reencode, "kept unchanged": kept, "tar KB/image": round(tar_bytes / images / 1000, 1)}


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m benchmarks.preprocess",
                                description="Measure preprocessing: the encoder's images/s and output bytes per image "
                                            "(before/auto/always, one process) and preprocess.shard's images/s in "
                                            "total and per worker.")
    p.add_argument("--src", default=None, help="data to shard: any preprocess.shard input or a flat folder of images "
                                               "(default: generate photo-like ImageNet-size JPEGs)")
    p.add_argument("--images", type=int, default=400, help="generated images when no --src (default 400)")
    p.add_argument("--limit", type=int, default=None, help="use a fixed subset of this many --src images "
                                                           "(every k-th in sorted order; folder sources only)")
    p.add_argument("--repeat", type=int, default=1, help="list each --src image this many times (default 1)")
    p.add_argument("--workers", type=int, nargs="*", default=[1, os.cpu_count() or 1],
                   help="worker counts to measure preprocess.shard with (default: 1 and all cores; none to skip)")
    p.add_argument("--encoders", nargs="*", default=DEFAULT_VARIANTS, choices=[*VARIANTS, *CANDIDATES],
                   help=f"encoder variants to compare in one process (default: {' '.join(DEFAULT_VARIANTS)}; "
                        f"none to skip)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the encoder comparison, best kept (default 2)")
    p.add_argument("--max-side", type=int, default=500, help="pixels (default 500)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    p.add_argument("--reencode", default="auto", choices=encode.MODES, help="mode of the preprocess.shard runs (default auto)")
    p.add_argument("--images-per-shard", type=int, default=50, help="(default 50: enough shards to keep workers busy)")
    add_report_flags(p)
    args = p.parse_args(argv)
    if not args.workers and not args.encoders:
        p.error("nothing to measure: give --workers or --encoders")

    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        src = args.src
        if src is None:
            from benchmarks.photos import write_photo_parquet

            src = str(write_photo_parquet(Path(tmp) / "parquet", train=args.images * 4 // 5, val=args.images // 5))
        elif Path(src).is_dir() and (image_files(Path(src)) or (Path(src) / "train").is_dir()):
            if args.limit or args.repeat > 1 or not (Path(src) / "train").is_dir():
                src = str(link_tree(Path(src), Path(tmp) / "src", args.limit, args.repeat))
        elif args.limit or args.repeat > 1:
            p.error("--limit and --repeat take a folder --src (an ImageFolder or a flat folder of images)")
        encoder_rows = (compare_encoders(source_images(src), args.encoders, args.max_side, args.quality, args.rounds)
                        if args.encoders else [])
        settings = shard.EncodeSettings(args.max_side, args.quality, args.reencode)
        rows = [measure(src, Path(tmp) / f"out-{w}", w, settings, args.images_per_shard) for w in args.workers]

    for table in (encoder_rows, rows):
        if table:
            print(" | ".join(table[0]))
            for row in table:
                print(" | ".join(str(v) for v in row.values()))
    target = report_path(args.report, args.no_report)
    if target is not None:
        data = args.src or f"{args.images} generated photo-like JPEGs (benchmarks.photos), quality 95"
        subset = (f", fixed subset of {args.limit}" if args.limit else "") + (f", each listed {args.repeat}x" if args.repeat > 1 else "")
        command = "python -m benchmarks.preprocess " + shlex.join(argv if argv is not None else sys.argv[1:])
        notes = (f"data: {data}{subset}; --max-side {args.max_side} --quality {args.quality}. "
                 f"1-min load average at start {load:.2f} on {os.cpu_count()} cores (shared machine: other jobs may "
                 f"have been running).")
        if encoder_rows:
            append_result("Preprocessing encoder", encoder_rows, command=command, device=cpu_description(),
                          notes=notes + f" One process, source bytes in memory, best of {args.rounds} interleaved "
                                        "rounds by wall clock and by this process's CPU time (x before uses CPU "
                                        "time). before = full-size decode and re-encode of every image (the "
                                        "encoder before issue 9); auto/keep/always = the --reencode modes.",
                          path=target)
        if rows:
            append_result("Preprocessing", rows, command=command, device=cpu_description(), notes=notes,
                          path=target)
        print(f"appended to {target}")
    if encoder_rows:
        print("encoder images per CPU-s (x before): " + ", ".join(
            f"{r['encoder']} {r['images per CPU-s']} ({r['x before (CPU)']})" for r in encoder_rows))
    if rows:
        print(f"preprocess images/s per worker: {rows[0]['images/s per worker']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
