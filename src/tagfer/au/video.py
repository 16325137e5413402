"""Video: AU grounding and expressions over time (``tagfer au VIDEO``, ``tagfer analyze VIDEO``).

Pipeline (I/O at the edges, pure steps in between)::

    decode (PyAV, streamed) → sample (--fps, --start/--end) → downscale (max_side)
    → FaceLandmarker in VIDEO mode (MediaPipe tracking) → AU scores and boxes (tagfer.au.aus)
    → class scores (tagfer.au.facs) → face ids (IoU tracker) → one JSON line per sampled frame
    then, from that file (streamed): smoothing → segments with onset/apex/offset
    → a grounded TAG trace for each segment's apex frame (tagfer.au.facs.explain).

Inputs: video files (:data:`VIDEO_EXTENSIONS`, anything PyAV's bundled FFmpeg opens), or a
folder of frames read as a video when asked (``--video``; frames in name order with natural
number sorting, at ``folder_fps`` frames per second). Frames are never held together: memory
stays flat with the clip's length.

Frame index and time: ``frame`` counts decoded frames from the start of the stream (0-based);
``t`` is the frame's presentation time in seconds from the first frame (``pts × time_base``),
so variable-frame-rate clips keep their true times. ``--start`` decodes the frames before it
without analysing them (the index stays absolute).

Sampling: with ``fps`` a frame is kept when its time reaches the next sampling instant
(``t0 + k / fps``); a frame-rate below the source's keeps every frame.

Resume: the output is append-only JSONL. A video whose ``"video"`` summary record is in the
output is done; otherwise the run restarts decoding and skips (without analysing) every frame
up to the last one written, restoring the face tracker from the written records.

Smoothing (:class:`SmoothingConfig`): ``"window"`` (default) is a centred moving average over
``window`` seconds (±window/2 around each frame): no phase lag (a symmetric rise stays centred
where it was), a step is spread over the window; the smoothed value of a frame is known
``window/2`` seconds after it (the pass delays its output by that much, a bounded buffer).
``"ema"`` is a causal exponential moving average with time constant ``tau = window / 2`` seconds
(``alpha = 1 − exp(−Δt / tau)``, right for variable frame rates): it lags by about ``tau``
seconds (``tau × fps`` frames). ``"none"`` keeps the raw values. AU scores and class scores are
smoothed per face with the same filter.

Segments (:class:`SegmentRecord`): per face, the label of a frame is the argmax of its smoothed
class scores; a segment is a run of one label; a switch to another label takes effect only once
that label has held for ``min_duration`` seconds (shorter blips stay in the current segment),
and the boundary is then put where the new label first appeared. A face lost for more than
``max_gap`` seconds closes its segment. Onset = the segment's first frame, apex = its frame with
the highest smoothed score of the label (among frames whose own raw label agrees, when there is
one), offset = its last frame.
"""

from __future__ import annotations

import math
import os
import re
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
import queue
import threading
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from tagfer.au.aus import AUConfig, AUDetection, ground_face
from tagfer.au.faces import FaceLandmarker
from tagfer.au.facs import DEFAULT_CONFIG as DEFAULT_FACS, FACSConfig, _argmax, class_scores, explain
from tagfer.core.canvas import CANVAS, CanvasTransform, iou_matrix
from tagfer.core.errors import ItemError
from tagfer.core.imageio import IMAGE_EXTENSIONS, LoadedImage, load_image
from tagfer.core.jsonl import JsonlWriter, drop_records, read_jsonl
from tagfer.core.labels import LABELS

VIDEO_EXTENSIONS = frozenset({".mp4", ".webm", ".mov", ".avi", ".mkv", ".m4v", ".mpg", ".mpeg"})
MAX_BAD_PACKETS = 200  # consecutive undecodable packets before the rest of a file is given up


class VideoError(ItemError):
    """A video that cannot be used (``kind``: ``not_found``, ``empty_file``, ``not_a_video``,
    ``zero_length``, ``corrupt``, ``no_frames``) or one bad frame (``decode_error``)."""


