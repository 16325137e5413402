"""Live sessions of ``tagfer serve``: a camera's frames analysed one by one, in memory.

The page (``web/live.js``) sends the camera's frames (JPEG, at most one in flight, at a bounded
rate: frames are dropped, never queued) to ``POST /live/{id}/frame``; each is answered with the
faces' boxes, AU boxes and smoothed label as JSON, which the browser draws over the live image.

Per session (:class:`LiveSession`): one MediaPipe landmarker in VIDEO mode, one face tracker and
one smoother per face — the video engine's own per-frame step (:func:`tagfer.au.video.ground_frame`,
:class:`tagfer.au.temporal.FaceTracker`, :class:`tagfer.au.segments.Smoother`) — and the video
engine's decision per face (:func:`tagfer.au.video.load_grounded`: the FER net's global impression
on the face crop, then the AU evidence, :func:`tagfer.au.fusion.decide`, as for photos), with its
full explanation (global view, local reading, agreement) for the page. Smoothing is causal (an EMA): a live frame
cannot wait for later ones.

Frames are decoded from the request body in memory (within the decode budget of
:mod:`tagfer.core.imageio`) and dropped after the answer: nothing is written anywhere.

:class:`LiveSessions` bounds the number of sessions (one more is refused with a clear message),
closes a session idle for ``idle_timeout_s`` or older than ``max_session_s``, refuses a frame that
arrives while the session's previous one is still being analysed (``frame_in_flight``) or sooner
than ``1 / max_fps`` after it (``too_fast``), and requires the session's token with every frame.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from tagfer.au.segments import Sample, SmoothingConfig, Smoother
from tagfer.au.temporal import FaceTracker
from tagfer.au.video import VideoConfig, ground_frame, load_grounded
from tagfer.core.errors import ItemError
from tagfer.core.labels import LABELS

__all__ = ["LiveConfig", "LiveError", "LiveSession", "LiveSessions"]


class LiveError(ItemError):
    """A refused live request (``kind``: ``live_full``, ``session_not_found``, ``bad_token``,
    ``too_fast``, ``frame_in_flight``, ``too_large``, …)."""


@dataclass(frozen=True)
class LiveConfig:
    """Limits and options of live sessions. ``max_sessions`` open at once; a session ends after
    ``idle_timeout_s`` without a frame or ``max_session_s`` in all; ``max_fps``: frames per second a
    session may send (faster ones are refused, the page drops them); ``max_frame_bytes``: largest
    encoded frame; ``max_side``: frames are downscaled to this longer side before detection;
    ``smoothing``: the per-face filter of the class scores (causal: ``ema``)."""

    max_sessions: int = 2
    idle_timeout_s: float = 30.0
    max_session_s: float = 1800.0
    max_fps: float = 30.0
    max_frame_bytes: int = 2 * 1024 * 1024
    max_side: int = 1280
    max_faces: int = 5
    smoothing: SmoothingConfig = SmoothingConfig("ema", 0.5)
    landmarker_path: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_sessions, int) or self.max_sessions < 0:
            raise ValueError(f"max_sessions must be an integer >= 0, got {self.max_sessions!r}")
        for name in ("idle_timeout_s", "max_session_s", "max_fps"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 < v < float("inf")):
                raise ValueError(f"{name} must be a positive finite number, got {v!r}")
        if self.smoothing.method == "window" and self.smoothing.window > 0:
            raise ValueError("live smoothing must be causal: ema or none (a centred window waits for later frames)")


def _face_json(fid: int, fa: Any, ex: Any, smoothed: np.ndarray) -> dict[str, Any]:
    k = int(np.argmax(smoothed))
    g = ex.global_ or {}
    return {
        "face_id": fid,
        "bbox": [round(float(v), 1) for v in fa.mesh.bbox],
        "bbox_canvas": list(fa.bbox_canvas),
        "label": LABELS[k],
        "score": round(float(smoothed[k]), 3),
        "scores": {c: round(float(v), 3) for c, v in zip(LABELS, smoothed)},
        "frame_label": ex.label,
        "frame_score": round(float(ex.scores.get(ex.label, 0.0)), 3),
        "global": {"net": g.get("net"), "label": g.get("label"), "confidence": g.get("confidence")} if g else None,
        "agreement": ex.agreement,
        "decided_by": (ex.decision or {}).get("decided_by"),
        "aus": [{"au": a.au, "name": a.name, "score": round(float(a.score), 2), "box": list(a.box), "cited": a.au in ex.evidence_aus}
                for a in fa.active],
    }


@dataclass
class LiveSession:
    """One camera: its landmarker (VIDEO mode), face tracker, smoothers and engine. :meth:`step`
    analyses one encoded frame (bytes) and returns the JSON sent to the page."""

    id: str
    token: str
    config: LiveConfig
    engine: Any  # GroundedEngine (explain(image, face_aus))
    landmarker: Any
    clock: Callable[[], float] = time.monotonic
    started: float = 0.0
    last_seen: float = 0.0
    last_frame: float = float("-inf")
    frames: int = 0
    tracker: FaceTracker = field(init=False)
    smoothers: dict[int, tuple[Smoother, float]] = field(default_factory=dict)
    busy: threading.Lock = field(default_factory=threading.Lock)
    _last_ms: int = -1
    _video: VideoConfig = field(init=False)

    def __post_init__(self) -> None:
        self._video = VideoConfig(max_side=self.config.max_side, max_faces=self.config.max_faces, render="none", plot=False)
        self.tracker = FaceTracker(self._video.iou_min, self.config.smoothing.max_gap)
        self.started = self.last_seen = self.clock()

    def step(self, data: bytes) -> dict[str, Any]:
        """Decode ``data`` (an encoded image) in memory and analyse it. Raises :class:`ItemError`
        for a frame that cannot be used (the session goes on)."""
        from PIL import Image

        from tagfer.core.imageio import load_image

        t0 = time.perf_counter()
        img = load_image(data, max_side=self.config.max_side)  # the decode budget applies
        now = self.clock()
        t = now - self.started
        self._last_ms = ts = max(round(t * 1000), self._last_ms + 1)  # strictly increasing for VIDEO mode
        faces = ground_frame(self.landmarker, img, ts, self._video)
        ids = self.tracker.update(t, [f.mesh.bbox for f in faces])
        pic = Image.fromarray(img.rgb) if faces else None
        out = []
        for fid, fa in zip(ids, faces):
            ex = self.engine.explain(pic, fa)
            sm, _ = self.smoothers.get(fid) or (Smoother(self.config.smoothing), t)
            self.smoothers[fid] = (sm, t)
            s = Sample(self.frames, t, np.array([ex.scores.get(c, 0.0) for c in LABELS], dtype=np.float64))
            done = sm.push(s)
            out.append(_face_json(fid, fa, ex, done[-1].smoothed if done else s.values))
        gap = self.config.smoothing.max_gap
        for fid in [f for f, (_, seen) in self.smoothers.items() if t - seen > gap]:  # tracks ended: memory stays bounded
            del self.smoothers[fid]
        self.frames += 1
        return {"frame": self.frames - 1, "t": round(t, 3), "width": img.width, "height": img.height,
                "canvas": self._video.au.canvas, "n_faces": len(out), "faces": out,
                "ms": round((time.perf_counter() - t0) * 1000, 1)}

    def close(self) -> None:
        self.landmarker.close()


class LiveSessions:
    """The open live sessions, at most ``config.max_sessions``. Thread-safe."""

    def __init__(self, config: LiveConfig = LiveConfig(), *, engine_factory: Callable[[], Any] | None = None,
                 landmarker_factory: Callable[[], Any] | None = None, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.clock = clock
        self._engine_factory = engine_factory
        self._landmarker_factory = landmarker_factory
        self._engine: Any = None
        self._sessions: dict[str, LiveSession] = {}
        self._opening = 0
        self._lock = threading.Lock()
        self._reaper: threading.Thread | None = None
        self._stop = threading.Event()

    # -- factories (lazy: MediaPipe and the FER net load only when a session opens)
    def _new_landmarker(self) -> Any:
        if self._landmarker_factory is not None:
            return self._landmarker_factory()
        from tagfer.au.faces import FaceLandmarker

        return FaceLandmarker(self.config.landmarker_path, max_faces=self.config.max_faces, running_mode="video")

    def _shared_engine(self) -> Any:
        with self._lock:
            if self._engine is None:
                if self._engine_factory is not None:
                    self._engine = self._engine_factory()
                else:  # the video job's engine (FER net + AU evidence); one net for every session (its calls are locked)
                    self._engine = load_grounded(VideoConfig(max_faces=self.config.max_faces))
            return self._engine

    # -- lifecycle
    def open(self) -> LiveSession:
        """A new session, or :class:`LiveError` ``live_full`` when ``max_sessions`` are open."""
        self.reap()
        with self._lock:
            if self.config.max_sessions == 0:
                raise LiveError("live_full", "live mode is off on this server (tagfer serve --max-live-sessions 0)")
            if len(self._sessions) + self._opening >= self.config.max_sessions:
                raise LiveError("live_full", f"{self.config.max_sessions} live session(s) are already open (the server's "
                                             f"limit); close one, or try again when one ends (after "
                                             f"{self.config.idle_timeout_s:g} s without frames)")
            self._opening += 1
        try:
            engine = self._shared_engine()
            lm = self._new_landmarker()
            s = LiveSession(secrets.token_urlsafe(12), secrets.token_urlsafe(24), self.config, engine, lm, clock=self.clock)
            with self._lock:
                self._sessions[s.id] = s
                if self._reaper is None or not self._reaper.is_alive():  # closes abandoned sessions without waiting for a request
                    self._stop.clear()
                    self._reaper = threading.Thread(target=self._reap_loop, name="tagfer-live-reaper", daemon=True)
                    self._reaper.start()
            return s
        finally:
            with self._lock:
                self._opening -= 1

    def get(self, sid: str, token: str | None) -> LiveSession:
        """The open session ``sid`` whose token is ``token``; :class:`LiveError` otherwise."""
        self.reap()
        with self._lock:
            s = self._sessions.get(sid)
        if s is None:
            raise LiveError("session_not_found", "this live session has ended (closed, idle too long or too old); start Live again")
        if not token or not secrets.compare_digest(token, s.token):
            raise LiveError("bad_token", "missing or wrong live session token")
        return s

    def close(self, sid: str) -> bool:
        with self._lock:
            s = self._sessions.pop(sid, None)
        if s is None:
            return False
        with s.busy:  # never close a landmarker in the middle of a frame
            s.close()
        return True

    def reap(self) -> int:
        """Close the sessions idle for ``idle_timeout_s`` or older than ``max_session_s``; how many."""
        now = self.clock()
        c = self.config
        with self._lock:
            old = [sid for sid, s in self._sessions.items()
                   if now - s.last_seen > c.idle_timeout_s or now - s.started > c.max_session_s]
        return sum(self.close(sid) for sid in old)

    def _reap_loop(self) -> None:
        period = min(5.0, self.config.idle_timeout_s / 2)
        while not self._stop.wait(period):
            self.reap()
            with self._lock:
                if not self._sessions and not self._opening:
                    self._reaper = None
                    return

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def close_all(self) -> None:
        self._stop.set()
        with self._lock:
            ids = list(self._sessions)
        for sid in ids:
            self.close(sid)

    # -- one frame
    def frame(self, sid: str, token: str | None, data: bytes) -> dict[str, Any]:
        """Analyse one frame of session ``sid``: at most one at a time per session, at most
        ``max_fps`` per second (else :class:`LiveError` ``frame_in_flight`` / ``too_fast``)."""
        s = self.get(sid, token)
        if len(data) > self.config.max_frame_bytes:
            raise LiveError("too_large", f"frame of {len(data):,} bytes is above the {self.config.max_frame_bytes:,}-byte limit")
        if not s.busy.acquire(blocking=False):
            raise LiveError("frame_in_flight", "the previous frame of this session is still being analysed (send one at a time)")
        try:
            now = self.clock()
            s.last_seen = now
            if now - s.last_frame < 1.0 / self.config.max_fps:
                raise LiveError("too_fast", f"frames come faster than {self.config.max_fps:g} per second")
            s.last_frame = now
            if not data:
                raise LiveError("empty_file", "the frame is empty")
            return s.step(data)
        finally:
            s.busy.release()
