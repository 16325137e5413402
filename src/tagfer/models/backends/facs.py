"""``facs`` / ``facs:DETECTOR``: the offline FACS-prototype engine (:func:`tagfer.au.facs.explain`) as a model."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from tagfer.core.errors import ItemError
from tagfer.models.backends.base import GenerationConfig, GenRequest, GenResult, _BackendBase

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

    name = "facs"
    thread_safe = True
    reads_face = True

    def __init__(self, detector_spec: Any = None, config: Any = None):
        from tagfer.au.facs import DEFAULT_CONFIG  # lazy (start-up time): urllib, importlib

        self.detector_spec = detector_spec
        self.config = config if config is not None else DEFAULT_CONFIG
        self._detector: Any = None
        self._lock = threading.Lock()

    @property
    def detector(self) -> Any:
        """The AU detector for requests without a grounded face (built on first use)."""
        if self._detector is None:
            from tagfer.au.detectors import DetectorSpec  # lazy (start-up time): PIL

            self._detector = (self.detector_spec or DetectorSpec()).build()
        return self._detector

    def warm(self) -> None:
        self.detector  # noqa: B018 - builds it

    def _face(self, req: GenRequest) -> Any:
        if req.face is not None:
            return req.face
        if req.image is None:
            raise ItemError("no_image", "the FACS engine needs a grounded face or an image")
        from tagfer.au.aus import largest_face  # lazy (start-up time): urllib, importlib
        from tagfer.core.imageio import load_image  # lazy (start-up time): PIL

        img = load_image(req.image)
        with self._lock:
            faces = self.detector.detect(img, req.image if isinstance(req.image, str) else None)
        return largest_face(faces)

    def _one(self, req: GenRequest) -> GenResult:
        from tagfer.au.facs import explain  # lazy (start-up time): urllib, importlib

        t0 = time.perf_counter()
        try:
            ex = explain(self._face(req), self.config)
        except ItemError as e:
            return GenResult.failure(req, e.kind, e.message, backend=self.name)
        except Exception as e:  # noqa: BLE001 - recorded per item
            return GenResult.failure(req, "internal", f"{type(e).__name__}: {e}", backend=self.name)
        return GenResult(req.id, ex.trace, None, dict(req.meta), {
            "backend": self.name, "label": ex.label, "scores": dict(ex.scores), "evidence_aus": list(ex.evidence_aus),
            "latency_s": round(time.perf_counter() - t0, 4)})

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
