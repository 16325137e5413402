"""``tagfer analyze``: a grounded, checkable explanation for every face in an image.

Pipeline per image: load (:func:`tagfer.core.imageio.load_image`) → detect every face
and its AUs (a :class:`tagfer.au.detectors.AUDetector`, faces left to right) → for
each face, express the detector's AUs in the *analysis frame* → ask the engine
for a TAG trace → parse it with the one parser (:func:`tagfer.traces.trace.parse_trace`)
→ score it with the rewards (``r_fmt``, ``R_AU`` against the activated AU boxes).

Engines
    ``"facs"`` (default, offline): :mod:`tagfer.au.facs`. Or a VLM
    (:func:`tagfer.models.vlm.load_vlm`) prompted with the unified TAG prompt
    (:func:`tagfer.models.prompts.tag_prompt`) on the face image, greedy decoding.
    A model's output is parsed and reported as it is: a malformed output keeps
    its violations and ``well_formed = false``; nothing is repaired.

Frame (documented choice; TAG's data are face crops)
    ``frame="face"`` (default): each face gets its own canvas — a square region
    around the face box grown by ``face_margin`` on every side, clipped to the
    image, letterboxed onto the ``canvas × canvas`` square. The VLM sees that
    crop, and the detector's AU boxes are re-expressed on that crop's canvas
    (same landmarks, same scores and activations, :func:`tagfer.au.aus.ground_face`).
    ``frame="image"``: the whole image is the canvas (the boxes of ``tagfer au``).

Record: :class:`Analysis` (one per face); :class:`ImageResult` (one per image,
the ``--json`` and ``POST /analyze`` object). Overlays: :func:`render_overlay`
(detector's active AUs in green with confidences, the engine's boxes in their own
colours from :data:`BOX_COLORS`, red first — the paper's Figure 3/8 look).

Errors: :meth:`Analyzer.analyze_image` raises :class:`tagfer.core.errors.ItemError`
(``ImageError`` kinds of :mod:`tagfer.core.imageio`, or ``DetectionError`` with kind
``no_face``); :meth:`Analyzer.run` never raises for a bad image and records the
error instead.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
from PIL import Image

from tagfer.au.aus import AUConfig, FaceAUs, ground_face
from tagfer.au.detectors import DetectionError, MediaPipeAUDetector
from tagfer.au.faces import FaceLandmarker, FaceMesh
from tagfer.au.facs import DEFAULT_CONFIG as DEFAULT_FACS, FACSConfig
from tagfer.core.canvas import CanvasTransform, clip_box
from tagfer.core.errors import ItemError
from tagfer.core.imageio import LoadedImage, data_url, load_image
from tagfer.core.jsonl import JsonlWriter
from tagfer.traces.rewards import RewardConfig, r_au, r_fmt
from tagfer.traces.trace import ParsedTrace, find_au_mentions, parse_trace

__all__ = [
    "BOX_COLORS",
    "Analysis",
    "AnalyzerPool",
    "ImageResult",
    "EngineOutput",
    "FACSEngine",
    "VLMEngine",
    "BackendEngine",
    "GenerationError",
    "Analyzer",
    "engine_for",
    "load_engine",
    "face_region",
    "reframe",
    "render_overlay",
    "png_data_url",
    "BatchSummary",
    "BatchSetupError",
    "analyze_batch",
    "overlay_paths",
    "EXIT_OK",
    "EXIT_FAILED",
    "EXIT_USAGE",
    "EXIT_MALFORMED",
]

# Exit codes of `tagfer analyze` (documented in docs/analyze.md).
EXIT_OK = 0  # every image analysed, every trace well-formed
EXIT_FAILED = 1  # at least one image could not be analysed (unreadable, no face, ...)
EXIT_USAGE = 2  # bad options, model or landmarker not available
EXIT_MALFORMED = 3  # all images analysed, but at least one model output is malformed

# Colours of the engine's boxes, in box order (red first); green is the detector's.
BOX_COLORS: tuple[str, ...] = ("#e61e1e", "#ff8c00", "#b428c8", "#1e6eff", "#8c5014", "#00a0a0")
DETECTOR_COLOR = "#00c846"


def _rgb(hex_color: str) -> tuple[int, int, int]:
    h = hex_color.lstrip("#")
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


def box_color(i: int) -> str:
    return BOX_COLORS[i % len(BOX_COLORS)]


# ----------------------------------------------------------------------------- records
@dataclass
class Analysis:
    """One face's analysis. JSON schema (:meth:`to_json`, stable)::

        {"image": "photo.jpg", "face": 0, "n_faces": 1,
         "face_bbox": [x1, y1, x2, y2],        # image pixels (float, 1 decimal)
         "frame": "face",                      # "face" | "image": what the canvas covers
         "frame_box": [x1, y1, x2, y2],        # that region, image pixels
         "canvas": 512,
         "engine": "facs",                     # or the model path / id
         "detector": "mediapipe",
         "label": "happiness",                 # normalised answer, null if unreadable
         "scores": {"anger": 0.0, ...},        # class scores (facs engine), else null
         "trace": "<think>…</think>\\n<answer>happiness</answer>",
         "well_formed": true, "violations": [],
         "boxes": [[x1, y1, x2, y2], ...],     # every <bbox> in order (null: unreadable)
         "box_aus": [12, null, ...],           # AU named just before each box, if any
         "box_colors": ["#e61e1e", ...],       # overlay/HTML colour of each box
         "segments": [{"text": "…", "box": null}, {"text": "<bbox>[…]</bbox>", "box": 0}, ...],
         "evidence_aus": [12, 25, 10],         # AUs the facs engine cited ([] for a model)
         "aus": [{"au": 12, "name": "Lip Corner Puller", "score": 0.99,
                  "active": true, "box": [x1, y1, x2, y2]}, ...],   # detector, score-descending
         "au_boxes": [[...], ...],             # activated AU boxes (B_AU)
         "r_fmt": 0.5,                         # tagfer.traces.rewards.r_fmt of the trace
         "r_au": 0.87}                         # R_AU vs au_boxes (null: no activated AU)

    ``segments`` concatenate to ``trace``; a segment with ``box = i`` is the
    i-th ``<bbox>`` element (used to highlight boxes in the web page).
    """

    image: str
    face: int
    n_faces: int
    face_bbox: list[float]
    frame: str
    frame_box: list[float]
    canvas: int
    engine: str
    detector: str
    label: str | None
    scores: dict[str, float] | None
    trace: str
    well_formed: bool
    violations: list[str]
    boxes: list[list[int] | None]
    box_aus: list[int | None]
    box_colors: list[str]
    segments: list[dict[str, Any]]
    evidence_aus: list[int]
    aus: list[dict[str, Any]]
    au_boxes: list[list[int]]
    r_fmt: float
    r_au: float | None
    face_aus: FaceAUs | None = field(default=None, repr=False, compare=False)  # not serialised
    # grounded facs engine (issue 19): {"global", "local", "agreement", "decision"}; {} otherwise
    views: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("face_aus", "views")}
        out.update(self.views)
        if self.scores is not None:
            out["scores"] = {k: round(float(v), 4) for k, v in self.scores.items()}
        if self.r_au is not None:
            out["r_au"] = round(float(self.r_au), 4)
        return out

    @property
    def au_labels(self) -> list[str]:
        """Caption of each engine box on the overlay: ``AU12`` when an AU is named near it, else ``box 1``."""
        return [f"AU{a}" if a is not None else f"box {i + 1}" for i, a in enumerate(self.box_aus)]


@dataclass
class ImageResult:
    """One image. JSON schema (:meth:`to_json`; the ``--json`` line and ``POST /analyze`` body)::

        {"image": "photo.jpg", "width": 640, "height": 480, "n_faces": 1,
         "analyses": [Analysis, ...],            # one per face, left to right
         "overlays": ["out/photo_face0.png"],   # when written (CLI), or data: URLs (server)
         "error": null}                          # or {"kind": "no_face", "message": "..."}
    """

    image: str
    width: int | None = None
    height: int | None = None
    analyses: list[Analysis] = field(default_factory=list)
    error: dict[str, str] | None = None
    overlays: list[str] = field(default_factory=list)
    loaded: LoadedImage | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def malformed(self) -> bool:
        return any(not a.well_formed for a in self.analyses)

    def to_json(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "width": self.width,
            "height": self.height,
            "n_faces": len(self.analyses),
            "analyses": [a.to_json() for a in self.analyses],
            "overlays": list(self.overlays),
            "error": self.error,
        }

    def render_overlays(self) -> list[Image.Image]:
        """One overlay per face (needs the loaded image: results from :meth:`Analyzer.run`)."""
        if self.loaded is None:
            raise ValueError("this result holds no image; use Analyzer.run to get one with pixels")
        return [render_overlay(self.loaded, a) for a in self.analyses]


# ----------------------------------------------------------------------------- engines
@dataclass
class EngineOutput:
    """What an engine returns for one face: the response text, plus class scores and cited AUs (facs)."""

    trace: str
    scores: dict[str, float] | None = None
    evidence_aus: list[int] = field(default_factory=list)
    views: dict[str, Any] = field(default_factory=dict)  # grounded facs engine: global / local / agreement


class Engine(Protocol):
    name: str

    def run(self, faces: Sequence[tuple[Image.Image, FaceAUs]]) -> list[EngineOutput]: ...


class FACSEngine:
    """The offline default: the ``facs`` backend (:class:`tagfer.models.backends.FACSBackend`) explaining
    the faces the analyzer's detector found (no second detection): the FER net's global impression of the
    face frame + AU evidence, or with ``rules_only`` (``facs-rules``) the AUs alone, no pixels. Thread-safe."""

    def __init__(self, config: FACSConfig = DEFAULT_FACS, backend: Any = None, rules_only: bool = False):
        from tagfer.models.backends import FACSBackend  # lazy (start-up time): asyncio, concurrent

        self.backend = backend if backend is not None else FACSBackend(config=config, rules_only=rules_only)
        self.name = self.backend.name
        self.needs_pixels = not self.backend.rules_only  # the grounded engine's global net looks at the face

    @property
    def config(self) -> FACSConfig:
        return self.backend.config

    def run(self, faces: Sequence[tuple[Image.Image | None, FaceAUs]]) -> list[EngineOutput]:
        out = []
        for pic, fa in faces:
            ex = self.backend.explain(fa, pic)
            out.append(EngineOutput(ex.trace, dict(ex.scores), list(ex.evidence_aus), ex.views()))
        return out

    def close(self) -> None:
        self.backend.close()


class GenerationError(ItemError):
    """The model backend failed for a face (``kind``: ``generation_<backend error kind>``)."""


class BackendEngine:
    """Any :class:`tagfer.models.backends.Backend` (``hf:PATH``, ``openai:URL[,URL]``, ``vllm:PATH``, a bare
    path) prompted with the unified TAG prompt, greedy (``GenerationConfig.tag``: at most three
    boxes, the paper's limit at inference). A backend failure for a face (timeout, HTTP error,
    a generation that raised) fails the image with :class:`GenerationError`; an answer that does
    not follow the grammar is reported as malformed, never repaired. Backends that are not
    ``thread_safe`` (in-process models) are called by one thread at a time."""

    needs_pixels = True

    def __init__(self, backend: Any, name: str | None = None, system: str | None = None, user: str | None = None,
                 max_new_tokens: int = 512):
        from tagfer.models.prompts import tag_prompt  # lazy (start-up time): importlib, tempfile

        s, u = tag_prompt()
        self.backend = backend
        self.system = s if system is None else system
        self.user = u if user is None else user
        self.max_new_tokens = max_new_tokens
        self.name = name or getattr(backend, "name", "backend")
        # Served models take concurrent requests (``analyze --workers``); in-process ones are serialised.
        self._lock = contextlib.nullcontext() if getattr(backend, "thread_safe", False) else threading.Lock()

    def run(self, faces: Sequence[tuple[Image.Image | None, FaceAUs]]) -> list[EngineOutput]:
        from tagfer.models.backends import GenerationConfig, GenRequest  # lazy (start-up time): asyncio, concurrent

        reqs = [GenRequest(id=f"face{i}", user=self.user, image=im, system=self.system) for i, (im, _) in enumerate(faces)]
        with self._lock:
            results = list(self.backend.generate(reqs, GenerationConfig.tag(max_new_tokens=self.max_new_tokens)))
        out = []
        for r in results:
            if r.error is not None or r.text is None:
                err = r.error or {"kind": "empty", "message": "no text returned"}
                kind = str(err.get("kind", "failed"))
                raise GenerationError(kind if kind.startswith("generation") else f"generation_{kind}",
                                      f"model backend failed: {err.get('message', '')}")
            out.append(EngineOutput(r.text))
        return out

    def close(self) -> None:
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()


class VLMEngine(BackendEngine):
    """A loaded VLM (``tagfer.models.vlm.VLM``, or anything with its ``generate``) as an engine: the
    ``hf`` backend (:class:`tagfer.models.backends.TransformersBackend`) around it."""

    def __init__(self, vlm: Any, name: str | None = None, system: str | None = None, user: str | None = None,
                 max_new_tokens: int = 512, batch_size: int = 4):
        from tagfer.models.backends import TransformersBackend  # lazy (start-up time): asyncio, concurrent

        backend = TransformersBackend(vlm, batch_size=batch_size)
        super().__init__(backend, name or backend.model_name(), system, user, max_new_tokens)
        self.vlm = vlm


def engine_for(backend: Any, name: str | None = None, max_new_tokens: int = 512) -> FACSEngine | BackendEngine:
    """The analysis engine of a :class:`tagfer.models.backends.Backend`: the facs backend explains the
    detector's faces directly (:class:`FACSEngine`); any other is prompted (:class:`BackendEngine`)."""
    from tagfer.models.backends import FACSBackend  # lazy (start-up time): asyncio, concurrent

    if isinstance(backend, FACSBackend):
        return FACSEngine(backend=backend)
    return BackendEngine(backend, name=name, max_new_tokens=max_new_tokens)


