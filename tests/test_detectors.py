import numpy as np
import pytest
from PIL import Image

from tagfer.au.aus import AUConfig
from tagfer.au.detectors import AUDetector, AUTable, DetectionError, DetectorSpec, MediaPipeAUDetector, TableAUDetector
from tagfer.core.imageio import load_image


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
    assert f.au_list.splitlines()[1].startswith("AU12 0.80 [")


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
    det = TableAUDetector(AUTable.from_openface(csv), landmarker=landmarker)
    left, right = det.detect(img, str(two_faces_path))
    assert left.score(12) == 1.0 and left.score(4) == 0.0
    assert right.score(4) == 1.0 and right.score(12) == 0.0


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
    with pytest.raises(ValueError):
        DetectorSpec(kind="graphau:x").build()


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
            AUTable.from_spec(spec)
