"""FFCV-style normalisation: any image bytes -> 3-channel RGB JPEG with the longer side <= max_side.

Everything is normalised (CMYK, grayscale, palette, alpha, PNG stored in a JPEG field) so that
every decoder downstream (DALI's nvJPEG, PIL, OpenCV) sees the same kind of file.

Two ways to be fast on real photos without losing quality:

* Pass-through (`mode="auto"`, or "keep" for any quantisation): a source that already is what we would write -- a baseline,
  8-bit, Huffman-coded YCbCr JPEG within `max_side`, with standard chroma subsampling and no EXIF
  rotation -- is returned byte for byte when its quantisation is no finer than that of `quality`
  (re-encoding it would only add a generation loss and, usually, bytes), or when re-encoding it
  does not make it smaller. Finer-quantised sources (most of ImageNet: ~q95, often 4:4:4) are
  re-encoded: that halves their bytes, and every training epoch decodes them again.
  A kept file is still decoded in full (at 1/8 scale: the entropy decoder reads every
  coefficient, so truncated or corrupt files are rejected as by a full-size decode), so that a
  broken file is skipped, never shipped. Excluded, and re-encoded instead:
  - progressive, arithmetic-coded, lossless, 12-bit: nvJPEG's hardware decoder takes baseline
    only, and nvJPEG has no arithmetic decoding at all;
  - EXIF orientation other than 1: DALI's decoder applies it by default while PIL (viz, the
    baseline loader, this module) does not, so the file is re-encoded with its pixels as stored
    and no EXIF, as every other image;
  - RGB-coded (Adobe transform 0, or component ids 'R','G','B') and unusual subsampling
    (4:1:1, 4:4:0, ...): rare, and decoders disagree on them;
  - several scans, or bytes after the end-of-image marker.
  ICC profiles and restart markers are kept: no decoder in this pipeline applies colour
  management (the re-encoded files carry no profile either), and nvJPEG handles restart intervals.
* DCT-domain downscaling: an RGB or grayscale JPEG that must shrink by 1.6x or more is decoded by
  libjpeg-turbo (through simplejpeg) at the smallest scale M/8 (M = 1..7) that leaves at least
  DRAFT_GAP = 1.6x for the Lanczos resize, instead of at full size. On the 120 ImageNet samples
  (issue 20), against the full-size path: output bytes +0.002% (134 of 6.07 MB), PSNR against the
  ideal (the source at full size, one Lanczos pass) -0.01 dB on average, -0.81 dB on the worst image;
  the full-size decode and Lanczos pass of the 23 downscaled samples were ~60% of the encoder's time.
  (Pillow's draft() offers only 1/2, 1/4, 1/8, which for 2-4x leaves a gap of 1-2, where the same
  samples lose up to 2 dB.) Pillow decodes everything else, and decides on any file libjpeg-turbo
  warns about, so the same files are rejected as before.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image, ImageFile, JpegImagePlugin

try:  # a dependency (setup.cfg); imported softly only so that a machine that never shrinks an image (the GPU
    import simplejpeg  # suite's device, whose generated images are within max_side) can still use this module
except ImportError:
    simplejpeg = None
MISSING_SIMPLEJPEG = ("simplejpeg is not installed (a dependency since 2026-12-03: it decodes JPEGs that must shrink "
                      "at a reduced DCT scale): run `pip install -e .` again in the project, or `pip install simplejpeg`")

# A truncated file must fail loudly so it is reported as skipped, not padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# ImageNet's largest images are ~90 MP panoramas; still refuse decompression bombs beyond that.
Image.MAX_IMAGE_PIXELS = 200_000_000

MODES = ("auto", "keep", "always")  # see reencode()
# Decode at the DCT scale M/8 that leaves at least this factor for Lanczos (issue 20, on the real ImageNet
# samples against the full-size decode: at 1.6, -0.01 dB mean and -0.81 dB worst image; at 1.25 -1.6 dB
# worst; at 2, -0.1 dB worst but hardly faster).
DRAFT_GAP = 1.6
# Fixes that say how an image was handled rather than what was wrong with it; not listed per key.
NOT_CONVERSIONS = frozenset({"resized", "passthrough"})

_SOF_BASELINE = 0xC0
_EOI = b"\xff\xd9"
# After the first scan's header: the next marker that is not a stuffed 0xFF00 or a restart marker.
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7]")
_SAMPLINGS_KEPT = (0, 1, 2)  # PIL's get_sampling(): 4:4:4, 4:2:2, 4:2:0
_RGB_COMPONENT_IDS = (ord("R"), ord("G"), ord("B"))


class UndecodableImage(ValueError):
    """The bytes are not an image PIL can fully decode; the message says why."""


@dataclass
class EncodeResult:
    jpeg: bytes
    width: int
    height: int
    fixes: list[str] = field(default_factory=list)  # e.g. ["mode-cmyk", "resized"] or ["passthrough"]

    @property
    def conversions(self) -> list[str]:
        """The fixes that changed what the image is (mode, format), worth listing per key."""
        return [f for f in self.fixes if f not in NOT_CONVERSIONS]


def fit_within(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Size with the longer side <= max_side, aspect kept, never upscaled."""
    longer = max(width, height)
    if longer <= max_side:
        return width, height
    scale = max_side / longer
    return max(1, round(width * scale)), max(1, round(height * scale))