def is_video_path(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def split_video_inputs(inputs: Iterable[str | os.PathLike], frames_folder: bool = False) -> tuple[list, list[str]]:
    """``(others, videos)``: video files (by extension) and, with ``frames_folder``, folders are videos."""
    others, videos = [], []
    for p in inputs:
        if is_video_path(p) or (frames_folder and Path(p).is_dir()):
            videos.append(os.path.abspath(p))
        else:
            others.append(p)
    return others, videos


# ----------------------------------------------------------------------------- config
@dataclass(frozen=True)
class SmoothingConfig:
    """The temporal filter and the segmentation rules (module docstring)."""

    method: str = "window"  # window | ema | none
    window: float = 0.5  # seconds (ema: tau = window / 2)
    min_duration: float = 0.2  # seconds a new label must hold before a segment switches
    max_gap: float = 1.0  # seconds a face may be missing before its track/segment ends

    def __post_init__(self) -> None:
        if self.method not in ("window", "ema", "none"):
            raise ValueError(f"smoothing must be window, ema or none, got {self.method!r}")
        if self.window < 0 or self.min_duration < 0 or self.max_gap <= 0:
            raise ValueError("window and min_duration must be >= 0 and max_gap > 0")

    @property
    def lag(self) -> float:
        """Delay (seconds) of the filter's response: 0 for the centred window, tau for the EMA."""
        return self.window / 2 if self.method == "ema" else 0.0


@dataclass(frozen=True)
class VideoConfig:
    """Options of a video job. ``fps``: sampling rate (None: every frame); ``start``/``end``:
    seconds; ``max_side``: frames are downscaled to this longer side before detection;
    ``folder_fps``: frame rate of a folder of frames; ``render``: annotated output
    ``mp4`` | ``gif`` | ``webp`` | ``none``; ``plot``: write the PNG plot; ``media_dir``:
    where the annotated video, the plot and nothing else go (None: no media)."""

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

    def __post_init__(self) -> None:
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"--fps must be > 0, got {self.fps}")
        if self.start < 0 or (self.end is not None and self.end <= self.start):
            raise ValueError(f"need 0 <= start < end, got start={self.start}, end={self.end}")
        if self.render not in ("mp4", "gif", "webp", "none"):
            raise ValueError(f"render must be mp4, gif, webp or none, got {self.render!r}")
        if self.folder_fps <= 0 or self.max_side < 32:
            raise ValueError("folder_fps must be > 0 and max_side >= 32")


# ----------------------------------------------------------------------------- records
@dataclass
class FaceRecord:
    """One face in one frame. JSON::

        {"face_id": 0,                          # stable across frames (IoU tracker)
         "bbox": [x1, y1, x2, y2],              # original frame pixels
         "bbox_canvas": [x1, y1, x2, y2],       # on the frame's canvas
         "head_pose": {"yaw": .., "pitch": .., "roll": ..},
         "label": "happiness", "scores": {"anger": 0.0, ...},   # facs engine, raw (unsmoothed)
         "aus": [{"au": 12, "name": "...", "score": 0.91, "active": true, "box": [..]}, ...],
         "active": [12, 6], "au_boxes": [[..], ...]}
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


@dataclass
class FrameRecord:
    """One sampled frame: one JSON line of the output. JSON::

        {"video": "/abs/clip.mp4", "record": "frame", "frame": 12, "t": 0.48,
         "width": 1920, "height": 1080, "canvas": 512, "n_faces": 1,
         "faces": [FaceRecord, ...],            # left to right; [] when no face is visible
         "error": null}                         # or {"kind": "decode_error", "message": ...}

    An error that is not one decoded frame's (an undecodable packet, a file cut short) has
    ``"frame": null`` and the time where it happened; kinds ``decode_error``, ``corrupt``,
    ``truncated``, ``internal``.

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

    def to_json(self) -> dict[str, Any]:
        return {"video": self.video, "record": "frame", "frame": self.frame, "t": round(self.t, 4),
                "width": self.width, "height": self.height, "canvas": self.canvas, "n_faces": len(self.faces),
                "faces": [vars(f).copy() for f in self.faces], "error": self.error}  # shallow: asdict's deep copy costs ms


@dataclass
class SegmentRecord:
    """One expression episode of one face. JSON (one line of ``*.segments.jsonl``)::

        {"video": "...", "face_id": 0, "label": "happiness",
         "onset": 0.48, "apex": 0.92, "offset": 1.60,       # seconds
         "start_frame": 12, "apex_frame": 23, "end_frame": 40, "n_frames": 29,
         "peak": 0.93, "mean": 0.88,                          # the label's smoothed score: at the apex, mean
         "aus": [{"au": 12, "score": 0.95}, ...],             # prototype AUs active at the apex (smoothed)
         "trace": "<think>…</think>\\n<answer>happiness</answer>",   # facs engine on the apex frame
         "trace_label": "happiness", "evidence_aus": [12, 6, 25],
         "boxes": [[x1, y1, x2, y2], ...],                    # the trace's boxes, on the frame canvas
         "canvas": 512, "smoothing": "window 0.5s"}
    """

    video: str
    face_id: int
    label: str
    onset: float
    apex: float
    offset: float
    start_frame: int
    apex_frame: int
    end_frame: int
    n_frames: int
    peak: float
    mean: float
    aus: list[dict[str, Any]]
    trace: str = ""
    trace_label: str | None = None
    evidence_aus: list[int] = field(default_factory=list)
    boxes: list[list[int]] = field(default_factory=list)
    canvas: int = CANVAS
    smoothing: str = ""

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("onset", "apex", "offset"):
            d[k] = round(d[k], 4)
        d["peak"], d["mean"] = round(self.peak, 4), round(self.mean, 4)
        return d


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


