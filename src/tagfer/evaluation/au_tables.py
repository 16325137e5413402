"""AU ground truth for scoring: activated AU boxes per test image, from a detector or a ``tagfer au`` file.

:func:`au_truth` grounds each predicted image with an AU detector (resumable JSONL cache);
:func:`load_au_jsonl` reads a precomputed table; both refuse boxes on another canvas
(:class:`CanvasMismatch`). :func:`table_boxes` looks a prediction up in a table and
:func:`au_geometries` says which box geometry a table's boxes come from.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from tagfer.core.canvas import CANVAS
from tagfer.core.jobs import resume_from
from tagfer.core.jsonl import JsonlWriter, read_jsonl
from tagfer.evaluation.predictions import item_error

__all__ = ["CanvasMismatch", "check_canvas", "load_au_jsonl", "au_truth", "table_boxes", "DEFAULT_GEOMETRY", "au_geometries"]

#: The geometry of a table's AU boxes when the table does not say: MediaPipe's landmark regions.
DEFAULT_GEOMETRY = "mediapipe-regions"


def au_geometries(path: str | os.PathLike) -> dict[str, int]:
    """How many records of an AU JSONL (an :func:`au_truth` cache or a ``tagfer au`` output) got
    their boxes from each geometry (``geometry`` of the record or of its first face; records
    without one count as :data:`DEFAULT_GEOMETRY`); failed records are not counted."""
    counts: dict[str, int] = {}
    for rec in read_jsonl(path):
        if rec.get("error"):
            continue
        faces = rec.get("faces") or []
        g = rec.get("geometry") or (faces[0].get("geometry") if faces and isinstance(faces[0], dict) else None) or DEFAULT_GEOMETRY
        counts[str(g)] = counts.get(str(g), 0) + 1
    return counts



def _first_face_boxes(rec: dict) -> list[list[int]] | None:
    """Activated AU boxes of the first face of a grounding record; None when the image failed."""
    if rec.get("error"):
        return None
    faces = rec.get("faces") or []
    if not faces:
        return None
    return [list(map(int, b)) for b in faces[0].get("au_boxes") or []]


class CanvasMismatch(ValueError):
    """AU boxes on one canvas offered for scoring on another (never rescaled silently)."""


def check_canvas(found: Any, expected: int, where: str) -> None:
    """Raise :class:`CanvasMismatch` when a record's ``canvas`` differs from ``expected``
    (a record without one is taken to be on the default canvas, :data:`tagfer.core.canvas.CANVAS`)."""
    got = CANVAS if found is None else found
    if got != expected:
        raise CanvasMismatch(
            f"{where}: AU boxes are on a {got}×{got} canvas but predictions are scored on {expected}×{expected}; "
            f"ground the images again on the same canvas (tagfer au --canvas {expected})"
        )


def load_au_jsonl(path: str | os.PathLike, canvas: int = CANVAS) -> dict[str, list[list[int]] | None]:
    """A ``tagfer au`` output (or an :func:`au_truth` cache) → key → AU boxes (None = failed image).

    Keys: the record's ``id`` when present (cache), else its ``image`` path, plus the file
    name of that path so a prediction can be joined by path or by name. Every record's
    ``canvas`` must equal ``canvas`` (the canvas the predictions are scored on):
    :class:`CanvasMismatch` otherwise.
    """
    out: dict[str, list[list[int]] | None] = {}
    for i, rec in enumerate(read_jsonl(path), 1):
        if not rec.get("error"):
            check_canvas(rec.get("canvas"), canvas, f"{path} (record {i}, {rec.get('image') or rec.get('id')})")
        boxes = rec["au_boxes"] if "au_boxes" in rec and "faces" not in rec else _first_face_boxes(rec)
        if rec.get("id"):
            out[str(rec["id"])] = boxes
        if rec.get("image"):
            out[str(rec["image"])] = boxes
            out.setdefault(os.path.basename(str(rec["image"])), boxes)
    return out


def au_truth(
    preds_path: str | os.PathLike,
    spec: Any,
    cache: str | os.PathLike,
    dataset: str | None = None,
    on_record: Callable[[dict], None] | None = None,
    canvas: int = CANVAS,
) -> dict[str, list[list[int]] | None]:
    """Activated AU boxes per prediction id, from an AU detector, cached (resumably) in ``cache``.

    ``spec``: a :class:`tagfer.au.detectors.DetectorSpec`; each image goes through
    :func:`tagfer.au.grounding.ground_image` (largest face). Images are read from the predictions'
    ``image`` paths; predictions without a path (bytes images) are looked up in ``dataset``
    (a source spec) when given. Cache record: ``{"id", "image", "detector", "au_boxes" | null,
    "error", "canvas"}``; an image the detector cannot use gets ``au_boxes: null`` (skipped in AU IoU).
    The detector's canvas (``spec.config.canvas``) and the cache's must be ``canvas``
    (:class:`CanvasMismatch` otherwise).
    """
    from tagfer.au.grounding import ground_image  # lazy (start-up time): PIL

    det_config = getattr(spec, "config", None)
    check_canvas(getattr(det_config, "canvas", None), canvas, f"AU detector {getattr(spec, 'kind', spec)!r}")
    cache = Path(cache)
    done = resume_from(cache, "id").done
    todo: list[tuple[str, str | None, str]] = []  # id, path, split
    for rec in read_jsonl(preds_path):
        rid = str(rec.get("id"))
        if rid not in done:
            todo.append((rid, rec.get("image"), rec.get("split", "test")))
            done.add(rid)
    if todo:
        byte_ids = {rid for rid, path, _ in todo if not path}
        byte_images: dict[str, bytes] = {}
        if byte_ids and dataset:
            from tagfer.data.sources import open_source  # lazy (start-up time): PIL

            for split in sorted({s for rid, p, s in todo if rid in byte_ids}):
                for src in open_source(dataset, split=split):
                    if src.id in byte_ids and src.image_bytes is not None:
                        byte_images[src.id] = src.image_bytes
        det = spec.build()
        try:
            with JsonlWriter(cache) as w:
                for rid, path, _ in todo:
                    rec: dict[str, Any] = {"id": rid, "image": path, "detector": det.name, "au_boxes": None, "error": None,
                                           "canvas": getattr(det_config, "canvas", CANVAS)}
                    source = path or byte_images.get(rid)
                    if source is None:
                        rec["error"] = item_error("no_image", "prediction has no image path and the dataset was not given")
                    else:  # the grounding job's per-image step: largest face, errors recorded
                        g = ground_image(det, source)
                        rec["au_boxes"] = _first_face_boxes(g)
                        rec["error"] = g.get("error")
                        faces = g.get("faces") or [{}]
                        # which boxes these are (e.g. OpenFace's own landmarks vs MediaPipe's regions)
                        rec["geometry"] = (faces[0].get("geometry") if isinstance(faces[0], dict) else None) \
                            or getattr(det, "geometry", None) or DEFAULT_GEOMETRY
                    w.write(rec)
                    if on_record:
                        on_record(rec)
        finally:
            det.close()
    out: dict[str, list[list[int]] | None] = {}
    for r in read_jsonl(cache):
        check_canvas(r.get("canvas"), canvas, f"AU cache {cache}")
        out[str(r["id"])] = r.get("au_boxes")
    return out


def table_boxes(truth: dict[str, Any], pred: dict[str, Any]) -> Any:
    """A prediction record's entry of an AU table (:func:`load_au_jsonl`, :func:`au_truth`): by its
    ``id``, else its ``image`` path, else that path's file name; ``None`` when absent."""
    for key in (pred.get("id"), pred.get("image"), os.path.basename(pred.get("image") or "") or None):
        if key is not None and key in truth:
            return truth[key]
    return None
