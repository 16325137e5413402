"""Video inputs of ``tagfer au`` and ``tagfer analyze`` (the job itself is :mod:`tagfer.au.video`)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from rich.table import Table
import typer

from tagfer.cli._app import console, out_console, say

# Options shared by `tagfer au` and `tagfer analyze` (video inputs only).
FPS = typer.Option(None, "--fps", min=0.001, help="Video: frames analysed per second (default: every frame).")
START = typer.Option(0.0, "--start", min=0.0, help="Video: first second analysed.")
END = typer.Option(None, "--end", min=0.0, help="Video: last second analysed (default: the end).")
FRAMES_FOLDER = typer.Option(False, "--video", help="Read each folder given as one video (its images are frames in name order).")
FOLDER_FPS = typer.Option(25.0, "--folder-fps", min=0.001, help="Video: frame rate of a folder of frames.")
SMOOTH = typer.Option("window:0.5", "--smooth", help="Video: temporal filter window:SECONDS (centred, no lag) | ema:SECONDS (causal, lag = SECONDS/2) | none.")
RENDER = typer.Option("mp4", "--render", help="Video: annotated output mp4 | gif | webp | none.")
MEDIA = typer.Option(None, "--media", help="Video: folder for the annotated video and the plot (analyze: OUT_media next to --out; au: --overlays).")
ALL_AUS_HELP = "List every detector AU, not only the active and cited ones; video: draw every active AU box, not only the cited ones."
ALL_AUS = typer.Option(False, "--all-aus", help=ALL_AUS_HELP)


def render_aus(all_aus: bool) -> str:
    """``VideoConfig.render_aus`` for ``--all-aus``: every active AU box, else the ones the trace cites."""
    return "active" if all_aus else "cited"

EXIT_PRIORITY = (2, 1, 3, 0)  # usage beats a failed input beats a malformed output


def worse_exit(a: int, b: int) -> int:
    """The exit code to report when two parts of one run ended with ``a`` and ``b``."""
    rank = {c: i for i, c in enumerate(EXIT_PRIORITY)}
    return min((a, b), key=lambda c: rank.get(c, 0))


def parse_smooth(spec: str):
    from tagfer.au.video import SmoothingConfig  # lazy (start-up time): PIL

    method, _, w = spec.partition(":")
    method = method.strip().lower()
    try:
        if method == "none":
            return SmoothingConfig(method="none")
        try:
            window = float(w) if w.strip() else 0.5
        except ValueError:
            raise ValueError(f"the window must be a number of seconds, got {w!r}") from None
        return SmoothingConfig(method=method, window=window)
    except ValueError as e:
        raise ValueError(f"--smooth {spec!r}: {e} (use window:SECONDS, ema:SECONDS or none)") from None


def video_config(*, fps, start, end, folder_fps, smooth, render, media, threshold=0.3, top_k=3, bilateral="union",
                 canvas=512, max_faces=5, landmarker=None, engine="facs", render_aus="cited"):
    """A :class:`tagfer.au.video.VideoConfig` from the command-line values (ValueError for bad ones)."""
    from tagfer.au.aus import AUConfig  # lazy: keeps `tagfer --help` fast
    from tagfer.au.video import VideoConfig  # lazy (start-up time): PIL

    return VideoConfig(
        fps=fps, start=start, end=end, folder_fps=folder_fps, smoothing=parse_smooth(smooth), render=render,
        plot=media is not None, media_dir=str(media) if media is not None else None, max_faces=max_faces,
        landmarker_path=str(landmarker) if landmarker else None,
        au=AUConfig(threshold=threshold, top_k=top_k, bilateral=bilateral, canvas=canvas), engine=engine,
        render_aus=render_aus,
    )


def _print_segments(summ, out: Path) -> None:
    from tagfer.au.video import segments_path  # lazy (start-up time): PIL
    from tagfer.core.jsonl import read_jsonl  # lazy: keeps `tagfer --help` fast

    t = Table(title=f"{Path(summ.video).name}: expression segments (seconds)")
    for c in ("face", "label", "onset", "apex", "offset", "peak", "AUs"):
        t.add_column(c)
    for s in read_jsonl(segments_path(out)):
        if s.get("video") == summ.video:
            aus = " ".join(f"AU{a['au']} {a['score']:.2f}" for a in s["aus"])
            t.add_row(f"#{s['face_id']}", s["label"], f"{s['onset']:.2f}", f"{s['apex']:.2f}", f"{s['offset']:.2f}", f"{s['peak']:.2f}", aus)
    out_console.print(t)


def drop_image_errors(out: Optional[Path]) -> None:
    """``--retry-errors`` with videos in the run: drop the failed *image* records here, so that the
    image job (told not to retry) leaves the video records — frame errors, summaries — alone."""
    from tagfer.core.jsonl import drop_records  # lazy: keeps `tagfer --help` fast

    if out is not None and out.exists():
        drop_records(out, lambda r: "image" in r and bool(r.get("error")))


def run_videos(videos: List[str], out: Optional[Path], config, *, no_resume: bool = False, retry_errors: bool = False,
               progress: bool = True, show: bool = False) -> int:
    """Run every video into ``out``; returns the exit code (0 ok, 1 a video or frame failed, 2 usage). The
    progress bar counts each video's frames; the exit code is that of the run's
    :class:`tagfer.core.jobs.JobResult` (one item per video). A video's own summary is its last
    record in ``out`` (:class:`tagfer.au.video.VideoSummary`)."""
    from tagfer.au.faces import FaceLandmarker  # lazy: keeps `tagfer --help` fast
    from tagfer.au.video import drop_failed_videos, load_grounded, run_video, segments_path  # lazy (start-up time): PIL

    if out is None:
        console.print("[red]error:[/red] a video needs --out FILE.jsonl (one JSON line per frame)")
        return 2
    try:
        FaceLandmarker(config.landmarker_path, running_mode="video").close()  # fail fast on a missing model file
        grounded = load_grounded(config)  # the FER net of the default engine, loaded once for every video
    except Exception as e:
        console.print(f"[red]error:[/red] {e}")
        return 2
    if no_resume:
        for p in (out, segments_path(out)):
            p.unlink(missing_ok=True)
    if retry_errors and out.exists():
        drop_failed_videos(out)
    from tagfer.cli.progress import JobProgress  # lazy: keeps `tagfer --help` fast
    from tagfer.core.jobs import JobRecorder, Progress  # lazy: keeps `tagfer --help` fast

    job = JobRecorder("video")  # one item per video: failed when the video or one of its frames failed
    for v in videos:
        with JobProgress(f"video {Path(v).name}", enabled=progress, unit="frames") as bar:

            def on_record(rec: dict, bar=bar) -> None:
                if rec.get("record") == "frame":
                    bar(Progress(str(rec.get("t")), (rec.get("error") or {}).get("kind") if rec.get("error") else None))

            summ = run_video(v, out, config, on_record=on_record, grounded=grounded)
        msg = f"{v}: {summ.frames_sampled} frame(s) analysed ({summ.frames_failed} failed), {summ.frames_resumed} already done"
        if summ.faces_seen:
            msg += f", {summ.faces_seen} face(s), {summ.segments} segment(s) → {summ.segments_file}"
        for what in ("annotated", "plot"):
            if getattr(summ, what):
                msg += f"; {what}: {getattr(summ, what)}"
        say(msg, err=True)
        if summ.error:
            console.print(f"[red]✗ {v}: {summ.error['kind']}: {summ.error['message']}[/red]")
        job.item(v, summ.error["kind"] if summ.error else "frame_failed" if summ.frames_failed else None)
        if show and summ.segments:
            _print_segments(summ, out)
    code = job.finish().exit_code()
    return code
