"""Action Units: catalogue, scores from MediaPipe blendshapes + landmark geometry, regions → canvas boxes.

Records
-------
:class:`AUDetection` — one AU on one face::

    {"au": 12, "name": "Lip Corner Puller", "score": 0.83, "active": true,
     "box": [191, 300, 330, 420]}          # canvas box (0..canvas-1), ints

:class:`FaceAUs` — one face: its :class:`~tagfer.faces.FaceMesh`, all AU
detections sorted by score (descending), and the derived views ``active``
(AUs with ``score ≥ threshold``), ``top`` (the ``top_k`` best active AUs),
``au_boxes`` (distinct canvas boxes of the active AUs, the ``B_AU`` of Eq. 3)
and ``au_list`` (the AU_LIST text a teacher prompt receives, one line per top AU,
formatted by :func:`tagfer.trace.format_au_list`).

How each score is made (all scores in [0, 1])
---------------------------------------------
A raw cue ``x`` becomes a score by a per-AU linear calibration
``clip((x - lo) / (hi - lo), 0, 1)``; ``(lo, hi)`` live in :data:`CALIBRATION`
and can be overridden through :class:`AUConfig`. Left/right blendshapes are
averaged. ``g`` below are landmark-geometry cues, measured in units of the
inter-ocular distance (outer eye corners 33–263, "IOD") in the face's own
rotated frame, so they are invariant to image scale and in-plane rotation.

====  ======================  =====================================================
AU    name                    score
====  ======================  =====================================================
1     Inner Brow Raiser       browInnerUp
2     Outer Brow Raiser       browOuterUp (L/R)
4     Brow Lowerer            browDown (L/R)
5     Upper Lid Raiser        eyeWide (L/R)
6     Cheek Raiser            max(cheekSquint, g_lowerlid): lower-eyelid centre raised
                              towards the eye-corner line (distance / eye width;
                              0.14 rest → 0.04 fully raised). cheekSquint alone is ~0
                              on almost every face.
7     Lid Tightener           eyeSquint (L/R), rest level 0.25 subtracted
9     Nose Wrinkler           max(noseSneer, g_ala): alar base raised towards the inner
                              eye corner (distance / IOD; 0.40 rest → 0.30 wrinkled).
                              noseSneer alone is ~0 on almost every face.
10    Upper Lip Raiser        mouthUpperUp (L/R)
12    Lip Corner Puller       max(mouthSmile, g_corner): lip corners above the lip
                              midpoint (/ IOD; -0.02 → 0.10)
14    Dimpler                 mouthDimple (L/R)
15    Lip Corner Depressor    mouthFrown (L/R)
16    Lower Lip Depressor     mouthLowerDown (L/R)
17    Chin Raiser             mouthShrugLower
18    Lip Pucker              mouthPucker
20    Lip Stretcher           mouthStretch (L/R)
22    Lip Funneler            mouthFunnel
23    Lip Tightener           mouthPress (L/R) × lip thinning, where thinning =
                              clip((0.14 - red-lip height / IOD) / 0.08, 0, 1)
                              (no blendshape of its own)
24    Lip Pressor             mouthPress (L/R), rest level 0.10 subtracted
25    Lips Part               g_gap: inner-lip gap (landmarks 13–14) / IOD,
                              0.02 → 0.10 (no blendshape)
26    Jaw Drop                jawOpen
28    Lip Suck                mouthRoll (upper/lower mean)
43    Eyes Closed             eyeBlink (L/R)
====  ======================  =====================================================

These mappings are heuristics, not a trained AU detector: they are good
enough for the offline default, overlays and tests; for data building at
scale import the outputs of a detector you trust (GraphAU, OpenFace,
LibreFace) with :mod:`tagfer.detectors`.

Regions
-------
Each AU has a landmark index set on the 478-point mesh (muscle seed vertices
in the style py-feat documents, extended for AUs it does not cover) plus a
margin in IOD units. Bilateral AUs get **one box covering both sides**
(``bilateral="union"``, the default — it matches the paper's examples such as
the eye-region box ``[80, 323, 416, 407]``); ``bilateral="split"`` gives one
box per side. Boxes are computed in image pixels and mapped to the canvas by
:class:`tagfer.canvas.CanvasTransform`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from tagfer.canvas import CANVAS, TOP_K, Box, CanvasTransform, union_box
from tagfer.faces import FaceMesh

AU_NAMES: dict[int, str] = {
    1: "Inner Brow Raiser",
    2: "Outer Brow Raiser",
    4: "Brow Lowerer",
    5: "Upper Lid Raiser",
    6: "Cheek Raiser",
    7: "Lid Tightener",
    9: "Nose Wrinkler",
    10: "Upper Lip Raiser",
    12: "Lip Corner Puller",
    14: "Dimpler",
    15: "Lip Corner Depressor",
    16: "Lower Lip Depressor",
    17: "Chin Raiser",
    18: "Lip Pucker",
    20: "Lip Stretcher",
    22: "Lip Funneler",
    23: "Lip Tightener",
    24: "Lip Pressor",
    25: "Lips Part",
    26: "Jaw Drop",
    28: "Lip Suck",
    43: "Eyes Closed",
    45: "Blink",
}
# AUs the MediaPipe detector scores (AU45 comes only from imported tables: it is AU43 in a still image).
AU_IDS: tuple[int, ...] = tuple(sorted(a for a in AU_NAMES if a != 45))

_LIPS_OUTER = (61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291, 375, 321, 405, 314, 17, 84, 181, 91, 146)
_LIPS_INNER = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308, 324, 318, 402, 317, 14, 87, 178, 88, 95)
_EYE_R = (33, 246, 161, 160, 159, 158, 157, 173, 133, 155, 154, 153, 145, 144, 163, 7)
_EYE_L = (263, 466, 388, 387, 386, 385, 384, 398, 362, 382, 381, 380, 374, 373, 390, 249)


@dataclass(frozen=True)
class AURegion:
    """Landmark sets of an AU's muscle region: ``sides`` holds one index tuple per
    side (one tuple for midline AUs); ``margin`` = (left/right, up, down) in IOD units."""

    sides: tuple[tuple[int, ...], ...]
    margin: tuple[float, float, float] = (0.05, 0.05, 0.05)


REGIONS: dict[int, AURegion] = {
    1: AURegion(((107, 66, 105, 69), (336, 296, 334, 299)), (0.05, 0.15, 0.05)),
    2: AURegion(((70, 63, 105, 46, 53), (300, 293, 334, 276, 283)), (0.05, 0.15, 0.05)),
    4: AURegion(((107, 55, 65, 9, 8, 168), (336, 285, 295, 9, 8, 168)), (0.05, 0.05, 0.05)),
    5: AURegion(((33, 246, 161, 160, 159, 158, 157, 173, 133), (263, 466, 388, 387, 386, 385, 384, 398, 362)), (0.03, 0.08, 0.02)),
    6: AURegion(((117, 118, 119, 100, 50, 36, 111, 31), (346, 347, 348, 329, 280, 266, 340, 261)), (0.05, 0.05, 0.05)),
    7: AURegion(((226, 110, 24, 23, 22, 26, 112, 190), (446, 339, 254, 253, 252, 256, 341, 414)), (0.05, 0.05, 0.05)),
    9: AURegion(((115, 48, 49, 64, 102, 219, 6, 197), (344, 278, 279, 294, 331, 439, 6, 197)), (0.05, 0.05, 0.03)),
    10: AURegion(((205, 36, 142, 203, 206, 207), (425, 266, 371, 423, 426, 427)), (0.03, 0.03, 0.03)),
    12: AURegion(((50, 101, 205, 187, 207, 61), (280, 330, 425, 411, 427, 291)), (0.05, 0.05, 0.05)),
    14: AURegion(((212, 202, 57, 43, 204, 207), (432, 422, 287, 273, 424, 427)), (0.05, 0.05, 0.05)),
    15: AURegion(((43, 204, 210, 135, 169, 61), (273, 424, 430, 364, 394, 291)), (0.05, 0.05, 0.05)),
    16: AURegion(((61, 146, 91, 181, 84, 17), (291, 375, 321, 405, 314, 17)), (0.05, 0.03, 0.12)),
    17: AURegion(((175, 199, 200, 18, 83, 313, 152, 148, 377),), (0.05, 0.03, 0.03)),
    18: AURegion((_LIPS_OUTER,), (0.05, 0.05, 0.05)),
    20: AURegion(((212, 202, 210, 169, 150), (432, 422, 430, 394, 379)), (0.05, 0.05, 0.05)),
    22: AURegion((_LIPS_OUTER,), (0.05, 0.05, 0.05)),
    23: AURegion((_LIPS_OUTER,), (0.05, 0.05, 0.05)),
    24: AURegion((_LIPS_OUTER,), (0.05, 0.05, 0.05)),
    25: AURegion((_LIPS_INNER,), (0.05, 0.06, 0.06)),
    26: AURegion(((58, 172, 136, 132, 215, 138, 148, 152), (288, 397, 365, 361, 435, 367, 377, 152)), (0.05, 0.03, 0.05)),
    28: AURegion((_LIPS_OUTER,), (0.05, 0.05, 0.05)),
    43: AURegion((_EYE_R, _EYE_L), (0.05, 0.05, 0.05)),
    45: AURegion((_EYE_R, _EYE_L), (0.05, 0.05, 0.05)),
}

# (lo, hi) of the linear calibration per raw cue (see module docstring).
CALIBRATION: dict[str, tuple[float, float]] = {
    "eyeSquint": (0.25, 1.0),
    "mouthPress": (0.10, 1.0),
    "g_lowerlid": (0.14, 0.04),
    "g_ala": (0.40, 0.30),
    "g_corner": (-0.02, 0.10),
    "g_gap": (0.02, 0.10),
    "g_thin": (0.14, 0.06),
}

# AU → blendshape stem (averaged over Left/Right when both exist).
BLENDSHAPE_AU: dict[int, str] = {
    1: "browInnerUp",
    2: "browOuterUp",
    4: "browDown",
    5: "eyeWide",
    6: "cheekSquint",
    7: "eyeSquint",
    9: "noseSneer",
    10: "mouthUpperUp",
    12: "mouthSmile",
    14: "mouthDimple",
    15: "mouthFrown",
    16: "mouthLowerDown",
    17: "mouthShrugLower",
    18: "mouthPucker",
    20: "mouthStretch",
    22: "mouthFunnel",
    24: "mouthPress",
    26: "jawOpen",
    43: "eyeBlink",
}


@dataclass(frozen=True)
class AUConfig:
    """Parameters of AU activation and boxes.

    ``threshold``: an AU is *active* when its score ≥ threshold (paper-style
    binary activation; per-AU overrides in ``thresholds``). ``top_k``: AUs in
    the candidate pool / AU_LIST (paper: 3). ``bilateral``: "union" | "split".
    ``calibration``: overrides of :data:`CALIBRATION`.
    """

    threshold: float = 0.3
    thresholds: Mapping[int, float] = field(default_factory=dict)
    top_k: int = TOP_K
    canvas: int = CANVAS
    bilateral: str = "union"
    calibration: Mapping[str, tuple[float, float]] = field(default_factory=dict)

    def threshold_for(self, au: int) -> float:
        return float(self.thresholds.get(au, self.threshold))

    def cal(self, key: str) -> tuple[float, float]:
        return tuple(self.calibration.get(key, CALIBRATION.get(key, (0.0, 1.0))))  # type: ignore[return-value]


@dataclass
class AUDetection:
    """One AU on one face (see module docstring for the JSON schema)."""

    au: int
    score: float
    active: bool
    box: Box
    boxes: tuple[Box, ...] = ()  # per-side boxes when bilateral="split"

    @property
    def name(self) -> str:
        return AU_NAMES.get(self.au, f"AU{self.au}")

    def to_json(self) -> dict:
        out = {"au": self.au, "name": self.name, "score": round(float(self.score), 4), "active": bool(self.active), "box": list(self.box)}
        if self.boxes:
            out["boxes"] = [list(b) for b in self.boxes]
        return out

    @classmethod
    def from_json(cls, d: Mapping) -> "AUDetection":
        return cls(
            au=int(d["au"]),
            score=float(d["score"]),
            active=bool(d["active"]),
            box=tuple(int(v) for v in d["box"]),  # type: ignore[arg-type]
            boxes=tuple(tuple(int(v) for v in b) for b in d.get("boxes", ())),  # type: ignore[misc]
        )


@dataclass
class FaceAUs:
    """AU grounding of one face. JSON schema::

        {"bbox": [x1, y1, x2, y2],            # image pixels
         "bbox_canvas": [x1, y1, x2, y2],     # canvas ints
         "head_pose": {...}, "source": "...", "blendshapes": {...},
         "aus": [AUDetection, ...],           # every scored AU, score-descending
         "active": [12, 10, ...],             # active AU numbers, score-descending
         "top": [12, 10, 6],                  # the top_k active AUs
         "au_boxes": [[...], ...],            # distinct canvas boxes of active AUs (B_AU)
         "au_list": "AU12 0.83 [...]\\n..."}   # teacher-prompt text for the top AUs
    """

    mesh: FaceMesh | None
    aus: list[AUDetection]
    bbox_canvas: Box
    top_k: int = TOP_K
    detector: str = "mediapipe"

    @property
    def active(self) -> list[AUDetection]:
        return [a for a in self.aus if a.active]

    @property
    def top(self) -> list[AUDetection]:
        return self.active[: self.top_k]

    @property
    def au_boxes(self) -> list[Box]:
        seen: list[Box] = []
        for a in self.active:
            for b in a.boxes or (a.box,):
                if b not in seen:
                    seen.append(b)
        return seen

    @property
    def au_list(self) -> str:
        from tagfer.trace import format_au_list

        return format_au_list([(a.au, a.score, a.box) for a in self.top])

    def score(self, au: int) -> float:
        for a in self.aus:
            if a.au == au:
                return a.score
        return 0.0

    def to_json(self, landmarks: bool = False) -> dict:
        out: dict = {"detector": self.detector}
        if self.mesh is not None:
            out.update(self.mesh.to_json(landmarks=landmarks))
        out.update(
            {
                "bbox_canvas": list(self.bbox_canvas),
                "aus": [a.to_json() for a in self.aus],
                "active": [a.au for a in self.active],
                "top": [a.au for a in self.top],
                "au_boxes": [list(b) for b in self.au_boxes],
                "au_list": self.au_list,
            }
        )
        return out


# --------------------------------------------------------------------------- geometry
def largest_face(faces: Sequence[FaceAUs]) -> FaceAUs:
    """The face TAG works on when an image has several: the largest landmark mesh (a face
    without a mesh counts as size 0; ties keep the first). ``faces`` must not be empty."""
    return max(faces, key=lambda f: f.mesh.area if getattr(f, "mesh", None) is not None else 0.0)


def _cal(x: float, lohi: tuple[float, float]) -> float:
    lo, hi = lohi
    if hi == lo:
        return float(x >= hi)
    return float(min(1.0, max(0.0, (x - lo) / (hi - lo))))


def _face_frame(lm: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Unit x axis along the eye line (33→263), unit y axis pointing down the face, IOD."""
    v = lm[263, :2] - lm[33, :2]
    iod = float(np.linalg.norm(v)) or 1.0
    ex = v / iod
    ey = np.array([-ex[1], ex[0]])
    return ex, ey, iod


