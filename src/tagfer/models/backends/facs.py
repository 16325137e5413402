"""``facs`` / ``facs:DETECTOR`` and ``facs-rules``: the offline engines as a model.

``facs`` (the default of ``tagfer analyze``): a FER net's global impression of the face plus the
AU evidence grounded in the detector's boxes (:class:`tagfer.au.impression.GroundedEngine`, the
decision rule of :mod:`tagfer.au.fusion`). ``facs-rules``: the FACS prototypes alone
(:func:`tagfer.au.facs.explain`, no pixels) — what ``tagfer build --teacher facs`` writes."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from tagfer.core.errors import ItemError
from tagfer.models.backends.base import GenerationConfig, GenRequest, GenResult, _BackendBase, load_request_image

__all__ = ["FACSBackend"]


class FACSBackend(_BackendBase):
    """The offline FACS-prototype engine as a :class:`Backend` (spec ``facs[:DETECTOR]``).

    It writes a finished TAG trace from a face's AUs (``reads_face``): from ``GenRequest.face``
    when the caller grounded the face already (``tagfer analyze``, ``tagfer build``: no second
    detection, no pixels), else from the largest face its own AU detector finds in
    ``GenRequest.image`` (``detector_spec``, a :class:`tagfer.au.detectors.DetectorSpec`, default
    MediaPipe; built on first use or by :meth:`warm`). Prompts and decoding settings are ignored:
    the engine is deterministic. ``config``: a :class:`tagfer.au.facs.FACSConfig` (default
    :data:`tagfer.au.facs.DEFAULT_CONFIG`; the data builder uses ``TRAINING_CONFIG``, no numbers).

    ``GenResult.info`` carries the engine's decision: ``label``, ``scores`` (class scores) and
    ``evidence_aus`` (the cited AUs, in trace order). Failures (no face, unreadable image) are
    per-item errors, like any backend's. Thread-safe: the engine is pure and the detector is
    used by one thread at a time.
    """

    thread_safe = True
    reads_face = True

    def __init__(self, detector_spec: Any = None, config: Any = None, rules_only: bool = False, engine: Any = None):
        from tagfer.au.facs import DEFAULT_CONFIG  # lazy (start-up time): urllib, importlib

        self.detector_spec = detector_spec
        self.config = config if config is not None else DEFAULT_CONFIG
        self.rules_only = rules_only
        self.name = "facs-rules" if rules_only else "facs"
        #: the grounded engine looks at the face (the caller sends the picture its canvas was made from)
        self.needs_pixels = not rules_only
        self._grounded: Any = engine  # built on first use (the rules never need the net)
        self._detector: Any = None
        self._lock = threading.Lock()

    @property
    def grounded(self) -> Any:
        """The :class:`tagfer.au.impression.GroundedEngine` (``ImpressionUnavailable`` when the net is missing)."""
        if self._grounded is None:
            from tagfer.au.impression import GroundedEngine  # lazy (start-up time): litert

            self._grounded = GroundedEngine(facs=self.config)
        return self._grounded

    @property
    def detector(self) -> Any:
        """The AU detector for requests without a grounded face (built on first use)."""
        if self._detector is None:
            from tagfer.au.detectors import DetectorSpec  # lazy (start-up time): PIL

            self._detector = (self.detector_spec or DetectorSpec()).build()
        return self._detector

    def warm(self) -> None:
        self.detector  # noqa: B018 - builds it

    def _face(self, req: GenRequest) -> tuple[Any, Any]:
        """The grounded face and the picture its canvas covers (None when not needed or not sent)."""
        if req.face is not None:
            return req.face, req.image
        if req.image is None:
            raise ItemError("no_image", "the FACS engine needs a grounded face or an image")
        from PIL import Image  # lazy (start-up time)

        from tagfer.au.aus import largest_face  # lazy (start-up time): urllib, importlib
        from tagfer.core.imageio import load_image  # lazy (start-up time): PIL

        img = load_image(req.image)
        with self._lock:
            faces = self.detector.detect(img, req.image if isinstance(req.image, str) else None)
        return largest_face(faces), (None if self.rules_only else Image.fromarray(img.rgb))

    def explain(self, face: Any, image: Any = None) -> Any:
        """The :class:`tagfer.au.facs.FACSExplanation` of one grounded face; ``image``: the picture its
        canvas was made from (needed unless ``rules_only``)."""
        from tagfer.au.facs import explain  # lazy (start-up time): urllib, importlib

        if self.rules_only:
            return explain(face, self.config)
        if image is None:
            raise ItemError("no_image", "the grounded engine needs the face's picture (or use facs-rules)")
        if not hasattr(image, "convert"):
            image = load_request_image(image)
        return self.grounded.explain(image, face)

    def _one(self, req: GenRequest) -> GenResult:
        t0 = time.perf_counter()
        try:
            ex = self.explain(*self._face(req))
        except ItemError as e:
            return GenResult.failure(req, e.kind, e.message, backend=self.name)
        except Exception as e:  # noqa: BLE001 - recorded per item
            return GenResult.failure(req, "internal", f"{type(e).__name__}: {e}", backend=self.name)
        return GenResult(req.id, ex.trace, None, dict(req.meta), {
            "backend": self.name, "label": ex.label, "scores": dict(ex.scores), "evidence_aus": list(ex.evidence_aus),
            "views": ex.views(), "latency_s": round(time.perf_counter() - t0, 4)})

    def generate(self, requests: Iterable[GenRequest], config: GenerationConfig | None = None,
                 on_result: Callable[[GenResult], None] | None = None) -> Iterator[GenResult]:
        for req in requests:
            res = self._one(req)
            if on_result is not None:
                on_result(res)
            yield res

    def close(self) -> None:
        with self._lock:
            if self._detector is not None:
                self._detector.close()
                self._detector = None
