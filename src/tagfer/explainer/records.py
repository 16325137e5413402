"""What ``tagfer analyze`` returns: :class:`Analysis` (one face), :class:`ImageResult` (one image), the
trace views they carry (:func:`box_aus`, :func:`segments`) and the command's exit codes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from tagfer.au.aus import FaceAUs
from tagfer.core.imageio import LoadedImage
from tagfer.explainer.overlay import render_overlay
from tagfer.traces.trace import ParsedTrace, find_au_mentions

__all__ = ["Analysis", "ImageResult", "box_aus", "segments", "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_MALFORMED"]

# Exit codes of `tagfer analyze` (documented in docs/analyze.md).
EXIT_OK = 0  # every image analysed, every trace well-formed
EXIT_FAILED = 1  # at least one image could not be analysed (unreadable, no face, ...)
EXIT_USAGE = 2  # bad options, model or landmarker not available
EXIT_MALFORMED = 3  # all images analysed, but at least one model output is malformed


@dataclass
class Analysis:
    """One face's analysis. JSON schema (:meth:`to_json`, stable)::

        {"image": "photo.jpg", "face": 0, "n_faces": 1,
         "face_bbox": [x1, y1, x2, y2],        # image pixels (float, 1 decimal)
         "frame": "face",                      # "face" | "image": what the canvas covers
         "frame_box": [x1, y1, x2, y2],        # that region, image pixels
         "canvas": 512,
         "engine": "facs",                     # the model: its spec (path, openai:URL, ...) or name
         "detector": "mediapipe",
         "label": "happiness",                 # normalised answer, null if unreadable
         "scores": {"anger": 0.0, ...},        # class scores (the facs backend's), else null
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
         "r_au": 0.87,                         # R_AU vs au_boxes (null: no activated AU)
         # the default engine (facs) only — docs/analyze.md, "The grounded engine":
         "global": {...}, "local": {...},      # the net's impression; the AU evidence's reading and steps
         "agreement": "agree", "decision": {...}}   # whether they agree; which rule decided

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
    # the grounded facs engine (issue 19): {"global", "local", "agreement", "decision"}; {} for other engines
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


def box_aus(parsed: ParsedTrace) -> list[int | None]:
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


def segments(parsed: ParsedTrace) -> list[dict[str, Any]]:
    """The trace cut at its boxes: ``{"text", "box"}`` pieces that concatenate to the trace (``box``: the box index, or None)."""
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