# ----------------------------------------------------------------------------- decoding
@dataclass
class Frame:
    """A decoded frame: ``index`` in the stream, ``t`` seconds, ``image`` (downscaled RGB + original size)
    or ``error`` (a frame that could not be decoded)."""

    index: int | None  # None for an error not tied to one decoded frame (a bad packet)
    t: float
    image: LoadedImage | None = None
    error: VideoError | None = None


@dataclass
class VideoInfo:
    width: int
    height: int
    fps: float | None
    duration: float | None


class Sampler:
    """Keeps a frame when its time reaches the next sampling instant ``t0 + k / fps`` (pure, stateful)."""

    def __init__(self, fps: float | None, start: float = 0.0, end: float | None = None):
        self.fps, self.start, self.end = fps, start, end
        self._next: float | None = None

    def keep(self, t: float) -> bool:
        if t < self.start - 1e-9 or (self.end is not None and t > self.end + 1e-9):
            return False
        if self.fps is None:
            return True
        step = 1.0 / self.fps
        if self._next is None:
            self._next = t
        if t + 1e-6 < self._next:
            return False
        k = math.floor((t - self._next) / step + 1e-6) + 1
        self._next += k * step
        return True


def _natural_key(name: str) -> list:
    return [int(s) if s.isdigit() else s.lower() for s in re.split(r"(\d+)", name)]


def _target_size(w: int, h: int, max_side: int) -> tuple[int, int, float]:
    s = min(1.0, max_side / max(w, h))
    return max(1, round(w * s)), max(1, round(h * s)), s


def open_video(path: str) -> tuple[Any, Any, VideoInfo]:
    """Open a video file with PyAV: ``(container, stream, info)`` or :class:`VideoError`."""
    import av  # lazy (start-up time): av

    p = Path(path)
    if not p.exists():
        raise VideoError("not_found", f"{path} does not exist")
    if p.is_file() and p.stat().st_size == 0:
        raise VideoError("empty_file", f"{path} is empty (0 bytes)")
    try:
        c = av.open(str(p))
    except av.error.FFmpegError as e:  # not a container FFmpeg knows, or one cut short (mp4 without its index)
        raise VideoError("corrupt", f"{path}: cannot be opened as a video: {e}") from e
    if not c.streams.video:
        empty = not c.streams
        c.close()
        if empty:
            raise VideoError("zero_length", f"{path} holds no stream at all (a video with no frame)")
        raise VideoError("not_a_video", f"{path} has no video stream")
    s = c.streams.video[0]
    w, h = s.codec_context.width, s.codec_context.height
    if not w or not h:
        c.close()
        raise VideoError("corrupt", f"{path}: the video stream has no frame size")
    fps = float(s.average_rate) if s.average_rate else None
    dur = float(s.duration * s.time_base) if s.duration and s.time_base else (c.duration / 1e6 if c.duration else None)
    return c, s, VideoInfo(w, h, fps, dur)


def iter_frames(path: str, config: VideoConfig = VideoConfig(), skip_through: int = -1,
                info_out: list | None = None) -> Iterator[Frame]:
    """Sampled frames of a video file or frames folder, streamed (one frame in memory at a time).

    Frames with ``index <= skip_through`` are decoded but not converted (resume).
    ``info_out`` receives the :class:`VideoInfo` once the file is open.
    Raises :class:`VideoError` for a file that cannot be opened; undecodable packets are
    yielded as ``Frame(error=…)`` and decoding goes on.
    """
    sampler = Sampler(config.fps, config.start, config.end)
    if Path(path).is_dir():
        yield from _iter_folder(path, config, sampler, skip_through, info_out)
        return
    import av  # lazy (start-up time): av

    container, stream, info = open_video(path)
    if info_out is not None:
        info_out.append(info)
    tw, th, scale = _target_size(info.width, info.height, config.max_side)
    t0 = float(stream.start_time * stream.time_base) if stream.start_time is not None and stream.time_base else None
    index = 0
    bad = 0
    last_t = -1.0
    rate = info.fps or 25.0
    try:
        packets = container.demux(stream)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                break
            except av.error.FFmpegError as e:  # the container itself is broken from here on
                yield Frame(None, max(last_t, 0.0), error=VideoError("corrupt", f"demuxing stopped: {e}"))
                return
            try:
                frames = packet.decode()
                bad = 0
            except av.error.FFmpegError as e:
                bad += 1
                if index <= skip_through:  # recorded by the run being resumed
                    continue
                pt = float(packet.pts * packet.time_base) - (t0 or 0.0) if packet.pts is not None and packet.time_base else last_t
                yield Frame(None, max(pt, 0.0), error=VideoError("decode_error", f"undecodable packet at {pt:.3f}s: {e}"))
                if bad >= MAX_BAD_PACKETS:
                    break
                continue
            for vf in frames:
                if vf.time is not None:
                    if t0 is None:
                        t0 = float(vf.time)
                    t = float(vf.time) - t0
                else:
                    t = index / rate
                if t <= last_t:  # broken or repeated timestamps: keep time moving forward
                    t = last_t + 1e-3
                last_t = t
                i = index
                index += 1
                if config.end is not None and t > config.end + 1e-9:
                    return
                if not sampler.keep(t) or i <= skip_through:
                    continue
                # Resize only when needed: a same-size width/height still builds a scaling context (≈3 ms/frame).
                rgb = vf.to_ndarray(format="rgb24", width=tw, height=th) if scale < 1 else vf.to_ndarray(format="rgb24")
                yield Frame(i, t, LoadedImage(rgb, info.width, info.height, scale, source=path))
        if config.end is None and info.duration and last_t < info.duration - 3.0 / rate:
            where = f"at {last_t:.2f}s" if last_t >= 0 else "before the first frame"
            yield Frame(None, max(last_t, 0.0), error=VideoError(
                "truncated", f"decoding stopped {where} of the {info.duration:.2f}s the file announces"))
    finally:
        container.close()


