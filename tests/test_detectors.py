import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from fixtures_openface import astronaut_68, write_openface2, write_openface3  # noqa: F401 (fixture)
from tagfer.au.aus import AUConfig, ground_face, region_boxes_px
from tagfer.au.detectors import (
    DETECTORS,
    AUDetector,
    AUTable,
    DetectionError,
    DetectorSpec,
    MediaPipeAUDetector,
    RegionAUDetector,
    TableAUDetector,
)
from tagfer.au.regions68 import GEOMETRY_MEDIAPIPE, GEOMETRY_OPENFACE, REGIONS_68, region_boxes_68
from tagfer.core.canvas import CanvasTransform, iou
from tagfer.core.imageio import load_image
from tagfer.explainer.frames import reframe
from tiers import examples


def _openface_csv(path, rows, with_key=False, with_landmarks=None):
    aus_r = [1, 2, 4, 5, 6, 7, 9, 10, 12, 14, 15, 17, 20, 23, 25, 26, 45]
    aus_c = aus_r + [28]
    header = ["face", " confidence", " success"] + ([" input"] if with_key else [])
    if with_landmarks is not None:
        header += [f" x_{i}" for i in range(68)] + [f" y_{i}" for i in range(68)]
    header += [f" AU{a:02d}_r" for a in aus_r] + [f" AU{a:02d}_c" for a in aus_c]
    lines = [",".join(header)]
    for i, row in enumerate(rows):
        vals = [str(i), "0.98", str(row.get("success", 1))] + ([row["key"]] if with_key else [])
        if with_landmarks is not None:
            cx, cy = with_landmarks[i]
            vals += [str(cx + (j % 3) - 1) for j in range(68)] + [str(cy + (j % 5) - 2) for j in range(68)]
        vals += [str(row.get("r", {}).get(a, 0.0)) for a in aus_r] + [str(int(row.get("c", {}).get(a, 0))) for a in aus_c]
        lines.append(", ".join(vals))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_protocol_is_satisfied(mp_detector):
    assert isinstance(mp_detector, AUDetector)


# ------------------------------------------------------------------ the region capability
class _KeepsDetect(MediaPipeAUDetector):
    """A subclass that keeps MediaPipe's detect (another mesh source would override ``meshes``)."""


class _OwnScores(MediaPipeAUDetector):
    """A subclass with its own scores (like the ConstAU plugin below): detect overridden."""

    def detect(self, image, key=None):
        tr = CanvasTransform(image.width, image.height, canvas=self.config.canvas)
        return [ground_face(m, tr, self.config, scores={12: 0.9}, detector="own") for m in self.meshes(image)]


class _OwnScoresOwnRegions(_OwnScores):
    def detect_in_regions(self, image, key, region_of):
        return [(reframe(f, region_of(f.mesh.bbox), self.config), region_of(f.mesh.bbox)) for f in self.detect(image, key)]


def test_region_capability_follows_detect():
    """The capability is inherited only with the detect it reproduces: a subclass that overrides
    ``detect`` (its own scores) loses it unless it brings its own ``detect_in_regions``."""
    lm = object()  # never called: isinstance only
    assert isinstance(MediaPipeAUDetector(landmarker=lm), RegionAUDetector)
    assert isinstance(_KeepsDetect(landmarker=lm), RegionAUDetector)
    assert isinstance(_OwnScoresOwnRegions(landmarker=lm), RegionAUDetector)
    for det in (_OwnScores(landmarker=lm), TableAUDetector(AUTable())):
        assert isinstance(det, AUDetector) and not isinstance(det, RegionAUDetector), type(det).__name__
    assert MediaPipeAUDetector.detect_in_regions is not None  # withdrawn on the subclass only


class _FixedMeshes(MediaPipeAUDetector):
    """A mesh-based detector whose faces come from elsewhere (here: meshes found once)."""

    def __init__(self, meshes, config):
        super().__init__(config, landmarker=object(), own_landmarker=False)
        self._meshes = meshes

    def meshes(self, image):
        return self._meshes


@pytest.fixture(scope="module")
def two_face_meshes(landmarker, two_faces_path):
    img = load_image(two_faces_path)
    return img, MediaPipeAUDetector(landmarker=landmarker).meshes(img)


def _faces_json(pairs):
    return [(f.to_json(), [(d.au, d.score, d.active, d.box, d.boxes) for d in f.aus], list(r)) for f, r in pairs]


