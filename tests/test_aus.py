import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from tagfer.aus import AU_IDS, REGIONS, AUConfig, au_number, au_scores, geometric_cues, ground_face, region_boxes_px
from tagfer.canvas import CanvasTransform
from tagfer.imageio import load_image
from tagfer.trace import parse_au_list

MOUTH_AUS = (10, 12, 14, 15, 16, 17, 18, 20, 22, 23, 24, 25, 26, 28)
BROW_AUS = (1, 2, 4)
EYE_AUS = (5, 7, 43)


def _center_y(box):
    return (box[1] + box[3]) / 2


@pytest.fixture(scope="module")
def faces(mp_detector, astronaut_path, grace_path, face_crop_path):
    return {name: mp_detector.detect(load_image(p), str(p)) for name, p in [("astronaut", astronaut_path), ("grace", grace_path), ("crop", face_crop_path)]}


@pytest.mark.parametrize("name", ["astronaut", "grace", "crop"])
def test_smiles_rank_au12_in_top3(faces, name):
    f = faces[name][0]
    top3 = [a.au for a in f.aus[:3]]
    assert 12 in top3, [(a.au, round(a.score, 2)) for a in f.aus[:5]]
    assert all(0.0 <= a.score <= 1.0 for a in f.aus)
    assert [a.score for a in f.aus] == sorted((a.score for a in f.aus), reverse=True)


def test_broad_smile_activates_au12(faces):
    for name in ("astronaut", "crop"):
        f = faces[name][0]
        assert 12 in [a.au for a in f.top]
        assert f.score(12) > 0.8


def test_region_layout_on_real_faces(faces):
    for name, fl in faces.items():
        f = fl[0]
        boxes = {a.au: a.box for a in f.aus}
        fx1, fy1, fx2, fy2 = f.bbox_canvas
        face_mid = (fy1 + fy2) / 2
        for au in MOUTH_AUS:
            assert _center_y(boxes[au]) > face_mid, (name, au)
        eye_top = min(boxes[au][1] for au in EYE_AUS)
        for au in BROW_AUS:
            assert _center_y(boxes[au]) < _center_y(boxes[5]), (name, au)
            assert boxes[au][1] < eye_top, (name, au)
        for a in f.aus:  # every box lies within the face box grown by 10%
            x1, y1, x2, y2 = a.box
            m = 0.1 * (fx2 - fx1)
            assert fx1 - m <= x1 < x2 <= fx2 + m and fy1 - m <= y1 < y2 <= fy2 + m, (name, a.au)


def test_face_crop_mouth_in_lower_half_of_canvas(faces):
    f = faces["crop"][0]
    for a in f.aus:
        if a.au in MOUTH_AUS:
            assert _center_y(a.box) > 256, a
        if a.au in (16, 17, 18, 22, 23, 24, 25, 26, 28):  # lips and chin: the whole box
            assert a.box[1] >= 256, a
        if a.au in BROW_AUS:
            assert _center_y(a.box) < 256


def test_record_views_and_au_list(faces):
    f = faces["astronaut"][0]
    assert [a.au for a in f.active] == [a.au for a in f.aus if a.score >= 0.3]
    assert len(f.top) == min(3, len(f.active))
    items = parse_au_list(f.au_list)
    assert [(it.au, tuple(it.box)) for it in items] == [(a.au, a.box) for a in f.top]
    for line, a in zip(f.au_list.splitlines(), f.top):
        assert line == f"AU{a.au} {a.score:.2f} [{a.box[0]}, {a.box[1]}, {a.box[2]}, {a.box[3]}]"
    assert len(f.au_boxes) == len(set(f.au_boxes)) <= len(f.active)
    js = f.to_json()
    assert js["top"] == [a.au for a in f.top] and js["au_list"] == f.au_list


def test_threshold_and_top_k_are_parameters(mp_detector, astronaut_path):
    img = load_image(astronaut_path)
    mesh = mp_detector.meshes(img)[0]
    tr = CanvasTransform(img.width, img.height)
    lo = ground_face(mesh, tr, AUConfig(threshold=0.05, top_k=5))
    hi = ground_face(mesh, tr, AUConfig(threshold=0.9, top_k=1))
    assert len(lo.active) > len(hi.active) >= 1
    assert len(lo.top) == 5 and len(hi.top) == 1
    none = ground_face(mesh, tr, AUConfig(threshold=1.01))
    assert none.active == [] and none.au_list == "" and none.au_boxes == []


def test_bilateral_split_boxes_inside_union(mp_detector, astronaut_path):
    img = load_image(astronaut_path)
    mesh = mp_detector.meshes(img)[0]
    f = ground_face(mesh, CanvasTransform(img.width, img.height), AUConfig(bilateral="split"))
    a12 = next(a for a in f.aus if a.au == 12)
    assert len(a12.boxes) == 2
    (l, r) = a12.boxes
    assert l[2] <= r[2] and l[0] < r[0]
    for b in a12.boxes:
        assert a12.box[0] <= b[0] and a12.box[1] <= b[1] and b[2] <= a12.box[2] and b[3] <= a12.box[3]
    a17 = next(a for a in f.aus if a.au == 17)  # midline AU: one box
    assert a17.boxes == ()


