"""FFCV-style re-encoding: any image bytes -> 3-channel RGB JPEG with the longer side <= max_side.

Everything is normalised (CMYK, grayscale, palette, alpha, PNG stored in a JPEG field) so that
every decoder downstream (DALI's nvJPEG, PIL, OpenCV) sees the same kind of file.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

from PIL import Image, ImageFile

# A truncated file must fail loudly so it is reported as skipped, not padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# ImageNet's largest images are ~90 MP panoramas; still refuse decompression bombs beyond that.
Image.MAX_IMAGE_PIXELS = 200_000_000


class UndecodableImage(ValueError):
    """The bytes are not an image PIL can fully decode; the message says why."""


@dataclass
class EncodeResult:
    jpeg: bytes
    width: int
    height: int
    fixes: list[str] = field(default_factory=list)  # e.g. ["cmyk", "resized"]


def fit_within(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Size with the longer side <= max_side, aspect kept, never upscaled."""
    longer = max(width, height)
    if longer <= max_side:
        return width, height
    scale = max_side / longer
    return max(1, round(width * scale)), max(1, round(height * scale))


def reencode(data: bytes, *, max_side: int = 500, quality: int = 90) -> EncodeResult:
    """Decode `data`, convert to RGB, shrink to `max_side`, encode as baseline JPEG at `quality`."""
    if not data:
        raise UndecodableImage("empty image bytes")
    try:
        image = Image.open(io.BytesIO(data))
        source_format = image.format
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
        else:
            image = image.convert("RGB")

    size = fit_within(image.width, image.height, max_side)
    if size != image.size:
        fixes.append("resized")
        # Pillow's reducing_gap makes big downscales fast with no visible cost (it is deterministic).
        image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)

    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality, subsampling="4:2:0", optimize=False)
    return EncodeResult(out.getvalue(), image.width, image.height, fixes)
