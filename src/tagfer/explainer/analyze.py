"""``tagfer analyze``: a grounded, checkable explanation for every face in an image.

Pipeline per image: load (:func:`tagfer.core.imageio.load_image`) → detect every face
and its AUs (a :class:`tagfer.au.detectors.AUDetector`, faces left to right) → for
each face, express the detector's AUs in the *analysis frame* → ask the model (a
:class:`tagfer.models.backends.Backend`) for a TAG trace → parse it with the one parser
(:func:`tagfer.traces.trace.parse_trace`) → score it with the rewards (``r_fmt``, ``R_AU``
against the activated AU boxes).

The model
    Any backend of the one registry (:func:`tagfer.models.backends.make_backend`). ``"facs"``
    (default, offline: :mod:`tagfer.au.facs`) gets each face already grounded
    (``GenRequest.face``) and writes its trace from those AUs, with no pixels and no second
    detection. Any other (``hf:PATH`` or a path, ``openai:URL``, ``vllm:PATH``, a backend
    object, a loaded VLM) is prompted with the unified TAG prompt
    (:func:`tagfer.models.prompts.tag_prompt`) on the face image, greedy decoding
    (:meth:`GenerationConfig.tag`: at most three boxes, the paper's limit at inference).
    A model's output is parsed and reported as it is: a malformed output keeps
    its violations and ``well_formed = false``; nothing is repaired.

Frame (documented choice; TAG's data are face crops)
    ``frame="face"`` (default): each face gets its own canvas — a square region
    around the face box grown by ``face_margin`` on every side, clipped to the
    image, letterboxed onto the ``canvas × canvas`` square. The VLM sees that
    crop, and the detector's AU boxes are re-expressed on that crop's canvas
    (same landmarks, same scores and activations, :func:`tagfer.au.aus.ground_face`).
    ``frame="image"``: the whole image is the canvas (the boxes of ``tagfer au``).

Records (:mod:`tagfer.explainer.records`): :class:`Analysis` (one per face); :class:`ImageResult`
(one per image, the ``--json`` and ``POST /analyze`` object). Frames:
:mod:`tagfer.explainer.frames`. Overlays (:mod:`tagfer.explainer.overlay`): :func:`render_overlay`
(detector's active AUs in green with confidences, the model's boxes in their own
colours from :data:`BOX_COLORS`, red first — the paper's Figure 3/8 look). Folders and
resumable batches: :mod:`tagfer.explainer.batch`. This module re-exports the records,
frames and overlay names.

Errors: :meth:`Analyzer.analyze_image` raises :class:`tagfer.core.errors.ItemError`
(``ImageError`` kinds of :mod:`tagfer.core.imageio`, or ``DetectionError`` with kind
``no_face``); :meth:`Analyzer.run` never raises for a bad image and records the
error instead.
"""

from __future__ import annotations

import os
import queue
import threading
import traceback
from dataclasses import replace
from typing import Any, Callable, Sequence

from PIL import Image

from tagfer.au.aus import AUConfig, FaceAUs
from tagfer.au.detectors import DetectionError, MediaPipeAUDetector, RegionAUDetector
from tagfer.au.faces import FaceLandmarker
from tagfer.core.errors import ItemError
from tagfer.core.imageio import LoadedImage, load_image
from tagfer.explainer.frames import crop_region, face_region, reframe
from tagfer.explainer.overlay import BOX_COLORS, DETECTOR_COLOR, box_color, png_data_url, render_overlay
from tagfer.explainer.records import (
    EXIT_FAILED,
    EXIT_MALFORMED,
    EXIT_OK,
    EXIT_USAGE,
    Analysis,
    ImageResult,
    box_aus,
    segments,
)
from tagfer.models.backends import (
    Backend,
    FACSBackend,
    GenerationConfig,
    GenRequest,
    GenResult,
    TransformersBackend,
    call_lock,
    make_backend,
)
from tagfer.models.prompts import tag_prompt
from tagfer.traces.rewards import RewardConfig, r_au, r_fmt
from tagfer.traces.trace import parse_trace

