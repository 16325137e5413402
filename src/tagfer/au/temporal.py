"""Time in a video, pure (no I/O): option checks, sampling, timestamp repair and face ids.

Sampling (:class:`Sampler`): with ``fps`` a frame is kept when its time reaches the next sampling
instant (``t0 + k / fps``); a frame-rate below the source's keeps every frame.

Timestamps (:class:`Timeline`): missing, jumping, backward or repeated pts are repaired frame by
frame (times stay finite and strictly increasing), and the reason is kept.

Face ids (:class:`FaceTracker`): greedy matching of face boxes on IoU, then on centre distance.

The expressions over time (smoothing, segments) are :mod:`tagfer.au.segments`; the I/O is
:mod:`tagfer.au.video_io`, the job :mod:`tagfer.au.video`.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

from tagfer.core.canvas import iou_matrix


# ----------------------------------------------------------------------------- option checks
MAX_WINDOW = 10.0  # seconds: the longest smoothing window accepted (``--smooth window:S``, ``ema:S``)
MAX_FPS = 1000.0  # frames per second: the highest sampling / folder rate accepted


def check_finite(name: str, value: float | None, lo: float, hi: float, *, lo_open: bool = False, allow_none: bool = False) -> None:
    """Raise ValueError unless ``value`` is a finite number in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``)."""
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        where = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise ValueError(f"{name} must be a finite number in {where}, got {value!r}")


# ----------------------------------------------------------------------------- sampling
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



# ----------------------------------------------------------------------------- timestamps
MAX_JUMP = 60.0  # seconds: a step forward between two frames beyond this is a broken timestamp
MAX_BACK = 1.0  # seconds: a step back beyond this is a discontinuity (times continue from the last)


class Timeline:
    """Frame times made usable, frame by frame (pure, stateful): finite, strictly increasing and
    without absurd jumps, so sampling, ``--end`` and the landmarker's timestamps stay sound.

    :meth:`next` takes a frame's time from the origin (seconds, exact: ``(pts − pts0) × time_base``)
    or None (no pts) and returns ``(t, repair)``; ``repair`` is None when ``t`` is the time as
    given, else why it was changed:

    * ``"missing"`` — no pts, or not a finite number: ``t = last + 1/rate``;
    * ``"jump"`` — more than :data:`MAX_JUMP` s after the previous frame (e.g. pts 10¹² ms or
      2⁶² in a normal clip): ``t = last + 1/rate``, and later frames are shifted by the same
      amount, so one broken pts does not push the rest of the clip past ``--end``;
    * ``"backwards"`` — more than :data:`MAX_BACK` s before the previous frame (a timestamp
      reset, or the frame after a broken one): shifted likewise, times continue from the last;
    * ``"repeated"`` — at or slightly before the previous frame: ``t = last + 1 ms``.
    """

    def __init__(self, rate: float | None = None):
        self.step = 1.0 / rate if rate is not None and math.isfinite(rate) and 0 < rate <= MAX_FPS else 1.0 / 25
        self.last: float | None = None
        self.offset = 0.0

    def next(self, raw: float | None) -> tuple[float, str | None]:
        # The first frame is the origin: kept when in [0, MAX_JUMP], else put at 0 (and what follows shifted).
        last = -self.step if self.last is None else self.last
        repair: str | None = None
        if raw is None or not math.isfinite(raw):
            t, repair = last + self.step, "missing"
        else:
            t = raw + self.offset
            if t - last > MAX_JUMP or last - t > MAX_BACK or (self.last is None and t < 0):
                repair = "jump" if t > last else "backwards"
                self.offset += last + self.step - t
                t = last + self.step
            elif t <= last:
                t, repair = last + 1e-3, "repeated"
        self.last = t
        return t, repair

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



