"""Grid layout of the Grad-CAM figure: one row per image, three cells per row, titles above the cells.

Every size is a constant here so that tests (and readers) can compute the PNG's pixel size:
width = PAD + COLUMNS * (CELL + PAD), height = HEADER_H + rows * ROW_H + PAD.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pytorch_grad_cam.utils.image import show_cam_on_image

CELL = 224  # px, side of each image cell; smaller crops are upscaled (bilinear), larger ones downscaled
PAD = 8  # px around and between cells
COLUMNS = 3  # input crop | CAM of the predicted class | CAM of the true class
FONT_PX = 15  # px, title font size
LINE_H = 20  # px per line of text
TITLE_H = 2 * LINE_H + 4  # px, two title lines above each cell
ROW_H = TITLE_H + CELL + PAD  # px per image row
HEADER_LINES = 3
HEADER_H = HEADER_LINES * LINE_H + 2 * PAD  # px, header text above the first row
LEGEND_W = 120  # px, colour bar of the heatmap scale in the header
CAM_WEIGHT = 0.5  # share of the image (vs. the heatmap) in an overlay

BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
PREDICTED = (190, 20, 20)  # wrong class: red
TRUE = (0, 120, 40)  # right class: green


@dataclass(frozen=True)
class GridRow:
    crop: Image.Image  # the RGB image exactly as the model saw it (after resize + centre crop)
    cam_predicted: np.ndarray  # (H, W) heatmap in [0, 1] for the predicted class
    cam_true: np.ndarray  # (H, W) heatmap in [0, 1] for the true class
    rank: int
    key: str
    true_name: str
    predicted_name: str
    confidence: float  # softmax probability of the predicted class
    true_prob: float  # softmax probability of the true class


def grid_size(rows: int) -> tuple[int, int]:
    """(width, height) in pixels of a grid with `rows` image rows."""
    return PAD + COLUMNS * (CELL + PAD), HEADER_H + rows * ROW_H + PAD


def font(size: int = FONT_PX) -> ImageFont.ImageFont:
    """The grid's font: one with accented Latin and CJK where installed (viz.fonts), else Pillow's default."""
    from viz.fonts import pil_font

    return pil_font(size)


def fit_text(text: str, width: int, face) -> str:
    """`text`, cut and ended with '...' if it is wider than `width` pixels."""
    if face.getlength(text) <= width:
        return text
    while text and face.getlength(text + "...") > width:
        text = text[:-1]
    return text.rstrip() + "..."


def to_cell(crop: Image.Image) -> Image.Image:
    return crop.convert("RGB").resize((CELL, CELL), Image.Resampling.BILINEAR) if crop.size != (CELL, CELL) \
        else crop.convert("RGB")


def overlay(cell: Image.Image, cam: np.ndarray) -> Image.Image:
    """The heatmap (resized to the cell, bilinear) blended over the cell image with grad-cam's colour map."""
    cam = cv2.resize(np.asarray(cam, dtype=np.float32), cell.size, interpolation=cv2.INTER_LINEAR)
    rgb = np.asarray(cell, dtype=np.float32) / 255.0
    return Image.fromarray(show_cam_on_image(rgb, np.clip(cam, 0, 1), use_rgb=True, image_weight=CAM_WEIGHT))


def _legend(canvas: Image.Image, draw: ImageDraw.ImageDraw, face, x: int, y: int) -> None:
    ramp = np.linspace(0, 255, LEGEND_W).astype(np.uint8)[None, :].repeat(10, axis=0)
    bar = cv2.cvtColor(cv2.applyColorMap(ramp, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    canvas.paste(Image.fromarray(bar), (x, y + 4))
    draw.text((x, y + LINE_H - 4), "low", fill=TEXT, font=face)
    draw.text((x + LEGEND_W, y + LINE_H - 4), "high", fill=TEXT, font=face, anchor="ra")


def render_grid(rows: list[GridRow], header: tuple[str, ...]) -> Image.Image:
    """The figure: up to HEADER_LINES header lines (beside a heatmap colour bar), then one row per image."""
    width, height = grid_size(len(rows))
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    face = font()
    text_w = width - 2 * PAD - LEGEND_W - PAD
    for line, text in enumerate(header[:HEADER_LINES]):
        draw.text((PAD, PAD + line * LINE_H), fit_text(text, text_w, face), fill=TEXT, font=face)
    _legend(canvas, draw, face, width - PAD - LEGEND_W, PAD)

    for i, row in enumerate(rows):
        top = HEADER_H + i * ROW_H
        cell = to_cell(row.crop)
        images = (cell, overlay(cell, row.cam_predicted), overlay(cell, row.cam_true))
        titles = ((f"#{row.rank}  {row.key}", TEXT), (f"true: {row.true_name}", TRUE),
                  (f"CAM predicted ({row.confidence:.1%})", TEXT), (row.predicted_name, PREDICTED),
                  (f"CAM true ({row.true_prob:.1%})", TEXT), (row.true_name, TRUE))
        for column, image in enumerate(images):
            left = PAD + column * (CELL + PAD)
            for line in range(2):
                text, colour = titles[2 * column + line]
                draw.text((left, top + line * LINE_H), fit_text(text, CELL, face), fill=colour, font=face)
            canvas.paste(image, (left, top + TITLE_H))
    return canvas


def cam_strip(crop: Image.Image, cam_predicted: np.ndarray, cam_true: np.ndarray, side: int = CELL,
              gap: int = PAD) -> Image.Image:
    """crop | CAM of the predicted class | CAM of the true class, each `side` px, `gap` px apart (the
    report's captions are HTML, so the strip carries no text)."""
    cell = crop.convert("RGB").resize((side, side), Image.Resampling.BILINEAR)
    strip = Image.new("RGB", (3 * side + 2 * gap, side), BACKGROUND)
    for column, image in enumerate((cell, overlay(cell, cam_predicted), overlay(cell, cam_true))):
        strip.paste(image, (column * (side + gap), 0))
    return strip


def thumbnail(crop: Image.Image, side: int) -> Image.Image:
    return crop.convert("RGB").resize((side, side), Image.Resampling.BILINEAR)
