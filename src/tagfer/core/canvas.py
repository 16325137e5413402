"""The virtual 512×512 canvas and box geometry on it.

TAG writes every box as integer pixel coordinates ``[x1, y1, x2, y2]`` on a
virtual ``canvas × canvas`` square (default ``canvas=512``, coordinates
``0 .. canvas-1``), independent of the real image size and of the VLM's own
resizing. This module is the *only* place where image pixels and canvas
coordinates are converted, and the only implementation of IoU in the package.

Mapping (documented choice, the paper only says "aspect ratio preserved"):
the image is scaled uniformly so that its longer side spans the canvas and
is centred along the shorter side (letterbox). With ``s = canvas / max(W, H)``
and offsets ``ox = (canvas - W·s) / 2``, ``oy = (canvas - H·s) / 2``::

    x_canvas = x_px · s + ox        x_px = (x_canvas - ox) / s

``align="topleft"`` puts the padding on the right/bottom instead. For square
images (RAF-DB aligned, FERPlus, AffectNet crops) both choices coincide.

Boxes are treated as continuous rectangles for IoU: area = (x2-x1)·(y2-y1).
All functions are pure (no I/O).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

#: Side of the virtual canvas (the paper's ``canvas=512``): the one default every config and record refers to.
CANVAS = 512
#: AUs in the teacher's / model's AU list (the paper's ``top_k=3``); kept here beside ``CANVAS`` so every
#: layer (and the CLI's defaults) reads the paper's grounding constants without importing the detector.
TOP_K = 3

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class CanvasTransform:
    """Letterbox transform between an image of ``width × height`` pixels and the canvas."""

    width: float
    height: float
    canvas: int = CANVAS
    align: str = "center"

    def __post_init__(self) -> None:
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"image size must be positive, got {self.width}×{self.height}")
        if self.align not in ("center", "topleft"):
            raise ValueError(f"align must be 'center' or 'topleft', got {self.align!r}")

    @property
    def scale(self) -> float:
        return self.canvas / max(self.width, self.height)

    @property
    def offset(self) -> tuple[float, float]:
        if self.align == "topleft":
            return 0.0, 0.0
        s = self.scale
        return (self.canvas - self.width * s) / 2.0, (self.canvas - self.height * s) / 2.0

    # -- points / boxes, float precision -------------------------------------------------
    def points_to_canvas(self, xy: np.ndarray) -> np.ndarray:
        """Map an ``(..., 2)`` array of image-pixel points to canvas coordinates (float)."""
        xy = np.asarray(xy, dtype=np.float64)
        ox, oy = self.offset
        return xy * self.scale + np.array([ox, oy])

    def points_to_image(self, xy: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`points_to_canvas`."""
        xy = np.asarray(xy, dtype=np.float64)
        ox, oy = self.offset
        return (xy - np.array([ox, oy])) / self.scale

    def box_to_canvas(self, box_px: Sequence[float]) -> Box:
        """Image-pixel box → integer canvas box, rounded outward and clipped to the canvas."""
        s = self.scale
        ox, oy = self.offset
        x1, y1, x2, y2 = (float(v) for v in box_px)
        return clip_box(
            (math.floor(x1 * s + ox), math.floor(y1 * s + oy), math.ceil(x2 * s + ox), math.ceil(y2 * s + oy)), self.canvas
        )

    def boxes_to_canvas(self, boxes_px: np.ndarray) -> list[Box]:
        """:meth:`box_to_canvas` of every row of an ``(n, 4)`` array (the same numbers, one numpy pass)."""
        b = np.asarray(boxes_px, dtype=np.float64).reshape(-1, 4)
        ox, oy = self.offset
        shift = np.array([ox, oy, ox, oy])
        scaled = b * self.scale + shift
        out = np.concatenate([np.floor(scaled[:, :2]), np.ceil(scaled[:, 2:])], axis=1)
        if not np.isfinite(out).all():
            raise ValueError("cannot place a box with NaN or infinite coordinates on the canvas")
        np.clip(out, 0, self.canvas - 1, out=out)
        return [tuple(r) for r in out.astype(np.int64).tolist()]

    def box_to_image(self, box_canvas: Sequence[float]) -> tuple[float, float, float, float]:
        """Canvas box → image-pixel box (float), clipped to the image."""
        b = np.asarray(box_canvas, dtype=np.float64).reshape(2, 2)
        p = self.points_to_image(b).reshape(4)
        x1, y1, x2, y2 = (float(v) for v in p)
        return (
            min(max(x1, 0.0), self.width),
            min(max(y1, 0.0), self.height),
            min(max(x2, 0.0), self.width),
            min(max(y2, 0.0), self.height),
        )

    @property
    def content_box(self) -> Box:
        """The canvas region actually covered by the image (the rest is padding)."""
        return self.box_to_canvas((0, 0, self.width, self.height))