def load_engine(model: Any = None, *, max_new_tokens: int = 512, device: str | None = None,
                **backend_kw: Any) -> FACSEngine | BackendEngine:
    """Engine from a ``--model`` value: a spec resolved by the one registry,
    :func:`tagfer.models.backends.make_backend` (``None`` = ``"facs"``; ``hf:PATH`` or a bare path / hub id,
    ``openai:URL[,URL]``, ``vllm:PATH``), or a backend object. ``device`` and ``backend_kw``
    go to the registry (:data:`tagfer.models.backends.COMMON_OPTIONS` and the kind's own options).
    Raises :class:`tagfer.models.vlm.ModelNotAvailable` / ``BackendUnavailable`` (or ImportError without
    the ``train`` extra).
    """
    from tagfer.models.backends import make_backend  # lazy (start-up time): asyncio, concurrent

    spec = "facs" if model is None else model
    backend = make_backend(spec, device=device, **backend_kw)
    return engine_for(backend, name=spec if isinstance(spec, str) else None, max_new_tokens=max_new_tokens)


# ----------------------------------------------------------------------------- frames
def face_region(bbox: Sequence[float], width: float, height: float, margin: float = 0.15) -> tuple[float, float, float, float]:
    """Square region (image pixels) centred on ``bbox``, side ``max(w, h)·(1 + 2·margin)``, clipped to the image."""
    x1, y1, x2, y2 = (float(v) for v in bbox)
    side = max(x2 - x1, y2 - y1, 1.0) * (1.0 + 2.0 * margin)
    cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    rx1, ry1 = max(0.0, cx - side / 2.0), max(0.0, cy - side / 2.0)
    rx2, ry2 = min(float(width), cx + side / 2.0), min(float(height), cy + side / 2.0)
    if rx2 - rx1 < 1.0 or ry2 - ry1 < 1.0:
        return 0.0, 0.0, float(width), float(height)
    return rx1, ry1, rx2, ry2


