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

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from tagfer.au.temporal import FaceTracker, Sampler, segments_from_records
from tagfer.au.video_records import VideoConfig
from tagfer.core.errors import ItemError
from tagfer.core.imageio import IMAGE_EXTENSIONS, LoadedImage, load_image
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
