"""Tests for tagfer.au.faces: the MediaPipe landmarker stage, its retry for tight crops."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tagfer.au.faces import PAD_GREY, FaceLandmarker


def _tight(rgb: np.ndarray, bbox, cut: float, side: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A square crop ``cut`` inside the face's own landmark box (brow and chin cut off, as in
    RAF-DB / FERPlus / AffectNet crops), resized to ``side`` pixels."""
    x1, y1, x2, y2 = bbox
    cx, cy, s = (x1 + x2) / 2, (y1 + y2) / 2, max(x2 - x1, y2 - y1) * (1 - cut) / 2
    box = (int(cx - s), int(cy - s), int(cx + s), int(cy + s))
    return np.asarray(Image.fromarray(rgb).crop(box).resize((side, side), Image.Resampling.BILINEAR)), box


@pytest.fixture(scope="module")
def bare_landmarker():
    with FaceLandmarker(pad_retry=0) as lm:
        yield lm


@pytest.mark.parametrize("name", ["astronaut", "grace"])
@pytest.mark.parametrize("cut,side", [(0.3, 48), (0.4, 100), (0.3, 224)])
def test_a_tight_crop_is_found_inside_a_border_with_the_full_image_landmarks(
        landmarker, bare_landmarker, astronaut_rgb, grace_rgb, name, cut, side):
    rgb = {"astronaut": astronaut_rgb, "grace": grace_rgb}[name]
    (full,) = landmarker.detect(rgb)
    crop, box = _tight(rgb, full.bbox, cut, side)
    assert bare_landmarker.detect(crop) == []  # BlazeFace alone misses a face that fills the frame
    (face,) = landmarker.detect(crop)
    assert face.source == "mediapipe+pad"
    # the same face: every landmark where the full image put it (mapped into the crop), within 6 % of the IOD
    ref = (full.landmarks[:, :2] - np.array(box[:2])) * (side / (box[2] - box[0]))
    iod = np.linalg.norm(ref[263] - ref[33])
    assert np.linalg.norm(face.landmarks[:, :2] - ref, axis=1).mean() < 0.06 * iod
    # landmarks of the cut-off brow and chin lie outside the crop: mapped back, not clipped
    assert face.bbox[1] < 0 or face.bbox[3] > side
    assert face.bbox == (face.landmarks[:, 0].min(), face.landmarks[:, 1].min(), face.landmarks[:, 0].max(), face.landmarks[:, 1].max())


def test_the_retry_runs_only_when_the_first_search_finds_nothing(landmarker, astronaut_rgb, monkeypatch):
    calls = []
    run = landmarker._run
    monkeypatch.setattr(landmarker, "_run", lambda rgb, ts=None: calls.append(rgb.shape) or run(rgb, ts))
    faces = landmarker.detect(astronaut_rgb)  # a face the first pass finds: one search, the plain result
    assert len(calls) == 1 and [f.source for f in faces] == ["mediapipe"]
    calls.clear()
    grey = np.full((120, 90, 3), PAD_GREY, np.uint8)
    assert landmarker.detect(grey) == []  # no face anywhere: the border invents none
    h, w = 120, 90
    b = round(landmarker.pad_retry * max(h, w))
    assert calls == [(h, w, 3), (h + 2 * b, w + 2 * b, 3)]  # one retry, a border on every side


def test_video_mode_and_pad_retry_zero_never_retry(astronaut_rgb, landmarker):
    (full,) = landmarker.detect(astronaut_rgb)
    crop, _ = _tight(astronaut_rgb, full.bbox, 0.4, 100)
    with FaceLandmarker(running_mode="video") as video:
        assert video.detect(crop, timestamp_ms=0) == []  # tracking mode: frames are never searched twice
    with pytest.raises(ValueError, match="pad_retry"):
        FaceLandmarker(pad_retry=-0.1)


def test_analyze_explains_a_tight_crop_end_to_end(landmarker, astronaut_rgb, tmp_path):
    from tagfer.au.detectors import MediaPipeAUDetector
    from tagfer.core.canvas import is_valid_box
    from tagfer.explainer.analyze import Analyzer
    from tagfer.traces.trace import parse_trace

    (full,) = landmarker.detect(astronaut_rgb)
    crop, _ = _tight(astronaut_rgb, full.bbox, 0.4, 100)
    path = tmp_path / "tight.png"
    Image.fromarray(crop).save(path)
    with Analyzer(detector=MediaPipeAUDetector(landmarker=landmarker)) as an:
        (a,) = an.analyze_image(path)
    assert a.label == "happiness" and a.well_formed
    assert parse_trace(a.trace).well_formed
    assert a.boxes and all(is_valid_box(b, a.canvas) for b in a.boxes)
    assert all(is_valid_box(d["box"], a.canvas) for d in a.aus)