def geometric_cues(lm: np.ndarray) -> dict[str, float]:
    """Raw geometry cues (IOD units, see module docstring) from 478 landmarks (pixels)."""
    ex, ey, iod = _face_frame(lm)
    p = lm[:, :2]

    def lowerlid(outer: int, inner: int, lower: int) -> float:
        mid = (p[outer] + p[inner]) / 2
        w = float(np.linalg.norm(p[inner] - p[outer])) or 1.0
        return float((p[lower] - mid) @ ey) / w

    mouth_mid = (p[13] + p[14]) / 2
    return {
        "g_lowerlid": (lowerlid(33, 133, 145) + lowerlid(263, 362, 374)) / 2,
        "g_ala": (float((p[48] - p[133]) @ ey) + float((p[278] - p[362]) @ ey)) / 2 / iod,
        "g_corner": (float((mouth_mid - p[61]) @ ey) + float((mouth_mid - p[291]) @ ey)) / 2 / iod,
        "g_gap": float(np.linalg.norm(p[13] - p[14])) / iod,
        "g_thin": (float(np.linalg.norm(p[0] - p[13])) + float(np.linalg.norm(p[14] - p[17]))) / iod,
    }


def _bs(bs: Mapping[str, float], stem: str) -> float:
    if stem in bs:
        return float(bs[stem])
    pair = [bs[k] for k in (stem + "Left", stem + "Right") if k in bs]
    return float(np.mean(pair)) if pair else 0.0