@settings(max_examples=examples(60), deadline=None)
@given(st.tuples(*(st.floats(-0.3, 0.3) for _ in range(4))), st.sampled_from([256, 512, 448]))
def test_detect_in_regions_equals_detect_then_reframe(two_face_meshes, jitter, canvas):
    """The contract of :class:`RegionAUDetector`: any region per face gives exactly the faces of
    ``detect`` reframed on that region (scores, activations, boxes, records)."""
    img, meshes = two_face_meshes
    det = _FixedMeshes(meshes, AUConfig(canvas=canvas))
    assert isinstance(det, RegionAUDetector)

    def region_of(b):
        w, h = b[2] - b[0], b[3] - b[1]
        return (b[0] + jitter[0] * w, b[1] + jitter[1] * h, b[2] + 1 + jitter[2] * w, b[3] + 1 + jitter[3] * h)

    fast = det.detect_in_regions(img, None, region_of)
    general = [(reframe(f, region_of(f.mesh.bbox), det.config), region_of(f.mesh.bbox)) for f in det.detect(img)]
    assert len(fast) == 2 and _faces_json(fast) == _faces_json(general)


def test_openface_csv_scores_and_presence(tmp_path, landmarker, astronaut_path):
    csv = _openface_csv(tmp_path / "astronaut.csv", [{"r": {12: 4.0, 6: 2.5, 4: 0.5}, "c": {12: 1, 6: 1, 4: 0, 28: 1}}])
    table = AUTable.from_openface(csv)
    assert len(table) == 1
    tf = table.lookup(str(astronaut_path))[0]  # matched by stem
    assert tf.scores[12] == pytest.approx(0.8) and tf.scores[6] == pytest.approx(0.5) and tf.scores[28] == 1.0
    assert tf.active == {**{a: False for a in tf.active}, 12: True, 6: True, 28: True}
    det = TableAUDetector(table, AUConfig(top_k=3), landmarker=landmarker)
    faces = det.detect(load_image(astronaut_path), str(astronaut_path))
    f = faces[0]
    assert f.detector == "openface"
    assert [a.au for a in f.active] == [28, 12, 6]  # AUxx_c decides activation; c-only AU28 scores 1.0
    # Same regions as the default detector: identical boxes for the same AU.
    mp = MediaPipeAUDetector(landmarker=landmarker).detect(load_image(astronaut_path))[0]
    assert {a.au: a.box for a in f.aus}[12] == {a.au: a.box for a in mp.aus}[12]
    assert f.au_list_text.splitlines()[1].startswith("AU12 0.80 [")


def test_openface_directory_key_column_and_failed_rows(tmp_path):
    d = tmp_path / "of"
    d.mkdir()
    _openface_csv(d / "batch.csv", [{"key": "imgs/a.jpg", "r": {12: 5}}, {"key": "imgs/b.jpg", "success": 0, "r": {4: 5}}], with_key=True)
    t = AUTable.from_openface(d)
    assert t.lookup("/data/imgs/a.jpg")[0].scores[12] == 1.0
    assert t.lookup("/data/imgs/b.jpg") is None  # success == 0 rows are skipped
    assert t.lookup("/elsewhere/zzz.jpg") is None


def test_openface_malformed(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="AUxx_r"):
        AUTable.from_openface(p)
    p.write_text("face, AU12_r\n0, high\n")
    with pytest.raises(ValueError, match="x.csv:2"):
        AUTable.from_openface(p)


def test_long_csv(tmp_path):
    p = tmp_path / "aus.csv"
    p.write_text("image,au,score,face\nsub/a.png,AU12,0.9,0\nsub/a.png,4,0.2,0\nsub/a.png,AU06_r,0.7,1\nb.png,AU1,1.5,\n")
    t = AUTable.from_long_csv(p)
    a = t.lookup("/root/sub/a.png")
    assert [f.scores for f in a] == [{12: 0.9, 4: 0.2}, {6: 0.7}]
    assert t.lookup("b.png")[0].scores == {1: 1.0}  # clipped to [0, 1]
    bad = tmp_path / "bad.csv"
    bad.write_text("image,au\nx.png,12\n")
    with pytest.raises(ValueError, match="image, au, score"):
        AUTable.from_long_csv(bad)
    bad.write_text("image,au,score\nx.png,AUx,0.3\n")
    with pytest.raises(ValueError, match="bad.csv:2"):
        AUTable.from_long_csv(bad)


