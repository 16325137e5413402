"""Step 0 of Algorithm 1: load an item's image, run the AU detector, keep the largest face (:class:`GroundedItem`)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from PIL import Image

from tagfer.au.aus import AUConfig, largest_face
from tagfer.au.detectors import DetectionError, DetectorSpec
from tagfer.data.build_config import BuildConfig
from tagfer.data.sources import SourceRecord
from tagfer.traces.trace import format_au_list

__all__ = ["GroundedItem", "ground_record", "DetectorPool"]


@dataclass
class GroundedItem:
    """One item's image with the AU grounding of its largest face (step 0 of Algorithm 1).

    ``au_pool``: the teacher's candidate AUs (the top-K activated AUs above the candidate
    threshold: ``(au, score, canvas box)``), written into the prompt as :attr:`au_list_text`;
    ``active``: every activated AU (score-descending); ``au_boxes``: their canvas boxes (B_AU);
    ``face``: the detector's :class:`tagfer.au.aus.FaceAUs` (what a backend that writes from the
    face, the FACS engine, gets in ``GenRequest.face``).
    """

    image: Any  # PIL.Image (RGB)
    au_pool: list[tuple[int, float, tuple[int, int, int, int]]]
    active: list[int]
    au_boxes: list[list[int]]
    face: Any = None
    detector: str = ""

    @property
    def au_list_text(self) -> str:
        """The candidate pool as the prompt's AU_LIST lines (:func:`tagfer.traces.trace.format_au_list`)."""
        return format_au_list(self.au_pool)


def ground_record(rec: SourceRecord, detector: Any) -> GroundedItem:
    """Load + detect (runs in a worker thread). Raises ``ItemError`` (image errors, no face)."""
    img = rec.load()
    faces = detector.detect(img, rec.image_path or rec.id)
    if not faces:
        raise DetectionError("no_face", f"no face found in {rec.image_path or rec.id}")
    face = largest_face(faces)
    pool = [(a.au, float(a.score), tuple(int(v) for v in a.box)) for a in face.candidate_pool]
    return GroundedItem(
        image=Image.fromarray(img.rgb),
        au_pool=pool,  # type: ignore[arg-type]
        active=[a.au for a in face.active],
        au_boxes=[list(b) for b in face.au_boxes],
        face=face,
        detector=str(getattr(face, "detector", getattr(detector, "name", ""))),
    )


class DetectorPool:
    """Worker threads, each with its own detector (MediaPipe graphs are not shared across threads)."""

    def __init__(self, config: BuildConfig, detector: Any | None):
        """``detector``: one given detector (used by one thread), else one built per thread from ``config``."""
        self._given = detector
        self._local = threading.local()
        self._made: list[Any] = []
        self._lock = threading.Lock()
        self.config = config
        workers = 1 if detector is not None else max(1, config.au_workers)
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="tagfer-au")

    def _detector(self) -> Any:
        if self._given is not None:
            return self._given
        det = getattr(self._local, "det", None)
        if det is None:
            kw: dict[str, Any] = {"top_k": self.config.top_k}
            if self.config.au_threshold is not None:
                kw["threshold"] = self.config.au_threshold
            if self.config.au_candidate_threshold is not None:
                kw["candidate_threshold"] = self.config.au_candidate_threshold
            det = DetectorSpec(self.config.detector, AUConfig(**kw)).build()
            self._local.det = det
            with self._lock:
                self._made.append(det)
        return det

    def ground(self, rec: SourceRecord) -> GroundedItem:
        return ground_record(rec, self._detector())

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        for d in self._made:
            try:
                d.close()
            except Exception:
                pass
