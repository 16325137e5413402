"""Shared fixtures (real sample faces, one MediaPipe landmarker per session) and the test tiers.

Tiers (``make test-fast`` / ``make test``): a test is marked ``model`` when it uses a fixture
that loads a transformers model (:data:`MODEL_FIXTURES`), ``browser`` when it drives Chromium
(:data:`BROWSER_FIXTURES`, or the mark itself); a whole module opts in with a module-level
``pytestmark = pytest.mark.model`` (or ``slow``/``browser``). ``-m "not slow and not model and
not browser"`` (the fast tier) does not even import the modules so marked, and fails a test
that imports transformers or Playwright without its mark.
"""

from __future__ import annotations

import os
import re
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GLOG_minloglevel", "2")

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tagfer.samples import sample_face_path


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
    from tagfer.faces import FaceLandmarker

    with FaceLandmarker() as lm:
        yield lm


@pytest.fixture(scope="session")
def mp_detector(landmarker):
    from tagfer.detectors import MediaPipeAUDetector

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


# Per-area fixture modules (one owner each), registered as plugins.
pytest_plugins = ["fixtures_vlm", "fixtures_backends", "fixtures_analyze", "fixtures_data", "fixtures_train", "fixtures_evaluate"]

# --------------------------------------------------------------------------- tiers
#: Fixtures that build or load a transformers model: a test using one (directly or through
#: another fixture) is marked ``model``.
MODEL_FIXTURES = frozenset({"tiny_vlm_dir", "tiny_vlm", "train_tiny_dir"})
#: Fixtures that launch Chromium: a test using one is marked ``browser``.
BROWSER_FIXTURES = frozenset({"browser"})
#: Modules a fast-tier test must not import (what ``model`` and ``browser`` tests need).
_HEAVY = {"transformers": "model", "playwright": "browser"}
_MODULE_MARK = re.compile(r"^pytestmark\s*=.*$", re.M)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "model: builds or loads a (tiny) transformers model; not in make test-fast")
    config.addinivalue_line("markers", "browser: drives Chromium through Playwright; not in make test-fast")


def _excluded_marks(config: pytest.Config) -> set[str]:
    """Marks the ``-m`` expression excludes outright (``not slow and not model`` → {slow, model})."""
    expr = config.getoption("markexpr", "") or ""
    return set(re.findall(r"\bnot\s+(\w+)", expr))


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Skip importing a test module whose module-level ``pytestmark`` names an excluded mark
    (so e.g. ``import torch`` at its top never runs in the fast tier)."""
    if collection_path.suffix != ".py" or not collection_path.name.startswith("test_"):
        return None
    excluded = _excluded_marks(config)
    if not excluded:
        return None
    m = _MODULE_MARK.search(collection_path.read_text(encoding="utf-8"))
    if m and excluded & set(re.findall(r"mark\.(\w+)", m.group(0))):
        return True
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & MODEL_FIXTURES:
            item.add_marker(pytest.mark.model)
        if names & BROWSER_FIXTURES:
            item.add_marker(pytest.mark.browser)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """In a run that excludes ``model``/``browser``, fail a test that imports their libraries unmarked."""
    before = set(sys.modules)
    result = yield
    excluded = _excluded_marks(item.config)
    for mod, mark in _HEAVY.items():
        if mark in excluded and mod in sys.modules and mod not in before:
            pytest.fail(f"{item.nodeid} imported {mod}: mark it @pytest.mark.{mark} (or use a fixture of that tier)", pytrace=False)
    return result
