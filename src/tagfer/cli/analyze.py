"""``tagfer analyze`` and ``tagfer serve``: grounded explanations from the command line and in a browser."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from tagfer.cli._app import app, console, out_console
from tagfer.cli import video as _video

_EXIT_HELP = "Exit codes: 0 ok; 1 an image failed (unreadable, no face); 2 bad options / model not available; 3 a model output is malformed."


def _overlay_paths(out: Path, image_key: str, n_faces: int, single: bool) -> list[Path]:
    """Overlay file per face: ``OUT.png`` (+ ``OUT_face1.png`` …) for one image, else ``DIR/<stem>_<hash>_face<i>.png``."""
    if single and out.suffix.lower() == ".png":
        return [out if i == 0 else out.with_name(f"{out.stem}_face{i}.png") for i in range(n_faces)]
    from tagfer.grounding import overlay_name

    stem = overlay_name(image_key)[: -len(".png")]
    return [out / f"{stem}_face{i}.png" for i in range(n_faces)]


def _resolve_image(p: Path) -> Path:
    """``sample:astronaut`` / ``sample:grace_hopper`` → the real face shipped by an installed package."""
    s = str(p)
    if s.startswith("sample:"):
        from tagfer.samples import sample_face_path

        return sample_face_path(s.split(":", 1)[1])
    return p


def _print_result(res, show_scores: bool, show_all_aus: bool) -> None:
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

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
        for seg in a.segments:
            if seg["box"] is None:
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


@app.command("analyze", epilog=_EXIT_HELP)
def analyze_cmd(
    images: List[Path] = typer.Argument(..., help="Image files and/or folders (walked); sample:astronaut or sample:grace_hopper for a bundled real face."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="VLM folder or hub id (TAG checkpoint or base model), or a backend spec openai:URL / hf:PATH / vllm:PATH. Default: the offline FACS engine."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object per image (one per line)."),
    overlay: Optional[Path] = typer.Option(None, "--overlay", "-o", help="Write overlays: OUT.png (one image) or a directory."),
    scores: bool = typer.Option(False, "--scores", help="Show the engine's class scores (always in --json)."),
    frame: str = typer.Option("face", "--frame", help="face: each face on its own 512 canvas (TAG's face crops); image: the whole image."),
    all_aus: bool = typer.Option(False, "--all-aus", help="List every detector AU, not only the active and cited ones."),
    max_faces: int = typer.Option(5, "--max-faces", min=1, help="Most faces analysed per image (left to right)."),
    threshold: float = typer.Option(0.3, "--threshold", min=0.0, max=1.0, help="AU activation threshold."),
    landmarker: Optional[Path] = typer.Option(None, "--landmarker", help="Path to face_landmarker.task (default: bundled)."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", min=1, help="Generation budget with --model."),
    device: str = typer.Option("auto", "--device", help="Device for --model: auto | cpu | cuda."),
    out: Optional[Path] = typer.Option(None, "--out", help="Append one JSON line per image to this file (as --json) instead of printing; resumable: images already in it are skipped."),
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
    from tagfer.cli.au import set_verbose
    from tagfer.video import split_video_inputs

    set_verbose(verbose)

    images, videos = split_video_inputs(images, frames_folder=video)
    code = 0
    if videos:
        if model not in (None, "facs"):
            console.print("[red]error:[/red] videos are explained by the offline facs engine only (no --model)")
            raise typer.Exit(2)
        try:
            vcfg = _video.video_config(fps=fps, start=start, end=end, folder_fps=folder_fps, smooth=smooth, render=render,
                                       media=media or (out.with_name(out.stem + "_media") if out else None),
                                       threshold=threshold, max_faces=max_faces, landmarker=landmarker)
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
    """The body of ``tagfer analyze`` with plain defaults (also run by ``tagfer demo``); options as documented there."""
    from tagfer.analyze import EXIT_FAILED, EXIT_MALFORMED, EXIT_USAGE, Analyzer, AnalyzerPool, load_engine
    from tagfer.aus import AUConfig
    from tagfer.detectors import MediaPipeAUDetector
    from tagfer.faces import FaceLandmarker

    if frame not in ("face", "image"):
        console.print(f"[red]error:[/red] --frame must be face or image, got {frame!r}")
        raise typer.Exit(EXIT_USAGE)
    try:
        from tagfer.grounding import iter_images

        images = [Path(x) for x in iter_images([_resolve_image(p) for p in images])]  # folders are walked
    except (ValueError, RuntimeError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(EXIT_USAGE)
    if not images:
        console.print("[red]error:[/red] no image found in the given folder(s)")
        raise typer.Exit(EXIT_USAGE)
    n_given, skipped = len(images), 0
    failed_before = malformed_before = 0
    if out is not None:
        from tagfer.grounding import check_output_path

        try:
            check_output_path(out)
        except ValueError as e:
            console.print(f"[red]error:[/red] {e}")
            raise typer.Exit(EXIT_USAGE)
        from tagfer.jsonl import drop_records, read_jsonl

        if no_resume and out.exists():
            out.unlink()
        if retry_errors and out.exists():
            drop_records(out, lambda rec: bool(rec.get("error")))
        earlier: dict[str, str] = {}  # image → "ok" | "failed" | "malformed" (the last record wins)
        for rec in read_jsonl(out):
            if "image" in rec:
                bad_trace = any(not a.get("well_formed", True) for a in rec.get("analyses") or [] if isinstance(a, dict))
                earlier[str(rec["image"])] = "failed" if rec.get("error") else "malformed" if bad_trace else "ok"
        requested = {str(p) for p in images}
        failed_before = sum(earlier.get(k) == "failed" for k in requested)  # a re-run must not hide them
        malformed_before = sum(earlier.get(k) == "malformed" for k in requested)
        images = [p for p in images if str(p) not in earlier]
        skipped = n_given - len(images)
    if overlay is not None and overlay.suffix.lower() == ".png" and len(images) > 1:
        console.print("[red]error:[/red] --overlay OUT.png takes one image; give a directory for several")
        raise typer.Exit(EXIT_USAGE)
    try:
        if model is None:
            engine = "facs"
        else:
            with console.status(f"loading {model} …"):
                engine = load_engine(model, max_new_tokens=max_new_tokens, device=None if device == "auto" else device)

        def make_analyzer() -> Analyzer:
            lm = FaceLandmarker(model_path=str(landmarker) if landmarker else None, max_faces=max_faces)
            det = MediaPipeAUDetector(AUConfig(threshold=threshold), landmarker=lm, own_landmarker=True)
            return Analyzer(det, engine, frame=frame, own_detector=True)

        pool = AnalyzerPool(make_analyzer, size=workers)
        pool.warm()  # fails fast on a missing landmarker model
    except Exception as e:  # model / landmarker not available: a usage-level failure
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(EXIT_USAGE)
    failed = malformed = 0
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor
    from contextlib import ExitStack

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with ExitStack() as stack:
        stack.callback(pool.close)
        executor = stack.enter_context(ThreadPoolExecutor(workers, thread_name_prefix="tagfer-analyze"))
        writer = bar = task = None
        if out is not None:
            from tagfer.jsonl import JsonlWriter

            writer = stack.enter_context(JsonlWriter(out))
            bar = stack.enter_context(Progress(
                TextColumn("[bold]tagfer analyze"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[failed]} failed"),
                TimeElapsedColumn(), console=console, disable=not progress,
            ))
            task = bar.add_task("analyze", total=len(images), failed=0)

        def results():
            """Results in input order, at most 2 × workers images in flight (constant memory)."""
            pending: deque = deque()
            for path in images:
                pending.append(executor.submit(pool.run, lambda a, p=path: a.run(p)))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

        for res in results():
            if res.ok and overlay is not None:
                paths = _overlay_paths(overlay, res.image, len(res.analyses), single=n_given == 1)
                from tagfer.overlay import save_png

                for p, im in zip(paths, res.render_overlays()):
                    save_png(im, p)
                res.overlays = [str(p) for p in paths]
            failed += not res.ok
            malformed += res.malformed
            if writer is not None:
                writer.write(res.to_json())
                bar.update(task, advance=1, failed=failed)
            elif json_out:
                out_console.file.write(json.dumps(res.to_json(), ensure_ascii=False) + "\n")
                out_console.file.flush()
            else:
                _print_result(res, scores, all_aus)
    close_engine = getattr(engine, "close", None)
    if close_engine is not None:
        close_engine()
    if out is not None:
        console.print(f"{len(images)} analysed ({failed} failed, {malformed} malformed), {skipped} already done → {out}")
        if failed_before:
            console.print(f"{failed_before} requested image(s) still have an error record from an earlier run (--retry-errors analyses them again)")
    if failed or failed_before:
        if failed:
            console.print(f"{failed} of {len(images)} image(s) failed")
        raise typer.Exit(EXIT_FAILED)
    malformed += malformed_before
    if malformed:
        console.print(f"{malformed} image(s) with a malformed model output (shown as written, with its violations)")
        raise typer.Exit(EXIT_MALFORMED)


@app.command("serve")
def serve_cmd(
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (localhost by default)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="VLM folder or hub id (default: the offline FACS engine)."),
    workers: int = typer.Option(2, "--pool", min=1, help="Analyzers (detectors) working in parallel."),
    max_upload_mb: float = typer.Option(10.0, "--max-upload-mb", min=0.01, help="Largest accepted upload."),
    frame: str = typer.Option("face", "--frame", help="face | image (see tagfer analyze)."),
    allowed_host: List[str] = typer.Option([], "--allowed-host", help="Also serve requests with this Host name (repeatable; "
                                           "localhost, 127.0.0.1, [::1] and --host always are; '*' turns the check off)."),
) -> None:
    """Web page + JSON API (POST /analyze) for grounded explanations. Localhost only by default."""
    import uvicorn

    from tagfer.serve import ServeConfig, create_app
    from tagfer.trusted_hosts import allowed_hosts, bind_note

    try:
        hosts = allowed_hosts(host, allowed_host)  # a malformed name is a usage error (exit 2)
        app_ = create_app(ServeConfig(model=model, pool_size=workers, frame=frame), max_upload_mb=max_upload_mb, allowed_hosts=hosts)
        app_.state.pool.warm()
    except Exception as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2)
    console.print(f"tagfer serve on http://{host}:{port}/  (engine: {model or 'facs'})")
    if note := bind_note(host, allowed_host):
        console.print(f"[yellow]note:[/yellow] {note}")
    uvicorn.run(app_, host=host, port=port, log_level="warning")
