"""The AU grounding job: images → one JSON line per image with its faces' AUs and canvas boxes.

Record schema (one per input image)::

    {"image": "/abs/path.jpg", "width": 640, "height": 480, "canvas": 512,
     "detector": "mediapipe", "n_faces": 2,
     "faces": [FaceAUs.to_json(), ...],       # the largest face, or all (left to right)
     "overlay": "overlays/x_1a2b3c4d.png",     # when overlays were requested
     "error": null}

or, when the image cannot be used::

    {"image": "...", "faces": [], "error": {"kind": "no_face", "message": "..."}}

Error kinds: those of :class:`tagfer.core.imageio.ImageError`, of
:class:`tagfer.au.detectors.DetectionError`, ``worker_crashed`` and ``internal``.

The job streams its inputs (directories are walked lazily), keeps a bounded
number of images in flight, writes and flushes each record as soon as it is
ready (in input order), and resumes: images whose key is already in the
output are skipped, so re-running after an interruption yields no duplicates
and no gaps.
"""

from __future__ import annotations

import hashlib
import os
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from tagfer.au.aus import largest_face
from tagfer.au.detectors import DETECTORS, AUDetector, DetectorSpec
from tagfer.core.canvas import CANVAS
from tagfer.core.errors import ItemError
from tagfer.core.imageio import is_image_path, load_image
from tagfer.core.jobs import Event, JobRecorder, JobResult, SetupError, exit_with_parent, ordered_map, resume_from
from tagfer.core.jsonl import JsonlWriter

__all__ = ["GroundingConfig", "iter_images", "check_output_path", "overlay_name", "error_record", "ground_image",
           "run_grounding", "exit_with_parent"]


@dataclass(frozen=True)
class GroundingConfig:
    """Options of the grounding job besides the detector.

    ``all_faces``: keep every face (left to right) instead of the largest one.
    ``max_side``: images are downscaled to this longer side before detection.
    ``landmarks``: include the 478 landmarks in each face record.
    ``overlays``: directory for PNG overlays (None = none).
    """

    all_faces: bool = False
    max_side: int = 2048
    landmarks: bool = False
    overlays: str | None = None


def iter_images(inputs: Iterable[str | os.PathLike], recursive: bool = True) -> Iterator[str]:
    """Yield image paths from files and directories, lazily, in sorted order per directory.

    Explicit files are yielded whatever their extension (so a bad file gets an
    error record); inside directories only image extensions are taken.
    """
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            yield from _walk(p, recursive)
        else:
            yield os.path.abspath(p)


def _walk(d: Path, recursive: bool) -> Iterator[str]:
    try:
        entries = sorted(os.scandir(d), key=lambda e: e.name)
    except OSError:
        return
    for e in entries:
        if e.is_dir(follow_symlinks=False):
            if recursive:
                yield from _walk(Path(e.path), recursive)
        elif is_image_path(e.name):
            yield os.path.abspath(e.path)


def check_output_path(out: str | os.PathLike) -> Path:
    """``out`` as a Path if it can be a resumable JSON Lines output: absent, or a regular file.
    A FIFO, device or directory (``/dev/stdout``, ``/dev/null``) is refused with ``ValueError``:
    resuming reads the file first, which would block or lose the records."""
    p = Path(out)
    if (p.exists() or p.is_symlink()) and not p.is_file():
        raise ValueError(f"output {p} is not a regular file (a FIFO, device, directory or broken link); give a file path")
    return p


def overlay_name(image_key: str) -> str:
    h = hashlib.blake2b(image_key.encode("utf-8", "surrogatepass"), digest_size=4).hexdigest()
    return f"{Path(image_key).stem}_{h}.png"


def error_record(key: str, kind: str, message: str) -> dict:
    return {"image": key, "faces": [], "error": {"kind": kind, "message": message}}


def ground_image(detector: AUDetector, key: str, config: GroundingConfig = GroundingConfig()) -> dict:
    """Ground one image. Never raises for bad input: failures become error records."""
    try:
        img = load_image(key, max_side=config.max_side)
        faces = detector.detect(img, key)
        n = len(faces)
        if not config.all_faces and faces:
            faces = [largest_face(faces)]
        rec = {
            "image": key,
            "width": img.width,
            "height": img.height,
            "canvas": getattr(getattr(detector, "config", None), "canvas", CANVAS),
            "detector": detector.name,
            "n_faces": n,
            "faces": [f.to_json(landmarks=config.landmarks) for f in faces],
            "error": None,
        }
        if config.overlays:
            from tagfer.au.overlay import au_overlay, save_png  # lazy (start-up time): PIL

            out = os.path.join(config.overlays, overlay_name(key))
            save_png(au_overlay(img.rgb, faces, original_size=(img.width, img.height), canvas=rec["canvas"]), out)
            rec["overlay"] = out
        return rec
    except ItemError as e:
        return error_record(key, e.kind, e.message)
    except MemoryError:
        return error_record(key, "internal", "out of memory while processing this image")
    except Exception as e:  # a bug or an unexpected library failure: record it, keep the batch going
        tb = traceback.format_exception_only(type(e), e)[-1].strip()
        return error_record(key, "internal", f"{type(e).__name__}: {tb}")


