"""What people look at after a video job: the annotated clip and the timeline plot.

* :func:`render_video`: the sampled frames again (decoded a second time, streamed), each face's
  box captioned ``#id label score`` in its label's colour and its active AU boxes in green
  (:func:`tagfer.au.overlay.draw_boxes`), written as H.264 MP4 (PyAV, ``libx264``, yuv420p, the
  frames' own times: variable frame rates stay variable), or as an animated GIF / WebP
  (PyAV's ``gif`` / ``libwebp_anim`` encoders, longer side at most 480 px).
* :func:`plot_timeline`: a PNG (matplotlib) with, per face, the smoothed AU intensities and the
  smoothed class scores over time, the expression segments shaded in their label's colour.
"""

from __future__ import annotations

import fractions
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image

from tagfer.au.aus import AU_NAMES
from tagfer.au.overlay import GREEN, LabeledBox, draw_boxes
from tagfer.au.segments import au_columns, smoothed_tracks
from tagfer.au.video_io import iter_frames
from tagfer.core.canvas import CanvasTransform
from tagfer.core.figures import READABLE
from tagfer.core.jsonl import read_jsonl
from tagfer.core.labels import LABELS
from tagfer.core.prefetch import prefetch

#: One colour per class (annotated video captions, plot curves and shading).
LABEL_COLORS: dict[str, str] = {
    "anger": "#d62728", "disgust": "#8c564b", "fear": "#9467bd", "happiness": "#ff7f0e",
    "neutral": "#7f7f7f", "sadness": "#1f77b4", "surprise": "#17becf",
}
ANIM_SIDE = 480  # longer side of GIF / WebP outputs


def _rgb(hex_color: str) -> tuple[int, int, int]:
    h = hex_color.lstrip("#")
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


#: A face drawn shorter than this many caption lines gets its AU names in its own caption
#: instead of a tag on each AU box (small faces would vanish under the tags).
TAGGED_FACE_LINES = 8


def frame_boxes(rec: dict, original_size: tuple[int, int], drawn_height: int,
                cited: dict[int, set[int]] | None = None) -> list[LabeledBox]:
    """The boxes :func:`annotate_frame` draws for one frame record (pure): each face's box in its
    label's colour with an *outside* ``#id label score`` caption, then green boxes of its active
    AUs — only those in ``cited[face_id]`` (the AUs the face's trace cites) when ``cited`` is
    given, every active AU when it is None. A face drawn at least :data:`TAGGED_FACE_LINES`
    caption lines tall (``drawn_height``: the frame's height in drawn pixels) has an ``AUx`` tag on
    each AU box; a smaller one lists them in its caption (``#0 happiness 0.99 · AU6 AU12``)."""
    canvas = rec.get("canvas", 512)
    W, H = original_size
    tr = CanvasTransform(W, H, canvas=canvas)
    line = max(11, round(max(drawn_height, drawn_height * W / max(H, 1)) / 40)) + 6  # draw_boxes' caption height
    faces, aus = [], []
    for f in rec.get("faces") or []:
        keep = None if cited is None else cited.get(f["face_id"], set())
        shown = [a for a in f["aus"] if a["active"] and (keep is None or a["au"] in keep)]
        _, y1, _, y2 = tr.box_to_image(f["bbox_canvas"])
        tagged = (y2 - y1) * drawn_height / H >= TAGGED_FACE_LINES * line
        p = f["scores"].get(f["label"], 0.0)
        cap = f"#{f['face_id']} {f['label']} {p:.2f}"
        if shown and not tagged:
            cap += " · " + " ".join(f"AU{a['au']}" for a in sorted(shown, key=lambda a: a["au"]))
        faces.append(LabeledBox(f["bbox_canvas"], cap, _rgb(LABEL_COLORS.get(f["label"], "#ffffff")), outside=True))
        aus += [LabeledBox(a["box"], f"AU{a['au']}" if tagged else "", GREEN) for a in shown]
    return faces + aus


def annotate_frame(rgb: np.ndarray, rec: dict | None, original_size: tuple[int, int],
                   cited: dict[int, set[int]] | None = None) -> Image.Image:
    """One frame with its record's faces drawn (:func:`frame_boxes`, boxes on the record's canvas):
    a face's caption sits above its box, below it when there is no room above, never over the face."""
    if rec is None or not rec.get("faces"):
        return Image.fromarray(rgb)
    boxes = frame_boxes(rec, original_size, rgb.shape[0], cited)
    return draw_boxes(rgb, boxes, canvas=rec.get("canvas", 512), original_size=original_size, min_side=0)


