import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from tiers import examples
from tagfer.au.aus import AU_IDS, REGIONS, AUConfig, _face_frame, au_number, au_scores, frontalize, geometric_cues, ground_face, region_boxes_px
from tagfer.core.canvas import CanvasTransform
from tagfer.core.imageio import load_image
from tagfer.traces.trace import parse_au_list

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
        assert 12 in [a.au for a in f.candidate_pool]
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
    confident = [a for a in f.active if a.score >= AUConfig().candidate_threshold]
    assert [a.au for a in f.candidate_pool] == [a.au for a in confident[:3]]
    items = parse_au_list(f.au_list_text)
    assert [(it.au, tuple(it.box)) for it in items] == [(a.au, a.box) for a in f.candidate_pool]
    for line, a in zip(f.au_list_text.splitlines(), f.candidate_pool):
        assert line == f"AU{a.au} {a.score:.2f} [{a.box[0]}, {a.box[1]}, {a.box[2]}, {a.box[3]}]"
    assert f.au_boxes == [a.box for a in f.active]  # one box per activated AU: n counts AUs, shared boxes repeat
    js = f.to_json()
    assert js["top"] == [a.au for a in f.candidate_pool] and js["au_list"] == f.au_list_text


def test_threshold_and_top_k_are_parameters(mp_detector, astronaut_path):
    img = load_image(astronaut_path)
    mesh = mp_detector.meshes(img)[0]
    tr = CanvasTransform(img.width, img.height)
    lo = ground_face(mesh, tr, AUConfig(threshold=0.05, candidate_threshold=0.05, top_k=5))
    hi = ground_face(mesh, tr, AUConfig(threshold=0.9, top_k=1))
    assert len(lo.active) > len(hi.active) >= 1
    assert len(lo.candidate_pool) == 5 and len(hi.candidate_pool) == 1
    none = ground_face(mesh, tr, AUConfig(threshold=1.01))
    assert none.active == [] and none.au_list_text == "" and none.au_boxes == []


def test_activation_and_candidate_thresholds_are_separate(mp_detector, astronaut_path):
    """Activated AUs (B_AU) and the teacher's confident candidates are two thresholds (paper App. D)."""
    img = load_image(astronaut_path)
    mesh = mp_detector.meshes(img)[0]
    tr = CanvasTransform(img.width, img.height)
    default = ground_face(mesh, tr)
    assert AUConfig().threshold < AUConfig().candidate_threshold
    assert all(a.score >= 0.5 for a in default.candidate_pool) and all(a.score >= 0.3 for a in default.active)
    no_pool = ground_face(mesh, tr, AUConfig(threshold=0.3, candidate_threshold=1.01))
    assert no_pool.candidate_pool == [] and no_pool.au_list_text == ""  # no confident candidate ...
    assert no_pool.active == default.active and len(no_pool.au_boxes) == len(default.active) >= 1  # ... R_AU still applies
    one = ground_face(mesh, tr, AUConfig(threshold=0.3, candidate_threshold=0.3))
    assert one.candidate_pool == one.active[:3]  # a single threshold: the old behaviour


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


@settings(max_examples=examples(25), deadline=None)
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


def _region_reference(lm: np.ndarray, au: int) -> list[tuple[float, float, float, float]]:
    """Each side's box written out directly: the landmarks' extent in the face frame widened by
    the margins, its four corners rotated back to image axes, their axis-aligned hull."""
    ex, ey, iod = _face_frame(lm)
    mx, mu, md = (m * iod for m in REGIONS[au].margin)
    out = []
    for side in REGIONS[au].sides:
        u, v = lm[list(side), :2] @ ex, lm[list(side), :2] @ ey
        corners = [(a, b) for a in (u.min() - mx, u.max() + mx) for b in (v.min() - mu, v.max() + md)]
        xs = [a * ex[0] + b * ey[0] for a, b in corners]
        ys = [a * ex[1] + b * ey[1] for a, b in corners]
        out.append((min(xs), min(ys), max(xs), max(ys)))
    return out


@settings(max_examples=examples(25), deadline=None)
@given(deg=st.floats(-60, 60), scale=st.floats(0.2, 5), dx=st.floats(-500, 500), dy=st.floats(-500, 500))
def test_region_boxes_match_the_per_side_definition(mesh_landmarks, deg, scale, dx, dy):
    lm = _rotate(mesh_landmarks, deg, scale, np.array([dx, dy]))
    for au in REGIONS:
        ref = _region_reference(lm, au)
        assert np.allclose(region_boxes_px(lm, au, "split"), ref, rtol=0, atol=1e-9)
        union = [(min(b[0] for b in ref), min(b[1] for b in ref), max(b[2] for b in ref), max(b[3] for b in ref))]
        assert np.allclose(region_boxes_px(lm, au, "union"), union, rtol=0, atol=1e-9)


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


