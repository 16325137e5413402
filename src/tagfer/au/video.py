"""Video: AU grounding and expressions over time (``tagfer au VIDEO``, ``tagfer analyze VIDEO``).

Pipeline (I/O at the edges, pure steps in between)::

    decode (PyAV, streamed; tagfer.au.video_io) → sample (--fps, --start/--end) → downscale (max_side)
    → FaceLandmarker in VIDEO mode (MediaPipe tracking) → AU scores and boxes (tagfer.au.aus)
    → class scores (tagfer.au.facs) → face ids (IoU tracker) → one JSON line per sampled frame
    then, from that file (streamed): smoothing → segments with onset/apex/offset
    → a grounded TAG trace for each segment's apex frame (tagfer.au.segments, tagfer.au.facs.explain)
    → the annotated clip and the plot (tagfer.au.video_render).

This module is the job (:func:`run_video`, :func:`analyse_frame`); the layers it joins:

* :mod:`tagfer.au.temporal` — pure: option checks, sampling, timestamp repair, face ids;
* :mod:`tagfer.au.segments` — pure: smoothing, held expressions, segments;
* :mod:`tagfer.au.video_io` — decoding, folders of frames, output files, resume;
* :mod:`tagfer.au.video_records` — the options and the records written;
* :mod:`tagfer.au.video_render` — the annotated clip and the timeline plot.

Their public names are importable from here too (``from tagfer.au.video import VideoConfig``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from tagfer.au.aus import FaceAUs, ground_face
from tagfer.au.faces import FaceLandmarker
from tagfer.au.facs import class_scores, top_label
from tagfer.au.fusion import decide
from tagfer.au.segments import (
    HoldGuard,
    Sample,
    Segmenter,
    SegmentRecord,
    SmoothingConfig,
    Smoother,
    au_columns,
    face_samples,
    segments_from_records,
    smooth_series,
    smoothed_tracks,
)
from tagfer.au.temporal import FaceTracker, Sampler, Timeline
from tagfer.au.video_io import (
    MAX_BAD_PACKETS,
    VIDEO_EXTENSIONS,
    Frame,
    FrameFile,
    VideoError,
    VideoInfo,
    drop_failed_videos,
    is_video_path,
    iter_frames,
    media_stem,
    open_video,
    read_progress,
    segments_path,
    split_video_inputs,
    write_segments,
)
from tagfer.au.video_records import FaceRecord, FrameRecord, VideoConfig, VideoSummary
from tagfer.au.video_render import plot_timeline, render_video
from tagfer.core.canvas import CanvasTransform
from tagfer.core.errors import ItemError
from tagfer.core.jsonl import JsonlWriter
from tagfer.core.prefetch import prefetch

__all__ = [
    "FaceRecord", "FaceTracker", "Frame", "FrameFile", "FrameRecord", "HoldGuard", "ground_frame", "MAX_BAD_PACKETS", "Sample", "Sampler",
    "SegmentRecord", "Segmenter", "SmoothingConfig", "Smoother", "VIDEO_EXTENSIONS", "VideoConfig", "VideoError",
    "VideoInfo", "VideoSummary", "analyse_frame", "au_columns", "drop_failed_videos", "face_samples", "is_video_path",
    "iter_frames", "media_stem", "open_video", "prefetch", "read_progress", "run_video", "segments_from_records",
    "segments_path", "load_grounded", "frame_scores", "smooth_series", "smoothed_tracks", "split_video_inputs", "Timeline", "write_segments",
]


def ground_frame(landmarker: Any, img: Any, timestamp_ms: int, config: VideoConfig) -> list[FaceAUs]:
    """The faces of one decoded frame (``img``: a :class:`tagfer.core.imageio.LoadedImage`), landmarks
    from the landmarker in video mode (``timestamp_ms`` strictly increasing), grounded on the frame's
    canvas (the whole frame). The per-frame step shared by :func:`analyse_frame` and live sessions
    (:mod:`tagfer.explainer.live`)."""
    meshes = landmarker.detect(img.rgb, scale=img.scale, timestamp_ms=timestamp_ms)
    tr = CanvasTransform(img.width, img.height, canvas=config.au.canvas)
    return [ground_face(m, tr, config.au, detector="mediapipe") for m in meshes]


def load_grounded(config: VideoConfig) -> Any:
    """The FER net + AU evidence engine of ``config.engine == "facs"`` (None for ``facs-rules``);
    raises :class:`tagfer.au.impression.ImpressionUnavailable` when the net is missing."""
    if config.engine != "facs":
        return None
    from tagfer.au.impression import GroundedEngine  # lazy (start-up time): litert

    return GroundedEngine(facs=config.facs)


def frame_scores(fa: Any, picture: Any, grounded: Any, config: VideoConfig) -> tuple[dict[str, float], dict[str, float] | None]:
    """One face's class scores with the video's engine, and the net's own impression (None for the
    rules): the same decision as ``tagfer analyze`` on a photo (:func:`tagfer.au.fusion.decide`)."""
    if grounded is None:
        return class_scores(fa, config.facs), None
    g = grounded.global_scores(picture, fa)
    return dict(decide(g, fa, grounded.fusion, config.facs).scores), g


def analyse_frame(landmarker: Any, frame: Frame, tracker: FaceTracker, config: VideoConfig, video: str,
                  timestamp_ms: int | None = None, grounded: Any = None) -> FrameRecord:
    """Detect, ground, score and track the faces of one decoded frame (``timestamp_ms``: for the
    landmarker's video mode, strictly increasing; default the frame's time). ``grounded``: the
    engine of :func:`load_grounded` (None: the FACS rules decide)."""
    img = frame.image
    assert img is not None and frame.index is not None
    ts = round(frame.t * 1000) if timestamp_ms is None else timestamp_ms
    faces = ground_frame(landmarker, img, ts, config)
    ids = tracker.update(frame.t, [f.mesh.bbox for f in faces])  # type: ignore[union-attr]
    # the decoded pixels (possibly downscaled): the canvas maps onto them with the same letterbox
    picture = Image.fromarray(img.rgb) if grounded is not None and faces else None
    recs = []
    for fid, fa in zip(ids, faces):
        sc, g = frame_scores(fa, picture, grounded, config)
        mesh = fa.mesh
        assert mesh is not None
        recs.append(FaceRecord(
            face_id=fid, bbox=[round(float(v), 1) for v in mesh.bbox], bbox_canvas=list(fa.bbox_canvas),
            head_pose={k: round(float(v), 1) for k, v in mesh.head_pose.items()},
            label=top_label(sc), scores={k: round(v, 4) for k, v in sc.items()},
            aus=[a.to_json() for a in fa.aus], active=[a.au for a in fa.active], au_boxes=[list(b) for b in fa.au_boxes],
            global_scores={k: round(float(v), 4) for k, v in g.items()} if g is not None else None,
        ))
    return FrameRecord(video, frame.index, frame.t, img.width, img.height, config.au.canvas, recs, t_repaired=frame.repair)


def run_video(video: str, out: str | os.PathLike, config: VideoConfig = VideoConfig(), *,
              on_record: Callable[[dict], None] | None = None, resume: bool = True, grounded: Any = None) -> VideoSummary:
    """Analyse one video into ``out`` (frame records then a summary record), then write its segments
    (``segments_path(out)``) and, with ``config.media_dir``, the annotated video and the plot.
    Never raises for bad input: the summary's ``error`` says what went wrong. ``grounded``: the
    engine of :func:`load_grounded`, loaded once for many videos (default: loaded here; a missing
    FER net raises :class:`tagfer.au.impression.ImpressionUnavailable` before anything is written)."""
    out = Path(out)
    video = os.path.abspath(video)
    if grounded is None:
        grounded = load_grounded(config)
    summ = VideoSummary(video=video)
    tracker = FaceTracker(config.iou_min, config.smoothing.max_gap)
    last, done, n_prev, faces_seen = read_progress(out, video, tracker) if resume and out.exists() else (-1, False, 0, set())
    summ.frames_resumed = n_prev
    if done:
        return summ
    info: list[VideoInfo] = []
    failures: dict[str, str] = {}  # kind → first message, of this run's failed frames
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
                        failures.setdefault(fr.error.kind, fr.error.message)
                        emit(FrameRecord(video, fr.index, fr.t, error={"kind": fr.error.kind, "message": fr.error.message},
                                         t_repaired=fr.repair).to_json())
                        if fr.error.kind in ("corrupt", "truncated"):
                            summ.error = {"kind": fr.error.kind, "message": fr.error.message}
                        continue
                    last_ms = max(round(fr.t * 1000), last_ms + 1)
                    try:
                        rec = analyse_frame(lm, fr, tracker, config, video, last_ms, grounded)
                    except Exception as e:  # a library failure on one frame: recorded, the clip goes on
                        summ.frames_failed += 1
                        failures.setdefault("internal", f"{type(e).__name__}: {e}")
                        rec = FrameRecord(video, fr.index, fr.t, error={"kind": "internal", "message": f"{type(e).__name__}: {e}"},
                                          t_repaired=fr.repair)
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
            elif summ.frames_failed and summ.frames_failed == summ.frames_sampled and not n_prev:
                kind = next(iter(failures)) if len(failures) == 1 and set(failures) <= {"too_large", "internal"} else "corrupt"
                first = next(iter(failures.values()), "")
                summ.error = {"kind": kind, "message": f"none of the {total} frame(s) could be used ({first})"}
            elif not faces_seen:
                summ.error = {"kind": "no_face", "message": f"no face in any of the {total} sampled frame(s)"}
        try:
            if faces_seen:
                summ.segments, summ.segments_file = write_segments(out, video, config), str(segments_path(out))
            if config.media_dir and faces_seen:
                stem = Path(config.media_dir) / media_stem(video)
                if config.render != "none":
                    summ.annotated = render_video(video, FrameFile(out, video), f"{stem}.annotated.{config.render}", config,
                                                 segments_path(out))
                if config.plot:
                    summ.plot = plot_timeline(FrameFile(out, video), segments_path(out), video, f"{stem}.plot.png", config)
        except Exception as e:  # outputs after the analysis: the frame records are already safe
            if summ.error is None:
                summ.error = {"kind": "render_failed", "message": f"{type(e).__name__}: {e}"}
        emit(summ.to_json())
    return summ