class CitedAUs:
    """The AUs each face's trace cites, by time: from the segments file (``evidence_aus`` of the
    segment that covers ``t``; one tuple per segment, streamed in and kept per face)."""

    def __init__(self, segments: Iterable[dict], video: str):
        self._by_face: dict[int, list[tuple[float, float, frozenset[int]]]] = {}
        for r in segments:
            if r.get("video") == video and r.get("face_id") is not None:
                self._by_face.setdefault(int(r["face_id"]), []).append(
                    (float(r["onset"]), float(r["offset"]), frozenset(int(a) for a in r.get("evidence_aus") or ())))
        for segs in self._by_face.values():
            segs.sort(key=lambda s: s[0])
        self._starts = {f: [s[0] for s in segs] for f, segs in self._by_face.items()}

    def at(self, t: float) -> dict[int, set[int]]:
        """``{face_id: AUs cited}`` for the segments covering ``t`` (the last one starting at or before ``t``)."""
        import bisect

        out: dict[int, set[int]] = {}
        for f, segs in self._by_face.items():
            k = bisect.bisect_right(self._starts[f], t + 1e-6) - 1
            if k >= 0:
                out[f] = set(segs[k][2])
        return out


class VideoWriter:
    """Streamed encoder: ``write(image, t)`` per frame (PIL or RGB array, seconds), then ``close()``.

    Format from the suffix (.mp4 H.264 yuv420p, .gif, .webp); the size is fixed by the first
    frame (cut to even sides); a later frame of another size is scaled to fit it, centred on
    black (never cropped, nor drawn with another frame's geometry); times become millisecond timestamps, strictly increasing. Written
    to ``NAME.part.EXT`` and renamed on close, so a killed run leaves no half file under the name.
    """

    def __init__(self, path: str | os.PathLike, fps: float = 25.0, crf: int = 23):
        import av  # lazy (start-up time): av

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.kind = self.path.suffix.lower().lstrip(".")
        if self.kind not in ("mp4", "gif", "webp"):
            raise ValueError(f"unsupported video output {self.path.suffix!r}: use .mp4, .gif or .webp")
        self.codec, self.pix = {"mp4": ("libx264", "yuv420p"), "gif": ("gif", "rgb8"), "webp": ("libwebp_anim", "yuva420p")}[self.kind]
        self.fps, self.crf = fps, crf
        self._tmp = self.path.with_name(self.path.stem + ".part" + self.path.suffix)
        self._c = av.open(str(self._tmp), "w")
        self._s = None
        self._last = -1
        self._pending: list[Any] = []  # packets held until the next frame's time gives their duration
        self._durations: dict[int, int] = {}  # frame pts → its duration (ms), once known
        self.frames = 0

    def write(self, image: Image.Image | np.ndarray, t: float) -> None:
        import av  # lazy (start-up time): av

        im = Image.fromarray(image) if isinstance(image, np.ndarray) else image
        if self._s is None:
            s = self._c.add_stream(self.codec, rate=max(1, round(self.fps)))
            s.width, s.height = max(2, im.width - im.width % 2), max(2, im.height - im.height % 2)
            s.pix_fmt = self.pix
            s.codec_context.time_base = _TB
            if self.kind == "mp4":
                s.options = {"crf": str(self.crf), "preset": "veryfast"}
            self._s = s
        if im.size != (self._s.width, self._s.height):
            w, h = self._s.width, self._s.height
            odd = 0 <= im.width - w <= 1 and 0 <= im.height - h <= 1  # only the cut to even sides
            im = im.crop((0, 0, w, h)) if odd else _fit(im, w, h)
        vf = av.VideoFrame.from_image(im.convert("RGB"))
        pts = max(round(t * 1000), self._last + 1)
        if self._last >= 0:
            self._durations[self._last] = pts - self._last
        self._last = pts
        vf.pts, vf.time_base = pts, _TB
        self._mux(self._s.encode(vf))
        self.frames += 1

    def _mux(self, packets: Iterable[Any], final: bool = False) -> None:
        """Mux packets with their frame's duration (the next frame's time minus theirs); a packet
        whose frame is the last one so far waits, unless ``final``."""
        self._pending.extend(packets)
        keep = []
        for pkt in self._pending:
            d = self._durations.get(pkt.pts) if pkt.pts is not None else None
            if d is None and not final:
                keep.append(pkt)
                continue
            if d is not None:
                pkt.duration = d
            self._c.mux(pkt)
        self._pending = keep

    def close(self, end: float | None = None) -> str:
        """Finish the file. The last frame lasts until ``end`` (seconds: the source's end, so a 2.0 s
        clip stays 2.0 s long) when that is after it, else one frame at ``fps``."""
        if self._s is not None:
            last_ms = round(1000 / max(self.fps, 1e-3))
            if end is not None and round(end * 1000) > self._last:
                last_ms = round(end * 1000) - self._last
            self._durations[self._last] = max(1, last_ms)
            self._mux(self._s.encode(), final=True)
        self._c.close()
        if self._s is None:
            self._tmp.unlink(missing_ok=True)
            raise ValueError(f"no frame written to {self.path}")
        os.replace(self._tmp, self.path)
        return str(self.path)

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self._c.close()
            self._tmp.unlink(missing_ok=True)


