"""Action Units: catalogue, scores from MediaPipe blendshapes + landmark geometry, regions → canvas boxes.

Records
-------
:class:`AUDetection` — one AU on one face::

    {"au": 12, "name": "Lip Corner Puller", "score": 0.83, "active": true,
     "box": [191, 300, 330, 420]}          # canvas box (0..canvas-1), ints

:class:`FaceAUs` — one face: its :class:`~tagfer.au.faces.FaceMesh`, all AU
detections sorted by score (descending), and the derived views ``active``
(AUs with ``score ≥ threshold``), ``top`` (the candidate pool: the ``top_k``
best active AUs whose score is also ``≥ candidate_threshold``),
``au_boxes`` (one canvas box per active AU, the ``B_AU`` of Eq. 3: two AUs
sharing a region give the same box twice, so ``n`` counts AUs) and
``au_list`` (the AU_LIST text a teacher prompt receives, one line per top AU,
formatted by :func:`tagfer.traces.trace.format_au_list`).

How each score is made (all scores in [0, 1])
---------------------------------------------
A raw cue ``x`` becomes a score by a per-AU linear calibration
``clip((x - lo) / (hi - lo), 0, 1)``; ``(lo, hi)`` live in :data:`CALIBRATION`
and can be overridden through :class:`AUConfig`. Left/right blendshapes are
averaged. ``g`` below are landmark-geometry cues, measured in units of the
inter-ocular distance (outer eye corners 33–263, "IOD") on the **pose-normalised**
mesh: the head rotation of MediaPipe's facial transformation matrix is undone
(:func:`frontalize`) and the rest of the roll by the face frame, so they are
invariant to image scale, in-plane rotation and head turn. ``s12`` is the AU12
score; cues a smile mimics are multiplied by ``(1 - s12)``. Evidence for every
constant: docs/au.md, "Calibration evidence".

====  ======================  =====================================================
AU    name                    score
====  ======================  =====================================================
1     Inner Brow Raiser       browInnerUp
2     Outer Brow Raiser       browOuterUp (L/R)
4     Brow Lowerer            min(browDown, max(g_brow, g_browgap)): the blendshape
                              and the geometry must agree. g_brow: inner brow head
                              above the inner eye corner (0.25 → 0.19); g_browgap:
                              inner brow heads' distance (0.30 → 0.26)
5     Upper Lid Raiser        eyeWide (L/R)
6     Cheek Raiser            max(cheekSquint, g_cheek): malar points (50, 101) below
                              the eye-corner line (0.325 → 0.285). Not from the lids.
7     Lid Tightener           min(eyeSquint − rest 0.25, g_aperture): lid-to-lid
                              opening (0.09 → 0.06)
9     Nose Wrinkler           max(noseSneer, g_ala·(1−s12)): alar base below the inner
                              eye corner (0.38 → 0.30)
10    Upper Lip Raiser        max(mouthUpperUp, g_upperlip·(1−s12)): subnasale to the
                              upper lip top (0.165 → 0.12)
12    Lip Corner Puller       max(mouthSmile, g_corner): lip corners above the upper
                              lip's inner midpoint (-0.02 → 0.10)
14    Dimpler                 mouthDimple (L/R)
15    Lip Corner Depressor    max(mouthFrown, g_corner_mid): corners below the lips'
                              midpoint (0.03 → 0.09 below)
16    Lower Lip Depressor     mouthLowerDown (L/R)
17    Chin Raiser             mouthShrugLower
18    Lip Pucker              mouthPucker
20    Lip Stretcher           max(mouthStretch, g_width·(1−s12)): mouth width
                              (0.60 → 0.72)
22    Lip Funneler            mouthFunnel
23    Lip Tightener           g_thin·(1−s12)·(1−s26): red-lip height (0.19 → 0.13)
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
LibreFace) with :mod:`tagfer.au.detectors`.

Regions
-------
Each AU has a landmark index set on the 478-point mesh (muscle seed vertices
in the style py-feat documents, extended for AUs it does not cover) plus a
margin in IOD units. Bilateral AUs get **one box covering both sides**
(``bilateral="union"``, the default — it matches the paper's examples such as
the eye-region box ``[80, 323, 416, 407]``); ``bilateral="split"`` gives one
box per side. Boxes are computed in image pixels and mapped to the canvas by
:class:`tagfer.core.canvas.CanvasTransform`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from tagfer.au.faces import FaceMesh
from tagfer.core.canvas import CANVAS, TOP_K, Box, CanvasTransform
from tagfer.traces.trace import format_au_list

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

# (lo, hi) of the linear calibration per raw cue (see module docstring; the evidence for each
# geometric constant is in docs/au.md, "Calibration evidence").
CALIBRATION: dict[str, tuple[float, float]] = {
    "eyeSquint": (0.25, 1.0),
    "mouthPress": (0.10, 1.0),
    "g_brow": (0.25, 0.19),
    "g_browgap": (0.30, 0.26),
    "g_aperture": (0.09, 0.06),
    "g_cheek": (0.325, 0.285),
    "g_ala": (0.38, 0.30),
    "g_upperlip": (0.165, 0.12),
    "g_corner": (-0.02, 0.10),
    "g_depress": (-0.03, -0.09),
    "g_width": (0.60, 0.72),
    "g_gap": (0.02, 0.10),
    "g_thin": (0.19, 0.13),
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

    Two thresholds, as in the paper (App. D), which tells apart the AUs a
    detector *activates* (≈5–6 per image, the boxes R_AU and AU IoU compare
    against) from the few *confident* candidates the teacher is shown (≈21% of
    images have none):

    ``threshold``: an AU is *active* (in ``B_AU``) when its score ≥ threshold
    (per-AU overrides in ``thresholds``). ``candidate_threshold``: an active AU
    also enters the candidate pool / AU_LIST when its score ≥ this value; the
    pool keeps the ``top_k`` best (paper: 3). An image can thus have activated
    AUs (R_AU applies) but no candidate (the teacher gets the no-AU prompt).
    The defaults (0.3 / 0.5) are set for the MediaPipe heuristic scores; check
    both rates with ``tagfer stats`` and tune them for your detector.
    ``bilateral``: "union" | "split".
    ``calibration``: overrides of :data:`CALIBRATION`.
    """

    threshold: float = 0.3
    thresholds: Mapping[int, float] = field(default_factory=dict)
    candidate_threshold: float = 0.5
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
         "detector": "mediapipe", "geometry": "mediapipe-regions",   # what placed the boxes
         "aus": [AUDetection, ...],           # every scored AU, score-descending
         "active": [12, 10, ...],             # active AU numbers, score-descending
         "top": [12, 10, 6],                  # the candidate pool (top_k, score ≥ candidate_threshold)
         "au_boxes": [[...], ...],            # one canvas box per active AU (B_AU; per side with split)
         "au_list": "AU12 0.83 [...]\\n..."}   # teacher-prompt text for the top AUs
    """

    mesh: FaceMesh | None
    aus: list[AUDetection]
    bbox_canvas: Box
    top_k: int = TOP_K
    detector: str = "mediapipe"
    #: the candidate pool's cut (the same default as :class:`AUConfig`: a face built without a config
    #: gets the pool a detector with the default config would give it)
    candidate_threshold: float = AUConfig.candidate_threshold
    #: which landmarks placed the AU boxes: ``"mediapipe-regions"`` (the 478-point mesh) or
    #: ``"openface-landmarks"`` (an AU table's own 68 points, :mod:`tagfer.au.regions68`)
    geometry: str = "mediapipe-regions"

    @property
    def active(self) -> list[AUDetection]:
        return [a for a in self.aus if a.active]

    @property
    def candidate_pool(self) -> list[AUDetection]:
        """The candidate pool: the ``top_k`` best active AUs scoring ≥ ``candidate_threshold``."""
        return [a for a in self.active if a.score >= self.candidate_threshold][: self.top_k]

    @property
    def au_boxes(self) -> list[Box]:
        """``B_AU``: one box per active AU (per side with ``bilateral="split"``), repeats kept."""
        return [b for a in self.active for b in (a.boxes or (a.box,))]

    @property
    def au_list_text(self) -> str:
        """The candidate pool as the teacher prompt's AU_LIST text (one ``AU12 0.83 [x1, y1, x2, y2]`` line each)."""
        return format_au_list([(a.au, a.score, a.box) for a in self.candidate_pool])

    def score(self, au: int) -> float:
        for a in self.aus:
            if a.au == au:
                return a.score
        return 0.0

    def to_json(self, landmarks: bool = False) -> dict:
        out: dict = {"detector": self.detector, "geometry": self.geometry}
        if self.mesh is not None:
            out.update(self.mesh.to_json(landmarks=landmarks))
        out.update(
            {
                "bbox_canvas": list(self.bbox_canvas),
                "aus": [a.to_json() for a in self.aus],
                "active": [a.au for a in self.active],
                "top": [a.au for a in self.candidate_pool],
                "au_boxes": [list(b) for b in self.au_boxes],
                "au_list": self.au_list_text,
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


# Image axes (x right, y down, z away from the camera) → MediaPipe's metric camera axes (y up, z towards the viewer).
_FLIP = np.array([1.0, -1.0, -1.0])


def frontalize(landmarks: np.ndarray, rotation: np.ndarray | None) -> np.ndarray:
    """Landmarks with the head rotation undone: ``R^T`` applied about the landmark centroid.

    ``rotation`` is the 3×3 rotation of MediaPipe's facial transformation matrix
    (canonical face → camera; :attr:`tagfer.au.faces.FaceMesh.rotation`); x, y are
    pixels and z MediaPipe's relative depth in the same scale. ``None`` returns
    the landmarks unchanged. Perspective is not undone (a weak-perspective
    approximation, fine for faces that fill a small part of the field of view).
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    if rotation is None:
        return lm
    r = np.asarray(rotation, dtype=np.float64)[:3, :3]
    c = lm[:, :3].mean(axis=0)
    out = lm.copy()
    out[:, :3] = ((lm[:, :3] - c) * _FLIP) @ r * _FLIP + c
    return out


def geometric_cues(lm: np.ndarray, rotation: np.ndarray | None = None) -> dict[str, float]:
    """Raw geometry cues (IOD units, see module docstring) from 478 landmarks (pixels).

    With ``rotation`` (the head rotation, :func:`frontalize`) the cues are measured
    on the pose-normalised face; the face frame then also removes any residual roll.
    """
    lm = frontalize(lm, rotation)
    ex, ey, iod = _face_frame(lm)
    p = lm[:, :2]

    def y(i: int) -> float:
        return float(p[i] @ ey) / iod

    eye_r, eye_l = (y(33) + y(133)) / 2, (y(263) + y(362)) / 2
    mouth_mid = (p[13] + p[14]) / 2
    return {
        # inner brow head above the inner eye corner (AU4 lowers it, AU1 raises it)
        "g_brow": ((y(133) - y(107)) + (y(362) - y(336))) / 2,
        # distance between the inner brow heads (AU4 draws them together, also in 1+4)
        "g_browgap": float(np.linalg.norm(p[336] - p[107])) / iod,
        # palpebral fissure: upper-lid centre to lower-lid centre (AU7 narrows it)
        "g_aperture": ((y(145) - y(159)) + (y(374) - y(386))) / 2,
        # infraorbital cheek (malar points 50/280 and 101/330) below the eye-corner line (AU6 raises it)
        "g_cheek": (((y(50) + y(101)) / 2 - eye_r) + ((y(280) + y(330)) / 2 - eye_l)) / 2,
        "g_ala": ((y(48) - y(133)) + (y(278) - y(362))) / 2,
        # subnasale (2) to the top of the upper lip (0) (AU10 shortens it)
        "g_upperlip": y(0) - y(2),
        # lip corners above the upper lip's inner midpoint (AU12 lifts them; a dropped jaw does not)
        "g_corner": (y(13) - y(61) + y(13) - y(291)) / 2,
        # lip corners above the midpoint of the lips (AU15 pulls them below it)
        "g_corner_mid": (float((mouth_mid - p[61]) @ ey) + float((mouth_mid - p[291]) @ ey)) / 2 / iod,
        # mouth width, corner to corner (AU20 lengthens it)
        "g_width": float(np.linalg.norm(p[291] - p[61])) / iod,
        "g_gap": float(np.linalg.norm(p[13] - p[14])) / iod,
        "g_thin": (float(np.linalg.norm(p[0] - p[13])) + float(np.linalg.norm(p[14] - p[17]))) / iod,
    }


def _bs(bs: Mapping[str, float], stem: str) -> float:
    if stem in bs:
        return float(bs[stem])
    pair = [bs[k] for k in (stem + "Left", stem + "Right") if k in bs]
    return float(np.mean(pair)) if pair else 0.0


def au_scores(
    blendshapes: Mapping[str, float],
    landmarks: np.ndarray | None,
    config: AUConfig = AUConfig(),
    rotation: np.ndarray | None = None,
) -> dict[int, float]:
    """Score every AU in :data:`AU_IDS` from blendshapes and (optionally) landmarks.

    ``rotation``: the head rotation (:attr:`tagfer.au.faces.FaceMesh.rotation`); when
    given, geometric cues are measured on the pose-normalised face.
    """
    raw = {au: _bs(blendshapes, stem) for au, stem in BLENDSHAPE_AU.items()}
    raw[28] = (_bs(blendshapes, "mouthRollUpper") + _bs(blendshapes, "mouthRollLower")) / 2
    scores = {au: _cal(v, config.cal(BLENDSHAPE_AU.get(au, ""))) for au, v in raw.items()}
    if landmarks is not None and len(landmarks) >= 468:
        g = geometric_cues(np.asarray(landmarks, dtype=np.float64), rotation)

        def c(key: str, value: str | None = None) -> float:
            return _cal(g[value or key], config.cal(key))

        scores[12] = max(scores[12], c("g_corner"))
        smile = scores[12]
        # Cues a smile (AU12) mimics are discounted by it: a strong AU12 lifts the alae and the
        # upper lip, widens and thins the mouth (FACS: AU12 appearance changes).
        free = 1.0 - smile
        # browDown alone fires on low-set brows at rest: the brows must also be lowered or drawn together
        scores[4] = min(scores[4], max(c("g_brow"), c("g_browgap")))
        scores[7] = min(scores[7], c("g_aperture"))  # eyeSquint alone fires on narrow eyes at rest
        scores[6] = max(scores[6], c("g_cheek"))  # cheek raise, not lid narrowing
        scores[9] = max(scores[9], c("g_ala") * free)
        scores[10] = max(scores[10], c("g_upperlip") * free)
        scores[15] = max(scores[15], c("g_depress", "g_corner_mid"))
        scores[20] = max(scores[20], c("g_width") * free)
        scores[25] = c("g_gap")
        # AU23 narrows the red lips; a dropped jaw (AU26) stretches them thin too.
        scores[23] = c("g_thin") * free * (1.0 - scores[26])
    else:
        scores.setdefault(25, 0.0)
        scores.setdefault(23, 0.0)
    return {au: float(scores.get(au, 0.0)) for au in AU_IDS}


class _SideTable:
    """Every region side of :data:`REGIONS` in one flat table, so all boxes of a face are one
    batch of numpy reductions (:func:`_all_region_boxes`) instead of a Python loop per side."""

    def __init__(self, regions: Mapping[int, AURegion]) -> None:
        self.aus = tuple(regions)
        sides = [(au, side, regions[au].margin) for au in self.aus for side in regions[au].sides]
        self.landmarks = np.asarray([i for _, side, _ in sides for i in side], dtype=np.intp)
        self.starts = np.cumsum([0] + [len(side) for _, side, _ in sides[:-1]]).astype(np.intp)
        self.margin = np.asarray([m for _, _, m in sides], dtype=np.float64)  # (sides, 3)
        counts = [len(regions[au].sides) for au in self.aus]
        self.au_starts = np.cumsum([0] + counts[:-1]).astype(np.intp)
        #: per AU: its row among the unions, and its sides' slice ``a:b`` among the sides
        self.rows = {au: (i, int(a), int(a) + n) for i, (au, a, n) in enumerate(zip(self.aus, self.au_starts, counts))}


_SIDES = _SideTable(REGIONS)


def _all_region_boxes(u: np.ndarray, v: np.ndarray, ex: np.ndarray, ey: np.ndarray, iod: float) -> tuple[np.ndarray, np.ndarray]:
    """Image-pixel boxes of every region side and of every AU's union of sides, from landmarks
    projected on the face frame (u along the eyes, v down the face): ``(sides, 4)``, ``(aus, 4)``
    in the order of :class:`_SideTable`.

    Each side is the landmarks' extent in the face's own frame, widened by the region's margins
    (IOD units: left/right, up, down, so they follow the face's roll); its box is the
    axis-aligned hull of that rotated rectangle's four corners back in image axes.
    """
    su, sv = u[_SIDES.landmarks], v[_SIDES.landmarks]
    m = _SIDES.margin * iod
    u0 = np.minimum.reduceat(su, _SIDES.starts) - m[:, 0]
    u1 = np.maximum.reduceat(su, _SIDES.starts) + m[:, 0]
    v0 = np.minimum.reduceat(sv, _SIDES.starts) - m[:, 1]
    v1 = np.maximum.reduceat(sv, _SIDES.starts) + m[:, 2]
    corners_u = np.stack([u0, u1, u0, u1])
    corners_v = np.stack([v0, v0, v1, v1])
    xs = corners_u * ex[0] + corners_v * ey[0]
    ys = corners_u * ex[1] + corners_v * ey[1]
    sides = np.stack([xs.min(0), ys.min(0), xs.max(0), ys.max(0)], axis=1)
    unions = np.concatenate([np.minimum.reduceat(sides[:, :2], _SIDES.au_starts), np.maximum.reduceat(sides[:, 2:], _SIDES.au_starts)], axis=1)
    return sides, unions


def _check_bilateral(bilateral: str) -> None:
    if bilateral not in ("union", "split"):
        raise ValueError(f"bilateral must be 'union' or 'split', got {bilateral!r}")


def region_boxes_px(landmarks: np.ndarray, au: int, bilateral: str = "union") -> list[tuple[float, float, float, float]]:
    """Image-pixel box(es) of an AU's region: one box (union) or one per side (split).

    Margins are applied in the face's own frame (so they follow its roll); the
    result is the axis-aligned hull of that rotated rectangle.
    """
    if au not in REGIONS:
        raise KeyError(f"no region defined for AU{au}")
    _check_bilateral(bilateral)
    lm = np.asarray(landmarks, dtype=np.float64)
    ex, ey, iod = _face_frame(lm)
    sides, unions = _all_region_boxes(lm[:, :2] @ ex, lm[:, :2] @ ey, ex, ey, iod)
    row, a, b = _SIDES.rows[au]
    if bilateral == "union" or b - a == 1:
        return [tuple(unions[row].tolist())]
    return [tuple(row) for row in sides[a:b].tolist()]


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
    sc = dict(au_scores(mesh.blendshapes, mesh.landmarks, config, getattr(mesh, "rotation", None)) if scores is None else scores)
    _check_bilateral(config.bilateral)
    lm = np.asarray(mesh.landmarks, dtype=np.float64)
    ex, ey, iod = _face_frame(lm)
    sides, unions = _all_region_boxes(lm[:, :2] @ ex, lm[:, :2] @ ey, ex, ey, iod)
    side_boxes = transform.boxes_to_canvas(sides) if config.bilateral == "split" else None
    union_boxes = transform.boxes_to_canvas(unions)
    dets = []
    for au, s in sc.items():
        if au not in REGIONS:
            continue
        row, a, b = _SIDES.rows[au]
        split = side_boxes is not None and b - a > 1
        is_active = bool(active[au]) if active is not None and au in active else s >= config.threshold_for(au)
        dets.append(AUDetection(au=int(au), score=float(s), active=is_active, box=union_boxes[row],
                                boxes=tuple(side_boxes[a:b]) if split else ()))
    dets.sort(key=lambda d: (-d.score, d.au))
    return FaceAUs(
        mesh=mesh, aus=dets, bbox_canvas=transform.box_to_canvas(mesh.bbox), top_k=config.top_k, detector=detector,
        candidate_threshold=config.candidate_threshold,
    )


def au_number(text: str | int) -> int:
    """'AU12', 'au_12', 'AU12_r', ' 12 ', 12 → 12 (ValueError otherwise)."""
    if isinstance(text, (int, np.integer)):
        return int(text)
    m = re.fullmatch(r"\s*(?:au)?[\s_]*0*(\d{1,2})(?:_[rc])?\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"not an AU name: {text!r}")
    return int(m.group(1))


