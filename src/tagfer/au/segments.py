"""Expressions over time, pure (no I/O): smoothing and segmentation of per-frame face scores.

Everything here works on values streamed in time order and keeps bounded state, so a video job
runs in memory that does not grow with the clip (time, sampling and face ids are
:mod:`tagfer.au.temporal`; the I/O :mod:`tagfer.au.video_io`; the job :mod:`tagfer.au.video`).

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

Short expressions are kept (:class:`HoldGuard`, docs/video.md): a raw label held for ``hold`` =
0.3 s (at least 2 frames) keeps its frames whatever the smoothing says and starts its segment at
once; a label held to the end of a track by ``tail_frames`` = 2 frames is a segment of its own.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from tagfer.au.aus import AUDetection
from tagfer.au.facs import DEFAULT_CONFIG as DEFAULT_FACS, FACSConfig, explain, top_label
from tagfer.au.grounded import explain_grounded
from tagfer.au.temporal import MAX_WINDOW, check_finite
from tagfer.core.canvas import CANVAS
from tagfer.core.labels import LABELS


#: The keys of a segment record's views (those of :meth:`tagfer.au.facs.FACSExplanation.views`).
VIEW_KEYS = ("global", "local", "agreement", "decision")


# ----------------------------------------------------------------------------- config
@dataclass(frozen=True)
class SmoothingConfig:
    """The temporal filter and the segmentation rules (module docstring). Every value is checked:
    finite, ``0 <= window <= MAX_WINDOW`` (ValueError with the option's name otherwise)."""

    method: str = "window"  # window | ema | none
    window: float = 0.5  # seconds (ema: tau = window / 2)
    min_duration: float = 0.2  # seconds a new label must hold before a segment switches
    max_gap: float = 1.0  # seconds a face may be missing before its track/segment ends
    hold: float = 0.3  # seconds: a raw label held this long keeps its frames (HoldGuard)
    tail_frames: int = 2  # frames: a label held to the end of a track by this many frames is a segment

    def __post_init__(self) -> None:
        if self.method not in ("window", "ema", "none"):
            raise ValueError(f"smoothing must be window, ema or none, got {self.method!r}")
        check_finite("the smoothing window (seconds)", self.window, 0.0, MAX_WINDOW)
        check_finite("min_duration (seconds)", self.min_duration, 0.0, 60.0)
        check_finite("max_gap (seconds)", self.max_gap, 0.0, 3600.0, lo_open=True)
        check_finite("hold (seconds)", self.hold, 0.0, 60.0)
        if not isinstance(self.tail_frames, int) or self.tail_frames < 1:
            raise ValueError(f"tail_frames must be an integer >= 1, got {self.tail_frames!r}")

    @property
    def lag(self) -> float:
        """Delay (seconds) of the filter's response: 0 for the centred window, tau for the EMA."""
        return self.window / 2 if self.method == "ema" else 0.0



@dataclass
class SegmentRecord:
    """One expression episode of one face. JSON (one line of ``*.segments.jsonl``)::

        {"video": "...", "face_id": 0, "label": "happiness",
         "onset": 0.48, "apex": 0.92, "offset": 1.60,       # seconds
         "start_frame": 12, "apex_frame": 23, "end_frame": 40, "n_frames": 29,
         "peak": 0.93, "mean": 0.88,                          # the label's smoothed score: at the apex, mean
         "aus": [{"au": 12, "score": 0.95}, ...],             # prototype AUs active at the apex (smoothed)
         "trace": "<think>…</think>\\n<answer>happiness</answer>",   # the video's engine on the apex frame
         "trace_label": "happiness", "evidence_aus": [12, 6, 25],
         "boxes": [[x1, y1, x2, y2], ...],                    # the trace's boxes, on the frame canvas
         "canvas": 512, "smoothing": "window 0.5s",
         # the default engine (facs) only, as in tagfer analyze's records (docs/analyze.md):
         "global": {...}, "local": {..., "steps": [{"au": 12, "role": "support", "for": "happiness"}, ...]},
         "agreement": "agree", "decision": {...}}

    ``evidence_aus[i]`` is the AU of ``boxes[i]``. ``global`` / ``local`` / ``agreement`` /
    ``decision`` are the apex trace's views (:meth:`tagfer.au.facs.FACSExplanation.views`, the
    same as a photo's ``Analysis``): ``local.steps`` gives each cited AU's role (``support`` |
    ``contrary`` | ``isolated``) and the class it argues for. They are absent for the
    ``facs-rules`` engine and in records written before they existed (:meth:`from_json` reads
    those with ``views = {}``).
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
    views: dict[str, Any] = field(default_factory=dict)  # {"global", "local", "agreement", "decision"}; {}: none

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("onset", "apex", "offset"):
            d[k] = round(d[k], 4)
        d["peak"], d["mean"] = round(self.peak, 4), round(self.mean, 4)
        d.update(d.pop("views"))
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "SegmentRecord":
        """A record read back from ``*.segments.jsonl`` (older records, without views, too)."""
        names = {f for f in cls.__dataclass_fields__ if f != "views"}
        return cls(**{k: v for k, v in d.items() if k in names}, views={k: d[k] for k in VIEW_KEYS if k in d})



# ----------------------------------------------------------------------------- smoothing (pure)
@dataclass
class Sample:
    """One face in one frame as the smoother sees it: ``values`` (AU scores then class scores)."""

    frame: int
    t: float
    values: np.ndarray
    payload: Any = None  # the raw face record, passed through
    smoothed: np.ndarray | None = None
    held_label: str | None = None  # set by HoldGuard: a held raw label that fixes this frame's label


class Smoother:
    """Streaming filter of one face track (see :class:`SmoothingConfig`); bounded memory and
    constant work per sample whatever the window (the centred mean keeps a running sum).

    :meth:`push` returns the samples whose smoothed values became known; :meth:`flush`
    the rest (end of the track)."""

    def __init__(self, config: SmoothingConfig):
        self.config = config
        self._in: deque[Sample] = deque()  # window: samples inside the current pending sample's window
        self._ahead: deque[Sample] = deque()  # pushed, not yet inside it
        self._pending: deque[Sample] = deque()
        self._sum: np.ndarray | None = None
        self._removed = 0  # subtractions since the sum was last recomputed (rounding stays bounded)
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
        self._ahead.append(s)
        self._pending.append(s)
        return self._release(s.t)

    def _release(self, now: float | None) -> list[Sample]:
        half = self.config.window / 2
        out = []
        while self._pending and (now is None or self._pending[0].t + half < now - 1e-9):
            p = self._pending.popleft()
            while self._ahead and self._ahead[0].t <= p.t + half + 1e-9:
                a = self._ahead.popleft()
                self._in.append(a)
                self._sum = a.values.astype(np.float64) if self._sum is None else self._sum + a.values
            while self._in and self._in[0].t < p.t - half - 1e-9:
                self._sum = self._sum - self._in.popleft().values  # type: ignore[operator]
                self._removed += 1
            if self._removed > len(self._in) + 256:  # recompute now and then: no drift over long tracks
                self._sum, self._removed = np.sum([b.values for b in self._in], axis=0, dtype=np.float64), 0
            p.smoothed = self._sum / len(self._in)  # type: ignore[operator]
            out.append(p)
        return out

    def flush(self) -> list[Sample]:
        if self.config.method != "window" or self.config.window == 0:
            self._ema, self._last_t = None, None
            return []
        out = self._release(None)
        self._in.clear()
        self._ahead.clear()
        self._sum, self._removed = None, 0
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
def _run_duration(first_t: float, last_t: float, n: int) -> float:
    """How long ``n`` frames from ``first_t`` to ``last_t`` show a label: their span plus one mean
    frame step (``span × n / (n − 1)``); 0 for a single frame (its own duration is unknown)."""
    return (last_t - first_t) * n / (n - 1) if n >= 2 else 0.0


class HoldGuard:
    """Keeps smoothing from dropping or shrinking an expression that was really held (streaming, pure).

    A *raw run* is a run of frames of one face with the same raw label (the frame's own label,
    before smoothing). A raw run that lasts at least ``config.hold`` seconds (:func:`_run_duration`,
    at least two frames) is *held*: each of its frames gets ``held_label`` = that label, which the
    :class:`Segmenter` uses instead of the smoothed argmax, and a switch to it takes effect at
    once. A raw run that reaches the end of the track with at least ``config.tail_frames`` frames
    is held too. Frames of shorter runs (flicker) keep the smoothed decision. Frames wait here
    only while their run is shorter than ``hold`` (bounded memory)."""

    def __init__(self, config: SmoothingConfig, n_aus: int):
        self.config, self.n_aus = config, n_aus
        self.label: str | None = None
        self.held = False
        self.first_t = self.last_t = 0.0
        self.n = 0
        self._wait: list[Sample] = []

    def raw_label(self, s: Sample) -> str:
        lab = s.payload.get("label") if isinstance(s.payload, dict) else None
        if lab in LABELS:
            return lab
        return top_label({c: float(s.values[self.n_aus + i]) for i, c in enumerate(LABELS)})

    def _release(self) -> list[Sample]:
        out, self._wait = self._wait, []
        if self.held:
            for w in out:
                w.held_label = self.label
        return out

    def push(self, s: Sample) -> list[Sample]:
        lab = self.raw_label(s)
        out: list[Sample] = []
        if lab != self.label or self.n == 0:
            out = self._release()
            self.label, self.held, self.first_t, self.n = lab, False, s.t, 0
        self.n += 1
        self.last_t = s.t
        self._wait.append(s)
        if not self.held and _run_duration(self.first_t, self.last_t, self.n) >= self.config.hold - 1e-9 and self.n >= 2:
            self.held = True
        if self.held:
            out += self._release()
        return out

    def flush(self) -> list[Sample]:
        if self.n >= self.config.tail_frames:
            self.held = True  # held to the end of the track
        out = self._release()
        self.label, self.held, self.n = None, False, 0
        return out


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
    """Per-face label runs → :class:`SegmentRecord` (rules in the module docstring); streaming.
    Samples go through a :class:`HoldGuard` first (held expressions keep their frames)."""

    def __init__(self, video: str, face_id: int, config: SmoothingConfig, au_names: Sequence[int],
                 facs: FACSConfig = DEFAULT_FACS, au_threshold: float = 0.3):
        self.video, self.face_id, self.config = video, face_id, config
        self.au_names, self.facs, self.au_threshold = list(au_names), facs, au_threshold
        self.guard = HoldGuard(config, len(self.au_names))
        self.cur: _Run | None = None
        self.cand: list[Sample] = []
        self.cand_label: str | None = None

    def _label_of(self, s: Sample) -> tuple[str, dict[str, float]]:
        sm = s.smoothed if s.smoothed is not None else s.values
        k = len(self.au_names)
        sc = {c: float(sm[k + i]) for i, c in enumerate(LABELS)}
        return s.held_label or top_label(sc), sc

    def _add(self, run: _Run, s: Sample) -> None:
        _, sc = self._label_of(s)
        raw = s.payload.get("label") if isinstance(s.payload, dict) else None
        run.add(s, sc[run.label], raw)

    def _lasts(self, cand: list[Sample]) -> bool:
        """The candidate label has held long enough to start a segment: ``min_duration`` seconds
        (first to last frame), or at once for a held frame."""
        return cand[-1].held_label is not None or cand[-1].t - cand[0].t >= self.config.min_duration - 1e-9

    def push(self, s: Sample) -> list[SegmentRecord]:
        out: list[SegmentRecord] = []
        for g in self.guard.push(s):
            out += self._push(g)
        return out

    def _push(self, s: Sample) -> list[SegmentRecord]:
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
        if self._lasts(self.cand):
            out.append(self._close(self.cur))
            self.cur = _Run(label)
            for c in self.cand:
                self._add(self.cur, c)
            self.cand, self.cand_label = [], None
        return out

    def flush(self) -> list[SegmentRecord]:
        """End of the track: a candidate label held to the last frame by ``tail_frames`` frames (or
        ``min_duration`` seconds) is a segment of its own."""
        out: list[SegmentRecord] = []
        for g in self.guard.flush():
            out += self._push(g)
        if self.cur is None:
            return out
        if self.cand and (len(self.cand) >= self.config.tail_frames or self._lasts(self.cand)):
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
            dets = [AUDetection.from_json(d) for d in payload["aus"]]
            g = payload.get("global_scores")  # the video's engine: the FER net's impression + the AUs, or the rules
            ex = explain_grounded(dets, g, self.facs) if g else explain(dets, self.facs)
            seg.trace, seg.trace_label = ex.trace, ex.label
            seg.evidence_aus, seg.boxes = list(ex.evidence_aus), [list(b) for b in ex.boxes]
            seg.views = ex.views()  # each box's role, as a photo's Analysis carries it
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

