import io

import numpy as np
import pytest
from PIL import Image

from preprocess.encode import UndecodableImage, fit_within, reencode


def _image_bytes(mode: str, size=(120, 80), fmt="JPEG") -> bytes:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    out = io.BytesIO()
    (rgb if mode == "RGB" else rgb.convert(mode)).save(out, format=fmt)
    return out.getvalue()


@pytest.mark.parametrize("w,h,m,expected", [(500, 375, 500, (500, 375)), (1000, 750, 500, (500, 375)),
                                            (300, 900, 450, (150, 450)), (10, 10, 500, (10, 10))])
def test_fit_within_keeps_aspect_and_never_upscales(w, h, m, expected):
    assert fit_within(w, h, m) == expected


@pytest.mark.parametrize("mode,fmt,fix", [("CMYK", "JPEG", "mode-cmyk"), ("L", "JPEG", "mode-l"),
                                          ("RGBA", "PNG", "mode-rgba"), ("P", "PNG", "mode-p")])
def test_reencode_normalises_to_rgb_jpeg(mode, fmt, fix):
    result = reencode(_image_bytes(mode, fmt=fmt), max_side=500, quality=90)
    image = Image.open(io.BytesIO(result.jpeg))
    assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (120, 80))
    assert fix in result.fixes
    assert ("format-png" in result.fixes) == (fmt == "PNG")


def test_reencode_resizes_longer_side():
    result = reencode(_image_bytes("RGB", size=(300, 200)), max_side=150)
    assert Image.open(io.BytesIO(result.jpeg)).size == (150, 100)
    assert result.fixes == ["resized"]


def test_reencode_is_deterministic():
    data = _image_bytes("CMYK", size=(640, 480))
    assert reencode(data, max_side=256).jpeg == reencode(data, max_side=256).jpeg


@pytest.mark.parametrize("data", [b"", b"not an image at all", _image_bytes("RGB")[:300]])
def test_reencode_rejects_corrupt_bytes(data):
    with pytest.raises(UndecodableImage):
        reencode(data)
