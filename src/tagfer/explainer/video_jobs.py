"""Video uploads of ``tagfer serve``: clips analysed in the background by the video job.

``POST /analyze`` with a clip checks its header (:func:`tagfer.au.video_io.open_video`: the decode
budget, a video stream, a duration within ``max_duration_s``) and hands it to :class:`VideoJobs`:
one worker thread runs :func:`tagfer.au.video.run_video` — the job behind ``tagfer analyze CLIP
--out`` — on one clip at a time, writing the same frame records, summary and segments into the
job's own folder (no annotated video or plot: the page draws them); once done, the files name
the clip by the upload's own file name, never by the server's copy (:meth:`VideoJob.publish_records`). ``GET /jobs/{id}`` follows it
(progress in frames) and, once done, gives the segments (each with its apex trace cut at its boxes,
in the photo view's colours) and the URLs of the records (JSON Lines, as the CLI writes them), the
segments, one JSON document with all of it, and the clip itself (for playback after a reload).

At most ``max_queued`` clips wait or run; more are refused (503). Finished jobs are kept for
``keep_s`` seconds (and at most ``keep`` of them), then deleted with their folder; everything
is deleted when the server stops. A job id is 128 random bits: it is the capability to read it.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import shutil
import tempfile
import threading
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from tagfer.au.video import VideoConfig, load_grounded, run_video, segments_path
from tagfer.au.video_io import VIDEO_EXTENSIONS, open_video
from tagfer.au.video_render import LABEL_COLORS
from tagfer.core.errors import ItemError
from tagfer.explainer.overlay import box_color
from tagfer.explainer.records import box_aus, segments as trace_segments
from tagfer.traces.trace import parse_trace

__all__ = ["VideoJob", "VideoJobs", "looks_like_video", "public_paths", "segment_view", "upload_name"]

MAX_NAME_CHARS = 120


def upload_name(raw: str | None) -> str:
    """The file name a client gave an upload, safe to show and to store: its last path component
    (``/`` or ``\\``), control and format characters dropped, white space runs made one space, at
    most :data:`MAX_NAME_CHARS` characters (the extension kept); ``""`` when nothing is left
    (or for ``.`` and ``..``)."""
    name = (raw or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = " ".join("".join(c for c in name if c.isspace() or not unicodedata.category(c).startswith("C")).split())
    if name in (".", ".."):
        return ""
    if len(name) > MAX_NAME_CHARS:
        stem, dot, ext = name.rpartition(".")
        ext = dot + ext if stem and len(ext) <= 10 else ""
        name = name[: MAX_NAME_CHARS - len(ext)].rstrip() + ext
    return name


def public_paths(value: Any, paths: dict[str, str]) -> Any:
    """``value`` (a JSON value) with every occurrence of each server path in ``paths`` replaced
    by what the client may see (longest path first): responses and records name no server file."""
    if isinstance(value, str):
        for p in sorted(paths, key=len, reverse=True):
            if p:
                value = value.replace(p, paths[p])
        return value
    if isinstance(value, dict):
        return {k: public_paths(v, paths) for k, v in value.items()}
    if isinstance(value, list):
        return [public_paths(v, paths) for v in value]
    return value

_MAGIC_AT_4 = (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot")


def looks_like_video(path: str | os.PathLike, name: str | None = None) -> bool:
    """True for a file whose first bytes are those of a video container (MP4/MOV/M4V, WebM/MKV, AVI,
    MPEG-PS/TS), or, failing that, whose name has a video extension."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head[4:8] in _MAGIC_AT_4 or head.startswith(b"\x1a\x45\xdf\xa3"):  # ISO-BMFF / QuickTime; EBML (WebM, MKV)
        return True
    if head.startswith(b"RIFF") and head[8:12] in (b"AVI ", b"AVIX"):
        return True
    if head.startswith(b"\x00\x00\x01\xba") or head.startswith(b"\x00\x00\x01\xb3") or (len(head) > 0 and head[0] == 0x47 and name
                                                                                        and name.lower().endswith((".ts", ".m2ts"))):
        return True
    return bool(name) and Path(name).suffix.lower() in VIDEO_EXTENSIONS


def segment_view(seg: dict) -> dict:
    """A segment record with its apex trace cut at its boxes as the photo view shows a trace:
    ``view`` = ``{"segments", "boxes", "box_aus", "box_colors", "well_formed"}`` (None without a trace)."""
    out = dict(seg)
    trace = seg.get("trace")
    if not trace:
        out["view"] = None
        return out
    p = parse_trace(trace, int(seg.get("canvas") or 512))
    out["view"] = {"segments": trace_segments(p), "boxes": [list(c) if c is not None else None for c in p.box_coords],
                   "box_aus": box_aus(p), "box_colors": [box_color(j) for j in range(len(p.boxes))], "well_formed": p.well_formed}
    return out