def reframe(face: FaceAUs, region: Sequence[float], config: AUConfig) -> FaceAUs:
    """The same face's AUs with boxes on the canvas of ``region`` (same scores and activations)."""
    if face.mesh is None:
        raise ValueError("reframing needs the face's landmarks")
    x1, y1, x2, y2 = (float(v) for v in region)
    m = face.mesh
    lm = np.array(m.landmarks, dtype=np.float64, copy=True)
    lm[:, 0] -= x1
    lm[:, 1] -= y1
    bx1, by1, bx2, by2 = m.bbox
    mesh = FaceMesh(bbox=(bx1 - x1, by1 - y1, bx2 - x1, by2 - y1), landmarks=lm, blendshapes=m.blendshapes,
                    head_pose=m.head_pose, source=m.source, rotation=m.rotation)
    tr = CanvasTransform(x2 - x1, y2 - y1, canvas=config.canvas)
    scores = {a.au: a.score for a in face.aus}
    active = {a.au: a.active for a in face.aus}
    return ground_face(mesh, tr, config, scores=scores, active=active, detector=face.detector)


def _crop(img: LoadedImage, region: Sequence[float]) -> Image.Image:
    s = img.scale
    h, w = img.rgb.shape[:2]
    x1, y1 = int(np.floor(region[0] * s)), int(np.floor(region[1] * s))
    x2, y2 = int(np.ceil(region[2] * s)), int(np.ceil(region[3] * s))
    x1, y1, x2, y2 = max(0, x1), max(0, y1), min(w, max(x2, x1 + 1)), min(h, max(y2, y1 + 1))
    return Image.fromarray(img.rgb[y1:y2, x1:x2])


