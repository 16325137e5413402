"""``tagfer au`` and ``tagfer demo``: AU grounding from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from tagfer.core.canvas import CANVAS, TOP_K
from tagfer.cli._app import app, console, out_console, say, usage_error
from tagfer.cli.progress import JobProgress
from tagfer.cli._shared import resolve_image, set_verbose
from tagfer.cli import video as _video


def _au_config(top_k: int, threshold: float, bilateral: str, canvas: int, candidate_threshold: float | None = None):
    from tagfer.au.aus import AUConfig  # lazy: keeps `tagfer --help` fast

    extra = {} if candidate_threshold is None else {"candidate_threshold": candidate_threshold}
    return AUConfig(threshold=threshold, top_k=top_k, bilateral=bilateral, canvas=canvas, **extra)


def pose_text(pose: dict | None) -> str:
    """``{"yaw": 0.6, "pitch": -3.1, "roll": 1.0}`` → ``yaw 0.6°, pitch -3.1°, roll 1.0°`` (empty: ``unknown``)."""
    if not pose:
        return "unknown"
    return ", ".join(f"{k} {float(v):.1f}°" for k, v in pose.items())


def box_text(box) -> str:
    """A box as the trace writes it, ``[x1, y1, x2, y2]`` (whole pixels); None → ``—``."""
    if not box:
        return "—"
    return "[" + ", ".join(str(round(float(v))) for v in box) + "]"


def _print_faces(rec: dict, all_aus: bool = False) -> None:
    if rec.get("error"):
        out_console.print(f"[red]✗ {rec['image']}: {rec['error']['kind']}: {rec['error']['message']}[/red]")
        return
    out_console.print(f"[bold]{rec['image']}[/bold]  {rec['width']}×{rec['height']}, {rec['n_faces']} face(s) found")
    for i, f in enumerate(rec["faces"]):
        t = Table(title=f"face {i}: box {box_text(f['bbox_canvas'])} on the {rec['canvas']} canvas; head pose {pose_text(f.get('head_pose'))}")
        for c in ("AU", "name", "score", "active", "canvas box"):
            t.add_column(c)
        for a in f["aus"]:
            if a["active"] or a["au"] in f["top"] or all_aus:
                t.add_row(f"AU{a['au']}", a["name"], f"{a['score']:.2f}", "yes" if a["active"] else "", box_text(a["box"]))
        out_console.print(t)
        out_console.print("AU_LIST for the teacher prompt:\n" + (f["au_list"] or "(no active AU)"))
    if rec.get("overlay"):
        out_console.print(f"overlay: {rec['overlay']}")


@app.command("au", short_help='AU grounding: faces, activated AUs, canvas boxes.')
def au_cmd(
    inputs: List[Path] = typer.Argument(..., help="Image files and/or directories (walked recursively); sample:astronaut or sample:grace_hopper for a bundled real face."),
    out: Path = typer.Option(..., "--out", "-o", help="Output JSON Lines file (appended to; resumable)."),
    overlays: Optional[Path] = typer.Option(None, "--overlays", help="Folder for one PNG overlay per image."),
    workers: int = typer.Option(1, "--workers", "-w", min=1, help="Worker processes."),
    top_k: int = typer.Option(TOP_K, "--top-k", min=0, help="AUs in the candidate pool / AU_LIST (paper: 3)."),
    threshold: float = typer.Option(0.3, "--au-threshold", min=0.0, max=1.0, help="AU activation threshold."),
    candidate_threshold: Optional[float] = typer.Option(None, "--candidate-threshold", min=0.0, max=1.0, help="Score an activated AU needs to enter the candidate pool (default: AUConfig's)."),
    all_faces: bool = typer.Option(False, "--all-faces", help="Keep every face (default: the largest)."),
    detector: str = typer.Option("mediapipe", "--detector", help="mediapipe | openface:CSV_OR_DIR[?geometry=mediapipe] | table:LONG_CSV | a kind registered by a $TAGFER_PLUGINS module (docs/au.md)."),
    bilateral: str = typer.Option("union", "--bilateral", help="union: one box over both sides; split: one per side."),
    canvas: int = typer.Option(CANVAS, "--canvas", min=16, help="Virtual canvas side."),
    fallback: Optional[str] = typer.Option(None, "--fallback", help="Small-face fallback detector: dlib (extra tagfer[dlib])."),
    landmarker: Optional[Path] = typer.Option(None, "--landmarker", help="Path to face_landmarker.task (default: bundled)."),
    landmarks: bool = typer.Option(False, "--landmarks", help="Include the 478 landmarks in each record."),
    retry_errors: bool = typer.Option(False, "--retry-errors", help="Re-run images whose earlier record is an error."),
    no_resume: bool = typer.Option(False, "--no-resume", help="Start over: overwrite --out."),
    show: bool = typer.Option(False, "--show", help="Print each face's AUs as a table."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    fps: Optional[float] = _video.FPS, start: float = _video.START, end: Optional[float] = _video.END,
    video: bool = _video.FRAMES_FOLDER, folder_fps: float = _video.FOLDER_FPS, smooth: str = _video.SMOOTH,
    render: str = _video.RENDER, media: Optional[Path] = _video.MEDIA, all_aus: bool = _video.ALL_AUS,
    verbose: bool = typer.Option(False, "--verbose", help="Show MediaPipe's own log lines (hidden by default)."),
) -> None:
    """Detect faces and activated AUs, and ground each AU in a box on the canvas. Exit code 1 if any
    requested image has an error record in --out (written now, or left by an earlier run).

    Videos (.mp4 .webm .mov .avi …, or folders with --video): one line per sampled frame, then segments
    (docs/video.md); the annotated video draws the AU boxes each segment's trace cites, every active
    one with --all-aus."""
    from tagfer.au.video import split_video_inputs  # lazy (start-up time): PIL

    set_verbose(verbose)

    inputs, videos = split_video_inputs(inputs, frames_folder=video)
    vcode = 0
    if videos:
        if detector != "mediapipe":
            console.print("[red]error:[/red] videos are analysed with the mediapipe detector only")
            raise typer.Exit(2)
        try:
            vcfg = _video.video_config(fps=fps, start=start, end=end, folder_fps=folder_fps, smooth=smooth, render=render,
                                       media=media or overlays, threshold=threshold, top_k=top_k, bilateral=bilateral,
                                       canvas=canvas, landmarker=landmarker, render_aus=_video.render_aus(all_aus))
        except ValueError as e:
            console.print(f"[red]error:[/red] {e}")
            raise typer.Exit(2)
        vcode = _video.run_videos(videos, out, vcfg, no_resume=no_resume, retry_errors=retry_errors,
                                  progress=progress, show=show)
        if not inputs or vcode == 2:
            raise typer.Exit(vcode)
        if retry_errors:
            _video.drop_image_errors(out)
            retry_errors = False  # the image job must not drop the video records just written
    from tagfer.au.detectors import DetectorSpec  # lazy (start-up time): PIL
    from tagfer.au.grounding import GroundingConfig, run_grounding  # lazy (start-up time): PIL
    from tagfer.core.jobs import SetupError  # lazy: keeps `tagfer --help` fast

    try:
        inputs = [resolve_image(p) for p in inputs]  # sample:astronaut, as in tagfer analyze
    except (ValueError, RuntimeError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2)
    spec = DetectorSpec(
        kind=detector,
        config=_au_config(top_k, threshold, bilateral, canvas, candidate_threshold),
        landmarker_path=str(landmarker) if landmarker else None,
        fallback=fallback,
    )
    gcfg = GroundingConfig(all_faces=all_faces, landmarks=landmarks, overlays=str(overlays) if overlays else None)

    def on_record(rec: dict) -> None:
        if show:
            _print_faces(rec, all_aus)

    try:
        with JobProgress("tagfer au", enabled=progress, unit="images") as bar:
            summary = run_grounding(inputs, out, spec, gcfg, workers=workers, resume=not no_resume or bool(videos),
                                    retry_errors=retry_errors, on_record=on_record, on_event=bar)
    except SetupError as e:  # a missing model file, a bad table, an output that is not a file
        usage_error(str(e))
    say(summary.render(out, noun="image"), err=True)
    if summary.any_failed or vcode:
        raise typer.Exit(1)


@app.command("demo", short_help='The offline tour on a bundled real face.')
def demo_cmd(
    out: Path = typer.Option(Path("demo_out"), "--out", "-o", help="Folder for the demo outputs."),
    sample: str = typer.Option("astronaut", "--sample", help="astronaut | grace_hopper"),
    verbose: bool = typer.Option(False, "--verbose", help="Show MediaPipe's own log lines (hidden by default)."),
) -> None:
    """The offline tour on a real face shipped by an installed package: `tagfer analyze`
    (label, grounded trace, red/green overlay) then the AU grounding record of `tagfer au`."""
    set_verbose(verbose)
    from tagfer.au.detectors import DetectorSpec  # lazy (start-up time): PIL
    from tagfer.au.grounding import GroundingConfig, run_grounding  # lazy (start-up time): PIL
    from tagfer.cli.analyze import analyze_images  # here, not above: `analyze` registers its commands after `au`'s
    from tagfer.core.samples import sample_face_path  # lazy: keeps `tagfer --help` fast

    out.mkdir(parents=True, exist_ok=True)
    analyze_images([Path(f"sample:{sample}")], overlay=out / f"analyze_{sample}.png", scores=True)
    records: list[dict] = []
    run_grounding([sample_face_path(sample)], out / "au.jsonl", DetectorSpec(), GroundingConfig(overlays=str(out)), resume=False, on_record=records.append)
    for rec in records:
        _print_faces(rec)
    if any(r.get("error") for r in records):
        raise typer.Exit(1)