def test_canvas_boxes_follow_aspect_preserving_transform(mp_detector, grace_path):
    img = load_image(grace_path)  # 512×600: letterboxed horizontally
    f = mp_detector.detect(img)[0]
    tr = CanvasTransform(img.width, img.height)
    ox, _ = tr.offset
    assert ox > 0
    for a in f.aus:
        x1, y1, x2, y2 = tr.box_to_image(a.box)
        assert 0 <= x1 < x2 <= img.width and 0 <= y1 < y2 <= img.height


# ------------------------------------------------------------------ pure functions
def _rotate(lm, deg, scale, shift):
    t = np.deg2rad(deg)
    R = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    out = lm.copy()
    out[:, :2] = lm[:, :2] @ R.T * scale + shift
    return out


@settings(max_examples=25, deadline=None)
@given(deg=st.floats(-40, 40), scale=st.floats(0.2, 5), dx=st.floats(-500, 500), dy=st.floats(-500, 500))
def test_geometric_cues_invariant_to_similarity(mesh_landmarks, deg, scale, dx, dy):
    g0 = geometric_cues(mesh_landmarks)
    g1 = geometric_cues(_rotate(mesh_landmarks, deg, scale, np.array([dx, dy])))
    for k in g0:
        assert g1[k] == pytest.approx(g0[k], abs=1e-6)


@pytest.fixture(scope="module")
def mesh_landmarks(mp_detector, astronaut_path):
    return mp_detector.meshes(load_image(astronaut_path))[0].landmarks.copy()


def test_scores_without_landmarks_and_calibration():
    bs = {"mouthSmileLeft": 0.8, "mouthSmileRight": 0.6, "eyeSquintLeft": 0.25, "eyeSquintRight": 0.25, "jawOpen": 0.4}
    s = au_scores(bs, None)
    assert set(s) == set(AU_IDS)
    assert s[12] == pytest.approx(0.7) and s[26] == pytest.approx(0.4)
    assert s[7] == 0.0  # eyeSquint rest level subtracted
    assert s[25] == 0.0 and s[23] == 0.0
    s2 = au_scores(bs, None, AUConfig(calibration={"eyeSquint": (0.0, 0.5)}))
    assert s2[7] == pytest.approx(0.5)


def test_region_boxes_unknown_au_and_bad_mode(mesh_landmarks):
    with pytest.raises(KeyError):
        region_boxes_px(mesh_landmarks, 99)
    with pytest.raises(ValueError):
        region_boxes_px(mesh_landmarks, 12, bilateral="left")
    assert set(REGIONS) >= set(AU_IDS)


@pytest.mark.parametrize("text,n", [("AU12", 12), ("au_06", 6), (" AU04_r", 4), ("AU45_c", 45), ("7", 7), (9, 9)])
def test_au_number(text, n):
    assert au_number(text) == n


@pytest.mark.parametrize("bad", ["AU", "AUx", "A12", "confidence", "AU123"])
def test_au_number_rejects(bad):
    with pytest.raises(ValueError):
        au_number(bad)


def test_head_pose_is_near_frontal(faces):
    pose = faces["astronaut"][0].mesh.head_pose
    assert abs(pose["yaw"]) < 20 and abs(pose["roll"]) < 20


def test_flipped_face_mirrors_boxes(mp_detector, face_crop_path, tmp_path):
    img = Image.open(face_crop_path)
    p = tmp_path / "flip.png"
    img.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(p)
    a = mp_detector.detect(load_image(face_crop_path))[0]
    b = mp_detector.detect(load_image(p))[0]
    ba, bb = {d.au: d.box for d in a.aus}, {d.au: d.box for d in b.aus}
    for au in (12, 4, 17, 26):  # symmetric/union boxes mirror about the vertical midline
        x1, y1, x2, y2 = ba[au]
        m = bb[au]
        assert abs((511 - x2) - m[0]) <= 12 and abs((511 - x1) - m[2]) <= 12 and abs(y1 - m[1]) <= 12


def test_largest_face_is_the_biggest_mesh_first_on_ties():
    from types import SimpleNamespace

    from tagfer.aus import largest_face

    def face(name, area):
        return SimpleNamespace(name=name, mesh=None if area is None else SimpleNamespace(area=area))

    assert largest_face([face("a", 10.0), face("b", 30.0), face("c", 20.0)]).name == "b"
    assert largest_face([face("none", None), face("tiny", 0.5)]).name == "tiny"  # no mesh counts as 0
    assert largest_face([face("first", 5.0), face("second", 5.0)]).name == "first"
    with pytest.raises(ValueError):
        largest_face([])
