"""Shared fixtures: real sample faces and one MediaPipe landmarker per session.

The test tiers (``make test-fast`` / ``make test``) are the plugin ``tests/tiers.py``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GLOG_minloglevel", "2")

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tagfer.core.samples import sample_face_path


@pytest.fixture(scope="session")
def astronaut_path() -> Path:
    return sample_face_path("astronaut")


@pytest.fixture(scope="session")
def grace_path() -> Path:
    return sample_face_path("grace_hopper")


@pytest.fixture(scope="session")
def astronaut_rgb(astronaut_path) -> np.ndarray:
    return np.asarray(Image.open(astronaut_path).convert("RGB"))


@pytest.fixture(scope="session")
def grace_rgb(grace_path) -> np.ndarray:
    return np.asarray(Image.open(grace_path).convert("RGB"))


@pytest.fixture(scope="session")
def landmarker():
    from tagfer.au.faces import FaceLandmarker

    with FaceLandmarker() as lm:
        yield lm


@pytest.fixture(scope="session")
def mp_detector(landmarker):
    from tagfer.au.detectors import MediaPipeAUDetector

    return MediaPipeAUDetector(landmarker=landmarker)


@pytest.fixture(scope="session")
def face_crop_path(tmp_path_factory, astronaut_rgb) -> Path:
    """The astronaut's face cropped like an aligned FER image (eyes at ~38%, mouth at ~75% of the height)."""
    p = tmp_path_factory.mktemp("crop") / "astronaut_face.jpg"
    Image.fromarray(astronaut_rgb[53:169, 168:284]).resize((224, 224)).save(p, quality=95)
    return p


@pytest.fixture(scope="session")
def two_faces_path(tmp_path_factory, astronaut_rgb, grace_rgb) -> Path:
    """Grace Hopper (large, right) beside the astronaut's face (smaller, left)."""
    left = Image.fromarray(astronaut_rgb[40:230, 130:320])  # 190 px face crop
    right = Image.fromarray(grace_rgb)  # 512×600
    canvas = Image.new("RGB", (190 + 40 + 512, 600), (200, 200, 200))
    canvas.paste(left, (0, 200))
    canvas.paste(right, (230, 0))
    p = tmp_path_factory.mktemp("multi") / "two_faces.png"
    canvas.save(p)
    return p


@pytest.fixture(scope="session")
def bad_inputs(tmp_path_factory, astronaut_rgb) -> dict[str, Path]:
    """One file per kind of bad input, keyed by the expected outcome."""
    d = tmp_path_factory.mktemp("bad")
    out: dict[str, Path] = {}
    good = d / "good.jpg"
    Image.fromarray(astronaut_rgb).save(good, quality=92)
    raw = good.read_bytes()
    (d / "corrupt.jpg").write_bytes(raw[:200] + b"\x00garbage" * 50)
    out["corrupt"] = d / "corrupt.jpg"
    (d / "text.jpg").write_text("this is not an image\n")
    out["not_an_image"] = d / "text.jpg"
    (d / "empty.png").write_bytes(b"")
    out["empty_file"] = d / "empty.png"
    Image.new("RGB", (1, 1), (128, 128, 128)).save(d / "one.png")
    out["too_small"] = d / "one.png"
    out["not_found"] = d / "missing.jpg"
    from skimage import data

    Image.fromarray(data.coffee()).save(d / "coffee.jpg")
    out["no_face"] = d / "coffee.jpg"
    return out


# pytester (for test_tiers.py), the test tiers (tests/tiers.py) and the per-area fixture modules (one owner each).
pytest_plugins = ["pytester", "tiers", "fixtures_vlm", "fixtures_backends", "fixtures_analyze", "fixtures_data", "fixtures_train", "fixtures_evaluate", "fixtures_imageio"]