# ----------------------------------------------------------------------------- trace views
def _box_aus(parsed: ParsedTrace) -> list[int | None]:
    """For each box, the AU mentioned last between the previous box (or the start) and this one."""
    out: list[int | None] = []
    text = parsed.text
    prev = 0
    for b in parsed.boxes:
        chunk = text[prev : b.span[0]]
        mentions = find_au_mentions(chunk)
        out.append(mentions[-1][0] if mentions else None)
        prev = b.span[1]
    return out


def _segments(parsed: ParsedTrace) -> list[dict[str, Any]]:
    text = parsed.text
    segs: list[dict[str, Any]] = []
    pos = 0
    for i, b in enumerate(parsed.boxes):
        if b.span[0] > pos:
            segs.append({"text": text[pos : b.span[0]], "box": None})
        segs.append({"text": text[b.span[0] : b.span[1]], "box": i})
        pos = b.span[1]
    if pos < len(text):
        segs.append({"text": text[pos:], "box": None})
    return segs


# ----------------------------------------------------------------------------- overlay
def render_overlay(img: LoadedImage, analysis: Analysis) -> Image.Image:
    """Overlay of one face: detector's active AUs (green, ``AUx 0.78``) and the engine's boxes
    (``box_colors``, captioned ``AU12`` or ``box 1``) on the analysis frame. Unreadable or empty
    boxes are not drawn (they are listed in the trace and its violations)."""
    from tagfer.au.overlay import LabeledBox, draw_boxes, face_focus  # lazy (start-up time): PIL

    canvas = analysis.canvas
    lbs = [LabeledBox(a["box"], f"AU{a['au']} {a['score']:.2f}", _rgb(DETECTOR_COLOR)) for a in analysis.aus if a["active"]]
    for coords, cap, color in zip(analysis.boxes, analysis.au_labels, analysis.box_colors):
        if coords is None:
            continue
        c = clip_box(coords, canvas)
        if c[0] >= c[2] or c[1] >= c[3]:
            continue
        lbs.append(LabeledBox(c, cap, _rgb(color)))
    if analysis.frame == "face":
        region = analysis.frame_box
        size = (region[2] - region[0], region[3] - region[1])
        return draw_boxes(_crop(img, region), lbs, canvas=canvas, original_size=size)
    crop = face_focus([analysis.face_bbox], (img.width, img.height))
    return draw_boxes(img.rgb, lbs, canvas=canvas, original_size=(img.width, img.height), crop=crop)


