"""The analysis frame: the square region around a face that becomes its canvas (pure geometry, plus the crop)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from tagfer.au.aus import AUConfig, FaceAUs, ground_face
from tagfer.au.regions68 import GEOMETRY_OPENFACE, ground_face_68
from tagfer.core.canvas import CanvasTransform
from tagfer.core.imageio import LoadedImage

__all__ = ["face_region", "reframe", "crop_region"]


def face_region(bbox: Sequence[float], width: float, height: float, margin: float = 0.15) -> tuple[float, float, float, float]:
    """Square region (image pixels) centred on ``bbox``, side ``max(w, h)·(1 + 2·margin)``, clipped to the image."""
    x1, y1, x2, y2 = (float(v) for v in bbox)
    side = max(x2 - x1, y2 - y1, 1.0) * (1.0 + 2.0 * margin)
    cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    rx1, ry1 = max(0.0, cx - side / 2.0), max(0.0, cy - side / 2.0)
    rx2, ry2 = min(float(width), cx + side / 2.0), min(float(height), cy + side / 2.0)
    if rx2 - rx1 < 1.0 or ry2 - ry1 < 1.0:
        return 0.0, 0.0, float(width), float(height)
    return rx1, ry1, rx2, ry2


def reframe(face: FaceAUs, region: Sequence[float], config: AUConfig) -> FaceAUs:
    """The same face's AUs with boxes on the canvas of ``region`` (same scores and activations). A
    detector that can ground straight on a region does it in one step
    (:class:`tagfer.au.detectors.RegionAUDetector`, the analyzer's fast path); this is the general one."""
    if face.mesh is None:
        raise ValueError("reframing needs the face's landmarks")
    x1, y1, x2, y2 = (float(v) for v in region)
    mesh = face.mesh.shifted(x1, y1)
    tr = CanvasTransform(x2 - x1, y2 - y1, canvas=config.canvas)
    scores = {a.au: a.score for a in face.aus}
    active = {a.au: a.active for a in face.aus}
    if face.geometry == GEOMETRY_OPENFACE:  # boxes placed on the table's own 68 landmarks, not MediaPipe's mesh
        return ground_face_68(mesh.landmarks[:, :2], tr, config, scores, active=active, detector=face.detector,
                              source=mesh.source)
    return ground_face(mesh, tr, config, scores=scores, active=active, detector=face.detector)


def crop_region(img: LoadedImage, region: Sequence[float]) -> Image.Image:
    """The pixels of ``region`` (original-image coordinates) from a possibly downscaled decode."""
    s = img.scale
    h, w = img.rgb.shape[:2]
    x1, y1 = int(np.floor(region[0] * s)), int(np.floor(region[1] * s))
    x2, y2 = int(np.ceil(region[2] * s)), int(np.ceil(region[3] * s))
    x1, y1, x2, y2 = max(0, x1), max(0, y1), min(w, max(x2, x1 + 1)), min(h, max(y2, y1 + 1))
    return Image.fromarray(img.rgb[y1:y2, x1:x2])