@dataclass
class VideoJob:
    id: str
    name: str
    folder: Path
    clip: Path
    expected_frames: int | None
    duration: float | None
    state: str = "queued"  # queued | running | done | failed
    frames_done: int = 0
    frames_failed: int = 0
    summary: dict | None = None
    error: dict | None = None
    created: float = field(default_factory=time.monotonic)
    finished: float | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def records(self) -> Path:
        return self.folder / "records.jsonl"

    @property
    def server_paths(self) -> dict[str, str]:
        """This job's server paths → what the client sees instead (the upload's name)."""
        return {str(self.clip): self.name, os.path.abspath(self.clip): self.name, str(self.folder) + os.sep: "",
                str(self.folder): ""}

    def publish_records(self) -> None:
        """Rewrite the records and segments files as the client gets them: ``video`` is the
        upload's name, ``segments_file`` the name of the segments download, and no string names
        a server path (atomic: a reader sees the old file or the new one)."""
        for path in (self.records, self.segments_file):
            if not path.exists():
                continue
            tmp = path.with_name(path.name + ".public")
            with open(path, encoding="utf-8") as src, open(tmp, "w", encoding="utf-8") as dst:
                for line in src:
                    if not line.strip():
                        continue
                    rec = json.loads(line)
                    if "video" in rec:
                        rec["video"] = self.name
                    if rec.get("segments_file"):
                        rec["segments_file"] = "segments.jsonl"
                    dst.write(json.dumps(public_paths(rec, self.server_paths), ensure_ascii=False) + "\n")
            os.replace(tmp, path)

    @property
    def segments_file(self) -> Path:
        return segments_path(self.records)

    def segments(self) -> list[dict]:
        if not self.segments_file.exists():
            return []
        with open(self.segments_file, encoding="utf-8") as f:
            return [segment_view(json.loads(line)) for line in f if line.strip()]

    def status(self, base: str = "") -> dict[str, Any]:
        """The JSON of ``GET /jobs/{id}``."""
        frac = None
        if self.state == "done" or self.state == "failed":
            frac = 1.0
        elif self.expected_frames:
            frac = min(0.99, self.frames_done / self.expected_frames)
        u = f"{base}/jobs/{self.id}"
        d: dict[str, Any] = {
            "job": self.id, "state": self.state, "name": self.name, "status_url": u,
            "progress": {"frames": self.frames_done, "failed": self.frames_failed, "expected": self.expected_frames, "fraction": frac},
            "duration": self.duration, "clip_url": f"{u}/clip", "error": self.error,
        }
        if self.state == "done":
            d.update({"summary": self.summary, "segments": self.segments(), "label_colors": LABEL_COLORS,
                      "records_url": f"{u}/records.jsonl", "segments_url": f"{u}/segments.jsonl", "result_url": f"{u}/result.json"})
        return d

    def iter_result(self) -> Iterator[bytes]:
        """``{"summary": …, "segments": […], "frames": […]}`` as JSON, streamed from the files
        (a long clip's frames are never all in memory)."""
        yield b'{"video": ' + json.dumps(self.name).encode() + b', "summary": ' + json.dumps(self.summary).encode()
        yield b', "segments": ' + json.dumps(self.segments()).encode() + b', "frames": ['
        first = True
        with open(self.records, encoding="utf-8") as f:
            for line in f:
                if not line.strip() or json.loads(line).get("record") != "frame":
                    continue
                yield (b"" if first else b", ") + line.strip().encode()
                first = False
        yield b"]}\n"