def png_data_url(im: Image.Image) -> str:
    """``data:image/png;base64,…`` of ``im`` (:func:`tagfer.core.imageio.data_url`, fast zlib level)."""
    return data_url(im, "png")


# ----------------------------------------------------------------------------- analyzer
class Analyzer:
    """Image → one :class:`Analysis` per face (left to right).

    ``detector``: an AU detector (default: a new :class:`tagfer.au.detectors.MediaPipeAUDetector`
    keeping up to ``max_faces`` faces); ``engine``: ``"facs"``, a model path / hub id, or an
    engine object (:class:`FACSEngine`, :class:`VLMEngine`, or a ``tagfer.models.vlm.VLM``).
    Calls are serialised by a lock (MediaPipe's landmarker is not thread-safe): for
    parallelism use several analyzers (``tagfer serve`` keeps a pool).
    """

    def __init__(
        self,
        detector: Any = None,
        engine: Any = "facs",
        *,
        frame: str = "face",
        face_margin: float = 0.15,
        reward_config: RewardConfig | None = None,
        max_faces: int = 5,
        landmarker_path: str | None = None,
        max_side: int = 2048,
        own_detector: bool | None = None,
    ):
        if frame not in ("face", "image"):
            raise ValueError(f"frame must be 'face' or 'image', got {frame!r}")
        from tagfer.models.backends import Backend  # lazy (start-up time): asyncio, concurrent

        from_spec = isinstance(engine, str) or engine is None
        if from_spec:
            engine = load_engine(engine)
        elif isinstance(engine, Backend):
            engine = engine_for(engine)
        elif hasattr(engine, "generate") and not hasattr(engine, "run"):
            engine = VLMEngine(engine)
        self.engine = engine
        self._own_detector = detector is None if own_detector is None else own_detector
        if detector is None:
            lm = FaceLandmarker(model_path=landmarker_path, max_faces=max_faces)
            detector = MediaPipeAUDetector(landmarker=lm, own_landmarker=True)
        self.detector = detector
        self.au_config: AUConfig = getattr(detector, "config", AUConfig())
        # one canvas: the detector's boxes, the parsed trace and the recorded Analysis.canvas
        if reward_config is None:
            reward_config = RewardConfig(canvas=self.au_config.canvas)
        elif reward_config.canvas != self.au_config.canvas:
            raise ValueError(f"reward_config.canvas ({reward_config.canvas}) differs from the detector's canvas ({self.au_config.canvas})")
        engine_canvas = getattr(getattr(self.engine, "config", None), "canvas", None)
        if isinstance(self.engine, FACSEngine) and engine_canvas != self.au_config.canvas:
            if not from_spec:
                raise ValueError(f"the FACS engine's canvas ({engine_canvas}) differs from the detector's ({self.au_config.canvas})")
            self.engine = FACSEngine(replace(self.engine.config, canvas=self.au_config.canvas),
                                     rules_only=self.engine.backend.rules_only)  # built here: follow the detector
        self.frame = frame
        self.face_margin = face_margin
        self.reward_config = reward_config
        self.max_side = max_side
        self._lock = threading.Lock()

    # -- lifecycle
    def close(self) -> None:
        if self._own_detector:
            self.detector.close()

    def __enter__(self) -> "Analyzer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- core
    def _analyze_loaded(self, img: LoadedImage, name: str) -> list[Analysis]:
        with self._lock:
            faces = self.detector.detect(img, name)
        if not faces:  # detectors raise no_face themselves; guard for others

            raise DetectionError("no_face", f"no face found in {name}")
        canvas = self.reward_config.canvas  # == self.au_config.canvas (checked in __init__)
        prepared: list[tuple[Image.Image | None, FaceAUs, tuple[float, float, float, float]]] = []
        needs_pixels = getattr(self.engine, "needs_pixels", True)
        for f in faces:
            if self.frame == "face" and f.mesh is not None:
                region = face_region(f.mesh.bbox, img.width, img.height, self.face_margin)
                fa = reframe(f, region, self.au_config)
            else:
                region = (0.0, 0.0, float(img.width), float(img.height))
                fa = f
            pic = (_crop(img, region) if self.frame == "face" else Image.fromarray(img.rgb)) if needs_pixels else None
            prepared.append((pic, fa, region))
        outs = self.engine.run([(p, fa) for p, fa, _ in prepared])
        cfg = self.reward_config
        result = []
        for i, ((_, fa, region), out) in enumerate(zip(prepared, outs)):
            parsed = parse_trace(out.trace, cfg.canvas, cfg.max_boxes)
            au_boxes = [list(b) for b in fa.au_boxes]
            bbox = fa.mesh.bbox if fa.mesh is not None else None
            face_bbox = [round(float(v) + (region[j % 2] if self.frame == "face" else 0.0), 1) for j, v in enumerate(bbox)] if bbox else []
            result.append(
                Analysis(
                    image=name,
                    face=i,
                    n_faces=len(faces),
                    face_bbox=face_bbox,
                    frame=self.frame,
                    frame_box=[round(float(v), 2) for v in region],
                    canvas=canvas,
                    engine=getattr(self.engine, "name", "engine"),
                    detector=fa.detector,
                    label=parsed.label if parsed.label != "excluded" else None,
                    scores=out.scores,
                    trace=parsed.text,
                    well_formed=parsed.well_formed,
                    violations=list(parsed.violations),
                    boxes=[list(c) if c is not None else None for c in parsed.box_coords],
                    box_aus=_box_aus(parsed),
                    box_colors=[box_color(j) for j in range(len(parsed.boxes))],
                    segments=_segments(parsed),
                    evidence_aus=list(out.evidence_aus),
                    aus=[a.to_json() for a in fa.aus],
                    au_boxes=au_boxes,
                    r_fmt=r_fmt(parsed, cfg),
                    r_au=r_au(parsed, au_boxes, matching=cfg.matching, canvas=cfg.canvas, au_count=cfg.au_count),
                    face_aus=fa,
                    views=dict(out.views),
                )
            )
        return result

    def analyze_image(self, source: str | os.PathLike | bytes, name: str | None = None) -> list[Analysis]:
        """One :class:`Analysis` per face, left to right. Raises :class:`ItemError` (bad image, ``no_face``)."""
        img = load_image(source, max_side=self.max_side)
        return self._analyze_loaded(img, name or _name(source))

    def run(self, source: str | os.PathLike | bytes, name: str | None = None) -> ImageResult:
        """Like :meth:`analyze_image` but never raises for a bad input: the error is recorded.

        The result keeps the decoded image so that :meth:`ImageResult.render_overlays` works.
        """
        name = name or _name(source)
        res = ImageResult(image=name)
        try:
            img = load_image(source, max_side=self.max_side)
            res.width, res.height, res.loaded = img.width, img.height, img
            res.analyses = self._analyze_loaded(img, name)
        except ItemError as e:
            res.error = {"kind": e.kind, "message": e.message}
        except MemoryError:
            res.error = {"kind": "internal", "message": "out of memory while analysing this image"}
        except Exception as e:  # an engine or library failure: recorded, the batch goes on
            res.error = {"kind": "internal", "message": traceback.format_exception_only(type(e), e)[-1].strip()}
        return res