def au_scores(blendshapes: Mapping[str, float], landmarks: np.ndarray | None, config: AUConfig = AUConfig()) -> dict[int, float]:
    """Score every AU in :data:`AU_IDS` from blendshapes and (optionally) landmarks."""
    raw = {au: _bs(blendshapes, stem) for au, stem in BLENDSHAPE_AU.items()}
    raw[28] = (_bs(blendshapes, "mouthRollUpper") + _bs(blendshapes, "mouthRollLower")) / 2
    scores = {au: _cal(v, config.cal(BLENDSHAPE_AU.get(au, ""))) for au, v in raw.items()}
    if landmarks is not None and len(landmarks) >= 468:
        g = geometric_cues(np.asarray(landmarks, dtype=np.float64))
        scores[6] = max(scores[6], _cal(g["g_lowerlid"], config.cal("g_lowerlid")))
        scores[9] = max(scores[9], _cal(g["g_ala"], config.cal("g_ala")))
        scores[12] = max(scores[12], _cal(g["g_corner"], config.cal("g_corner")))
        scores[25] = _cal(g["g_gap"], config.cal("g_gap"))
        scores[23] = scores[24] * _cal(g["g_thin"], config.cal("g_thin"))
    else:
        scores.setdefault(25, 0.0)
        scores.setdefault(23, 0.0)
    return {au: float(scores.get(au, 0.0)) for au in AU_IDS}


