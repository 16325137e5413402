"""The video job's options and its output records (plain dataclasses, no logic beyond checks).

:class:`VideoConfig` (the options of ``tagfer au/analyze VIDEO``), and the JSON Lines records
it writes: :class:`FrameRecord` (one per sampled frame, its faces as :class:`FaceRecord`) and
:class:`VideoSummary` (the last record of each video). Segment records and the smoothing
options are those of :mod:`tagfer.au.segments`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from tagfer.au.aus import AUConfig
from tagfer.au.facs import DEFAULT_CONFIG as DEFAULT_FACS, FACSConfig
from tagfer.au.segments import SmoothingConfig
from tagfer.au.temporal import MAX_FPS, check_finite
from tagfer.core.canvas import CANVAS

MAX_SECONDS = 1e7  # --start / --end: about 115 days
#: the offline engines a video is explained with (the backend kinds of the same names)
ENGINES = ("facs", "facs-rules")


@dataclass(frozen=True)
class VideoConfig:
    """Options of a video job. ``fps``: sampling rate (None: every frame); ``start``/``end``:
    seconds; ``max_side``: frames are downscaled to this longer side before detection;
    ``folder_fps``: frame rate of a folder of frames; ``render``: annotated output
    ``mp4`` | ``gif`` | ``webp`` | ``none``; ``plot``: write the PNG plot; ``media_dir``:
    where the annotated video, the plot and nothing else go (None: no media); ``decode_budget``:
    bytes one decoded frame may take (:func:`tagfer.core.imageio.decode_budget`). Every number
    is checked (finite, in range): a ValueError names the option."""

    fps: float | None = None
    start: float = 0.0
    end: float | None = None
    max_side: int = 1280
    max_faces: int = 5
    landmarker_path: str | None = None
    au: AUConfig = AUConfig()
    facs: FACSConfig = DEFAULT_FACS
    smoothing: SmoothingConfig = SmoothingConfig()
    iou_min: float = 0.3
    folder_fps: float = 25.0
    render: str = "mp4"
    plot: bool = True
    media_dir: str | None = None
    decode_budget: int | None = None  # bytes per decoded frame (None: TAGFER_DECODE_BUDGET_MB or the default)
    engine: str = "facs"  # "facs" (FER net + AU evidence, as for photos) | "facs-rules" (the FACS prototypes alone)
    render_aus: str = "cited"  # annotated video: "cited" (the AUs the face's trace cites) | "active" (every active AU)

    def __post_init__(self) -> None:
        check_finite("--fps", self.fps, 0.0, MAX_FPS, lo_open=True, allow_none=True)
        check_finite("--folder-fps", self.folder_fps, 0.0, MAX_FPS, lo_open=True)
        check_finite("--start (seconds)", self.start, 0.0, MAX_SECONDS)
        check_finite("--end (seconds)", self.end, 0.0, MAX_SECONDS, allow_none=True)
        if self.end is not None and self.end <= self.start:
            raise ValueError(f"need start < end, got start={self.start}, end={self.end}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.render_aus not in ("cited", "active"):
            raise ValueError(f"render_aus must be cited or active, got {self.render_aus!r}")
        if self.render not in ("mp4", "gif", "webp", "none"):
            raise ValueError(f"render must be mp4, gif, webp or none, got {self.render!r}")
        if not isinstance(self.max_side, int) or self.max_side < 32:
            raise ValueError(f"max_side must be an integer >= 32, got {self.max_side!r}")
        if not isinstance(self.max_faces, int) or self.max_faces < 1:
            raise ValueError(f"max_faces must be an integer >= 1, got {self.max_faces!r}")
        check_finite("iou_min", self.iou_min, 0.0, 1.0)
        if self.decode_budget is not None and (not isinstance(self.decode_budget, int) or self.decode_budget <= 0):
            raise ValueError(f"decode_budget must be a positive number of bytes, got {self.decode_budget!r}")


# ----------------------------------------------------------------------------- records
@dataclass
class FaceRecord:
    """One face in one frame. JSON::

        {"face_id": 0,                          # stable across frames (IoU tracker)
         "bbox": [x1, y1, x2, y2],              # original frame pixels
         "bbox_canvas": [x1, y1, x2, y2],       # on the frame's canvas
         "head_pose": {"yaw": .., "pitch": .., "roll": ..},
         "label": "happiness", "scores": {"anger": 0.0, ...},   # the engine's decision, raw (unsmoothed)
         "aus": [{"au": 12, "name": "...", "score": 0.91, "active": true, "box": [..]}, ...],
         "active": [12, 6], "au_boxes": [[..], ...],
         "global_scores": {"anger": 0.01, ...}}  # the FER net's impression (engine "facs"; null for "facs-rules")

    The engine is the one ``tagfer analyze`` uses on photos (``VideoConfig.engine``): ``facs``
    decides each frame with the FER net's global impression and the AU evidence
    (:func:`tagfer.au.fusion.decide`), ``facs-rules`` with the FACS prototypes alone.
    """

    face_id: int
    bbox: list[float]
    bbox_canvas: list[int]
    head_pose: dict[str, float]
    label: str
    scores: dict[str, float]
    aus: list[dict[str, Any]]
    active: list[int]
    au_boxes: list[list[int]]
    global_scores: dict[str, float] | None = None


@dataclass
class FrameRecord:
    """One sampled frame: one JSON line of the output. JSON::

        {"video": "/abs/clip.mp4", "record": "frame", "frame": 12, "t": 0.48,
         "t_repaired": null,                    # or "missing" | "jump" | "backwards" | "repeated" (Timeline)
         "width": 1920, "height": 1080,         # this frame's own decoded size
         "canvas": 512, "n_faces": 1,
         "faces": [FaceRecord, ...],            # left to right; [] when no face is visible
         "error": null}                         # or {"kind": "decode_error", "message": ...}

    An error that is not one decoded frame's (an undecodable packet, a file cut short) has
    ``"frame": null`` and the time where it happened; kinds ``decode_error``, ``too_large``
    (a frame above the decode budget), ``corrupt``, ``truncated``, ``internal``.

    Boxes on the canvas refer to the whole frame (``CanvasTransform`` of width × height).
    """

    video: str
    frame: int | None  # None on a bad-packet error record
    t: float
    width: int | None = None
    height: int | None = None
    canvas: int = CANVAS
    faces: list[FaceRecord] = field(default_factory=list)
    error: dict[str, str] | None = None
    t_repaired: str | None = None  # why ``t`` is not the frame's own pts (tagfer.au.temporal.Timeline)

    def to_json(self) -> dict[str, Any]:
        return {"video": self.video, "record": "frame", "frame": self.frame, "t": round(self.t, 4), "t_repaired": self.t_repaired,
                "width": self.width, "height": self.height, "canvas": self.canvas, "n_faces": len(self.faces),
                "faces": [vars(f).copy() for f in self.faces], "error": self.error}  # shallow: asdict's deep copy costs ms



@dataclass
class VideoSummary:
    """The last record of a video (``"record": "video"``); its presence marks the video done. JSON::

        {"video": "...", "record": "video", "width": .., "height": .., "fps": 25.0, "duration": 2.0,
         "frames_sampled": 50,                # frame records written by this run (errors included)
         "frames_failed": 0, "frames_resumed": 0,   # error records; records of the run(s) resumed
         "faces_seen": 1,                      # distinct face ids
         "segments": 3, "segments_file": "...", "annotated": "...", "plot": "...",
         "error": null}     # or {"kind": "corrupt" | "no_face" | "zero_length" | ..., "message": ...}
    """

    video: str
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    duration: float | None = None
    frames_sampled: int = 0
    frames_failed: int = 0
    frames_resumed: int = 0
    faces_seen: int = 0
    segments: int = 0
    segments_file: str | None = None
    annotated: str | None = None
    plot: str | None = None
    error: dict[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["record"] = "video"
        return d

