"""Fonts for figures whose text holds class names in any script: accented Latin, Greek, Cyrillic, CJK.

Matplotlib ships DejaVu Sans (Latin, Greek, Cyrillic) and no CJK font, so CJK text needs one installed on the
machine (Debian/Ubuntu: `apt-get install fonts-noto-cjk`). Where one is, matplotlib falls back to it glyph by
glyph and Pillow draws with it (it has Latin too). Where none is, those characters are drawn as boxes and one
note says so, instead of matplotlib's warning per character.
"""

from __future__ import annotations

import contextlib
import functools
import re
import sys
import warnings

LATIN = "DejaVu Sans"  # ships with matplotlib: always installed
# Families with CJK coverage, most wanted first (Noto Sans CJK is fonts-noto-cjk on Debian/Ubuntu).
CJK_FAMILIES = ("Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans CJK TC", "Noto Sans CJK KR", "Noto Sans SC",
                "Noto Sans JP", "Source Han Sans SC", "Source Han Sans", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei",
                "Droid Sans Fallback", "Microsoft YaHei", "SimHei", "PingFang SC", "Hiragino Sans", "Arial Unicode MS")
MISSING_GLYPH = re.compile(r"Glyph (\d+) .*missing from (current )?font")


def _entry(family: str):
    """matplotlib's FontEntry of `family` (its regular face when it has several), or None if not installed."""
    from matplotlib import font_manager

    faces = [f for f in font_manager.fontManager.ttflist if f.name == family]
    regular = [f for f in faces if f.style == "normal" and f.weight in (400, "normal", "regular")]
    return (regular or faces or [None])[0]


@functools.cache
def cjk_family() -> str | None:
    """The first installed family of CJK_FAMILIES, or None."""
    return next((family for family in CJK_FAMILIES if _entry(family) is not None), None)


def families() -> list[str]:
    """matplotlib's font.family: DejaVu Sans, then the CJK font for what DejaVu lacks (only installed ones, since
    a missing family costs a logged 'findfont' line per text)."""
    cjk = cjk_family()
    return [LATIN, cjk] if cjk else [LATIN]


def pil_font(size: int):
    """A Pillow font of `size` px covering the most scripts installed: the CJK font (which has Latin too) where
    there is one, else DejaVu Sans, else Pillow's built-in default."""
    from PIL import ImageFont

    for family in (cjk_family(), LATIN):
        entry = _entry(family) if family else None
        if entry is not None:
            try:
                return ImageFont.truetype(entry.fname, size, index=entry.index)
            except OSError:  # a font file matplotlib listed but FreeType cannot open
                continue
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: only a small bitmap font
        return ImageFont.load_default()


@contextlib.contextmanager
def any_script(who: str):
    """matplotlib figures made and saved inside use families(); characters no installed font has are drawn as
    boxes with one note on stderr (`who`: the command that prints it) instead of one warning per character."""
    import matplotlib

    with matplotlib.rc_context({"font.family": families()}), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    missing = []
    for w in caught:
        match = MISSING_GLYPH.search(str(w.message))
        if match:
            missing.append(chr(int(match[1])))
        else:  # not ours to hide
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if missing:
        shown = "".join(dict.fromkeys(missing))[:12]
        print(f"{who}: note: no installed font has {shown!r}: drawn as boxes (install one that has them, e.g. "
              f"fonts-noto-cjk for Chinese, Japanese and Korean)", file=sys.stderr)
