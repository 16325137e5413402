"""``tagfer analyze`` and ``tagfer serve``: grounded explanations from the command line and in a browser."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

from rich.table import Table
from rich.text import Text
import typer

from tagfer.cli._app import app, console, out_console, say
from tagfer.cli import _serving
from tagfer.cli._shared import resolve_image, set_verbose
from tagfer.cli.progress import JobProgress
from tagfer.cli import video as _video

_EXIT_HELP = "Exit codes: 0 ok; 1 an image failed (unreadable, no face); 2 bad options / model not available; 3 a model output is malformed."


def _print_result(res, show_scores: bool, show_all_aus: bool) -> None:
    from rich.panel import Panel  # lazy (start-up time): rich.panel

    from tagfer.explainer.display import collapse_segments

    if res.error:
        out_console.print(f"[red]✗ {res.image}: {res.error['kind']}: {res.error['message']}[/red]")
        return
    out_console.print(f"[bold]{res.image}[/bold]  {res.width}×{res.height}, {len(res.analyses)} face(s)")
    for a in res.analyses:
        head = f"face {a.face + 1}/{a.n_faces} · engine {a.engine} · label [bold]{a.label or '—'}[/bold]"
        if a.well_formed:
            head += f" · well-formed (r_fmt {a.r_fmt:g})"
        else:
            head += f" · [red]MALFORMED: {', '.join(a.violations)}[/red]"
        head += f" · R_AU {'skipped (no active AU)' if a.r_au is None else f'{a.r_au:.2f}'}"
        text = Text()
        for seg in collapse_segments(a.segments):  # blank runs collapsed, long output cut (pictures)
            if seg.get("note"):
                text.append(seg["text"], style="dim italic")
            elif seg["box"] is None:
                text.append(seg["text"])
            else:
                text.append(seg["text"], style=f"bold white on {a.box_colors[seg['box']]}")
        out_console.print(Panel(text, title=head, title_align="left"))
        if show_scores and a.scores:
            st = Table(title="class scores")
            st.add_column("class")
            st.add_column("score", justify="right")
            for c, v in sorted(a.scores.items(), key=lambda kv: -kv[1]):
                st.add_row(c, f"{v:.3f}")
            out_console.print(st)
        t = Table(title=f"detector AUs ({a.detector}, frame: {a.frame}, canvas {a.canvas})")
        for c in ("AU", "name", "score", "active", "canvas box", "cited"):
            t.add_column(c)
        for d in a.aus:
            if d["active"] or show_all_aus or d["au"] in a.box_aus:
                cited = "yes" if d["au"] in a.box_aus else ""
                t.add_row(f"AU{d['au']}", d["name"], f"{d['score']:.2f}", "yes" if d["active"] else "", str(d["box"]), cited)
        out_console.print(t)
    for p in res.overlays:
        out_console.print(f"overlay: {p}")


@app.command("analyze", epilog=_EXIT_HELP, short_help='Explain each face: label, grounded trace, AUs.')
def analyze_cmd(
    images: List[Path] = typer.Argument(..., help="Image files and/or folders (walked); sample:astronaut or sample:grace_hopper for a bundled real face."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="VLM folder or hub id (TAG checkpoint or base model), or a backend spec openai:URL / hf:PATH / vllm:PATH. Default: the offline FACS engine."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object per image (one per line)."),
    overlay: Optional[Path] = typer.Option(None, "--overlays", help="Write overlays: FILE.png (one image) or a folder."),
    scores: bool = typer.Option(False, "--scores", help="Show the engine's class scores (always in --json)."),
    frame: str = typer.Option("face", "--frame", help="face: each face on its own 512 canvas (TAG's face crops); image: the whole image."),
    all_aus: bool = _video.ALL_AUS,
    max_faces: int = typer.Option(5, "--max-faces", min=1, help="Most faces analysed per image (left to right)."),
    threshold: float = typer.Option(0.3, "--au-threshold", min=0.0, max=1.0, help="AU activation threshold."),
    landmarker: Optional[Path] = typer.Option(None, "--landmarker", help="Path to face_landmarker.task (default: bundled)."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", min=1, help="Generation budget with --model."),
    device: str = typer.Option("auto", "--device", help="Device for --model: auto | cpu | cuda."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Append one JSON line per image to this file (as --json) instead of printing; resumable."),
    no_resume: bool = typer.Option(False, "--no-resume", help="With --out: start over (overwrite the file)."),
    retry_errors: bool = typer.Option(False, "--retry-errors", help="With --out: analyse again the images whose earlier record is an error."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="With --out: show a progress bar."),
    workers: int = typer.Option(1, "--workers", "-w", min=1, help="Images analysed in parallel (one detector each; a --model is shared). Output order is kept."),
    fps: Optional[float] = _video.FPS, start: float = _video.START, end: Optional[float] = _video.END,
    video: bool = _video.FRAMES_FOLDER, folder_fps: float = _video.FOLDER_FPS, smooth: str = _video.SMOOTH,
    render: str = _video.RENDER, media: Optional[Path] = _video.MEDIA,
    verbose: bool = typer.Option(False, "--verbose", help="Show MediaPipe's own log lines (hidden by default)."),
) -> None:
    """Explain the expression of every face: label, TAG trace with boxes, detector AUs, overlay.
    Videos (.mp4 .webm .mov .avi …, folders with --video) need --out: frames, segments, annotated video, plot (docs/video.md)."""
    from tagfer.au.video import split_video_inputs  # lazy (start-up time): PIL

    set_verbose(verbose)

    images, videos = split_video_inputs(images, frames_folder=video)
    code = 0
    if videos:
        if model not in (None, "facs", "facs-rules"):
            console.print("[red]error:[/red] videos are explained by the offline engines only (facs, facs-rules)")
            raise typer.Exit(2)
        try:
            vcfg = _video.video_config(fps=fps, start=start, end=end, folder_fps=folder_fps, smooth=smooth, render=render,
                                       media=media or (out.with_name(out.stem + "_media") if out else None),
                                       threshold=threshold, max_faces=max_faces, landmarker=landmarker,
                                       engine=model or "facs", render_aus=_video.render_aus(all_aus))
        except ValueError as e:
            console.print(f"[red]error:[/red] {e}")
            raise typer.Exit(2)
        code = _video.run_videos(videos, out, vcfg, no_resume=no_resume, retry_errors=retry_errors, progress=progress, show=not json_out)
        if not images or code == 2:
            raise typer.Exit(code)
        no_resume = False  # the file now holds this run's video records
        if retry_errors:
            _video.drop_image_errors(out)
            retry_errors = False  # the image pass must not drop the video records just written
    try:
        analyze_images(
            images, model=model, json_out=json_out, overlay=overlay, scores=scores, frame=frame, all_aus=all_aus,
            max_faces=max_faces, threshold=threshold, landmarker=landmarker, max_new_tokens=max_new_tokens, device=device,
            out=out, no_resume=no_resume, retry_errors=retry_errors, progress=progress, workers=workers,
        )
    except typer.Exit as e:
        code = _video.worse_exit(code, e.exit_code)
    if code:
        raise typer.Exit(code)


def analyze_images(
    images: List[Path],
    *,
    model: Optional[str] = None,
    json_out: bool = False,
    overlay: Optional[Path] = None,
    scores: bool = False,
    frame: str = "face",
    all_aus: bool = False,
    max_faces: int = 5,
    threshold: float = 0.3,
    landmarker: Optional[Path] = None,
    max_new_tokens: int = 512,
    device: str = "auto",
    out: Optional[Path] = None,
    no_resume: bool = False,
    retry_errors: bool = False,
    progress: bool = True,
    workers: int = 1,
) -> None:
    """The body of ``tagfer analyze`` with plain defaults (also run by ``tagfer demo``): the work is
    :func:`tagfer.explainer.batch.analyze_batch`; this prints and sets the exit code."""
    # lazy (start-up time): PIL
    from tagfer.explainer.batch import BatchSetupError, analyze_batch
    from tagfer.core.jobs import EXIT_USAGE

    try:
        images = [resolve_image(p) for p in images]
    except (ValueError, RuntimeError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(EXIT_USAGE)

    def on_result(res) -> None:
        if out is not None:
            return  # the record is in --out; the bar shows the count
        if json_out:
            out_console.file.write(json.dumps(res.to_json(), ensure_ascii=False) + "\n")
            out_console.file.flush()
        else:
            _print_result(res, scores, all_aus)

    if model is not None and out is None:
        console.print(f"loading {model} …")
    try:
        with JobProgress("tagfer analyze", enabled=progress and out is not None, unit="images") as bar:
            summary = analyze_batch(
                images, engine=model, out=out, overlay=overlay, resume=not no_resume, retry_errors=retry_errors, workers=workers,
                frame=frame, max_faces=max_faces, threshold=threshold, landmarker=landmarker, max_new_tokens=max_new_tokens,
                device=None if device == "auto" else device, on_result=on_result, on_event=bar,
            )
    except BatchSetupError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(EXIT_USAGE)
    if out is not None or summary.failed:
        say(summary.render(out, noun="image"), err=True)
    code = summary.exit_code()
    if code and summary.malformed + summary.malformed_before:
        console.print(f"{summary.malformed + summary.malformed_before} image(s) with a malformed model output "
                      "(shown as written, with its violations)")
    if code:
        raise typer.Exit(code)


@app.command("serve", short_help='Web page + JSON API for explanations.')
def serve_cmd(
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (localhost by default)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="VLM folder or hub id (default: the offline FACS engine)."),
    workers: int = typer.Option(2, "--workers", "-w", min=1, help="Analyzers (detectors) working in parallel."),
    max_upload_mb: float = typer.Option(10.0, "--max-upload-mb", min=0.01, help="Largest accepted upload."),
    frame: str = typer.Option("face", "--frame", help="face | image (see tagfer analyze)."),
    allowed_host: List[str] = typer.Option([], "--allowed-host", metavar="HOST", help="Also serve requests with this Host name (repeatable; "
                                           "localhost, 127.0.0.1, [::1] and --host always are; '*' turns the check off)."),
    allowed_origin: List[str] = typer.Option([], "--allowed-origin", metavar="ORIGIN", help="Also accept uploads posted by pages "
                                             "of this origin, http://host:port (repeatable; the page's own origin always is)."),
    max_pending: Optional[int] = typer.Option(None, "--max-pending", min=1, help="Uploads in flight at once; more get 503 "
                                              "(default: 4 per worker)."),
    max_live_sessions: int = typer.Option(2, "--max-live-sessions", min=0, help="Live camera sessions open at once (0: no live mode)."),
    max_connections: int = _serving.MAX_CONNECTIONS, header_timeout: float = _serving.HEADER_TIMEOUT,
    keep_alive: float = _serving.KEEP_ALIVE, max_header_kb: int = _serving.MAX_HEADER_KB,
) -> None:
    """Web page + JSON API (POST /analyze) for grounded explanations. Localhost only by default."""
    from tagfer.core.serving import run as run_server  # lazy (start-up time): uvicorn
    from tagfer.core.trusted_hosts import allowed_hosts, bind_note  # lazy: keeps `tagfer --help` fast
    from tagfer.explainer.live import LiveConfig  # lazy (start-up time)
    from tagfer.explainer.serve import ServeConfig, create_app  # lazy (start-up time): fastapi, starlette

    try:
        hosts = allowed_hosts(host, allowed_host)  # a malformed name is a usage error (exit 2)
        conn_limits = _serving.server_limits(max_connections, header_timeout, keep_alive, max_header_kb)
        app_ = create_app(ServeConfig(model=model, pool_size=workers, frame=frame), max_upload_mb=max_upload_mb, allowed_hosts=hosts,
                          allowed_origins=list(allowed_origin), max_pending=max_pending,
                          live=LiveConfig(max_sessions=max_live_sessions))
        app_.state.pool.warm()
    except Exception as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2)
    console.print(f"tagfer serve on http://{host}:{port}/  (engine: {model or 'facs'})")
    if note := bind_note(host, allowed_host):
        console.print(f"[yellow]note:[/yellow] {note}")
    run_server(app_, host, port, conn_limits)