class VideoJobs:
    """Background video jobs (module docstring). ``run``: the job function (default
    :func:`tagfer.au.video.run_video`), for tests."""

    def __init__(self, config: VideoConfig | None = None, *, max_queued: int = 4, keep: int = 16, keep_s: float = 3600.0,
                 max_duration_s: float = 600.0, root: str | os.PathLike | None = None, run: Callable[..., Any] | None = None):
        self.config = config or VideoConfig(render="none", plot=False, media_dir=None)
        self.max_queued, self.keep, self.keep_s, self.max_duration_s = max_queued, keep, keep_s, max_duration_s
        self._root_arg = root
        self._root: Path | None = None
        self._run = run or run_video
        self._grounded: Any = None
        self._jobs: dict[str, VideoJob] = {}
        self._queue: queue.Queue[VideoJob | None] = queue.Queue()
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self._closed = False

    @property
    def root(self) -> Path:
        with self._lock:
            if self._root is None:
                self._root = Path(tempfile.mkdtemp(prefix="tagfer-serve-videos-", dir=self._root_arg))
            return self._root

    def check(self, path: str | os.PathLike) -> tuple[float | None, int | None]:
        """Header checks of a clip (decode budget, a video stream, the duration): ``(duration s,
        expected frames)``; :class:`ItemError` otherwise. Opens the container only."""
        c, s, info = open_video(str(path))
        c.close()
        dur = info.duration
        if dur is not None and dur > self.max_duration_s:
            raise ItemError("too_long", f"the clip lasts {dur:.0f} s; this server analyses clips of at most {self.max_duration_s:g} s")
        fps = self.config.fps or info.fps
        return dur, (max(1, round(dur * fps)) if dur and fps else None)

    def active(self) -> int:
        with self._lock:
            return sum(j.state in ("queued", "running") for j in self._jobs.values())

    def submit(self, path: str | os.PathLike, name: str, duration: float | None, expected: int | None) -> VideoJob:
        """Move the clip at ``path`` into a new job's folder and queue it; :class:`ItemError`
        ``busy`` when ``max_queued`` clips are already waiting or running."""
        self.expire()
        with self._lock:
            if self._closed:
                raise ItemError("busy", "the server is stopping")
            if sum(j.state in ("queued", "running") for j in self._jobs.values()) >= self.max_queued:
                raise ItemError("busy", f"{self.max_queued} clips are already being analysed; try again when one is done")
        name = upload_name(name) or "clip"
        jid = secrets.token_hex(16)
        folder = self.root / jid
        folder.mkdir()
        suffix = Path(name).suffix.lower() if Path(name).suffix.lower() in VIDEO_EXTENSIONS else ".video"
        clip = folder / f"clip{suffix}"
        shutil.move(str(path), clip)
        job = VideoJob(jid, name, folder, clip, expected, duration)
        with self._lock:
            self._jobs[jid] = job
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="tagfer-video-jobs", daemon=True)
                self._worker.start()
        self._queue.put(job)
        return job

    def get(self, jid: str) -> VideoJob | None:
        self.expire()
        with self._lock:
            return self._jobs.get(jid)

    def expire(self) -> None:
        """Delete finished jobs older than ``keep_s``, and the oldest beyond ``keep``."""
        now = time.monotonic()
        with self._lock:
            done = sorted((j for j in self._jobs.values() if j.finished is not None), key=lambda j: j.finished or 0.0)
            drop = [j for j in done if now - (j.finished or now) > self.keep_s]
            rest = [j for j in done if j not in drop]
            drop += rest[: max(0, len(rest) - self.keep)]
            for j in drop:
                self._jobs.pop(j.id, None)
        for j in drop:
            shutil.rmtree(j.folder, ignore_errors=True)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            job.state = "running"

            def on_record(rec: dict, job: VideoJob = job) -> None:
                if rec.get("record") == "frame":
                    job.frames_done += 1
                    job.frames_failed += bool(rec.get("error"))

            try:
                if self._grounded is None and self.config.engine == "facs":
                    self._grounded = load_grounded(self.config)  # loaded once for every clip
                summ = self._run(str(job.clip), job.records, self.config, on_record=on_record, resume=False, grounded=self._grounded)
                job.publish_records()  # the server's temporary paths mean nothing to the user, and are not theirs to see
                summary = summ.to_json()
                summary["video"] = job.name
                if summary.get("segments_file"):
                    summary["segments_file"] = "segments.jsonl"
                job.summary = public_paths(summary, job.server_paths)
                job.error = public_paths(summ.error, job.server_paths)  # e.g. no_face, corrupt: shown beside what was analysed
                job.state = "done"
            except Exception as e:  # noqa: BLE001 — a library failure fails this job, never the worker
                job.error = {"kind": "internal", "message": public_paths(f"{type(e).__name__}: {e}", job.server_paths)}
                job.state = "failed"
            job.finished = time.monotonic()
            job.done.set()

    def close(self) -> None:
        """Stop the worker after the clip in progress and delete every job folder."""
        with self._lock:
            self._closed = True
            worker = self._worker
        if worker is not None:
            self._queue.put(None)
            worker.join(timeout=60)
        with self._lock:
            root, self._root = self._root, None
            self._jobs.clear()
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)