# --------------------------------------------------------------------------- workers
_WORKER: tuple[AUDetector, GroundingConfig] | None = None
def _init_worker(spec: DetectorSpec, config: GroundingConfig) -> None:
    global _WORKER
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _WORKER = (spec.build(), config)


def _work(key: str) -> dict:
    assert _WORKER is not None
    det, cfg = _WORKER
    return ground_image(det, key, cfg)


def run_grounding(
    inputs: Iterable[str | os.PathLike],
    out: str | os.PathLike,
    spec: DetectorSpec = DetectorSpec(),
    config: GroundingConfig = GroundingConfig(),
    workers: int = 1,
    resume: bool = True,
    retry_errors: bool = False,
    on_record: Callable[[dict], None] | None = None,
    max_in_flight: int | None = None,
    on_event: Callable[[Event], None] | None = None,
) -> JobResult:
    """Run the grounding job (see module docstring); returns the run's :class:`tagfer.core.jobs.JobResult`
    (job ``au``; metrics ``au/retried_errors``, ``au/repaired_bytes``). ``on_record`` sees each new
    record; ``on_event`` each job event (progress bars: the total is counted before the first image).
    Raises :class:`tagfer.core.jobs.SetupError` when the detector cannot be built (before any record)."""
    job = JobRecorder("au", on_event)
    try:
        out = check_output_path(out)
    except ValueError as e:
        raise SetupError(str(e)) from e
    inputs = list(inputs)  # walked twice: once to count, once to run
    earlier = resume_from(out, "image", resume=resume, retry_errors=retry_errors)
    job.result.set_metric("retried_errors", earlier.retried)

    def todo(report: bool) -> Iterator[str]:
        seen: set[str] = set()
        for key in iter_images(inputs):
            if key in earlier or key in seen:
                if report:  # a duplicate input is counted once as failed-before
                    job.skip(key, "ok" if key in seen else earlier.status.get(key, "ok"))
                seen.add(key)
                continue
            seen.add(key)
            yield key

    job.start(sum(1 for _ in todo(report=False)))
    det = None
    try:
        if job.result.total:
            det = spec.build()
            if workers > 1:  # the workers build their own
                det.close()
                det = None
        else:  # nothing to do: the spec is checked, no model is loaded (a finished job's re-run skips at once)
            _check_spec(spec)
    except Exception as e:  # an unknown kind, a missing model file or table: the job cannot start
        raise SetupError(str(e)) from e
    with JsonlWriter(out) as writer:
        job.result.set_metric("repaired_bytes", writer.repaired_bytes)

        def emit(rec: dict) -> None:
            writer.write(rec)
            job.item(rec["image"], (rec.get("error") or {}).get("kind"))
            if on_record:
                on_record(rec)

        if workers <= 1 or not job.result.total:
            try:
                for key in todo(report=True):
                    emit(ground_image(det, key, config))
            finally:
                if det is not None:
                    det.close()
        else:  # worker processes (MediaPipe is not thread-safe); a crash costs only the image that causes it
            for rec in ordered_map(_work, todo(report=True), workers=workers, window=max_in_flight or 4 * workers, processes=True,
                                   initializer=_init_worker, initargs=(spec, config), on_crash=_crashed):
                emit(rec)
    return job.finish()


def _check_spec(spec: DetectorSpec) -> None:
    """The checks of :meth:`DetectorSpec.build` that need no model: a known kind, its options, and
    for the table kinds (``openface``, ``table``) a file or folder that exists."""
    parsed = DETECTORS.parse(spec.kind)
    if parsed.kind in ("openface", "table") and parsed.target and not Path(parsed.target).exists():
        raise FileNotFoundError(f"{parsed.kind} table {parsed.target} not found")


def _crashed(key: str) -> dict:
    return error_record(key, "worker_crashed", "the worker process died while processing this image (run alone)")