def reencode(data: bytes, *, max_side: int = 500, quality: int = 90, mode: str = "auto",
             draft_gap: float | None = DRAFT_GAP) -> EncodeResult:
    """Normalise `data` to an RGB baseline JPEG with the longer side <= `max_side`.

    mode "auto" returns a source that needs no change unchanged (see the module docstring), with
    fixes ["passthrough"]; "keep" does so whatever the source's quantisation (no generation loss, but
    high-quality sources stay large); "always" decodes and re-encodes every image at `quality`.
    `draft_gap` is DRAFT_GAP's value for this call; None decodes at full size before resizing (slower; the
    reference path, and the encoder before pass-through existed).
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: choose from {', '.join(MODES)}")
    if not data:
        raise UndecodableImage("empty image bytes")
    try:
        image = Image.open(io.BytesIO(data))
        source_format = image.format
        source_size = image.size
        size = fit_within(image.width, image.height, max_side)
        keepable = mode != "always" and size == source_size and _keepable(image, data)
        if keepable and (mode == "keep" or _no_finer_than(image, quality)):
            image.draft(None, (1, 1))  # 1/8 scale: every coefficient is still entropy-decoded
            image.load()
            return EncodeResult(data, *source_size, ["passthrough"])
        box = None
        if draft_gap and source_format == "JPEG" and size != source_size and image.mode in ("RGB", "L"):
            scaled = _scaled_decode(data, image, size, draft_gap)
            if scaled is not None:
                image, box = scaled
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
        raise UndecodableImage(f"{type(exc).__name__}: {exc}") from exc

    fixes = []
    if source_format != "JPEG":
        fixes.append(f"format-{str(source_format).lower()}")
    if image.mode != "RGB":
        fixes.append(f"mode-{image.mode.lower()}")
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            # Composite transparent pixels on white rather than letting them turn black.
            rgba = image.convert("RGBA")
            image = Image.new("RGB", rgba.size, (255, 255, 255))
            image.paste(rgba, mask=rgba.getchannel("A"))
        elif image.mode != "L":  # grayscale is resized first (a third of the work), then widened
            image = image.convert("RGB")

    if size != source_size:
        fixes.append("resized")
        # Pillow's reducing_gap makes big downscales fast with no visible cost (it is deterministic).
        image = image.resize(size, Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)
    if image.mode == "L":
        image = image.convert("RGB")

    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality, subsampling="4:2:0", optimize=False)
    if keepable and out.tell() >= len(data):  # finer tables than ours, yet no bytes to gain: keep the source
        return EncodeResult(data, *source_size, ["passthrough"])
    return EncodeResult(out.getvalue(), image.width, image.height, fixes)


def _scaled_decode(data: bytes, image: Image.Image, size: tuple[int, int],
                   gap: float) -> tuple[Image.Image, tuple[float, float, float, float]] | None:
    """`image` (an RGB or grayscale JPEG opened from `data`, not loaded) decoded by libjpeg-turbo at the
    smallest scale M/8 whose result is at least `gap` times `size`, and the box of the source within it;
    None when no M < 8 qualifies, or when libjpeg-turbo warns (then Pillow's full-size decode decides)."""
    width, height = image.size
    for eighths in range(1, 8):
        scaled = (math.ceil(width * eighths / 8), math.ceil(height * eighths / 8))  # libjpeg-turbo rounds up
        if scaled[0] >= size[0] * gap and scaled[1] >= size[1] * gap:
            break
    else:
        return None
    if simplejpeg is None:  # never a silent fallback to another decoder: the output would differ by machine
        raise RuntimeError(MISSING_SIMPLEJPEG)
    try:
        # strict: a warning (truncated or corrupt data) is an error here, so that Pillow's decode reports it.
        pixels = simplejpeg.decode_jpeg(data, colorspace="GRAY" if image.mode == "L" else "RGB",
                                        min_width=scaled[0], min_height=scaled[1], strict=True)
    except ValueError:
        return None
    if pixels.shape[:2] != (scaled[1], scaled[0]):
        return None
    pixels = pixels[:, :, 0] if image.mode == "L" else pixels
    scaled_image = Image.fromarray(np.ascontiguousarray(pixels))
    if "comment" in image.info:  # Pillow's JPEG encoder writes it again, as for a Pillow-decoded source
        scaled_image.info["comment"] = image.info["comment"]
    return scaled_image, (0, 0, width * eighths / 8, height * eighths / 8)


def _keepable(image: Image.Image, data: bytes) -> bool:
    """Whether `image` (opened from `data`, not loaded) is a JPEG that every decoder downstream reads as we
    would write it (size and quality aside)."""
    if image.format != "JPEG" or image.mode != "RGB" or image.info.get("progressive"):
        return False
    if JpegImagePlugin.get_sampling(image) not in _SAMPLINGS_KEPT:
        return False
    if image.info.get("adobe_transform") == 0 or tuple(c[0] for c in image.layer) == _RGB_COMPONENT_IDS:
        return False
    try:
        orientation = image.getexif().get(0x0112, 1)  # EXIF Orientation
    except Exception:  # malformed EXIF: re-encoding drops it, which is what we want anyway
        return False
    return orientation == 1 and _single_baseline_scan(data)


def _no_finer_than(image: Image.Image, quality: int) -> bool:
    """Whether the luma and chroma quantisation steps add up to at least those we write at `quality`."""
    tables = image.quantization
    ours = _our_tables(quality)
    try:
        luma, chroma = tables[image.layer[0][3]], tables[image.layer[1][3]]
    except (KeyError, IndexError):
        return False
    return sum(luma) >= sum(ours[0]) and sum(chroma) >= sum(ours[1])


@lru_cache(maxsize=8)
def _our_tables(quality: int) -> tuple[list[int], list[int]]:
    """The luma and chroma quantisation tables that Pillow's encoder writes at `quality`."""
    out = io.BytesIO()
    Image.new("RGB", (16, 16)).save(out, format="JPEG", quality=quality, subsampling="4:2:0")
    tables = Image.open(out).quantization
    return tables[0], tables[1]


def _single_baseline_scan(data: bytes) -> bool:
    """SOF0 frame, one scan, and the end-of-image marker as the last bytes."""
    pos, frame = 2, None
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return False
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start-of-frame (not DHT/JPG/DAC)
            frame = marker
        segment_end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker == 0xDA:  # start of scan: entropy-coded data follows its header
            after = _NEXT_MARKER.search(data, segment_end)
            return (frame == _SOF_BASELINE and after is not None and after.group() == _EOI
                    and after.end() == len(data))
        pos = segment_end
    return False
