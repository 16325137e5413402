"""OpenFace output fixtures in both layouts, built from a real face's landmarks.

``astronaut_68``: the astronaut's 68 landmarks (image pixels), taken from MediaPipe's mesh at the
vertices that correspond to the 68-point layout — plausible landmarks to place boxes with, so
the 68-point geometry can be compared with MediaPipe's regions on the same face.
``write_openface2`` / ``write_openface3``: CSVs as ``FaceLandmarkImg`` (2.x) and ``openface
detect`` (3.0) write them.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

#: MediaPipe mesh vertex for each of the 68 points (jaw, brows, nose, eyes, outer and inner lips).
MP_TO_68 = (127, 234, 93, 132, 58, 172, 136, 150, 152, 379, 365, 397, 288, 361, 323, 454, 356,
            70, 63, 105, 66, 107, 336, 296, 334, 293, 300, 168, 197, 5, 4, 75, 97, 2, 326, 305,
            33, 160, 158, 133, 153, 144, 362, 385, 387, 263, 373, 380,
            61, 39, 37, 0, 267, 269, 291, 405, 314, 17, 84, 181, 78, 82, 13, 312, 308, 317, 14, 87)

#: OpenFace 2.x intensity columns (FaceLandmarkImg -aus).
OF2_AUS = (1, 2, 4, 5, 6, 7, 9, 10, 12, 14, 15, 17, 20, 23, 25, 26, 45)


@pytest.fixture(scope="session")
def astronaut_68(astronaut_path) -> np.ndarray:
    from tagfer.au.detectors import MediaPipeAUDetector
    from tagfer.au.faces import FaceLandmarker
    from tagfer.core.imageio import load_image

    with FaceLandmarker() as lm:
        mesh = MediaPipeAUDetector(landmarker=lm).meshes(load_image(astronaut_path))[0]
    return np.asarray(mesh.landmarks[list(MP_TO_68), :2], dtype=np.float64)


def write_openface2(path: Path, faces: list[dict], key: str | None = None) -> Path:
    """``faces``: dicts with ``r`` {au: 0–5}, ``c`` {au: 0/1}, optional ``lm`` (68×2), ``success``."""
    with_lm = any("lm" in f for f in faces)
    header = ["face", "confidence", "success"] + (["input"] if key else [])
    header += ([f"x_{i}" for i in range(68)] + [f"y_{i}" for i in range(68)]) if with_lm else []
    header += [f"AU{a:02d}_r" for a in OF2_AUS] + [f"AU{a:02d}_c" for a in OF2_AUS + (28,)]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([" " + h for h in header])  # FaceLandmarkImg pads the header with spaces
        for i, f in enumerate(faces):
            row = [i, 0.98, f.get("success", 1)] + ([key] if key else [])
            if with_lm:
                lm = np.asarray(f["lm"])
                row += [f"{v:.3f}" for v in lm[:, 0]] + [f"{v:.3f}" for v in lm[:, 1]]
            row += [f.get("r", {}).get(a, 0.0) for a in OF2_AUS] + [int(f.get("c", {}).get(a, 0)) for a in OF2_AUS + (28,)]
            w.writerow(row)
    return path


def to_wflw98(lm68: np.ndarray) -> np.ndarray:
    """98 WFLW points whose 68-point subset is ``lm68`` (the other points interpolated)."""
    from tagfer.au.regions68 import _WFLW_TO_68

    out = np.full((98, 2), np.nan)
    out[list(_WFLW_TO_68)] = lm68
    for i in range(98):  # fill the unmapped points from the nearest mapped neighbours
        if np.isnan(out[i, 0]):
            j = next(k for k in range(i - 1, -1, -1) if not np.isnan(out[k, 0]))
            out[i] = out[j] + 0.5
    return out


def write_openface3(path: Path, image_path: str, faces: list[dict | None]) -> Path:
    """``faces``: dicts with ``au`` (8 outputs), optional ``lm`` (68×2, written as 98 WFLW points) and
    ``box``; None is an image without a face (OpenFace 3.0 writes one empty row)."""
    header = ["timestamp", "image_path", "face_id", "face_detection", "landmarks", "emotion", "gaze_yaw",
              "gaze_pitch", "action_units"]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for i, f in enumerate(faces):
            if f is None:
                w.writerow(["2025-06-01 12:00:00", image_path, "", "", "", "", "", "", ""])
                continue
            lm = json.dumps(to_wflw98(np.asarray(f["lm"])).round(3).tolist()) if "lm" in f else ""
            w.writerow(["2025-06-01 12:00:00", image_path, i, json.dumps(f.get("box", [10.0, 10.0, 90.0, 90.0, 0.99])),
                        lm, 1, 0.01, -0.02, json.dumps([list(f["au"])])])
    return path
