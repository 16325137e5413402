"""Many images: :func:`analyze_batch` walks files and folders, analyses them with a pool of
:class:`tagfer.explainer.analyze.Analyzer` in parallel (results in input order), appends one JSON
line per image (resumable through :func:`tagfer.core.jobs.resume_from`) and writes overlays.
Its :class:`tagfer.core.jobs.JobResult` (job ``analyze``) holds the counts and the ``tagfer analyze`` exit code."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

from tagfer.au.aus import AUConfig
from tagfer.au.detectors import MediaPipeAUDetector
from tagfer.au.faces import FaceLandmarker
from tagfer.au.grounding import check_output_path, iter_images, overlay_name
from tagfer.au.overlay import save_png
from tagfer.core.jobs import MALFORMED, Event, JobRecorder, JobResult, SetupError, ordered_map, resume_from
from tagfer.core.jsonl import JsonlWriter
from tagfer.explainer.analyze import Analyzer, AnalyzerPool, load_engine
from tagfer.explainer.records import ImageResult

__all__ = ["BatchSetupError", "analyze_batch", "overlay_paths"]


class BatchSetupError(SetupError):
    """A batch that cannot start: bad options, no image, model or landmarker not available (exit code 2)."""


def overlay_paths(overlay: str | os.PathLike, image_key: str, n_faces: int, single: bool) -> list[str]:
    """Overlay file per face: ``OUT.png`` (+ ``OUT_face1.png`` …) for one image, else ``DIR/<stem>_<hash>_face<i>.png``."""
    out = Path(overlay)
    if single and out.suffix.lower() == ".png":
        return [str(out if i == 0 else out.with_name(f"{out.stem}_face{i}.png")) for i in range(n_faces)]
    stem = overlay_name(image_key)[: -len(".png")]
    return [str(out / f"{stem}_face{i}.png") for i in range(n_faces)]


def _earlier_status(rec: dict) -> str:
    bad_trace = any(not a.get("well_formed", True) for a in rec.get("analyses") or [] if isinstance(a, dict))
    return "failed" if rec.get("error") else "malformed" if bad_trace else "ok"


def analyze_batch(
    images: Sequence[str | os.PathLike],
    *,
    engine: Any = None,
    out: str | os.PathLike | None = None,
    overlay: str | os.PathLike | None = None,
    resume: bool = True,
    retry_errors: bool = False,
    workers: int = 1,
    frame: str = "face",
    max_faces: int = 5,
    threshold: float = 0.3,
    landmarker: str | os.PathLike | None = None,
    max_new_tokens: int = 512,
    device: str | None = None,
    factory: Callable[[], Analyzer] | None = None,
    on_result: Callable[[ImageResult], None] | None = None,
    on_event: Callable[[Event], None] | None = None,
) -> JobResult:
    """Analyse image files and folders (walked, :func:`tagfer.au.grounding.iter_images`) with
    ``workers`` analyzers in parallel, results in input order (``on_result`` sees each).

    ``engine``: a model spec or a :class:`tagfer.models.backends.Backend` (:func:`load_engine`;
    None = facs) shared by the analyzers (one built here from a spec is closed here);
    ``factory`` replaces the analyzer set-up (detector options are then ignored).
    ``out``: append one :meth:`ImageResult.to_json` line per image, resumable through the one job
    runner (:func:`tagfer.core.jobs.resume_from`: images already there are skipped,
    ``retry_errors`` runs the failed ones again, ``resume=False`` starts over). ``overlay``:
    ``OUT.png`` for one image or a folder (:func:`overlay_paths`); written paths go to
    ``ImageResult.overlays``. ``on_event`` gets every
    job event (:mod:`tagfer.core.jobs`). Returns the run's :class:`tagfer.core.jobs.JobResult` (job
    ``analyze``; ``total``: images requested minus those done before). When every image is done
    already, no model is loaded. Raises :class:`BatchSetupError` before any work when the batch cannot start.
    """
    if frame not in ("face", "image"):
        raise BatchSetupError(f"--frame must be face or image, got {frame!r}")
    try:
        paths = list(iter_images(images))
    except (ValueError, RuntimeError) as e:
        raise BatchSetupError(str(e)) from e
    if not paths:
        raise BatchSetupError("no image found in the given folder(s)")
    job = JobRecorder("analyze", on_event)
    given = len(paths)
    if out is not None:
        try:
            check_output_path(out)
        except ValueError as e:
            raise BatchSetupError(str(e)) from e
        earlier = resume_from(out, "image", resume=resume, retry_errors=retry_errors, status=_earlier_status)
        for p in dict.fromkeys(paths):  # each requested image once
            if p in earlier:
                job.skip(p, earlier.status[p])
        paths = [p for p in paths if p not in earlier]
    job.start(len(paths))
    if not paths:  # a re-run with everything done: no model is loaded
        return job.finish()
    if overlay is not None and Path(overlay).suffix.lower() == ".png" and len(paths) > 1:
        raise BatchSetupError("--overlays FILE.png takes one image; give a folder for several")
    # the output's lock is taken before any model loads: a second run on the same --out stops at once
    writer = JsonlWriter(out) if out is not None else None
    own_engine = None  # a backend built here from a spec is closed here; one handed in stays the caller's
    try:
        if factory is None:
            eng = load_engine(engine, device=device)
            name = engine if isinstance(engine, str) else None
            if engine is None or isinstance(engine, str):
                own_engine = eng

            def factory() -> Analyzer:
                lm = FaceLandmarker(model_path=str(landmarker) if landmarker else None, max_faces=max_faces)
                det = MediaPipeAUDetector(AUConfig(threshold=threshold), landmarker=lm, own_landmarker=True)
                return Analyzer(det, eng, name=name, frame=frame, own_detector=True, max_new_tokens=max_new_tokens)

        pool = AnalyzerPool(factory, size=workers)
        pool.warm()  # fails fast on a missing landmarker model
    except Exception as e:  # model / landmarker not available: the batch cannot start
        if own_engine is not None:
            getattr(own_engine, "close", lambda: None)()
        if writer is not None:
            writer.close()
        raise BatchSetupError(str(e)) from e

    try:
        for res in ordered_map(lambda p: pool.run(lambda a: a.run(p)), paths, workers=workers, name="tagfer-analyze"):
            if res.ok and overlay is not None:
                files = overlay_paths(overlay, res.image, len(res.analyses), single=given == 1)
                for f, im in zip(files, res.render_overlays()):
                    save_png(im, f)
                res.overlays = files
            if writer is not None:
                writer.write(res.to_json())
            job.item(res.image, (res.error or {}).get("kind", "error") if not res.ok else None,
                     MALFORMED if res.ok and res.malformed else None)
            if on_result is not None:
                on_result(res)
    finally:
        if writer is not None:
            writer.close()
        pool.close()
        if own_engine is not None:
            getattr(own_engine, "close", lambda: None)()
    return job.finish()
