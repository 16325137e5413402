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
from typing import Iterable

import numpy as np
from PIL import Image

from tagfer.au.aus import AU_NAMES
from tagfer.au.overlay import GREEN, LabeledBox, draw_boxes
from tagfer.au.temporal import au_columns, smoothed_tracks
from tagfer.au.video_io import iter_frames
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


def annotate_frame(rgb: np.ndarray, rec: dict | None, original_size: tuple[int, int]) -> Image.Image:
    """One frame with its record's faces drawn (boxes on the record's canvas)."""
    if rec is None or not rec.get("faces"):
        return Image.fromarray(rgb)
    canvas = rec.get("canvas", 512)
    boxes = []
    for f in rec["faces"]:
        for a in f["aus"]:
            if a["active"]:
                boxes.append(LabeledBox(a["box"], f"AU{a['au']}", GREEN))
    for f in rec["faces"]:  # face boxes last: their captions are drawn on top
        p = f["scores"].get(f["label"], 0.0)
        boxes.append(LabeledBox(f["bbox_canvas"], f"#{f['face_id']} {f['label']} {p:.2f}", _rgb(LABEL_COLORS.get(f["label"], "#ffffff"))))
    return draw_boxes(rgb, boxes, canvas=canvas, original_size=original_size, min_side=0)


class VideoWriter:
    """Streamed encoder: ``write(image, t)`` per frame (PIL or RGB array, seconds), then ``close()``.

    Format from the suffix (.mp4 H.264 yuv420p, .gif, .webp); the size is fixed by the first
    frame (cut to even sides); times become millisecond timestamps, strictly increasing. Written
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
            im = im.crop((0, 0, self._s.width, self._s.height))
        vf = av.VideoFrame.from_image(im.convert("RGB"))
        pts = max(round(t * 1000), self._last + 1)
        self._last = pts
        vf.pts, vf.time_base = pts, _TB
        for pkt in self._s.encode(vf):
            self._c.mux(pkt)
        self.frames += 1

    def close(self) -> str:
        if self._s is not None:
            for pkt in self._s.encode():
                self._c.mux(pkt)
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


def render_video(video: str, records: Iterable[dict], path: str | os.PathLike, config) -> str:
    """Write the annotated clip (format from the suffix: .mp4, .gif, .webp); returns its path."""
    recs = iter(records)
    cur = next(recs, None)
    w = VideoWriter(path, fps=config.fps or 25.0)
    try:
        for fr in prefetch(iter_frames(video, config)):
            if fr.image is None:
                continue
            while cur is not None and cur["frame"] < fr.index:
                cur = next(recs, None)
            rec = cur if cur is not None and cur["frame"] == fr.index else None
            im = annotate_frame(fr.image.rgb, rec, (fr.image.width, fr.image.height))
            if w.kind != "mp4" and max(im.size) > ANIM_SIDE:
                s = ANIM_SIDE / max(im.size)
                im = im.resize((max(2, round(im.width * s)), max(2, round(im.height * s))), Image.Resampling.BILINEAR)
            w.write(im, fr.t)
    except BaseException:
        w.__exit__(Exception)
        raise
    return w.close()


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


def plot_timeline(records: Iterable[dict], segments_file: str | os.PathLike | None, video: str,
                  path: str | os.PathLike, config, max_faces: int = 4, max_aus: int = 8) -> str:
    """PNG: per face (the ``max_faces`` seen longest), smoothed AU intensities (the ``max_aus``
    strongest) and class scores over time, segments shaded. Returns the path."""
    import matplotlib  # lazy (start-up time): matplotlib, PIL

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy (start-up time): matplotlib, PIL

    aus = au_columns(records)
    series: dict[int, _Series] = {}
    for fid, s in smoothed_tracks(records, aus, config.smoothing):
        if s is not None:
            series.setdefault(fid, _Series()).add(s.t, s.smoothed)
    segs: dict[int, list[dict]] = {}
    if segments_file is not None:
        for r in read_jsonl(segments_file):
            if r.get("video") == video:
                segs.setdefault(r["face_id"], []).append(r)
    faces = sorted(series, key=lambda f: -len(series[f].t))[:max_faces]
    faces.sort()
    k = len(aus)
    fig, axes = plt.subplots(2 * max(len(faces), 1), 1, figsize=(11, 3.2 * 2 * max(len(faces), 1)), sharex=True, squeeze=False)
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
            for sg in segs.get(fid, []):
                ax.axvspan(sg["onset"], sg["offset"], color=LABEL_COLORS.get(sg["label"], "#cccccc"), alpha=0.15, lw=0)
                ax.axvline(sg["apex"], color=LABEL_COLORS.get(sg["label"], "#cccccc"), lw=0.8, ls="--")
            ax.set_ylim(-0.02, 1.02)
            ax.legend(loc="upper right", fontsize=7, ncol=2)
        ax_au.set_ylabel("AU intensity")
        ax_cls.set_ylabel("class score")
        ax_au.set_title(f"face #{fid}: AU intensities ({config.smoothing.method} smoothing)", fontsize=9)
        ax_cls.set_title(f"face #{fid}: class scores; segments shaded, apex dashed", fontsize=9)
    axes[-1, 0].set_xlabel("time (s)")
    fig.suptitle(Path(video).name, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return str(path)
