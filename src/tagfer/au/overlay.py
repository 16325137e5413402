"""Overlays: canvas boxes drawn on the image (the look of the paper's Figures 3 and 8).

Detector AU boxes are green with ``AUx 0.78`` labels; model boxes (used by
``tagfer analyze``) are red. Boxes are given on the canvas and mapped back to
image pixels with :class:`tagfer.core.canvas.CanvasTransform`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from tagfer.core.canvas import CANVAS, CanvasTransform

GREEN = (0, 200, 70)
RED = (230, 30, 30)


@dataclass(frozen=True)
class LabeledBox:
    """A canvas box with a caption and a colour."""

    box: Sequence[float]
    label: str = ""
    color: tuple[int, int, int] = GREEN


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pragma: no cover - Pillow without FreeType
        return ImageFont.load_default()


def place_captions(
    anchors: Sequence[tuple[float, float]], sizes: Sequence[tuple[float, float]], width: float
) -> list[tuple[float, float]]:
    """Top-left corners for caption rectangles: each sits just above its box's top-left
    corner (inside the image width; below the corner when there is no room above), then
    moves down until it overlaps no caption placed before it. Pure; no two results overlap."""
    placed: list[tuple[float, float, float, float]] = []
    for (x1, y1), (tw, th) in zip(anchors, sizes, strict=True):
        tx, ty = min(max(0.0, x1), max(0.0, width - tw)), y1 - th
        if ty < 0:
            ty = max(0.0, y1)
        while any(tx < px + pw and px < tx + tw and ty < py + ph and py < ty + th for px, py, pw, ph in placed):
            ty += th
        placed.append((tx, ty, tw, th))
    return [(x, y) for x, y, _, _ in placed]


def draw_boxes(
    image: Image.Image | np.ndarray,
    boxes: Iterable[LabeledBox],
    canvas: int = CANVAS,
    original_size: tuple[int, int] | None = None,
    min_side: int = 512,
    crop: Sequence[float] | None = None,
) -> Image.Image:
    """Draw canvas boxes on ``image`` and return a new RGB image.

    ``original_size``: the (width, height) the canvas refers to when ``image``
    is a downscaled copy. ``crop``: an (x1, y1, x2, y2) region in original
    pixels to show instead of the whole image (e.g. the face). Small results
    are upscaled to ``min_side`` so labels stay legible.
    """
    im = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    im = im.convert("RGB")
    W, H = original_size or im.size
    tr = CanvasTransform(W, H, canvas=canvas)
    k0 = im.width / W
    ox = oy = 0.0
    if crop is not None:
        cx1, cy1 = max(0.0, crop[0]), max(0.0, crop[1])
        cx2, cy2 = min(float(W), crop[2]), min(float(H), crop[3])
        if cx2 - cx1 >= 2 and cy2 - cy1 >= 2:
            im = im.crop((round(cx1 * k0), round(cy1 * k0), round(cx2 * k0), round(cy2 * k0)))
            ox, oy = cx1, cy1
    up = max(1.0, min_side / max(im.size))
    if up > 1.0:
        im = im.resize((round(im.width * up), round(im.height * up)), Image.Resampling.BICUBIC)
    k = k0 * up  # drawn pixels per original pixel
    draw = ImageDraw.Draw(im)
    lw = max(2, round(max(im.size) / 250))
    font = _font(max(11, round(max(im.size) / 40)))
    boxes = list(boxes)
    drawn = []
    for lb in boxes:  # every box first, then every label: a later box never covers a caption
        bx1, by1, bx2, by2 = tr.box_to_image(lb.box)
        x1, y1, x2, y2 = (bx1 - ox) * k, (by1 - oy) * k, (bx2 - ox) * k, (by2 - oy) * k
        draw.rectangle((x1, y1, x2, y2), outline=lb.color, width=lw)
        drawn.append((lb, x1, y1))
    labelled = [(lb, x1, y1, draw.textbbox((0, 0), lb.label, font=font)) for lb, x1, y1 in drawn if lb.label]
    sizes = [(tb[2] - tb[0] + 6, tb[3] - tb[1] + 6) for _, _, _, tb in labelled]
    spots = place_captions([(x1, y1) for _, x1, y1, _ in labelled], sizes, im.width)
    for (lb, _, _, tb), (tw, th), (tx, ty) in zip(labelled, sizes, spots):
        draw.rectangle((tx, ty, tx + tw, ty + th), fill=lb.color)
        draw.text((tx + 3, ty + 3 - tb[1]), lb.label, fill=(255, 255, 255), font=font)
    return im


def au_overlay(
    image: Image.Image | np.ndarray,
    faces,
    which: str = "active",
    original_size: tuple[int, int] | None = None,
    canvas: int = CANVAS,
    focus: bool = True,
) -> Image.Image:
    """Green detector boxes with ``AUx 0.78`` labels for each face (``which``: "active" | "top" | "all").

    ``focus``: when the faces cover a small part of the picture, show only the
    region around them (face boxes grown by 35%).
    """
    boxes = []
    for f in faces:
        dets = {"active": f.active, "top": f.candidate_pool, "all": f.aus}[which]
        boxes += [LabeledBox(d.box, f"AU{d.au} {d.score:.2f}", GREEN) for d in dets]
    if original_size is not None:
        im_size = original_size
    elif isinstance(image, np.ndarray):
        im_size = (image.shape[1], image.shape[0])
    else:
        im_size = image.size
    crop = face_focus([f.mesh.bbox for f in faces if f.mesh is not None], im_size) if focus else None
    return draw_boxes(image, boxes, canvas=canvas, original_size=original_size, crop=crop)


def face_focus(face_boxes: Sequence[Sequence[float]], size: tuple[int, int], grow: float = 0.35, max_fraction: float = 0.5):
    """Region around the faces (image pixels), or None when it would cover most of the image anyway."""
    if not face_boxes:
        return None
    b = np.asarray(face_boxes, dtype=np.float64).reshape(-1, 4)
    x1, y1, x2, y2 = b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()
    side = max(x2 - x1, y2 - y1) * (1 + 2 * grow)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    region = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    W, H = size
    if side * side >= max_fraction * W * H:
        return None
    return region


def save_png(im: Image.Image, path: str | os.PathLike) -> None:
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    im.save(path, format="PNG")
