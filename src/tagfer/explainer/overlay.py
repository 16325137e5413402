"""Drawing an analysis: the detector's AUs in green, the model's boxes in their own colours (red first)."""

from __future__ import annotations

from typing import Any

from PIL import Image

from tagfer.core.canvas import clip_box
from tagfer.core.imageio import LoadedImage, data_url
from tagfer.explainer.frames import crop_region

__all__ = ["BOX_COLORS", "DETECTOR_COLOR", "box_color", "render_overlay", "png_data_url"]

# Colours of the model's boxes, in box order (red first); green is the detector's.
BOX_COLORS: tuple[str, ...] = ("#e61e1e", "#ff8c00", "#b428c8", "#1e6eff", "#8c5014", "#00a0a0")
DETECTOR_COLOR = "#00c846"


def _rgb(hex_color: str) -> tuple[int, int, int]:
    h = hex_color.lstrip("#")
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


def box_color(i: int) -> str:
    return BOX_COLORS[i % len(BOX_COLORS)]


def render_overlay(img: LoadedImage, analysis: Any) -> Image.Image:
    """Overlay of one face's :class:`tagfer.explainer.records.Analysis`: the detector's active AUs
    (green, ``AUx 0.78``) and the model's boxes (``box_colors``, captioned ``AU12`` or ``box 1``)
    on the analysis frame. Unreadable or empty boxes are not drawn (they are listed in the trace
    and its violations)."""
    from tagfer.au.overlay import LabeledBox, draw_boxes, face_focus  # lazy (start-up time): PIL

    canvas = analysis.canvas
    lbs = [LabeledBox(a["box"], f"AU{a['au']} {a['score']:.2f}", _rgb(DETECTOR_COLOR)) for a in analysis.aus if a["active"]]
    for coords, cap, color in zip(analysis.boxes, analysis.au_labels, analysis.box_colors):
        if coords is None:
            continue
        c = clip_box(coords, canvas)
        if c[0] >= c[2] or c[1] >= c[3]:
            continue
        lbs.append(LabeledBox(c, cap, _rgb(color)))
    if analysis.frame == "face":
        region = analysis.frame_box
        size = (region[2] - region[0], region[3] - region[1])
        return draw_boxes(crop_region(img, region), lbs, canvas=canvas, original_size=size)
    crop = face_focus([analysis.face_bbox], (img.width, img.height))
    return draw_boxes(img.rgb, lbs, canvas=canvas, original_size=(img.width, img.height), crop=crop)


def png_data_url(im: Image.Image) -> str:
    """``data:image/png;base64,…`` of ``im`` (:func:`tagfer.core.imageio.data_url`, fast zlib level)."""
    return data_url(im, "png")