def test_table_detector_missing_image_is_a_per_image_error(tmp_path, landmarker, grace_path):
    p = tmp_path / "aus.csv"
    p.write_text("image,au,score\nother.png,12,0.9\n")
    det = TableAUDetector(AUTable.from_long_csv(p), landmarker=landmarker)
    with pytest.raises(DetectionError) as ei:
        det.detect(load_image(grace_path), str(grace_path))
    assert ei.value.kind == "not_in_table"


def test_table_faces_matched_by_landmark_centre(tmp_path, landmarker, two_faces_path):
    img = load_image(two_faces_path)
    meshes = MediaPipeAUDetector(landmarker=landmarker).meshes(img)
    assert len(meshes) == 2
    centres = [((m.bbox[0] + m.bbox[2]) / 2, (m.bbox[1] + m.bbox[3]) / 2) for m in meshes]
    # Table lists the right face first; centres must still pair them correctly.
    csv = _openface_csv(tmp_path / "two_faces.csv", [{"r": {4: 5.0}}, {"r": {12: 5.0}}], with_landmarks=[centres[1], centres[0]])
    det = TableAUDetector(AUTable.from_openface(csv), landmarker=landmarker, use_landmarks=False)
    left, right = det.detect(img, str(two_faces_path))
    assert left.score(12) == 1.0 and left.score(4) == 0.0
    assert right.score(4) == 1.0 and right.score(12) == 0.0
    assert left.geometry == right.geometry == GEOMETRY_MEDIAPIPE and left.mesh.landmarks.shape[0] == 478


def test_no_face_raises_detection_error(mp_detector, bad_inputs):
    with pytest.raises(DetectionError) as ei:
        mp_detector.detect(load_image(bad_inputs["no_face"]))
    assert ei.value.kind == "no_face"


def test_spec_builds_and_closes(tmp_path):
    det = DetectorSpec(config=AUConfig(top_k=2)).build()
    try:
        assert det.name == "mediapipe" and det.config.top_k == 2
    finally:
        det.close()
    with pytest.raises(ValueError, match="did you mean 'openface'.*mediapipe.*table:CSV"):
        DetectorSpec(kind="opnface:x.csv").build()
    with pytest.raises(ValueError, match="no option 'geometri'.*aus, presence, geometry"):
        DetectorSpec(kind="openface:x.csv?geometri=mediapipe").build()


@pytest.mark.slow
def test_dlib_fallback_finds_small_faces(tmp_path, astronaut_rgb):
    pytest.importorskip("dlib")
    from tagfer.au.faces import FaceLandmarker

    face = Image.fromarray(astronaut_rgb[40:230, 130:320]).resize((70, 70))
    group = Image.new("RGB", (1600, 900), (170, 170, 160))
    for i in range(5):
        group.paste(face, (100 + i * 300, 300 + (i % 2) * 200))
    arr = np.asarray(group)
    with FaceLandmarker(max_faces=10) as plain, FaceLandmarker(max_faces=10, fallback="dlib") as fb:
        n_plain = len(plain.detect(arr))
        found = fb.detect(arr)
    assert len(found) > n_plain
    assert len(found) == 5
    xs = [(f.bbox[0] + f.bbox[2]) / 2 for f in found]
    assert xs == sorted(xs)
    assert any(f.source == "dlib+mediapipe" for f in found)


@pytest.mark.timeout(30)
def test_au_table_that_is_a_fifo_is_refused_unread(tmp_path):
    import os

    from tagfer.au.detectors import AUTable

    fifo = tmp_path / "aus.csv"
    os.mkfifo(fifo)  # reading it would block forever
    for spec in (f"table:{fifo}", f"openface:{fifo}", f"openface:{tmp_path}"):
        with pytest.raises(ValueError, match="not a regular file"):
            DetectorSpec(kind=spec).build()


# ------------------------------------------------------------------ geometry from the table's own landmarks
AU_R = {12: 4.0, 6: 3.0, 25: 2.5, 1: 0.5}


def _canvas_boxes(lm, img, au, bilateral="union"):
    tr = CanvasTransform(img.width, img.height)
    return [tr.box_to_canvas(b) for b in region_boxes_68(lm, au, bilateral)]