_TB = fractions.Fraction(1, 1000)


def _fit(im: Image.Image, w: int, h: int) -> Image.Image:
    """``im`` scaled to fit ``w`` × ``h`` (aspect kept), centred on black."""
    s = min(w / im.width, h / im.height)
    sw, sh = max(1, min(w, round(im.width * s))), max(1, min(h, round(im.height * s)))
    out = Image.new("RGB", (w, h))
    out.paste(im.convert("RGB").resize((sw, sh), Image.Resampling.BILINEAR), ((w - sw) // 2, (h - sh) // 2))
    return out


def render_video(video: str, records: Iterable[dict], path: str | os.PathLike, config,
                 segments_file: str | os.PathLike | None = None) -> str:
    """Write the annotated clip (format from the suffix: .mp4, .gif, .webp); returns its path.

    Frames keep their own times; the output's frame rate is the sampling rate (``config.fps``) or
    the source's, and its last frame lasts until the end of the analysed range, so the output is
    as long as the source. AU boxes: only the AUs the face's trace cites (``segments_file``'s
    ``evidence_aus``) unless ``config.render_aus == "active"`` (every active AU) or there is no
    segments file."""
    recs = iter(records)
    cur = next(recs, None)
    info: list[Any] = []
    cited = None
    if segments_file is not None and getattr(config, "render_aus", "cited") == "cited" and Path(segments_file).is_file():
        cited = CitedAUs(read_jsonl(segments_file), video)
    w = VideoWriter(path, fps=config.fps or 25.0)
    try:
        for fr in prefetch(iter_frames(video, config, info_out=info)):
            if info and config.fps is None and w.frames == 0 and info[0].fps:
                w.fps = float(info[0].fps)  # the source's rate (folder: folder_fps)
            if fr.image is None:
                continue
            while cur is not None and cur["frame"] < fr.index:
                cur = next(recs, None)
            rec = cur if cur is not None and cur["frame"] == fr.index else None
            im = annotate_frame(fr.image.rgb, rec, (fr.image.width, fr.image.height), cited.at(fr.t) if cited is not None else None)
            if w.kind != "mp4" and max(im.size) > ANIM_SIDE:
                s = ANIM_SIDE / max(im.size)
                im = im.resize((max(2, round(im.width * s)), max(2, round(im.height * s))), Image.Resampling.BILINEAR)
            w.write(im, fr.t)
    except BaseException:
        w.__exit__(Exception)
        raise
    ends = [e for e in (info[0].duration if info else None, config.end) if e]
    return w.close(end=min(ends) if ends else None)


class _Series:
    """Time series of one face with bounded memory: past ``cap`` points, every other point is dropped."""

    def __init__(self, cap: int = 4000):
        self.cap, self.stride, self._n = cap, 1, 0
        self.t: list[float] = []
        self.v: list[np.ndarray] = []

    def add(self, t: float, v: np.ndarray) -> None:
        if self._n % self.stride == 0:
            self.t.append(t)
            self.v.append(v.astype(np.float32))
            if len(self.t) > self.cap:
                self.t, self.v = self.t[::2], self.v[::2]
                self.stride *= 2
        self._n += 1


SPAN_BINS = 2000  # the plot's time axis in columns (≥ 2× its pixels): segments are drawn per column


class _SpanBins:
    """Segment shading of one face in bounded memory, whatever the number of segments: each label
    covers a set of time columns (one bool array), an apex marks its column (with the label of the
    last apex there); drawn as one collection per label (runs of covered columns) and one
    collection of apex lines (at most one per column)."""

    def __init__(self, t0: float, t1: float, bins: int = SPAN_BINS):
        self.t0, self.bins = t0, bins
        self.dt = max(t1 - t0, 1e-3) / bins
        self.cover = np.zeros((len(LABELS), bins), dtype=bool)
        self.apex = np.full(bins, -1, dtype=np.int8)

    def _col(self, t: float) -> int:
        return int(min(max((t - self.t0) / self.dt, 0), self.bins - 1))

    def add(self, label: str, onset: float, offset: float, apex: float) -> None:
        if label not in LABELS:
            return
        i = LABELS.index(label)
        self.cover[i, self._col(onset):self._col(offset) + 1] = True
        self.apex[self._col(apex)] = i

    def draw(self, ax) -> None:
        for i, c in enumerate(LABELS):
            cov = self.cover[i]
            if cov.any():
                edges = np.flatnonzero(np.diff(np.concatenate([[0], cov.astype(np.int8), [0]])))
                starts, ends = edges[0::2], edges[1::2]
                xr = [(self.t0 + a * self.dt, (b - a) * self.dt) for a, b in zip(starts, ends)]
                ax.broken_barh(xr, (-0.02, 1.04), facecolors=LABEL_COLORS.get(c, "#cccccc"), alpha=0.15, lw=0)
        cols = np.flatnonzero(self.apex >= 0)
        if len(cols):
            ax.vlines(self.t0 + (cols + 0.5) * self.dt, -0.02, 1.02, colors=[LABEL_COLORS[LABELS[k]] for k in self.apex[cols]],
                      lw=0.8, linestyles="--")


def plot_timeline(records: Iterable[dict], segments_file: str | os.PathLike | None, video: str,
                  path: str | os.PathLike, config, max_faces: int = 4, max_aus: int = 8) -> str:
    """PNG: per face (the ``max_faces`` seen longest), smoothed AU intensities (the ``max_aus``
    strongest) and class scores over time, segments shaded. Returns the path.

    Memory is bounded whatever the clip: ``records`` is read twice (it must be re-iterable, e.g. a
    :class:`tagfer.au.video_io.FrameFile`): first to count each face's frames, then to keep the
    curves of the faces plotted only (at most 4,000 points each); segments are streamed from
    ``segments_file`` into time columns (:class:`_SpanBins`), not kept."""
    import matplotlib  # lazy (start-up time): matplotlib, PIL

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy (start-up time): matplotlib, PIL

    aus = au_columns(records)
    seen: dict[int, int] = {}
    for r in records:
        for f in r.get("faces") or []:
            seen[f["face_id"]] = seen.get(f["face_id"], 0) + 1
    faces = sorted(sorted(seen, key=lambda f: -seen[f])[:max_faces])
    series: dict[int, _Series] = {f: _Series() for f in faces}
    for fid, s in smoothed_tracks(records, aus, config.smoothing):
        if s is not None and fid in series:
            series[fid].add(s.t, s.smoothed)
    faces = [f for f in faces if series[f].t]
    t_all = [t for f in faces for t in (series[f].t[0], series[f].t[-1])]
    spans = {f: _SpanBins(min(t_all), max(t_all)) for f in faces} if t_all else {}
    if segments_file is not None and spans:
        # edge to edge: a segment is shaded up to the next one's onset when only the sampling gap
        # (the face's next frame) lies between them; a longer gap (the face was away) stays blank
        step = {f: float(np.median(np.diff(series[f].t))) if len(series[f].t) > 1 else 0.0 for f in faces}
        pending: dict[int, tuple[str, float, float, float]] = {}
        for r in read_jsonl(segments_file):
            fid = r.get("face_id")
            if r.get("video") != video or fid not in spans:
                continue
            seg = (r.get("label"), float(r["onset"]), float(r["offset"]), float(r["apex"]))
            prev = pending.get(fid)
            if prev is not None:
                gap = seg[1] - prev[2]
                end = seg[1] if 0.0 <= gap <= 2.5 * step[fid] + 1e-6 else prev[2]
                spans[fid].add(prev[0], prev[1], end, prev[3])
            pending[fid] = seg
        for fid, (label, onset, offset, apex) in pending.items():
            spans[fid].add(label, onset, offset, apex)
    k = len(aus)
    with matplotlib.rc_context(READABLE):
        fig, axes = plt.subplots(2 * max(len(faces), 1), 1, figsize=(12, 3.4 * 2 * max(len(faces), 1)), sharex=True, squeeze=False)
        for row, fid in enumerate(faces):
            ser = series[fid]
            t = np.asarray(ser.t)
            v = np.stack(ser.v) if ser.v else np.zeros((0, k + len(LABELS)))
            ax_au, ax_cls = axes[2 * row, 0], axes[2 * row + 1, 0]
            if len(v):
                strongest = np.argsort(-v[:, :k].max(axis=0))[:max_aus] if k else []
                for j in sorted(strongest, key=lambda j: aus[j]):
                    ax_au.plot(t, v[:, j], label=f"AU{aus[j]} {AU_NAMES.get(aus[j], '')}", lw=1.4)
                for i, c in enumerate(LABELS):
                    ax_cls.plot(t, v[:, k + i], label=c, color=LABEL_COLORS[c], lw=1.6)
            for ax in (ax_au, ax_cls):
                spans[fid].draw(ax)
                ax.set_ylim(-0.02, 1.02)
                # the legend beside the axes, never over the curves
                ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=10, frameon=False)
            ax_au.set_ylabel("AU intensity")
            ax_cls.set_ylabel("class score")
            ax_au.set_title(f"face #{fid}: AU intensities ({config.smoothing.method} smoothing)")
            ax_cls.set_title(f"face #{fid}: class scores; segments shaded, apex dashed")
        axes[-1, 0].set_xlabel("time (s)")
        fig.suptitle(Path(video).name)
        fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return str(path)