def clip_box(box: Sequence[float], canvas: int = CANVAS) -> Box:
    """Round to ints and clip each coordinate to ``0 .. canvas-1``."""
    hi = canvas - 1
    x1, y1, x2, y2 = (int(round(float(v))) for v in box)
    return (min(max(x1, 0), hi), min(max(y1, 0), hi), min(max(x2, 0), hi), min(max(y2, 0), hi))


def is_valid_box(box: Sequence[object], canvas: int = CANVAS) -> bool:
    """A TAG box: 4 integers within ``0 .. canvas-1`` with ``x1 < x2`` and ``y1 < y2``."""
    try:
        x1, y1, x2, y2 = box  # type: ignore[misc]
    except (TypeError, ValueError):
        return False
    for v in (x1, y1, x2, y2):
        # plain ints take the fast path; numpy integers pass, bools (an int subclass) do not
        if type(v) is not int and (isinstance(v, bool) or not isinstance(v, np.integer)):
            return False
    hi = canvas - 1
    return bool(0 <= x1 < x2 <= hi and 0 <= y1 < y2 <= hi)


def clip_boxes(boxes: np.ndarray, canvas: int = CANVAS) -> np.ndarray:
    """Float box array ``(..., 4)`` with every coordinate clipped to ``0 .. canvas-1``, in place."""
    np.maximum(boxes, 0.0, out=boxes)
    np.minimum(boxes, canvas - 1, out=boxes)
    return boxes


def union_box(boxes: Iterable[Sequence[float]]) -> tuple[float, float, float, float]:
    """Smallest box covering all given boxes (pure Python: called per AU region on the hot path)."""
    bs = list(boxes)
    if not bs:
        raise ValueError("union_box of no boxes")
    return (
        float(min(b[0] for b in bs)),
        float(min(b[1] for b in bs)),
        float(max(b[2] for b in bs)),
        float(max(b[3] for b in bs)),
    )


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of float boxes ``a[..., 4]`` and ``b[..., 4]`` broadcast against each other.

    The package's single IoU kernel (few, in-place numpy ops: the rewards call
    it once per batch of rollouts).
    """
    wh_a = np.maximum(a[..., 2:] - a[..., :2], 0.0)
    wh_b = np.maximum(b[..., 2:] - b[..., :2], 0.0)
    area_a = wh_a[..., 0] * wh_a[..., 1]
    area_b = wh_b[..., 0] * wh_b[..., 1]
    wh = np.minimum(a[..., 2:], b[..., 2:])
    wh -= np.maximum(a[..., :2], b[..., :2])
    np.maximum(wh, 0.0, out=wh)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a + area_b
    union -= inter
    out = np.zeros_like(inter)
    np.divide(inter, union, out=out, where=union > 0)
    return out


def iou_matrix(a: np.ndarray | Sequence[Sequence[float]], b: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """Pairwise IoU of boxes ``a`` (k×4) and ``b`` (n×4) → k×n array in [0, 1].

    Degenerate boxes (zero or negative width/height) have zero area and IoU 0
    with everything, including themselves.
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    if a.shape[0] == 0 or b.shape[0] == 0:
        return np.zeros((a.shape[0], b.shape[0]))
    return _iou(a[:, None, :], b[None, :, :])


def iou_pairs(a: np.ndarray | Sequence[Sequence[float]], b: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """Element-wise IoU of aligned boxes ``a[i]``, ``b[i]`` (both m×4) → m values in [0, 1]."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    if a.shape != b.shape:
        raise ValueError(f"iou_pairs needs aligned boxes, got {a.shape} and {b.shape}")
    if a.shape[0] == 0:
        return np.zeros(0)
    return _iou(a, b)


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two boxes (see :func:`iou_matrix`)."""
    return float(iou_matrix([a], [b])[0, 0])
