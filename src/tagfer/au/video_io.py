"""Video I/O: decoding (PyAV, streamed), folders of frames, the output files and resume.

Inputs: video files (:data:`VIDEO_EXTENSIONS`, anything PyAV's bundled FFmpeg opens), or a
folder of frames read as a video when asked (``--video``; frames in name order with natural
number sorting, at ``folder_fps`` frames per second). Frames are never held together: memory
stays flat with the clip's length.

Frame index and time: ``frame`` counts decoded frames from the start of the stream (0-based);
``t`` is the frame's presentation time in seconds from the first frame (``pts × time_base``),
so variable-frame-rate clips keep their true times. ``--start`` decodes the frames before it
without analysing them (the index stays absolute).

Resume: the output is append-only JSONL. A video whose ``"video"`` summary record is in the
output is done; otherwise the run restarts decoding and skips (without analysing) every frame
up to the last one written, restoring the face tracker from the written records
(:func:`read_progress`).
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from tagfer.au.segments import segments_from_records
from tagfer.au.temporal import FaceTracker, Sampler, Timeline
from tagfer.au.video_records import VideoConfig
from tagfer.core.errors import ItemError
from tagfer.core.imageio import IMAGE_EXTENSIONS, LoadedImage, decode_budget, load_image, probe
from tagfer.core.jsonl import JsonlWriter, drop_records, read_jsonl

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


# ----------------------------------------------------------------------------- decoding
@dataclass
class Frame:
    """A decoded frame: ``index`` in the stream, ``t`` seconds, ``image`` (downscaled RGB + the frame's
    own size) or ``error`` (a frame that could not be decoded); ``repair``: why ``t`` is not the
    frame's own pts (:class:`tagfer.au.temporal.Timeline`), None when it is."""

    index: int | None  # None for an error not tied to one decoded frame (a bad packet)
    t: float
    image: LoadedImage | None = None
    error: VideoError | None = None
    repair: str | None = None


@dataclass
class VideoInfo:
    width: int
    height: int
    fps: float | None
    duration: float | None
    pix_fmt: str | None = None


def _natural_key(name: str) -> list:
    return [int(s) if s.isdigit() else s.lower() for s in re.split(r"(\d+)", name)]


def _target_size(w: int, h: int, max_side: int) -> tuple[int, int, float]:
    s = min(1.0, max_side / max(w, h))
    return max(1, round(w * s)), max(1, round(h * s)), s


# ----------------------------------------------------------------------------- decode budget
WIDEST_BITS = 48  # bits per pixel assumed when a frame's format is not known (16-bit RGB)
GUARD_BYTES_PER_PIXEL = 4  # FFmpeg refuses frames above budget / 4 pixels: an 8-bit RGB image's limit


def _format_bits(pix_fmt: str | None) -> int | None:
    if not pix_fmt:
        return None
    import av  # lazy (start-up time): av

    try:
        return int(av.VideoFormat(pix_fmt).padded_bits_per_pixel) or None
    except (ValueError, TypeError):
        return None


def frame_cost(width: int, height: int, pix_fmt: str | None) -> int:
    """Bytes FFmpeg holds for one decoded ``width`` × ``height`` frame in ``pix_fmt`` (padded bits per
    pixel, every plane: yuv420p 1.5 bytes, rgb24 3, 16-bit RGB 6, 16-bit RGBA 8; unknown: 6).
    The video counterpart of an image's decode cost (:mod:`tagfer.core.imageio`)."""
    return int(width) * int(height) * (_format_bits(pix_fmt) or WIDEST_BITS) // 8