def _iter_folder(path: str, config: VideoConfig, sampler: Sampler, skip_through: int, info_out) -> Iterator[Frame]:
    names = sorted((e.name for e in os.scandir(path) if e.is_file() and Path(e.name).suffix.lower() in IMAGE_EXTENSIONS),
                   key=_natural_key)
    if not names:
        raise VideoError("zero_length", f"{path}: the folder holds no image frames")
    if info_out is not None:
        info_out.append(VideoInfo(0, 0, config.folder_fps, len(names) / config.folder_fps))
    for i, name in enumerate(names):
        t = i / config.folder_fps
        if config.end is not None and t > config.end + 1e-9:
            return
        if not sampler.keep(t) or i <= skip_through:
            continue
        try:
            yield Frame(i, t, load_image(os.path.join(path, name), max_side=config.max_side))
        except ItemError as e:
            yield Frame(i, t, error=VideoError("decode_error", f"{name}: {e.kind}: {e.message}"))


def prefetch(items: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """Iterate ``items`` in a background thread, at most ``depth`` ahead (decoding overlaps the
    landmarker, which releases the GIL); exceptions are re-raised here, in order."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item: tuple) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for x in items:
                if not put((x, None)):
                    return
            put((done, None))
        except BaseException as e:  # handed to the consumer
            put((done, e))
        finally:
            close = getattr(items, "close", None)
            if close is not None and stop.is_set():
                close()

    th = threading.Thread(target=work, name="tagfer-video-decode", daemon=True)
    th.start()
    try:
        while True:
            x, err = q.get()
            if x is done:
                if err is not None:
                    raise err
                return
            yield x
    finally:
        stop.set()
        th.join()


# ----------------------------------------------------------------------------- tracking
class FaceTracker:
    """Stable face ids across frames: greedy matching on IoU of face boxes (≥ ``iou_min``),
    then on centre distance (< half the box diagonal) for fast moves; a track not seen for
    ``max_gap`` seconds ends; new faces get the next unused id."""

    def __init__(self, iou_min: float = 0.3, max_gap: float = 1.0):
        self.iou_min, self.max_gap = iou_min, max_gap
        self.tracks: dict[int, tuple[list[float], float]] = {}  # id -> (box, last time seen)
        self.next_id = 0

    def update(self, t: float, boxes: Sequence[Sequence[float]]) -> list[int]:
        self.tracks = {k: v for k, v in self.tracks.items() if t - v[1] <= self.max_gap}
        ids: list[int | None] = [None] * len(boxes)
        tids = list(self.tracks)
        if boxes and tids:
            tb = [self.tracks[k][0] for k in tids]
            m = iou_matrix(boxes, tb)
            b = np.asarray(boxes, dtype=np.float64)
            c = np.asarray(tb, dtype=np.float64)
            bc, cc = (b[:, :2] + b[:, 2:]) / 2, (c[:, :2] + c[:, 2:]) / 2
            dist = np.linalg.norm(bc[:, None] - cc[None], axis=-1)
            diag = np.linalg.norm(c[:, 2:] - c[:, :2], axis=-1)[None]
            pairs = [(-m[i, j], 0, i, j) for i in range(len(boxes)) for j in range(len(tids)) if m[i, j] >= self.iou_min]
            pairs += [(dist[i, j] / max(diag[0, j], 1e-6), 1, i, j) for i in range(len(boxes)) for j in range(len(tids))
                      if m[i, j] < self.iou_min and dist[i, j] < 0.5 * diag[0, j]]
            used: set[int] = set()
            for _, _, i, j in sorted(pairs, key=lambda p: (p[1], p[0])):
                if ids[i] is None and j not in used:
                    ids[i] = tids[j]
                    used.add(j)
        for i, box in enumerate(boxes):
            if ids[i] is None:
                ids[i] = self.next_id
                self.next_id += 1
            self.tracks[ids[i]] = ([float(v) for v in box], t)  # type: ignore[index]
        return ids  # type: ignore[return-value]

    def observe(self, t: float, faces: Iterable[tuple[int, Sequence[float]]]) -> None:
        """Replay already written faces (resume)."""
        for fid, box in faces:
            self.tracks[fid] = ([float(v) for v in box], t)
            self.next_id = max(self.next_id, fid + 1)


# ----------------------------------------------------------------------------- per frame
def analyse_frame(landmarker: Any, frame: Frame, tracker: FaceTracker, config: VideoConfig, video: str,
                  timestamp_ms: int | None = None) -> FrameRecord:
    """Detect, ground, score and track the faces of one decoded frame (``timestamp_ms``: for the
    landmarker's video mode, strictly increasing; default the frame's time)."""
    img = frame.image
    assert img is not None and frame.index is not None
    ts = round(frame.t * 1000) if timestamp_ms is None else timestamp_ms
    meshes = landmarker.detect(img.rgb, scale=img.scale, timestamp_ms=ts)
    tr = CanvasTransform(img.width, img.height, canvas=config.au.canvas)
    faces = [ground_face(m, tr, config.au, detector="mediapipe") for m in meshes]
    ids = tracker.update(frame.t, [f.mesh.bbox for f in faces])  # type: ignore[union-attr]
    recs = []
    for fid, fa in zip(ids, faces):
        sc = class_scores(fa, config.facs)
        mesh = fa.mesh
        assert mesh is not None
        recs.append(FaceRecord(
            face_id=fid, bbox=[round(float(v), 1) for v in mesh.bbox], bbox_canvas=list(fa.bbox_canvas),
            head_pose={k: round(float(v), 1) for k, v in mesh.head_pose.items()},
            label=_argmax(sc), scores={k: round(v, 4) for k, v in sc.items()},
            aus=[a.to_json() for a in fa.aus], active=[a.au for a in fa.active], au_boxes=[list(b) for b in fa.au_boxes],
        ))
    return FrameRecord(video, frame.index, frame.t, img.width, img.height, config.au.canvas, recs)


# ----------------------------------------------------------------------------- smoothing (pure)
@dataclass
class Sample:
    """One face in one frame as the smoother sees it: ``values`` (AU scores then class scores)."""

    frame: int
    t: float
    values: np.ndarray
    payload: Any = None  # the raw face record, passed through
    smoothed: np.ndarray | None = None


class Smoother:
    """Streaming filter of one face track (see :class:`SmoothingConfig`); bounded memory.

    :meth:`push` returns the samples whose smoothed values became known; :meth:`flush`
    the rest (end of the track)."""

    def __init__(self, config: SmoothingConfig):
        self.config = config
        self._buf: deque[Sample] = deque()  # window: samples within reach of pending ones
        self._pending: deque[Sample] = deque()
        self._ema: np.ndarray | None = None
        self._last_t: float | None = None

    def push(self, s: Sample) -> list[Sample]:
        c = self.config
        if c.method == "none" or c.window == 0:
            s.smoothed = s.values.copy()
            return [s]
        if c.method == "ema":
            if self._ema is None or self._last_t is None:
                self._ema = s.values.astype(np.float64).copy()
            else:
                a = 1.0 - math.exp(-max(s.t - self._last_t, 0.0) / (c.window / 2))
                self._ema = self._ema + a * (s.values - self._ema)
            self._last_t = s.t
            s.smoothed = self._ema.copy()
            return [s]
        self._buf.append(s)
        self._pending.append(s)
        return self._release(s.t)

    def _release(self, now: float | None) -> list[Sample]:
        half = self.config.window / 2
        out = []
        while self._pending and (now is None or self._pending[0].t + half < now - 1e-9):
            p = self._pending.popleft()
            while self._buf and self._buf[0].t < p.t - half - 1e-9:
                self._buf.popleft()
            vals = [b.values for b in self._buf if b.t <= p.t + half + 1e-9]
            p.smoothed = np.mean(vals, axis=0)
            out.append(p)
        return out

    def flush(self) -> list[Sample]:
        if self.config.method != "window" or self.config.window == 0:
            self._ema, self._last_t = None, None
            return []
        out = self._release(None)
        self._buf.clear()
        return out


def smooth_series(times: Sequence[float], values: Sequence[Sequence[float]], config: SmoothingConfig) -> np.ndarray:
    """The filter over a whole series (pure; same :class:`Smoother` as the streaming pass)."""
    sm = Smoother(config)
    out: list[Sample] = []
    for i, (t, v) in enumerate(zip(times, values)):
        out += sm.push(Sample(i, float(t), np.asarray(v, dtype=np.float64)))
    out += sm.flush()
    return np.array([s.smoothed for s in sorted(out, key=lambda s: s.frame)])


# ----------------------------------------------------------------------------- segments (pure)
@dataclass
class _Run:
    label: str
    apex: tuple[int, float, float, Any, np.ndarray | None] | None = None  # frame, t, score, payload, smoothed
    apex_agrees: bool = False
    n: int = 0
    total: float = 0.0
    first: tuple[int, float] | None = None
    last: tuple[int, float] | None = None

    def add(self, s: Sample, score: float, raw_label: str | None) -> None:
        if self.first is None:
            self.first = (s.frame, s.t)
        self.last = (s.frame, s.t)
        self.n += 1
        self.total += score
        agrees = raw_label == self.label
        better = (agrees and not self.apex_agrees) or (agrees == self.apex_agrees and (self.apex is None or score > self.apex[2]))
        if better:
            self.apex = (s.frame, s.t, score, s.payload, s.smoothed)
            self.apex_agrees = agrees


class Segmenter:
    """Per-face label runs → :class:`SegmentRecord` (rules in the module docstring); streaming."""

    def __init__(self, video: str, face_id: int, config: SmoothingConfig, au_names: Sequence[int],
                 facs: FACSConfig = DEFAULT_FACS, au_threshold: float = 0.3):
        self.video, self.face_id, self.config = video, face_id, config
        self.au_names, self.facs, self.au_threshold = list(au_names), facs, au_threshold
        self.cur: _Run | None = None
        self.cand: list[Sample] = []
        self.cand_label: str | None = None

    def _label_of(self, s: Sample) -> tuple[str, dict[str, float]]:
        sm = s.smoothed if s.smoothed is not None else s.values
        k = len(self.au_names)
        sc = {c: float(sm[k + i]) for i, c in enumerate(LABELS)}
        return _argmax(sc), sc

    def _add(self, run: _Run, s: Sample) -> None:
        _, sc = self._label_of(s)
        raw = s.payload.get("label") if isinstance(s.payload, dict) else None
        run.add(s, sc[run.label], raw)

    def push(self, s: Sample) -> list[SegmentRecord]:
        label, _ = self._label_of(s)
        out: list[SegmentRecord] = []
        if self.cur is None:
            self.cur = _Run(label)
        if label == self.cur.label:
            for c in self.cand:  # a blip: the candidate frames stay in the current segment
                self._add(self.cur, c)
            self.cand, self.cand_label = [], None
            self._add(self.cur, s)
            return out
        if label != self.cand_label:
            for c in self.cand:
                self._add(self.cur, c)
            self.cand, self.cand_label = [], label
        self.cand.append(s)
        if self.cand[-1].t - self.cand[0].t >= self.config.min_duration - 1e-9:
            out.append(self._close(self.cur))
            self.cur = _Run(label)
            for c in self.cand:
                self._add(self.cur, c)
            self.cand, self.cand_label = [], None
        return out

    def flush(self) -> list[SegmentRecord]:
        out: list[SegmentRecord] = []
        if self.cur is None:
            return out
        if self.cand and self.cand[-1].t - self.cand[0].t >= self.config.min_duration - 1e-9:
            out.append(self._close(self.cur))
            self.cur = _Run(self.cand_label or "neutral")
        for c in self.cand:
            self._add(self.cur, c)
        out.append(self._close(self.cur))
        self.cur, self.cand, self.cand_label = None, [], None
        return out

    def _close(self, run: _Run) -> SegmentRecord:
        assert run.apex is not None and run.first is not None and run.last is not None
        af, at, peak, payload, sm = run.apex
        proto = self.facs.prototypes.get(run.label, {})
        aus = []
        if sm is not None:
            for i, au in enumerate(self.au_names):
                if au in proto and sm[i] >= self.au_threshold:
                    aus.append({"au": au, "score": round(float(sm[i]), 4)})
            aus.sort(key=lambda d: -proto[d["au"]] * d["score"])
        seg = SegmentRecord(
            video=self.video, face_id=self.face_id, label=run.label, onset=run.first[1], apex=at, offset=run.last[1],
            start_frame=run.first[0], apex_frame=af, end_frame=run.last[0], n_frames=run.n, peak=peak,
            mean=run.total / max(run.n, 1), aus=aus, smoothing=_smoothing_name(self.config),
        )
        if isinstance(payload, dict) and payload.get("aus") is not None:
            ex = explain([AUDetection.from_json(d) for d in payload["aus"]], self.facs)
            seg.trace, seg.trace_label = ex.trace, ex.label
            seg.evidence_aus, seg.boxes = list(ex.evidence_aus), [list(b) for b in ex.boxes]
        return seg


def _smoothing_name(c: SmoothingConfig) -> str:
    if c.method == "none" or c.window == 0:
        return "none"
    return f"window {c.window:g}s" if c.method == "window" else f"ema tau {c.window / 2:g}s"


def au_columns(records: Iterable[dict]) -> list[int]:
    """The AU numbers of the first face found in ``records`` (the order of the value vectors)."""
    for r in records:
        for f in r.get("faces") or []:
            return sorted(a["au"] for a in f["aus"])
    return []


def face_samples(rec: dict, aus: Sequence[int]) -> Iterator[tuple[int, Sample]]:
    """``(face_id, Sample)`` for every face of a frame record: AU scores (in ``aus`` order) then class scores."""
    for f in rec.get("faces") or []:
        sc = {a["au"]: a["score"] for a in f["aus"]}
        vals = np.array([sc.get(a, 0.0) for a in aus] + [f["scores"].get(c, 0.0) for c in LABELS], dtype=np.float64)
        yield f["face_id"], Sample(rec["frame"], float(rec["t"]), vals, payload=f)


def smoothed_tracks(records: Iterable[dict], aus: Sequence[int], config: SmoothingConfig) -> Iterator[tuple[int, Sample | None]]:
    """Stream ``(face_id, smoothed Sample)`` over frame records (one video, in frame order);
    ``(face_id, None)`` marks the end of a track run (face lost for more than ``max_gap``)."""
    smoothers: dict[int, Smoother] = {}
    last_seen: dict[int, float] = {}
    for rec in records:
        if rec.get("record", "frame") != "frame" or rec.get("error"):
            continue
        t = float(rec["t"])
        for fid in [f for f, ts in last_seen.items() if t - ts > config.max_gap]:
            for s in smoothers[fid].flush():
                yield fid, s
            yield fid, None
            del last_seen[fid], smoothers[fid]
        for fid, s in face_samples(rec, aus):
            if fid not in smoothers:
                smoothers[fid] = Smoother(config)
            last_seen[fid] = t
            for o in smoothers[fid].push(s):
                yield fid, o
    for fid, sm in smoothers.items():
        for s in sm.flush():
            yield fid, s
        yield fid, None


def segments_from_records(records: Iterable[dict], config: SmoothingConfig = SmoothingConfig(), *,
                          aus: Sequence[int] | None = None, facs: FACSConfig = DEFAULT_FACS,
                          au_threshold: float = 0.3, video: str | None = None) -> Iterator[SegmentRecord]:
    """Segments of every face, streamed from frame records of one video (frame order).

    ``aus``: the AU order of the value vectors (default: taken from the first face — then
    ``records`` must be re-iterable, e.g. a list or a :class:`FrameFile`)."""
    if aus is None:
        aus = au_columns(records)
    segs: dict[int, Segmenter] = {}
    for fid, s in smoothed_tracks(records, aus, config):
        if s is None:
            if fid in segs:
                yield from segs.pop(fid).flush()
            continue
        if fid not in segs:
            segs[fid] = Segmenter(video or "", fid, config, aus, facs, au_threshold)
        yield from segs[fid].push(s)
    for sg in segs.values():
        yield from sg.flush()


class FrameFile:
    """The frame records of one video in an output file, re-iterable and streamed (constant memory)."""

    def __init__(self, path: str | os.PathLike, video: str):
        self.path, self.video = Path(path), video

    def __iter__(self) -> Iterator[dict]:
        for r in read_jsonl(self.path):
            if r.get("video") == self.video and r.get("record") == "frame" and r.get("frame") is not None:
                yield r


# ----------------------------------------------------------------------------- the job
def segments_path(out: str | os.PathLike) -> Path:
    """``runs/clip.jsonl`` → ``runs/clip.segments.jsonl``."""
    p = Path(out)
    return p.with_name(p.stem + ".segments.jsonl")


def media_stem(video: str) -> str:
    from tagfer.au.grounding import overlay_name  # lazy (start-up time): multiprocessing, concurrent

    return overlay_name(video)[: -len(".png")]


def _progress(out: Path, video: str, tracker: FaceTracker) -> tuple[int, bool, int, set[int]]:
    """(last frame written, video done, frames written, face ids) for ``video`` in ``out``; replays the tracker."""
    last, done, n, ids = -1, False, 0, set()
    for r in read_jsonl(out):
        if r.get("video") != video:
            continue
        if r.get("record") == "video":
            done = True
        elif r.get("record") == "frame" and r.get("frame") is not None:
            n += 1
            last = max(last, int(r["frame"]))
            tracker.tracks = {k: v for k, v in tracker.tracks.items() if float(r["t"]) - v[1] <= tracker.max_gap}
            tracker.observe(float(r["t"]), [(f["face_id"], f["bbox"]) for f in r.get("faces") or []])
            ids.update(f["face_id"] for f in r.get("faces") or [])
    return last, done, n, ids


def run_video(video: str, out: str | os.PathLike, config: VideoConfig = VideoConfig(), *,
              on_record: Callable[[dict], None] | None = None, resume: bool = True) -> VideoSummary:
    """Analyse one video into ``out`` (frame records then a summary record), then write its segments
    (``segments_path(out)``) and, with ``config.media_dir``, the annotated video and the plot.
    Never raises for bad input: the summary's ``error`` says what went wrong."""
    out = Path(out)
    video = os.path.abspath(video)
    summ = VideoSummary(video=video)
    tracker = FaceTracker(config.iou_min, config.smoothing.max_gap)
    last, done, n_prev, faces_seen = _progress(out, video, tracker) if resume and out.exists() else (-1, False, 0, set())
    summ.frames_resumed = n_prev
    if done:
        return summ
    info: list[VideoInfo] = []
    last_ms = -1
    with JsonlWriter(out) as writer:
        def emit(d: dict) -> None:
            writer.write(d)
            if on_record:
                on_record(d)

        try:
            with FaceLandmarker(config.landmarker_path, max_faces=config.max_faces, running_mode="video") as lm:
                for fr in prefetch(iter_frames(video, config, skip_through=last, info_out=info)):
                    summ.frames_sampled += 1
                    if fr.error is not None:
                        summ.frames_failed += 1
                        emit(FrameRecord(video, fr.index, fr.t, error={"kind": fr.error.kind, "message": fr.error.message}).to_json())
                        if fr.error.kind in ("corrupt", "truncated"):
                            summ.error = {"kind": fr.error.kind, "message": fr.error.message}
                        continue
                    last_ms = max(round(fr.t * 1000), last_ms + 1)
                    try:
                        rec = analyse_frame(lm, fr, tracker, config, video, last_ms)
                    except Exception as e:  # a library failure on one frame: recorded, the clip goes on
                        summ.frames_failed += 1
                        rec = FrameRecord(video, fr.index, fr.t, error={"kind": "internal", "message": f"{type(e).__name__}: {e}"})
                    faces_seen.update(f.face_id for f in rec.faces)
                    emit(rec.to_json())
        except ItemError as e:
            summ.error = {"kind": e.kind, "message": e.message}
        except MemoryError:
            summ.error = {"kind": "internal", "message": "out of memory while decoding this video"}
        if info:
            i = info[0]
            summ.width, summ.height = i.width or None, i.height or None
            summ.fps = round(i.fps, 3) if i.fps else None
            summ.duration = round(i.duration, 3) if i.duration else None
        summ.faces_seen = len(faces_seen)
        total = summ.frames_sampled + n_prev
        if summ.error is None:
            if total == 0:
                summ.error = {"kind": "zero_length", "message": f"{video}: no frame decoded in the requested range"}
            elif not faces_seen:
                summ.error = {"kind": "no_face", "message": f"no face in any of the {total} sampled frame(s)"}
            elif summ.frames_failed and summ.frames_failed == summ.frames_sampled and not n_prev:
                summ.error = {"kind": "corrupt", "message": f"none of the {total} frame(s) could be decoded"}
        try:
            if faces_seen:
                summ.segments, summ.segments_file = write_segments(out, video, config), str(segments_path(out))
            if config.media_dir and faces_seen:
                from tagfer.au.video_render import plot_timeline, render_video  # lazy (start-up time): PIL

                stem = Path(config.media_dir) / media_stem(video)
                if config.render != "none":
                    summ.annotated = render_video(video, FrameFile(out, video), f"{stem}.annotated.{config.render}", config)
                if config.plot:
                    summ.plot = plot_timeline(FrameFile(out, video), segments_path(out), video, f"{stem}.plot.png", config)
        except Exception as e:  # outputs after the analysis: the frame records are already safe
            if summ.error is None:
                summ.error = {"kind": "render_failed", "message": f"{type(e).__name__}: {e}"}
        emit(summ.to_json())
    return summ


def write_segments(out: str | os.PathLike, video: str, config: VideoConfig) -> int:
    """(Re)write the segments of ``video`` into ``segments_path(out)``; returns how many."""
    sp = segments_path(out)
    drop_records(sp, lambda r: r.get("video") == video)
    frames = FrameFile(out, video)
    n = 0
    with JsonlWriter(sp) as w:
        for seg in segments_from_records(frames, config.smoothing, facs=config.facs, au_threshold=config.au.threshold, video=video):
            w.write(seg.to_json())
            n += 1
    return n


def drop_failed_videos(out: str | os.PathLike) -> int:
    """``--retry-errors``: remove every record of the videos whose summary has an error."""
    bad = {r["video"] for r in read_jsonl(out) if r.get("record") == "video" and r.get("error")}
    return drop_records(out, lambda r: r.get("video") in bad) if bad else 0