__all__ = [
    "Analyzer",
    "AnalyzerPool",
    "GenerationError",
    "load_engine",
    # re-exported from tagfer.explainer.records / .frames / .overlay
    "Analysis",
    "ImageResult",
    "BOX_COLORS",
    "DETECTOR_COLOR",
    "box_color",
    "face_region",
    "reframe",
    "render_overlay",
    "png_data_url",
    "EXIT_OK",
    "EXIT_FAILED",
    "EXIT_USAGE",
    "EXIT_MALFORMED",
]


class GenerationError(ItemError):
    """The model backend failed for a face (``kind``: ``generation_<backend error kind>``)."""


def load_engine(model: Any = None, *, device: str | None = None, **backend_kw: Any) -> Backend:
    """The analyzer's model from a ``--model`` value: :func:`tagfer.models.backends.make_backend`
    with ``None`` meaning ``"facs"`` (a backend object is returned as is). ``device`` and
    ``backend_kw`` go to the registry (:data:`tagfer.models.backends.COMMON_OPTIONS` and the kind's
    own options). Raises :class:`tagfer.models.vlm.ModelNotAvailable` / ``BackendUnavailable``
    (or ImportError without the ``train`` extra).
    """
    return make_backend("facs" if model is None else model, device=device, **backend_kw)