_SIDE_INDEX: dict[int, tuple[np.ndarray, ...]] = {au: tuple(np.asarray(side, dtype=np.intp) for side in reg.sides) for au, reg in REGIONS.items()}


def _region_boxes(u: np.ndarray, v: np.ndarray, ex: np.ndarray, ey: np.ndarray, iod: float, au: int, bilateral: str):
    """Region box(es) from landmarks projected on the face frame (u along the eyes, v down the face)."""
    if bilateral not in ("union", "split"):
        raise ValueError(f"bilateral must be 'union' or 'split', got {bilateral!r}")
    reg = REGIONS[au]
    mx, mu, md = (m * iod for m in reg.margin)
    boxes = []
    for idx in _SIDE_INDEX[au]:
        su, sv = u[idx], v[idx]
        u0, u1, v0, v1 = float(su.min()) - mx, float(su.max()) + mx, float(sv.min()) - mu, float(sv.max()) + md
        # Corners of the face-aligned rectangle back in image axes, then their axis-aligned hull.
        xs = [a * ex[0] + b * ey[0] for a, b in ((u0, v0), (u1, v0), (u0, v1), (u1, v1))]
        ys = [a * ex[1] + b * ey[1] for a, b in ((u0, v0), (u1, v0), (u0, v1), (u1, v1))]
        boxes.append((min(xs), min(ys), max(xs), max(ys)))
    return [union_box(boxes)] if bilateral == "union" or len(boxes) == 1 else boxes