def test_openface2_landmarks_place_the_boxes_without_mediapipe(tmp_path, astronaut_path, astronaut_68, mp_detector):
    csv = write_openface2(tmp_path / "astronaut.csv", [{"r": AU_R, "c": {12: 1, 6: 1, 25: 1}, "lm": astronaut_68}])
    det = DetectorSpec(kind=f"openface:{csv}").build()
    try:
        img = load_image(astronaut_path)
        (f,) = det.detect(img, str(astronaut_path))
        assert det._lm is None  # MediaPipe never opened: an independent localiser
    finally:
        det.close()
    assert det.geometry == f.geometry == GEOMETRY_OPENFACE == f.to_json()["geometry"]
    assert f.detector == "openface" and f.mesh.source == "openface"
    assert [a.au for a in f.active] == [12, 6, 25]
    by_au = {a.au: a.box for a in f.aus}
    for au in AU_R:
        assert by_au[au] == _canvas_boxes(astronaut_68, img, au)[0]
    # Independent of MediaPipe's regions, yet on the same parts of the face.
    mp = {a.au: a.box for a in mp_detector.detect(img)[0].aus}
    ious = [iou(by_au[au], mp[au]) for au in AU_R]
    assert all(v > 0.2 for v in ious) and np.mean(ious) > 0.4, ious
    assert sum(by_au[au] != mp[au] for au in AU_R) >= 3


def test_geometry_option_mediapipe_keeps_the_mediapipe_regions(tmp_path, astronaut_path, astronaut_68, mp_detector):
    csv = write_openface2(tmp_path / "astronaut.csv", [{"r": AU_R, "lm": astronaut_68}])
    det = DetectorSpec(kind=f"openface:{csv}?geometry=mediapipe").build()
    try:
        img = load_image(astronaut_path)
        (f,) = det.detect(img, str(astronaut_path))
    finally:
        det.close()
    assert det.geometry == f.geometry == GEOMETRY_MEDIAPIPE
    mp = {a.au: a.box for a in mp_detector.detect(img)[0].aus}
    assert all(a.box == mp[a.au] for a in f.aus if a.au in mp) and set(AU_R) <= set(mp)


def test_region_boxes_68_split_union_and_mirror(astronaut_68):
    for au in REGIONS_68:
        (u,) = region_boxes_68(astronaut_68, au, "union")
        parts = region_boxes_68(astronaut_68, au, "split")
        assert len(parts) == len(REGIONS_68[au].centres)
        assert u == (min(p[0] for p in parts), min(p[1] for p in parts), max(p[2] for p in parts), max(p[3] for p in parts))
    # A mirrored face gives mirrored boxes (side 0 and side 1 swap, offsets mirrored).
    flip = [16 - i for i in range(17)] + [26 - i for i in range(10)] + [27, 28, 29, 30] + [35, 34, 33, 32, 31] + \
        [45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40] + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55] + \
        [64, 63, 62, 61, 60, 67, 66, 65]
    m = astronaut_68[flip] * np.array([-1.0, 1.0])
    for au in (1, 6, 12, 14, 20):
        a, b = region_boxes_68(astronaut_68, au, "split"), region_boxes_68(m, au, "split")
        np.testing.assert_allclose(a[0], [-b[1][2], b[1][1], -b[1][0], b[1][3]], atol=1e-6)


def test_openface3_csv_scores_presence_and_landmarks(tmp_path, astronaut_path, astronaut_68):
    outs = [0.7, 0.1, 0.0, 0.55, -0.2, 0.9, 0.6, 0.3]  # AU 1, 2, 4, 6, 9, 12, 25, 26
    d = tmp_path / "of3"
    d.mkdir()
    write_openface3(d / "face_analysis_astronaut.csv", str(astronaut_path), [{"au": outs, "lm": astronaut_68}])
    write_openface3(d / "face_analysis_empty.csv", "/imgs/empty.jpg", [None])
    table = AUTable.from_openface(d)
    assert table.lookup("/imgs/empty.jpg") is None  # the no-face row is skipped
    (tf,) = table.lookup(str(astronaut_path))
    assert tf.scores == {1: 0.7, 2: 0.1, 4: 0.0, 6: 0.55, 9: 0.0, 12: 0.9, 25: 0.6, 26: 0.3}
    assert [au for au, on in tf.active.items() if on] == [1, 6, 12, 25]
    np.testing.assert_allclose(tf.landmarks, astronaut_68, atol=1e-3)  # 98 WFLW points → the 68 layout
    assert table.geometry == GEOMETRY_OPENFACE
    det = DetectorSpec(kind=f"openface:{d}").build()
    img = load_image(astronaut_path)
    (f,) = det.detect(img, str(astronaut_path))
    det.close()
    assert f.geometry == GEOMETRY_OPENFACE and [a.au for a in f.active] == [12, 1, 25, 6]
    assert {a.au: a.box for a in f.aus}[12] == _canvas_boxes(astronaut_68, img, 12)[0]
    # Another AU order and presence cut, given as spec options.
    t2 = DETECTORS.create(f"openface:{d}?aus=1,2,4,5,6,9,12,15&presence=0.65", DetectorSpec()).table
    (tf2,) = t2.lookup(str(astronaut_path))
    assert tf2.scores[15] == 0.3 and 26 not in tf2.scores and [a for a, on in tf2.active.items() if on] == [1, 9]