def max_frame_pixels(budget: int) -> int:
    """The largest frame (pixels) FFmpeg may allocate under ``budget`` bytes, whatever its format
    (``max_pixels``, checked before a frame is allocated): budget / 4, the pixels of the largest
    8-bit RGB image the same budget admits."""
    return max(1, budget // GUARD_BYTES_PER_PIXEL)


def _too_large(w: int, h: int, pix_fmt: str | None, cost: int, limit: int, what: str) -> VideoError:
    return VideoError("too_large", f"{what}: a {w}×{h} {pix_fmt or 'frame'} needs {cost / 1e6:,.0f} MB decoded, above the "
                                   f"decode budget of {limit / 1e6:,.0f} MB (TAGFER_DECODE_BUDGET_MB)")


def open_video(path: str, budget: int | None = None) -> tuple[Any, Any, VideoInfo]:
    """Open a video file with PyAV: ``(container, stream, info)`` or :class:`VideoError`.

    Decode budget (``budget`` bytes, default :func:`tagfer.core.imageio.decode_budget`): FFmpeg is
    told to refuse any frame above :func:`max_frame_pixels` before allocating it — when it probes
    the file here (a frame it would decode to learn the format), and for every later frame (a
    stream whose frames grow past its header); a header whose frames exceed that, or cost more
    than the budget in their own format, is refused here (``too_large``)."""
    import av  # lazy (start-up time): av

    p = Path(path)
    if not p.exists():
        raise VideoError("not_found", f"{path} does not exist")
    if p.is_file() and p.stat().st_size == 0:
        raise VideoError("empty_file", f"{path} is empty (0 bytes)")
    limit = decode_budget(budget)
    guard = {"max_pixels": str(max_frame_pixels(limit))}
    try:
        c = av.open(str(p), options=guard)
    except av.error.FFmpegError as e:  # not a container FFmpeg knows, or one cut short (mp4 without its index)
        raise VideoError("corrupt", f"{path}: cannot be opened as a video: {e}") from e
    if not c.streams.video:
        empty = not c.streams
        c.close()
        if empty:
            raise VideoError("zero_length", f"{path} holds no stream at all (a video with no frame)")
        raise VideoError("not_a_video", f"{path} has no video stream")
    s = c.streams.video[0]
    cc = s.codec_context
    w, h, fmt = cc.width or 0, cc.height or 0, cc.pix_fmt
    # No size here: none in the header, or the probe's frame was refused above; each frame is checked as decoded.
    if w and h:
        cost = w * h * (_format_bits(fmt) or 12) // 8  # unknown format: the smallest common one (yuv420p)
        if cost > limit:
            c.close()
            raise _too_large(w, h, fmt, cost, limit, f"{path}: its header announces frames too large")
        if w * h > max_frame_pixels(limit):
            c.close()
            raise VideoError("too_large", f"{path}: its header announces {w}×{h} frames, more than the {max_frame_pixels(limit):,} "
                                          f"pixels a decode budget of {limit / 1e6:,.0f} MB admits (TAGFER_DECODE_BUDGET_MB)")
    cc.options = dict(cc.options or {}, **guard)
    fps = float(s.average_rate) if s.average_rate else None
    dur = float(s.duration * s.time_base) if s.duration and s.time_base else (c.duration / 1e6 if c.duration else None)
    return c, s, VideoInfo(w, h, fps, dur, fmt)


def iter_frames(path: str, config: VideoConfig = VideoConfig(), skip_through: int = -1,
                info_out: list | None = None) -> Iterator[Frame]:
    """Sampled frames of a video file or frames folder, streamed (one frame in memory at a time).

    Every frame is checked against the decode budget at the size it was decoded, and downscaled
    from its own size (PyAV converts straight to the target size: no full-size RGB copy); a frame
    above the budget is yielded as ``Frame(error=too_large)``. Times go through
    :class:`tagfer.au.temporal.Timeline` (``Frame.repair`` says when one was changed).
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

    limit = decode_budget(config.decode_budget)
    container, stream, info = open_video(path, limit)
    if info_out is not None:
        info_out.append(info)
    timeline = Timeline(info.fps)
    pts0: int | None = None
    index = 0
    bad = 0
    shifted = False  # a timestamp was moved by a jump: the announced duration is not to be trusted
    refused = False  # a frame was refused undecoded (too_large, recorded): no time to compare with the duration
    rate = 1.0 / timeline.step

    def now() -> float:
        return max(timeline.last or 0.0, 0.0)

    try:
        packets = container.demux(stream)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                break
            except av.error.FFmpegError as e:  # the container itself is broken from here on
                yield Frame(None, now(), error=VideoError("corrupt", f"demuxing stopped: {e}"))
                return
            try:
                frames = packet.decode()
                bad = 0
            except av.error.FFmpegError as e:
                bad += 1
                if index <= skip_through:  # recorded by the run being resumed
                    continue
                if e.errno == errno.EINVAL:  # FFmpeg's max_pixels check (open_video): a frame above the budget
                    refused = True
                    err = VideoError("too_large", f"a frame at {now():.3f}s is larger than the decode budget "
                                                  f"({decode_budget(limit) / 1e6:,.0f} MB, TAGFER_DECODE_BUDGET_MB) allows: "
                                                  f"refused before decoding ({e})")
                else:
                    err = VideoError("decode_error", f"undecodable packet after {now():.3f}s: {e}")
                yield Frame(None, now(), error=err)
                if bad >= MAX_BAD_PACKETS:
                    break
                continue
            for vf in frames:
                raw: float | None = None
                if vf.pts is not None and vf.time_base:
                    if pts0 is None:
                        pts0 = vf.pts
                    raw = float((vf.pts - pts0) * vf.time_base)  # exact integer arithmetic: 2**62 stays precise
                t, repair = timeline.next(raw)
                shifted = shifted or repair in ("jump", "backwards")
                i = index
                index += 1
                if config.end is not None and t > config.end + 1e-9:
                    return
                if not sampler.keep(t) or i <= skip_through:
                    continue
                w, h, fmt = vf.width, vf.height, vf.format.name
                cost = frame_cost(w, h, fmt)
                if cost > limit:
                    yield Frame(i, t, error=_too_large(w, h, fmt, cost, limit, f"frame {i}"), repair=repair)
                    continue
                tw, th, scale = _target_size(w, h, config.max_side)  # from this frame's own size
                # Resize only when needed: a same-size width/height still builds a scaling context (≈3 ms/frame).
                rgb = vf.to_ndarray(format="rgb24", width=tw, height=th) if scale < 1 else vf.to_ndarray(format="rgb24")
                yield Frame(i, t, LoadedImage(rgb, w, h, tw / w, source=path), repair=repair)
            frames = vf = None  # dropped before the next packet is decoded: one full-size frame alive at a time
        last_t = timeline.last
        if config.end is None and info.duration and not shifted and not refused and (last_t is None or last_t < info.duration - 3.0 / rate):
            where = f"at {last_t:.2f}s" if last_t is not None else "before the first frame"
            yield Frame(None, now(), error=VideoError(
                "truncated", f"decoding stopped {where} of the {info.duration:.2f}s the file announces"))
    finally:
        container.close()


def _iter_folder(path: str, config: VideoConfig, sampler: Sampler, skip_through: int, info_out) -> Iterator[Frame]:
    names = sorted((e.name for e in os.scandir(path) if e.is_file() and Path(e.name).suffix.lower() in IMAGE_EXTENSIONS),
                   key=_natural_key)
    if not names:
        raise VideoError("zero_length", f"{path}: the folder holds no image frames")
    if info_out is not None:  # the size of the first frame whose header reads (pictures: a folder's summary has it)
        w = h = 0
        for name in names[:8]:
            try:
                head = probe(os.path.join(path, name), max_side=config.max_side, budget=config.decode_budget)
            except ItemError:
                continue
            w, h = head.width, head.height
            break
        info_out.append(VideoInfo(w, h, config.folder_fps, len(names) / config.folder_fps))
    for i, name in enumerate(names):
        t = i / config.folder_fps
        if config.end is not None and t > config.end + 1e-9:
            return
        if not sampler.keep(t) or i <= skip_through:
            continue
        try:
            yield Frame(i, t, load_image(os.path.join(path, name), max_side=config.max_side, budget=config.decode_budget))
        except ItemError as e:
            kind = "too_large" if e.kind == "too_large" else "decode_error"
            yield Frame(i, t, error=VideoError(kind, f"{name}: {e.kind}: {e.message}"))


# ----------------------------------------------------------------------------- output files
class FrameFile:
    """The frame records of one video in an output file, re-iterable and streamed (constant memory)."""

    def __init__(self, path: str | os.PathLike, video: str):
        self.path, self.video = Path(path), video

    def __iter__(self) -> Iterator[dict]:
        for r in read_jsonl(self.path):
            if r.get("video") == self.video and r.get("record") == "frame" and r.get("frame") is not None:
                yield r


def segments_path(out: str | os.PathLike) -> Path:
    """``runs/clip.jsonl`` → ``runs/clip.segments.jsonl``."""
    p = Path(out)
    return p.with_name(p.stem + ".segments.jsonl")


def media_stem(video: str) -> str:
    from tagfer.au.grounding import overlay_name  # lazy (start-up time): multiprocessing, concurrent

    return overlay_name(video)[: -len(".png")]


def read_progress(out: Path, video: str, tracker: FaceTracker) -> tuple[int, bool, int, set[int]]:
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
