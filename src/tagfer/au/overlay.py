"""Overlays: canvas boxes drawn on the image (the look of the paper's Figures 3 and 8).

Detector AU boxes are green with ``AUx 0.78`` labels; model boxes (used by
``tagfer analyze``) are red. Boxes are given on the canvas and mapped back to
image pixels with :class:`tagfer.core.canvas.CanvasTransform`. A rectangle drawn
twice gets one outline and one caption listing both labels; captions never
overlap; an optional legend panel under the picture explains colours and names
(:func:`render_boxes` returns the layout with the image).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from tagfer.au.aus import AU_NAMES
from tagfer.core.canvas import CANVAS, CanvasTransform

GREEN = (0, 200, 70)
RED = (230, 30, 30)


@dataclass(frozen=True)
class LabeledBox:
    """A canvas box with a caption and a colour."""

    box: Sequence[float]
    label: str = ""
    color: tuple[int, int, int] = GREEN
    outside: bool = False  # caption above the box, else below it — never over it (a face box's caption)


@dataclass(frozen=True)
class LegendLine:
    """One line of the legend panel under an overlay: a colour swatch (``color``; None: no
    swatch) and its text. ``heading``: drawn larger (the label line)."""

    text: str
    color: tuple[int, int, int] | None = None
    heading: bool = False


@dataclass(frozen=True)
class Tag:
    """A caption drawn on the picture: its rectangle ``(x, y, w, h)`` in output pixels."""

    rect: tuple[float, float, float, float]
    text: str
    color: tuple[int, int, int]


@dataclass(frozen=True)
class LegendEntry:
    """A legend line as drawn: its swatch rectangle ``(x, y, w, h)`` (None: no swatch) and the
    rectangle of its (possibly wrapped) text block."""

    line: LegendLine
    swatch: tuple[float, float, float, float] | None
    rect: tuple[float, float, float, float]
    lines: tuple[str, ...]


@dataclass
class Rendered:
    """What :func:`render_boxes` drew: the image, its tags and its legend (layout data for tests and
    for callers that place more on top)."""

    image: Image.Image
    tags: list[Tag]
    legend: list[LegendEntry]
    picture_height: int  # rows above the legend panel


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pragma: no cover - Pillow without FreeType
        return ImageFont.load_default()


def place_captions(
    anchors: Sequence[tuple[float, float]], sizes: Sequence[tuple[float, float]], width: float,
    bottoms: Sequence[float | None] | None = None, height: float | None = None,
) -> list[tuple[float, float]]:
    """Top-left corners for caption rectangles: each sits just above its box's top-left
    corner (inside the image width; below the corner when there is no room above), then
    moves down until it overlaps no caption placed before it. Pure; no two results overlap.

    ``bottoms[i]`` (a box's bottom edge, not None) asks for an *outside* caption: above the
    box when it fits inside the image, else just below the box's bottom edge (inside
    ``height`` when given: over the box's lower edge only when the box fills the image); it
    moves away from the box, not into it, to avoid earlier captions. Outside captions are
    placed before the others, so a corner caption never pushes one onto the box."""
    n = len(anchors)
    bottoms = list(bottoms) if bottoms is not None else [None] * n
    if len(sizes) != n or len(bottoms) != n:
        raise ValueError("anchors, sizes and bottoms must have the same length")
    order = [i for i in range(n) if bottoms[i] is not None] + [i for i in range(n) if bottoms[i] is None]
    placed: list[tuple[float, float, float, float]] = []
    out: list[tuple[float, float]] = [(0.0, 0.0)] * n

    def hits(tx: float, ty: float, tw: float, th: float) -> bool:
        return any(tx < px + pw and px < tx + tw and ty < py + ph and py < ty + th for px, py, pw, ph in placed)

    for i in order:
        (x1, y1), (tw, th), y2 = anchors[i], sizes[i], bottoms[i]
        tx = min(max(0.0, x1), max(0.0, width - tw))
        if y2 is None:
            ty = y1 - th
            if ty < 0:
                ty = max(0.0, y1)
            while hits(tx, ty, tw, th):
                ty += th
        else:
            above = y1 - th >= 0
            ty = y1 - th if above else max(0.0, y2)
            if not above and height is not None and ty + th > height:
                ty = max(0.0, height - th)
            step = -th if above else th
            while hits(tx, ty, tw, th):
                if above and ty + step < 0:  # no room further up: go below the box instead
                    above, step = False, th
                    ty = max(0.0, y2)
                    continue
                ty += step
        placed.append((tx, ty, tw, th))
        out[i] = (tx, ty)
    return out


def merge_boxes(boxes: Iterable[LabeledBox]) -> list[LabeledBox]:
    """One box per distinct rectangle (canvas coordinates rounded to integers): a box drawn twice
    (two AUs sharing a region, or a cited AU that is also the detector's) gets one outline, in the
    colour of its first occurrence, and one caption listing every distinct label (``" · "``)."""
    out: dict[tuple[int, ...], tuple[LabeledBox, list[str]]] = {}
    for lb in boxes:
        key = tuple(int(round(float(v))) for v in lb.box)
        if key not in out:
            out[key] = (lb, [])
        labels = out[key][1]
        if lb.label and lb.label not in labels:
            labels.append(lb.label)
    return [LabeledBox(first.box, " · ".join(labels), first.color, first.outside) for first, labels in out.values()]


def wrap_text(text: str, width: float, measure) -> list[str]:
    """``text`` cut into lines no wider than ``width`` (``measure(s)`` → pixels): at spaces, and inside
    a word only when the word alone is too wide. Pure; the lines joined with spaces give back the
    words of ``text``."""
    lines: list[str] = []
    cur = ""
    for word in text.split():
        cand = f"{cur} {word}" if cur else word
        if measure(cand) <= width:
            cur = cand
            continue
        if cur:
            lines.append(cur)
        cur = ""
        while measure(word) > width and len(word) > 1:  # hard-cut a word wider than the panel
            k = len(word) - 1
            while k > 1 and measure(word[:k]) > width:
                k -= 1
            lines.append(word[:k])
            word = word[k:]
        cur = word
    if cur:
        lines.append(cur)
    return lines


def render_boxes(
    image: Image.Image | np.ndarray,
    boxes: Iterable[LabeledBox],
    canvas: int = CANVAS,
    original_size: tuple[int, int] | None = None,
    min_side: int = 512,
    crop: Sequence[float] | None = None,
    legend: Sequence[LegendLine] = (),
) -> Rendered:
    """Draw canvas boxes on ``image`` (see :func:`draw_boxes`) and, when ``legend`` is given, a
    white legend panel under the picture: one line per :class:`LegendLine`, its swatch in the
    line's colour, long lines wrapped. Boxes with the same rectangle are merged first
    (:func:`merge_boxes`), so no caption is stacked on a duplicate; captions never overlap
    (:func:`place_captions`)."""
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
    fsize = max(11, round(max(im.size) / 40))
    font = _font(fsize)
    boxes = merge_boxes(boxes)
    drawn = []
    for lb in boxes:  # every box first, then every label: a later box never covers a caption
        bx1, by1, bx2, by2 = tr.box_to_image(lb.box)
        x1, y1, x2, y2 = (bx1 - ox) * k, (by1 - oy) * k, (bx2 - ox) * k, (by2 - oy) * k
        draw.rectangle((x1, y1, x2, y2), outline=lb.color, width=lw)
        drawn.append((lb, x1, y1, y2 + lw / 2))
    labelled = [(lb, x1, y1, y2, draw.textbbox((0, 0), lb.label, font=font)) for lb, x1, y1, y2 in drawn if lb.label]
    sizes = [(tb[2] - tb[0] + 6, tb[3] - tb[1] + 6) for *_, tb in labelled]
    spots = place_captions([(x1, y1 - (lw / 2 if lb.outside else 0)) for lb, x1, y1, _, _ in labelled], sizes, im.width,
                           [y2 if lb.outside else None for lb, _, _, y2, _ in labelled], im.height)
    tags: list[Tag] = []
    for (lb, _, _, _, tb), (tw, th), (tx, ty) in zip(labelled, sizes, spots):
        draw.rectangle((tx, ty, tx + tw, ty + th), fill=lb.color)
        draw.text((tx + 3, ty + 3 - tb[1]), lb.label, fill=(255, 255, 255), font=font)
        tags.append(Tag((tx, ty, tw, th), lb.label, lb.color))
    picture_h = im.height
    entries: list[LegendEntry] = []
    if legend:
        im, entries = _draw_legend(im, legend, fsize)
    return Rendered(im, tags, entries, picture_h)


def _draw_legend(im: Image.Image, legend: Sequence[LegendLine], fsize: int) -> tuple[Image.Image, list[LegendEntry]]:
    """``im`` with a legend panel appended below it (same width), and the drawn entries."""
    pad = max(6, fsize // 2)
    fonts = {False: _font(fsize), True: _font(round(fsize * 1.35))}
    scratch = ImageDraw.Draw(im)
    sw = fsize  # swatch side
    plan = []
    y = pad
    for line in legend:
        font = fonts[line.heading]
        x_text = pad + (sw + pad // 2 if line.color is not None else 0)
        avail = im.width - x_text - pad
        wrapped = wrap_text(line.text, avail, lambda s, f=font: scratch.textlength(s, font=f)) or [""]
        asc, desc = font.getmetrics()
        lh = asc + desc + 2
        plan.append((line, font, x_text, y, wrapped, lh))
        y += lh * len(wrapped) + pad // 2
    panel_h = y + pad // 2
    out = Image.new("RGB", (im.width, im.height + panel_h), (255, 255, 255))
    out.paste(im, (0, 0))
    draw = ImageDraw.Draw(out)
    draw.line((0, im.height, im.width, im.height), fill=(200, 200, 200), width=1)
    entries = []
    for line, font, x_text, y0, wrapped, lh in plan:
        top = im.height + y0
        swatch = None
        if line.color is not None:
            sy = top + (lh - sw) / 2
            swatch = (float(pad), float(sy), float(sw), float(sw))
            draw.rectangle((pad, sy, pad + sw - 1, sy + sw - 1), fill=line.color)
        width = 0.0
        for j, text in enumerate(wrapped):
            draw.text((x_text, top + j * lh), text, fill=(20, 20, 20), font=font)
            width = max(width, draw.textlength(text, font=font))
        entries.append(LegendEntry(line, swatch, (float(x_text), float(top), width, float(lh * len(wrapped))), tuple(wrapped)))
    return out, entries


def draw_boxes(
    image: Image.Image | np.ndarray,
    boxes: Iterable[LabeledBox],
    canvas: int = CANVAS,
    original_size: tuple[int, int] | None = None,
    min_side: int = 512,
    crop: Sequence[float] | None = None,
    legend: Sequence[LegendLine] = (),
) -> Image.Image:
    """Draw canvas boxes on ``image`` and return a new RGB image.

    ``original_size``: the (width, height) the canvas refers to when ``image``
    is a downscaled copy. ``crop``: an (x1, y1, x2, y2) region in original
    pixels to show instead of the whole image (e.g. the face). Small results
    are upscaled to ``min_side`` so labels stay legible. ``legend``: lines of a
    legend panel added under the picture (:func:`render_boxes`).
    """
    return render_boxes(image, boxes, canvas, original_size, min_side, crop, legend).image


def au_overlay(
    image: Image.Image | np.ndarray,
    faces,
    which: str = "active",
    original_size: tuple[int, int] | None = None,
    canvas: int = CANVAS,
    focus: bool = True,
    legend: bool = True,
) -> Image.Image:
    """Green detector boxes with ``AUx 0.78`` labels for each face (``which``: "active" | "top" | "all").

    ``focus``: when the faces cover a small part of the picture, show only the
    region around them (face boxes grown by 35%). ``legend``: a panel under the
    picture naming each AU (``AU12 Lip Corner Puller 0.90``; one line per face
    when there are several).
    """
    boxes = []
    lines: list[LegendLine] = []
    for i, f in enumerate(faces):
        dets = {"active": f.active, "top": f.candidate_pool, "all": f.aus}[which]
        boxes += [LabeledBox(d.box, f"AU{d.au} {d.score:.2f}", GREEN) for d in dets]
        named = [f"AU{d.au} {AU_NAMES.get(d.au, '')} {d.score:.2f}".replace("  ", " ") for d in dets]
        if len(faces) == 1:
            lines += [LegendLine(t, GREEN) for t in named]
        else:
            lines.append(LegendLine(f"face {i + 1}: " + (", ".join(named) or "no AU"), GREEN))
    if legend and not lines:
        lines.append(LegendLine("no activated AU" if faces else "no face found"))
    if original_size is not None:
        im_size = original_size
    elif isinstance(image, np.ndarray):
        im_size = (image.shape[1], image.shape[0])
    else:
        im_size = image.size
    crop = face_focus([f.mesh.bbox for f in faces if f.mesh is not None], im_size) if focus else None
    return draw_boxes(image, boxes, canvas=canvas, original_size=original_size, crop=crop, legend=lines if legend else ())


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