def _name(source: str | os.PathLike | bytes) -> str:
    return "<bytes>" if isinstance(source, (bytes, bytearray)) else os.fspath(source)


Factory = Callable[[], Analyzer]


class AnalyzerPool:
    """At most ``size`` analyzers, created on demand by ``factory`` and lent one per request."""

    def __init__(self, factory: Callable[[], Analyzer], size: int = 2):
        if size < 1:
            raise ValueError("pool size must be >= 1")
        self.factory = factory
        self.size = size
        self._free: queue.LifoQueue[Analyzer] = queue.LifoQueue()
        self._made: list[Analyzer] = []
        self._lock = threading.Lock()

    def warm(self) -> None:
        """Build one analyzer now (fails fast on a missing model file)."""
        a = self._get()
        self._free.put(a)

    def _get(self) -> Analyzer:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            if len(self._made) < self.size:
                a = self.factory()
                self._made.append(a)
                return a
        return self._free.get()

    def run(self, fn: Callable[[Analyzer], Any]) -> Any:
        a = self._get()
        try:
            return fn(a)
        finally:
            self._free.put(a)

    def close(self) -> None:
        """Close every analyzer built so far; later requests build fresh ones."""
        with self._lock:
            while True:
                try:
                    self._free.get_nowait()
                except queue.Empty:
                    break
            for a in self._made:
                a.close()
            self._made.clear()