class Analyzer:
    """Image → one :class:`Analysis` per face (left to right).

    ``detector``: an AU detector (default: a new :class:`tagfer.au.detectors.MediaPipeAUDetector`
    keeping up to ``max_faces`` faces). ``engine``: the model that writes the trace — a model
    spec (``"facs"``, a path / hub id, ``openai:URL``, … — built by :func:`load_engine` and closed
    with the analyzer), a :class:`tagfer.models.backends.Backend` object (stays the caller's), or
    a loaded ``tagfer.models.vlm.VLM`` (run through the ``hf`` backend). ``name``: what
    :attr:`Analysis.engine` records (default: the spec, else the backend's name).
    ``max_new_tokens``, ``system``, ``user``: the generation budget and the prompt of a prompted
    model (default: the unified TAG prompt); the facs backend needs neither.
    Calls are serialised by a lock (MediaPipe's landmarker is not thread-safe): for
    parallelism use several analyzers (``tagfer serve`` keeps a pool); they may share one
    backend (one that is not ``thread_safe`` is called by one analyzer at a time).
    """

    def __init__(
        self,
        detector: Any = None,
        engine: Any = "facs",
        *,
        name: str | None = None,
        frame: str = "face",
        face_margin: float = 0.15,
        reward_config: RewardConfig | None = None,
        max_faces: int = 5,
        landmarker_path: str | None = None,
        max_side: int = 2048,
        own_detector: bool | None = None,
        max_new_tokens: int = 512,
        system: str | None = None,
        user: str | None = None,
    ):
        if frame not in ("face", "image"):
            raise ValueError(f"frame must be 'face' or 'image', got {frame!r}")
        from_spec = isinstance(engine, str) or engine is None
        if from_spec:
            backend = load_engine(engine)
        elif isinstance(engine, Backend):
            backend = engine
        elif hasattr(engine, "generate"):  # a loaded VLM (or anything with its generate())
            backend = TransformersBackend(engine, batch_size=4)
            name = name or backend.model_name()
        else:
            raise TypeError(f"engine must be a model spec, a Backend or a VLM, got {type(engine).__name__}")
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
        if isinstance(backend, FACSBackend) and backend.config.canvas != self.au_config.canvas:
            if not from_spec:
                raise ValueError(f"the FACS engine's canvas ({backend.config.canvas}) differs from the detector's ({self.au_config.canvas})")
            spec = backend.model_spec  # built here: follow the detector
            backend = FACSBackend(backend.detector_spec, replace(backend.config, canvas=self.au_config.canvas),
                                  rules_only=backend.rules_only, engine=backend._grounded)
            backend.model_spec = spec
        self.backend = backend
        self._own_backend = from_spec
        self.name = name or getattr(backend, "model_spec", None) or getattr(backend, "name", "model")
        self.generation = GenerationConfig.tag(max_new_tokens=max_new_tokens)
        self.reads_face = bool(getattr(backend, "reads_face", False))
        # a prompted model sees the face's pixels; an engine that reads the grounded face may too (the FER net)
        self.needs_pixels = bool(getattr(backend, "needs_pixels", not self.reads_face))
        if not self.reads_face and (system is None or user is None):
            s, u = tag_prompt()
            system, user = (s if system is None else system), (u if user is None else user)
        self.system, self.user = system, user or ""
        self.frame = frame
        self.face_margin = face_margin
        self.reward_config = reward_config
        self.max_side = max_side
        self._lock = threading.Lock()

    # -- lifecycle
    def close(self) -> None:
        if self._own_detector:
            self.detector.close()
        if self._own_backend:
            self.backend.close()

    def __enter__(self) -> "Analyzer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- core
    def _write(self, faces: Sequence[tuple[Image.Image | None, FaceAUs]]) -> list[GenResult]:
        """One trace per face from the backend (the facs backend reads the grounded face; a
        prompted model sees the face's pixels). A failed face fails the image (:class:`GenerationError`)."""
        reqs = [GenRequest(id=f"face{i}", user=self.user, image=pic, system=self.system, face=fa)
                for i, (pic, fa) in enumerate(faces)]
        with call_lock(self.backend):
            results = list(self.backend.generate(reqs, self.generation))
        for r in results:
            if r.error is not None or r.text is None:
                err = r.error or {"kind": "empty", "message": "no text returned"}
                kind = str(err.get("kind", "failed"))
                raise GenerationError(kind if kind.startswith("generation") else f"generation_{kind}",
                                      f"model backend failed: {err.get('message', '')}")
        return results

    def _grounded_faces(self, img: LoadedImage, name: str) -> list[tuple[FaceAUs, tuple[float, float, float, float]]]:
        """Each face grounded on its analysis frame, with that frame (image pixels). On the face frame a
        detector that can ground on a region (:class:`RegionAUDetector`) does it once per face; any
        other detects on the whole image and its faces are reframed (the same AUs either way)."""
        whole = (0.0, 0.0, float(img.width), float(img.height))
        if self.frame == "face" and isinstance(self.detector, RegionAUDetector):
            def region_of(bbox: Sequence[float]) -> tuple[float, float, float, float]:
                return face_region(bbox, img.width, img.height, self.face_margin)

            with self._lock:
                return self.detector.detect_in_regions(img, name, region_of)
        with self._lock:
            faces = self.detector.detect(img, name)
        out = []
        for f in faces:
            if self.frame == "face" and f.mesh is not None:
                region = face_region(f.mesh.bbox, img.width, img.height, self.face_margin)
                out.append((reframe(f, region, self.au_config), region))
            else:
                out.append((f, whole))
        return out

    def _analyze_loaded(self, img: LoadedImage, name: str) -> list[Analysis]:
        grounded = self._grounded_faces(img, name)
        if not grounded:  # detectors raise no_face themselves; guard for others
            raise DetectionError("no_face", f"no face found in {name}")
        faces = grounded
        canvas = self.reward_config.canvas  # == self.au_config.canvas (checked in __init__)
        prepared: list[tuple[Image.Image | None, FaceAUs, tuple[float, float, float, float]]] = []
        for fa, region in grounded:
            pic = None if not self.needs_pixels else crop_region(img, region) if self.frame == "face" else Image.fromarray(img.rgb)
            prepared.append((pic, fa, region))
        outs = self._write([(p, fa) for p, fa, _ in prepared])
        cfg = self.reward_config
        result = []
        for i, ((_, fa, region), out) in enumerate(zip(prepared, outs)):
            parsed = parse_trace(out.text, cfg.canvas, cfg.max_boxes)
            scores = out.info.get("scores")
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
                    engine=self.name,
                    detector=fa.detector,
                    label=parsed.label if parsed.label != "excluded" else None,
                    scores=dict(scores) if scores is not None else None,
                    trace=parsed.text,
                    well_formed=parsed.well_formed,
                    violations=list(parsed.violations),
                    boxes=[list(c) if c is not None else None for c in parsed.box_coords],
                    box_aus=box_aus(parsed),
                    box_colors=[box_color(j) for j in range(len(parsed.boxes))],
                    segments=segments(parsed),
                    evidence_aus=list(out.info.get("evidence_aus") or []),
                    aus=[a.to_json() for a in fa.aus],
                    au_boxes=au_boxes,
                    r_fmt=r_fmt(parsed, cfg),
                    r_au=r_au(parsed, au_boxes, matching=cfg.matching, canvas=cfg.canvas, au_count=cfg.au_count),
                    face_aus=fa,
                    views=dict(out.info.get("views") or {}),
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