# ------------------------------------------------------------------ pose normalisation and AU cues (issue 13)
def _rot(yaw: float, pitch: float, roll: float) -> np.ndarray:
    y, p, r = np.deg2rad([yaw, pitch, roll])
    rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    return rz @ ry @ rx


def _turn(lm: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Turn the head by ``q`` (MediaPipe camera axes) about the landmark centroid, in image axes."""
    flip = np.array([1.0, -1.0, -1.0])
    c = lm[:, :3].mean(axis=0)
    out = lm.copy()
    out[:, :3] = ((lm[:, :3] - c) * flip) @ q.T * flip + c
    return out


@pytest.fixture(scope="module")
def grace_mesh(mp_detector, grace_path):
    m = mp_detector.meshes(load_image(grace_path))[0]
    assert m.rotation is not None and m.rotation.shape == (3, 3)
    return m


@settings(max_examples=examples(20), deadline=None)
@given(yaw=st.floats(-40, 40), pitch=st.floats(-25, 25), roll=st.floats(-30, 30))
def test_pose_normalisation_cancels_a_pure_rotation(grace_mesh, yaw, pitch, roll):
    q = _rot(yaw, pitch, roll)
    turned = _turn(grace_mesh.landmarks, q)
    r1 = q @ grace_mesh.rotation  # what MediaPipe would report for the turned head
    f0 = frontalize(grace_mesh.landmarks, grace_mesh.rotation)
    np.testing.assert_allclose(frontalize(turned, r1), f0, atol=1e-6)
    g0, g1 = geometric_cues(grace_mesh.landmarks, grace_mesh.rotation), geometric_cues(turned, r1)
    for k in g0:
        assert g1[k] == pytest.approx(g0[k], abs=1e-6)


def test_unnormalised_cues_do_change_under_head_turn(grace_mesh):
    turned = _turn(grace_mesh.landmarks, _rot(0, 20, 0))
    g0, g1 = geometric_cues(grace_mesh.landmarks), geometric_cues(turned)
    # A 20° nod moves the vertical cues by more than their rest-to-action calibration span.
    assert abs(g1["g_corner"] - g0["g_corner"]) > 0.03 and abs(g1["g_brow"] - g0["g_brow"]) > 0.02


def test_frontalize_uses_the_matrix_sign_convention(grace_mesh):
    """Undoing MediaPipe's rotation brings the two outer eye corners to the same depth."""
    lm, r = grace_mesh.landmarks, grace_mesh.rotation
    turned = _turn(lm, _rot(30, 0, 0))
    iod = np.linalg.norm(lm[263, :2] - lm[33, :2])
    f = frontalize(turned, _rot(30, 0, 0) @ r)
    assert abs(f[263, 2] - f[33, 2]) / iod < 0.05 < abs(turned[263, 2] - turned[33, 2]) / iod


# Blendshapes of a face at rest with everything MediaPipe scores near zero.
_REST_BS: dict[str, float] = {}


def _moved(lm: np.ndarray, moves: dict[int, tuple[float, float]]) -> np.ndarray:
    """Move points by (dx, dy) in IOD units of the face frame (x towards the subject's left eye, y down)."""
    ex, ey, iod = _face_frame(lm)
    out = lm.copy()
    for i, (dx, dy) in moves.items():
        out[i, :2] += (dx * ex + dy * ey) * iod
    return out


BROWS = (107, 66, 105, 63, 70, 55, 65, 52, 53, 46, 336, 296, 334, 293, 300, 285, 295, 282, 283, 276)


@pytest.mark.parametrize(
    "au,moves,bs",
    [
        (4, {i: (0.0, 0.08) for i in BROWS}, {"browDownLeft": 0.8, "browDownRight": 0.8}),
        # 1+4 (sadness, fear): inner brows raised but drawn together — AU4 from the narrowed gap
        (4, {**{i: (0.05, -0.03) for i in (107, 66, 105, 55, 65)}, **{i: (-0.05, -0.03) for i in (336, 296, 334, 285, 295)}},
         {"browDownLeft": 0.8, "browDownRight": 0.8}),
        (6, {i: (0.0, -0.06) for i in (50, 101, 280, 330)}, {}),
        (7, {145: (0.0, -0.03), 374: (0.0, -0.03), 159: (0.0, 0.01), 386: (0.0, 0.01)}, {"eyeSquintLeft": 0.8, "eyeSquintRight": 0.8}),
        (9, {48: (0.0, -0.1), 278: (0.0, -0.1)}, {}),
        (10, {0: (0.0, -0.06), 37: (0.0, -0.06), 267: (0.0, -0.06)}, {}),
        (15, {61: (0.0, 0.09), 291: (0.0, 0.09)}, {}),
        (20, {61: (-0.09, 0.0), 291: (0.09, 0.0)}, {}),
        (23, {0: (0.0, 0.03), 17: (0.0, -0.03)}, {}),
    ],
)
def test_geometric_cue_responds_to_its_action(grace_mesh, au, moves, bs):
    """Move the mesh points as the AU moves them (on Grace Hopper's pose-normalised mesh): its score rises."""
    front = frontalize(grace_mesh.landmarks, grace_mesh.rotation)
    base = au_scores(bs, front)[au]
    moved = au_scores(bs, _moved(front, moves))[au]
    assert moved >= base + 0.3 and moved >= 0.5, (base, moved)


def test_blendshape_alone_does_not_make_au4_or_au7(grace_mesh):
    """browDown / eyeSquint fire on low-set brows and narrow eyes at rest: the geometry must agree."""
    front = frontalize(grace_mesh.landmarks, grace_mesh.rotation)
    s = au_scores({"browDownLeft": 0.9, "browDownRight": 0.9, "eyeSquintLeft": 0.9, "eyeSquintRight": 0.9}, front)
    assert s[4] < 0.3 and s[7] < 0.3


def test_au6_does_not_fire_on_lid_tension_alone(grace_mesh):
    front = frontalize(grace_mesh.landmarks, grace_mesh.rotation)
    lids = {145: (0.0, -0.04), 374: (0.0, -0.04), 144: (0.0, -0.03), 153: (0.0, -0.03), 373: (0.0, -0.03), 380: (0.0, -0.03)}
    bs = {"eyeSquintLeft": 0.9, "eyeSquintRight": 0.9}
    assert au_scores(bs, _moved(front, lids))[6] == pytest.approx(au_scores(bs, front)[6])
    assert au_scores(bs, _moved(front, lids))[7] >= 0.5


def test_smile_discounts_the_cues_it_mimics(faces):
    """The astronaut's broad smile widens and thins the mouth and lifts the alae: not AU20/AU23/AU9."""
    f = faces["astronaut"][0]
    assert f.score(12) >= 0.8 and f.score(6) >= 0.5
    for au in (4, 9, 15, 20, 23):
        assert f.score(au) < 0.3, (au, f.score(au))


def test_dropped_jaw_is_not_a_smile_or_a_frown(grace_mesh):
    """Jaw drop (AU26): the lower lip and the corners follow the jaw; neither AU12 nor AU15 fires."""
    front = frontalize(grace_mesh.landmarks, grace_mesh.rotation)
    lower = (14, 17, 84, 181, 91, 146, 314, 405, 321, 375, 87, 178, 88, 95, 317, 402, 318, 324)
    moved = _moved(front, {**{i: (0.0, 0.35) for i in lower}, 61: (0.0, 0.06), 291: (0.0, 0.06)})
    s = au_scores({"jawOpen": 0.8}, moved)
    assert s[25] >= 0.9 and s[12] < 0.3 and s[15] < 0.3


def test_largest_face_is_the_biggest_mesh_first_on_ties():
    from types import SimpleNamespace

    from tagfer.au.aus import largest_face

    def face(name, area):
        return SimpleNamespace(name=name, mesh=None if area is None else SimpleNamespace(area=area))

    assert largest_face([face("a", 10.0), face("b", 30.0), face("c", 20.0)]).name == "b"
    assert largest_face([face("none", None), face("tiny", 0.5)]).name == "tiny"  # no mesh counts as 0
    assert largest_face([face("first", 5.0), face("second", 5.0)]).name == "first"
    with pytest.raises(ValueError):
        largest_face([])


def test_face_built_without_a_config_gets_the_default_candidate_pool():
    """FaceAUs' candidate cut defaults to AUConfig's (it was 0.0: a bare FaceAUs put AUs at 0.31 in the pool)."""
    from tagfer.au.aus import AUConfig, AUDetection, FaceAUs

    dets = [AUDetection(12, 0.9, True, (1, 2, 30, 40)), AUDetection(4, 0.31, True, (5, 6, 70, 80))]
    face = FaceAUs(mesh=None, aus=dets, bbox_canvas=(0, 0, 511, 511))
    assert face.candidate_threshold == AUConfig().candidate_threshold
    assert [d.au for d in face.candidate_pool] == [12]  # 0.31 is active but below the candidate cut