# ----------------------------------------------------------------------------- batches
@dataclass
class BatchSummary:
    """Counts of one :func:`analyze_batch` run. ``given``: images requested (folders walked);
    ``skipped``: already in ``out``; ``failed_before`` / ``malformed_before``: skipped images whose
    record in ``out`` is an error / holds a malformed trace (a re-run does not hide them)."""

    given: int = 0
    analysed: int = 0
    skipped: int = 0
    failed: int = 0
    malformed: int = 0
    failed_before: int = 0
    malformed_before: int = 0

    @property
    def exit_code(self) -> int:
        """The ``tagfer analyze`` exit code: 1 while an image has failed, else 3 while a trace is malformed, else 0."""
        if self.failed or self.failed_before:
            return EXIT_FAILED
        return EXIT_MALFORMED if self.malformed or self.malformed_before else EXIT_OK


class BatchSetupError(ValueError):
    """A batch that cannot start: bad options, no image, model or landmarker not available (exit code 2)."""


def overlay_paths(overlay: str | os.PathLike, image_key: str, n_faces: int, single: bool) -> list[str]:
    """Overlay file per face: ``OUT.png`` (+ ``OUT_face1.png`` …) for one image, else ``DIR/<stem>_<hash>_face<i>.png``."""
    from tagfer.au.grounding import overlay_name  # lazy (start-up time): multiprocessing, concurrent

    out = Path(overlay)
    if single and out.suffix.lower() == ".png":
        return [str(out if i == 0 else out.with_name(f"{out.stem}_face{i}.png")) for i in range(n_faces)]
    stem = overlay_name(image_key)[: -len(".png")]
    return [str(out / f"{stem}_face{i}.png") for i in range(n_faces)]


def _earlier_status(rec: dict) -> str:
    bad_trace = any(not a.get("well_formed", True) for a in rec.get("analyses") or [] if isinstance(a, dict))
    return "failed" if rec.get("error") else "malformed" if bad_trace else "ok"