def region_boxes_px(landmarks: np.ndarray, au: int, bilateral: str = "union") -> list[tuple[float, float, float, float]]:
    """Image-pixel box(es) of an AU's region: one box (union) or one per side (split).

    Margins are applied in the face's own frame (so they follow its roll); the
    result is the axis-aligned hull of that rotated rectangle.
    """
    if au not in REGIONS:
        raise KeyError(f"no region defined for AU{au}")
    lm = np.asarray(landmarks, dtype=np.float64)
    ex, ey, iod = _face_frame(lm)
    return _region_boxes(lm[:, :2] @ ex, lm[:, :2] @ ey, ex, ey, iod, au, bilateral)


def ground_face(
    mesh: FaceMesh,
    transform: CanvasTransform,
    config: AUConfig = AUConfig(),
    scores: Mapping[int, float] | None = None,
    active: Mapping[int, bool] | None = None,
    detector: str = "mediapipe",
) -> FaceAUs:
    """Turn one face mesh into a :class:`FaceAUs` record.

    ``scores`` replaces the blendshape scores (imported AU tables); AUs without a
    region are skipped. ``active`` overrides the threshold rule per AU (e.g.
    OpenFace's ``AUxx_c`` presence columns).
    """
    sc = dict(au_scores(mesh.blendshapes, mesh.landmarks, config) if scores is None else scores)
    lm = np.asarray(mesh.landmarks, dtype=np.float64)
    ex, ey, iod = _face_frame(lm)
    u, v = lm[:, :2] @ ex, lm[:, :2] @ ey
    dets = []
    for au, s in sc.items():
        if au not in REGIONS:
            continue
        px = _region_boxes(u, v, ex, ey, iod, au, config.bilateral)
        cboxes = tuple(transform.box_to_canvas(b) for b in px)
        union = transform.box_to_canvas(union_box(px))
        is_active = bool(active[au]) if active is not None and au in active else s >= config.threshold_for(au)
        dets.append(AUDetection(au=int(au), score=float(s), active=is_active, box=union, boxes=cboxes if len(cboxes) > 1 else ()))
    dets.sort(key=lambda d: (-d.score, d.au))
    return FaceAUs(mesh=mesh, aus=dets, bbox_canvas=transform.box_to_canvas(mesh.bbox), top_k=config.top_k, detector=detector)


def au_number(text: str | int) -> int:
    """'AU12', 'au_12', 'AU12_r', ' 12 ', 12 → 12 (ValueError otherwise)."""
    if isinstance(text, (int, np.integer)):
        return int(text)
    m = re.fullmatch(r"\s*(?:au)?[\s_]*0*(\d{1,2})(?:_[rc])?\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"not an AU name: {text!r}")
    return int(m.group(1))


