"""The AU grounding job: images → one JSON line per image with its faces' AUs and canvas boxes.

Record schema (one per input image)::

    {"image": "/abs/path.jpg", "width": 640, "height": 480, "canvas": 512,
     "detector": "mediapipe", "n_faces": 2,
     "faces": [FaceAUs.to_json(), ...],       # the largest face, or all (left to right)
     "overlay": "overlays/x_1a2b3c4d.png",     # when overlays were requested
     "error": null}

or, when the image cannot be used::

    {"image": "...", "faces": [], "error": {"kind": "no_face", "message": "..."}}

Error kinds: those of :class:`tagfer.imageio.ImageError`, of
:class:`tagfer.detectors.DetectionError`, ``worker_crashed`` and ``internal``.

The job streams its inputs (directories are walked lazily), keeps a bounded
number of images in flight, writes and flushes each record as soon as it is
ready (in input order), and resumes: images whose key is already in the
output are skipped, so re-running after an interruption yields no duplicates
and no gaps.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import threading
import time
import traceback
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from tagfer.aus import largest_face
from tagfer.canvas import CANVAS
from tagfer.detectors import AUDetector, DetectorSpec
from tagfer.errors import ItemError
from tagfer.imageio import is_image_path, load_image
from tagfer.jsonl import JsonlWriter, drop_records, read_jsonl


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
            from tagfer.overlay import au_overlay, save_png

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
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def exit_with_parent(parent_pid: int, poll_s: float = 1.0, use_prctl: bool = True) -> str:
    """Make the calling (worker) process exit when the process ``parent_pid`` dies, even by SIGKILL.

    Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``; elsewhere (or if prctl fails) a daemon
    thread polls ``os.getppid()`` every ``poll_s`` seconds. A parent that died before this
    call is caught by the ``getppid`` check. Returns the mechanism used (``"prctl"`` or ``"watchdog"``).
    """
    how = "watchdog"
    if use_prctl and sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0:
                how = "prctl"
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # orphaned already (the parent died before the signal was armed)
        os._exit(1)
    if how == "watchdog":

        def watch() -> None:
            while True:
                time.sleep(poll_s)
                if os.getppid() != parent_pid:
                    os._exit(1)

        threading.Thread(target=watch, name="tagfer-parent-watchdog", daemon=True).start()
    return how


def _init_worker(spec: DetectorSpec, config: GroundingConfig, parent_pid: int | None = None) -> None:
    global _WORKER
    if parent_pid is not None:
        exit_with_parent(parent_pid)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _WORKER = (spec.build(), config)


def _work(key: str) -> dict:
    assert _WORKER is not None
    det, cfg = _WORKER
    return ground_image(det, key, cfg)


@dataclass
class RunSummary:
    """Counts of one run: ``processed`` = records written now, ``skipped`` = already in the output,
    ``failed_before`` = skipped inputs whose record in the output is an error (still failed)."""

    processed: int = 0
    failed: int = 0
    skipped: int = 0
    failed_before: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    retried_errors: int = 0
    repaired_bytes: int = 0

    @property
    def ok(self) -> int:
        return self.processed - self.failed

    @property
    def any_failed(self) -> bool:
        """True while a requested input has an error record (written now or left from a run before)."""
        return bool(self.failed or self.failed_before)


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
) -> RunSummary:
    """Run the grounding job (see module docstring). ``on_record`` sees each new record (progress bars)."""
    summary = RunSummary()
    out = check_output_path(out)
    if not resume and out.exists():
        out.unlink()
    if retry_errors and out.exists():
        summary.retried_errors = drop_records(out, lambda r: r.get("error") is not None)
    done, failed_done = _done_and_failed(out) if resume else (set(), set())
    with JsonlWriter(out) as writer:
        summary.repaired_bytes = writer.repaired_bytes

        def emit(rec: dict) -> None:
            writer.write(rec)
            summary.processed += 1
            if rec.get("error"):
                summary.failed += 1
                k = rec["error"]["kind"]
                summary.errors[k] = summary.errors.get(k, 0) + 1
            if on_record:
                on_record(rec)

        def todo() -> Iterator[str]:
            seen: set[str] = set()
            still_failed: set[str] = set()
            for key in iter_images(inputs):
                if key in done or key in seen:
                    summary.skipped += 1
                    if key in failed_done and key not in still_failed:
                        still_failed.add(key)
                        summary.failed_before += 1
                    continue
                seen.add(key)
                yield key

        if workers <= 1:
            det = spec.build()
            try:
                for key in todo():
                    emit(ground_image(det, key, config))
            finally:
                det.close()
        else:
            _run_pool(todo(), spec, config, workers, emit, max_in_flight or 4 * workers)
    return summary


def _done_and_failed(out: Path) -> tuple[set[str], set[str]]:
    """Keys already in ``out``, and those whose record is an error (one pass over the file)."""
    done: set[str] = set()
    failed: set[str] = set()
    for rec in read_jsonl(out):
        if "image" in rec:
            key = str(rec["image"])
            done.add(key)
            if rec.get("error"):
                failed.add(key)
            else:
                failed.discard(key)
    return done, failed


def _run_pool(keys: Iterator[str], spec, config, workers: int, emit, window: int) -> None:
    """Bounded, ordered parallel map. A crashed worker pool is rebuilt; an image that
    was in flight during two crashes is recorded as ``worker_crashed``."""
    crashes: dict[str, int] = {}
    pending: deque[tuple[str, Future | None]] = deque()

    def new_pool() -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, initargs=(spec, config, os.getpid()))

    pool = new_pool()
    try:
        it = iter(keys)
        exhausted = False
        while True:
            while not exhausted and len(pending) < window:
                try:
                    k = next(it)
                except StopIteration:
                    exhausted = True
                    break
                pending.append((k, pool.submit(_work, k)))
            # Items given up on (future None) are recorded when they reach the front, keeping input order.
            while pending and pending[0][1] is None:
                k, _ = pending.popleft()
                emit(error_record(k, "worker_crashed", "the worker process died twice while processing this image"))
            if not pending:
                break
            key, fut = pending[0]
            try:
                rec = fut.result()  # type: ignore[union-attr]
            except BrokenProcessPool:
                pool.shutdown(wait=False, cancel_futures=True)
                pool = new_pool()
                survivors = []
                for k, _ in pending:
                    crashes[k] = crashes.get(k, 0) + 1
                    survivors.append(k)
                pending.clear()
                for k in survivors:
                    pending.append((k, None if crashes[k] >= 2 else pool.submit(_work, k)))
                continue
            pending.popleft()
            emit(rec)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