def analyze_batch(
    images: Sequence[str | os.PathLike],
    *,
    engine: Any = None,
    out: str | os.PathLike | None = None,
    overlay: str | os.PathLike | None = None,
    resume: bool = True,
    retry_errors: bool = False,
    workers: int = 1,
    frame: str = "face",
    max_faces: int = 5,
    threshold: float = 0.3,
    landmarker: str | os.PathLike | None = None,
    max_new_tokens: int = 512,
    device: str | None = None,
    factory: Callable[[], Analyzer] | None = None,
    on_start: Callable[[int], None] | None = None,
    on_result: Callable[[ImageResult], None] | None = None,
) -> BatchSummary:
    """Analyse image files and folders (walked, :func:`tagfer.au.grounding.iter_images`) with
    ``workers`` analyzers in parallel, results in input order (``on_result`` sees each).

    ``engine``: a model spec or backend (:func:`load_engine`; None = facs) shared by the
    analyzers; ``factory`` replaces the analyzer set-up (detector options are then ignored).
    ``out``: append one :meth:`ImageResult.to_json` line per image, resumable through the one job
    runner (:func:`tagfer.core.jobs.resume_from`: images already there are skipped,
    ``retry_errors`` runs the failed ones again, ``resume=False`` starts over). ``overlay``:
    ``OUT.png`` for one image or a folder (:func:`overlay_paths`); written paths go to
    ``ImageResult.overlays``. ``on_start(n)`` gets the number of images to analyse.
    Raises :class:`BatchSetupError` before any work when the batch cannot start.
    """
    from tagfer.au.grounding import check_output_path, iter_images  # lazy (start-up time): multiprocessing, concurrent
    from tagfer.core.jobs import ordered_map, resume_from  # lazy (start-up time): multiprocessing, concurrent

    if frame not in ("face", "image"):
        raise BatchSetupError(f"--frame must be face or image, got {frame!r}")
    try:
        paths = list(iter_images(images))
    except (ValueError, RuntimeError) as e:
        raise BatchSetupError(str(e)) from e
    if not paths:
        raise BatchSetupError("no image found in the given folder(s)")
    summary = BatchSummary(given=len(paths))
    if out is not None:
        try:
            check_output_path(out)
        except ValueError as e:
            raise BatchSetupError(str(e)) from e
        earlier = resume_from(out, "image", resume=resume, retry_errors=retry_errors, status=_earlier_status)
        summary.failed_before = earlier.count(paths, "failed")
        summary.malformed_before = earlier.count(paths, "malformed")
        paths = [p for p in paths if p not in earlier]
        summary.skipped = summary.given - len(paths)
    if overlay is not None and Path(overlay).suffix.lower() == ".png" and len(paths) > 1:
        raise BatchSetupError("--overlay OUT.png takes one image; give a directory for several")
    own_engine = None  # an engine built here from a spec is closed here; one handed in stays the caller's
    try:
        if factory is None:
            eng = engine if hasattr(engine, "run") else load_engine(engine, max_new_tokens=max_new_tokens, device=device)
            if engine is None or isinstance(engine, str):
                own_engine = eng

            def factory() -> Analyzer:
                from tagfer.au.aus import AUConfig
                from tagfer.au.detectors import MediaPipeAUDetector
                from tagfer.au.faces import FaceLandmarker

                lm = FaceLandmarker(model_path=str(landmarker) if landmarker else None, max_faces=max_faces)
                det = MediaPipeAUDetector(AUConfig(threshold=threshold), landmarker=lm, own_landmarker=True)
                return Analyzer(det, eng, frame=frame, own_detector=True)

        pool = AnalyzerPool(factory, size=workers)
        pool.warm()  # fails fast on a missing landmarker model
    except Exception as e:  # model / landmarker not available: the batch cannot start
        if own_engine is not None:
            getattr(own_engine, "close", lambda: None)()
        raise BatchSetupError(str(e)) from e
    if on_start is not None:
        on_start(len(paths))

    writer = JsonlWriter(out) if out is not None else None
    try:
        for res in ordered_map(lambda p: pool.run(lambda a: a.run(p)), paths, workers=workers, name="tagfer-analyze"):
            if res.ok and overlay is not None:
                from tagfer.au.overlay import save_png  # lazy (start-up time): PIL

                files = overlay_paths(overlay, res.image, len(res.analyses), single=summary.given == 1)
                for f, im in zip(files, res.render_overlays()):
                    save_png(im, f)
                res.overlays = files
            summary.analysed += 1
            summary.failed += not res.ok
            summary.malformed += res.malformed
            if writer is not None:
                writer.write(res.to_json())
            if on_result is not None:
                on_result(res)
    finally:
        if writer is not None:
            writer.close()
        pool.close()
        if own_engine is not None:
            getattr(own_engine, "close", lambda: None)()
    return summary
