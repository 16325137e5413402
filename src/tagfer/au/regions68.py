"""AU boxes on the 68-point (iBUG 300-W / dlib / OpenFace 2.x) landmark layout: a localiser
independent of MediaPipe's mesh, for the cross-detector evaluation (paper §4, AU IoU against a
second detector).

Each AU has one centre per side, the mean of a few landmarks plus an offset, and a rectangle
around it; offsets and half-sizes are in units of ``d``, the distance between the inner eye
corners (39, 42) — the JAA-Net convention of placing AU centres at landmark pairs with offsets
measured by the inner-eye-corner distance. ``d`` is about a fifth of the face width, so a
half-size of 0.5 gives a box one ``d`` wide. Offsets are taken in the face's own frame (x along
the outer eye corners 36→45, y down the face), so boxes follow the roll; the box returned is the
axis-aligned hull of the rotated rectangle, in image pixels. Bilateral AUs give one box per side
(``bilateral="split"``) or their union (``"union"``, the default, as for the MediaPipe regions).

OpenFace 3.0 writes 98 WFLW points; :func:`wflw98_to_68` picks the 68 that correspond.
Pure functions, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tagfer.au.aus import AUConfig, AUDetection, FaceAUs
from tagfer.au.faces import FaceMesh
from tagfer.core.canvas import CanvasTransform, union_box

__all__ = ["Region68", "REGIONS_68", "GEOMETRY_OPENFACE", "GEOMETRY_MEDIAPIPE", "region_boxes_68", "wflw98_to_68",
           "inner_eye_distance", "ground_face_68"]

#: The two geometries a record can carry (``FaceAUs.geometry``, ``AUTable.geometry``).
GEOMETRY_OPENFACE = "openface-landmarks"
GEOMETRY_MEDIAPIPE = "mediapipe-regions"


@dataclass(frozen=True)
class Region68:
    """``centres``: per side, the landmark indices whose mean is the centre; ``offset``: (dx, dy)
    in ``d`` units for the first side (dx is mirrored for the second); ``half``: (half width,
    half height) in ``d`` units."""

    centres: tuple[tuple[int, ...], ...]
    offset: tuple[float, float] = (0.0, 0.0)
    half: tuple[float, float] = (0.5, 0.5)


_LIPS = tuple(range(48, 60))
_INNER_LIPS = tuple(range(60, 68))
_EYE_R = tuple(range(36, 42))
_EYE_L = tuple(range(42, 48))

# Side 0 is the subject's right (image left); a negative dx moves outwards on that side.
REGIONS_68: dict[int, Region68] = {
    1: Region68(((21,), (22,)), (0.0, -0.35), (0.45, 0.4)),          # frontalis above the inner brow ends
    2: Region68(((17, 18), (25, 26)), (0.0, -0.35), (0.5, 0.4)),     # frontalis above the outer brows
    4: Region68(((21, 22, 27),), (0.0, -0.1), (0.8, 0.4)),           # corrugator / procerus between the brows
    5: Region68(((37, 38), (43, 44)), (0.0, 0.0), (0.6, 0.3)),       # upper lids
    6: Region68(((40, 41), (46, 47)), (-0.1, 0.55), (0.6, 0.4)),     # cheeks below the eyes
    7: Region68((_EYE_R, _EYE_L), (0.0, 0.0), (0.7, 0.35)),          # lids
    9: Region68(((27, 28, 29),), (0.0, 0.0), (0.55, 0.55)),          # nasal root and sides
    10: Region68(((31, 50), (35, 52)), (-0.15, -0.05), (0.55, 0.45)),  # between nostril wing and upper lip
    12: Region68(((48,), (54,)), (-0.1, -0.1), (0.5, 0.5)),          # lip corners, pulled up and out
    14: Region68(((48,), (54,)), (-0.25, 0.0), (0.4, 0.4)),          # dimples beside the corners
    15: Region68(((48,), (54,)), (0.0, 0.35), (0.45, 0.45)),         # below the corners
    16: Region68(((56, 57, 58),), (0.0, 0.15), (0.7, 0.4)),          # lower lip
    17: Region68(((8, 57),), (0.0, 0.0), (0.7, 0.5)),                # chin boss
    18: Region68((_LIPS,), (0.0, 0.0), (1.0, 0.6)),
    20: Region68(((48,), (54,)), (-0.3, 0.2), (0.5, 0.5)),           # stretched corners
    22: Region68((_LIPS,), (0.0, 0.0), (1.0, 0.6)),
    23: Region68((_LIPS,), (0.0, 0.0), (1.0, 0.6)),
    24: Region68((_LIPS,), (0.0, 0.0), (1.0, 0.6)),
    25: Region68((_INNER_LIPS,), (0.0, 0.0), (0.8, 0.45)),           # the lips' opening
    26: Region68(((5, 6), (10, 11)), (0.0, -0.1), (0.6, 0.6)),       # jaw, both sides
    28: Region68((_LIPS,), (0.0, 0.0), (1.0, 0.6)),
    43: Region68((_EYE_R, _EYE_L), (0.0, 0.0), (0.65, 0.35)),
    45: Region68((_EYE_R, _EYE_L), (0.0, 0.0), (0.65, 0.35)),
}


def inner_eye_distance(lm: np.ndarray) -> float:
    """``d``: distance between the inner eye corners (39, 42) of a 68-point layout."""
    return float(np.linalg.norm(np.asarray(lm, dtype=np.float64)[42, :2] - np.asarray(lm, dtype=np.float64)[39, :2]))


def _frame68(lm: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    v = lm[45, :2] - lm[36, :2]
    n = float(np.linalg.norm(v))
    ex = v / n if n > 0 else np.array([1.0, 0.0])
    ey = np.array([-ex[1], ex[0]])
    d = inner_eye_distance(lm) or (n / 3.0) or 1.0
    return ex, ey, d


def region_boxes_68(landmarks: np.ndarray, au: int, bilateral: str = "union") -> list[tuple[float, float, float, float]]:
    """Image-pixel box(es) of ``au`` from 68 landmarks (N×2 or N×3, image pixels): one per side with
    ``bilateral="split"``, their union with ``"union"``. ``KeyError`` for an AU without a region."""
    if bilateral not in ("union", "split"):
        raise ValueError(f"bilateral must be 'union' or 'split', got {bilateral!r}")
    reg = REGIONS_68[au]
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.ndim != 2 or lm.shape[0] != 68:
        raise ValueError(f"expected 68 landmarks, got an array of shape {lm.shape}")
    ex, ey, d = _frame68(lm)
    hw, hh = reg.half[0] * d, reg.half[1] * d
    boxes = []
    for side, idx in enumerate(reg.centres):
        dx = reg.offset[0] if side == 0 else -reg.offset[0]
        c = lm[list(idx), :2].mean(axis=0) + (dx * ex + reg.offset[1] * ey) * d
        corners = [c + a * hw * ex + b * hh * ey for a in (-1, 1) for b in (-1, 1)]
        xs, ys = [p[0] for p in corners], [p[1] for p in corners]
        boxes.append((float(min(xs)), float(min(ys)), float(max(xs)), float(max(ys))))
    return [union_box(boxes)] if bilateral == "union" or len(boxes) == 1 else boxes


# WFLW's 98 points → the 68-point layout: every second jaw point, the upper brow arcs, nose,
# six of the eight points per eye (corners + two per lid), the 20 mouth points as they are.
_WFLW_TO_68: tuple[int, ...] = (
    *range(0, 33, 2),                      # jaw 0–16
    33, 34, 35, 36, 37, 42, 43, 44, 45, 46,  # brows 17–26
    51, 52, 53, 54, 55, 56, 57, 58, 59,    # nose 27–35
    60, 61, 63, 64, 65, 67,                # right eye 36–41
    68, 69, 71, 72, 73, 75,                # left eye 42–47
    *range(76, 96),                        # mouth 48–67
)


def wflw98_to_68(landmarks: np.ndarray) -> np.ndarray:
    """The 68-point layout from WFLW's 98 points (OpenFace 3.0's STAR landmarks)."""
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.ndim != 2 or lm.shape[0] != 98:
        raise ValueError(f"expected 98 WFLW landmarks, got an array of shape {lm.shape}")
    return lm[list(_WFLW_TO_68)]


def ground_face_68(
    landmarks: np.ndarray,
    transform: CanvasTransform,
    config: AUConfig,
    scores: dict[int, float],
    active: dict[int, bool] | None = None,
    detector: str = "openface",
    source: str = "openface",
) -> FaceAUs:
    """A :class:`~tagfer.au.aus.FaceAUs` whose boxes come from 68 landmarks (image pixels), with
    ``geometry="openface-landmarks"``: the counterpart of :func:`tagfer.au.aus.ground_face` for a
    detector that brings its own landmarks. AUs without a 68-point region are skipped; ``active``
    overrides the threshold rule per AU."""
    lm = np.asarray(landmarks, dtype=np.float64)[:, :2]
    dets = []
    for au, s in scores.items():
        if au not in REGIONS_68:
            continue
        px = region_boxes_68(lm, au, config.bilateral)
        cboxes = tuple(transform.box_to_canvas(b) for b in px)
        union = transform.box_to_canvas(union_box(px))
        is_active = bool(active[au]) if active is not None and au in active else s >= config.threshold_for(au)
        dets.append(AUDetection(au=int(au), score=float(s), active=is_active, box=union, boxes=cboxes if len(cboxes) > 1 else ()))
    dets.sort(key=lambda a: (-a.score, a.au))
    bbox = (float(lm[:, 0].min()), float(lm[:, 1].min()), float(lm[:, 0].max()), float(lm[:, 1].max()))
    mesh = FaceMesh(bbox=bbox, landmarks=np.column_stack([lm, np.zeros(len(lm))]), blendshapes={}, source=source)
    return FaceAUs(mesh=mesh, aus=dets, bbox_canvas=transform.box_to_canvas(bbox), top_k=config.top_k, detector=detector,
                   candidate_threshold=config.candidate_threshold, geometry=GEOMETRY_OPENFACE)