def test_openface3_without_landmarks_and_bad_rows(tmp_path, astronaut_path):
    p = write_openface3(tmp_path / "a.csv", "x/a.jpg", [{"au": [0.9] * 8, "box": [10, 20, 50, 80, 0.9]}])
    (tf,) = AUTable.from_openface(p).lookup("/data/x/a.jpg")
    assert tf.landmarks is None and tf.center == (30.0, 50.0)
    assert AUTable.from_openface(p).geometry == GEOMETRY_MEDIAPIPE
    bad = write_openface3(tmp_path / "b.csv", "b.jpg", [{"au": [0.5] * 6}])
    with pytest.raises(ValueError, match="b.csv:2.*6 AU outputs for 8 AUs.*aus="):
        AUTable.from_openface(bad)
    bad.write_text(bad.read_text().replace("[[0.5", "[[oops"))
    with pytest.raises(ValueError, match="b.csv:2: malformed OpenFace 3.0 row"):
        AUTable.from_openface(bad)


def test_degenerate_openface2_landmarks_fall_back_to_mediapipe(tmp_path):
    p = write_openface2(tmp_path / "z.csv", [{"r": {12: 5}, "lm": np.zeros((68, 2))}])
    (tf,) = AUTable.from_openface(p).lookup("z.jpg")
    assert tf.landmarks is None and tf.center == (0.0, 0.0)  # all points at one spot: no usable geometry


# ------------------------------------------------------------------ a detector added from outside the package
PLUGIN = '''
from tagfer.au.aus import ground_face
from tagfer.au.detectors import DETECTORS, MediaPipeAUDetector
from tagfer.core.canvas import CanvasTransform


class ConstAU(MediaPipeAUDetector):
    """Fixed AU scores on every face MediaPipe finds (stands in for GraphAU, OpenFace-3 ...)."""

    name = "constau"

    def __init__(self, scores, config, landmarker):
        super().__init__(config, landmarker=landmarker, own_landmarker=True)
        self.scores = scores

    def detect(self, image, key=None):
        tr = CanvasTransform(image.width, image.height, canvas=self.config.canvas)
        return [ground_face(m, tr, self.config, scores=self.scores, detector=self.name) for m in self.meshes(image)]


@DETECTORS.register("constau", usage="constau:AU=SCORE[,AU=SCORE...][?scale=X]")
def build(target, spec, scale="1"):
    pairs = (p.split("=") for p in target.split(","))
    return ConstAU({int(k): float(v) * float(scale) for k, v in pairs}, spec.config, spec.landmarker())
'''


def test_user_detector_plugin_through_the_cli(tmp_path, monkeypatch, astronaut_path):
    import json

    from typer.testing import CliRunner

    from tagfer.cli import app

    plugin = tmp_path / "my_aus.py"
    plugin.write_text(PLUGIN)
    monkeypatch.setenv("TAGFER_PLUGINS", str(plugin))
    out = tmp_path / "au.jsonl"
    try:
        r = CliRunner().invoke(app, ["au", str(astronaut_path), "--out", str(out), "--no-progress",
                                     "--detector", "constau:12=0.45,4=0.2?scale=2"])
        assert r.exit_code == 0, r.output
        rec = json.loads(out.read_text().splitlines()[0])
        (face,) = rec["faces"]
        assert rec["detector"] == face["detector"] == "constau"
        assert {a["au"]: a["score"] for a in face["aus"]} == {12: 0.9, 4: 0.4}
        assert face["active"] == [12, 4] and face["geometry"] == GEOMETRY_MEDIAPIPE
        assert "constau" in DETECTORS.list()
        r = CliRunner().invoke(app, ["au", str(astronaut_path), "--out", str(tmp_path / "b.jsonl"),
                                     "--detector", "constau:12=1?scael=2"])
        assert r.exit_code == 2 and "no option 'scael'" in r.output
    finally:
        DETECTORS.unregister("constau")
