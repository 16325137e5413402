"""Evaluation with the paper's protocol (§5, App. B, C.2): predictions, AU ground truth, scores.

Three steps, each a function and a CLI command:

1. :func:`run_eval` (``tagfer eval``) streams a test set (:func:`tagfer.data.sources.open_source`,
   7-class protocol: contempt and non-emotion codes are excluded by the readers), asks a
   model (:mod:`tagfer.models.backends`) with the unified TAG prompt (:func:`tagfer.models.prompts.tag_prompt`)
   and writes one :class:`Prediction` per image to a JSON Lines file — resumable (ids
   already in the file are skipped), a failed image or request becomes a recorded
   per-item ``error``, never a crashed run. Decoding defaults follow the paper: TAG
   models greedy (temperature 0); baselines (``baseline=True``) top-p 0.9 sampling
   (*choice*: temperature 1.0 with it); at most 512 new tokens.
2. :func:`au_truth` grounds each test image with an AU detector
   (:class:`tagfer.au.detectors.DetectorSpec`, e.g. ``mediapipe`` — the training detector —
   or ``openface:CSV`` for the cross-detector IoU) or reads a precomputed ``tagfer au``
   JSONL, and caches the activated AU boxes per prediction id (resumable JSONL).
3. :func:`score_file` (``tagfer score``) joins predictions with AU boxes and computes the
   metrics of :mod:`tagfer.evaluation.metrics` into one score JSON (input of :mod:`tagfer.evaluation.report`).

Parsing: the label and boxes come from :func:`tagfer.traces.trace.parse_trace` (the one parser;
the label is its :func:`tagfer.core.labels.normalize_label` of the single answer span).
``lenient=True`` (*choice*, off by default) also accepts a response with no answer span
whose whole text is one label (e.g. a closed model replying "Happiness."); the record
says which rule produced the label (``pred_from``).

Test-set sizes are checked against the paper's (RAF-DB 3,068, FERPlus 3,517,
AffectNet 3,500) when a full test split is evaluated; a different count is a warning.
"""

from __future__ import annotations

from collections import Counter
import contextlib
import hashlib
import os
from dataclasses import asdict, dataclass, field, fields
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from tagfer.core.canvas import CANVAS
from tagfer.core.jobs import Event, JobRecorder, JobResult, ordered_map, resume_from
from tagfer.core.jsonl import JsonlWriter, read_jsonl
from tagfer.core.labels import LABELS, normalize_label
from tagfer.evaluation.metrics import save_confusion_png
from tagfer.evaluation.metrics import Bootstrap, ScoreInputs, compute_scores, encode_labels
from tagfer.models.backends import GenerationConfig, GenRequest, make_backend
from tagfer.traces.boxtags import limit_boxes, vllm_extra_body
from tagfer.models.backends import FACSBackend  # noqa: F401 - the `facs` model spec's backend, documented here too
from tagfer.models.prompts import tag_prompt
from tagfer.traces.rewards import PAPER_FORMAT_VIOLATIONS, r_au_batch
from tagfer.traces.trace import parse_trace

__all__ = [
    "PAPER_TEST_SIZES",
    "Prediction",
    "prompt_key",
    "prompt_texts",
    "BOX_REQUESTS",
    "parse_prediction",
    "generation_defaults",
    "run_eval",
    "size_warning",
    "eval_source",
    "FACSBackend",
    "au_truth",
    "load_au_jsonl",
    "check_canvas",
    "CanvasMismatch",
    "score_predictions",
    "score_file",
    "au_geometries",
    "DEFAULT_GEOMETRY",
]

#: Test-set sizes of the paper (7 classes, contempt removed).
PAPER_TEST_SIZES = {"rafdb": 3068, "ferplus": 3517, "affectnet": 3500}


@dataclass
class Prediction:
    """One model answer on one test image (one JSON line of ``tagfer eval``).

    Schema::

      id           str        the dataset record id (``"rafdb/test_0001"``), the resume key
      source       str        dataset kind (rafdb | ferplus | affectnet | generic | ...)
      split        str        train | val | test
      image        str|null   image path (null for images stored as bytes, e.g. FER2013 CSV pixels)
      label        str        ground truth, one of LABELS
      output       str|null   the raw model response (null when the request failed)
      pred         str|null   parsed label (one of LABELS) or null (no / invalid answer)
      pred_from    str|null   "answer" (the <answer> span) or "lenient" (whole text, see module doc)
      boxes        list       [[x1, y1, x2, y2] | null, ...] every <bbox> in order (null = unreadable)
      violations   list[str]  grammar violation codes (:mod:`tagfer.traces.trace`)
      well_formed  bool       no grammar violation at all (the strict R_fmt rules; the paper's R_fmt
                              checks only PAPER_FORMAT_VIOLATIONS, see ``format_validity_paper``)
      error        obj|null   {"kind", "message"} for a per-item failure (image or request)
      model        str        model spec (``hf:PATH``, ``openai:URL``, ...)
      gen          obj        generation settings {temperature, top_p, max_new_tokens, seed}
      latency_s    float|null seconds spent on this item's request (backend-reported or batch share)
      box_limit    str|null   how the box limit (``gen.max_boxes``) was met: "decode" (enforced while
                              decoding: in-process processor, or a decode-time limit asked of the server),
                              "repaired" (the reply had more boxes; the extra box elements were removed,
                              the rest kept), "none" (reply unaltered, no decode-time limit); null: failed item
      box_limit_info obj|null {"mode", "max_boxes", "boxes", "removed", "spans"} when repaired (or a backend's own note)
      raw_output   str|null   the reply as the model wrote it, when ``output`` is its repaired form
      prompt       str|null   key of the prompt answered (:func:`prompt_key`: hash of system + user text)
      prompt_text  obj|null   {"system", "user"}: the prompt itself, on the first record each run writes
    """

    id: str
    source: str
    split: str
    image: str | None
    label: str
    output: str | None = None
    pred: str | None = None
    pred_from: str | None = None
    boxes: list[list[int] | None] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    well_formed: bool = False
    error: dict[str, str] | None = None
    model: str = ""
    gen: dict[str, Any] = field(default_factory=dict)
    latency_s: float | None = None
    box_limit: str | None = None
    box_limit_info: dict[str, Any] | None = None
    raw_output: str | None = None
    prompt: str | None = None
    prompt_text: dict[str, str | None] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Prediction":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        missing = {"id", "source", "split", "label"} - known.keys()
        if missing:
            raise ValueError(f"prediction record lacks field(s): {', '.join(sorted(missing))}")
        known.setdefault("image", None)
        return cls(**known)


def prompt_key(system: str | None, user: str) -> str:
    """A short stable key of a (system, user) prompt: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(json.dumps([system, user], ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


def prompt_texts(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, str | None]]:
    """``prompt key → {"system", "user"}`` from prediction records (the records that carry the text)."""
    out: dict[str, dict[str, str | None]] = {}
    for r in records:
        key, text = r.get("prompt"), r.get("prompt_text")
        if isinstance(key, str) and isinstance(text, dict) and isinstance(text.get("user"), str):
            out.setdefault(key, {"system": text.get("system"), "user": text["user"]})
    return out


def parse_prediction(pred: Prediction, output: str | None, lenient: bool = False) -> Prediction:
    """Fill ``output``, ``pred``, ``boxes``, ``violations``, ``well_formed`` from a response text."""
    pred.output = output
    if output is None:
        pred.pred, pred.pred_from, pred.boxes, pred.violations, pred.well_formed = None, None, [], [], False
        return pred
    parsed = parse_trace(output)
    label = parsed.label if parsed.label in LABELS else None
    source = "answer" if label else None
    if label is None and lenient and not parsed.answers:
        alt = normalize_label(output)
        if alt in LABELS:
            label, source = alt, "lenient"
    pred.pred, pred.pred_from = label, source
    pred.boxes = [list(c) if c is not None else None for c in parsed.box_coords]
    pred.violations = list(parsed.violations)
    pred.well_formed = parsed.well_formed
    return pred


# ---------------------------------------------------------------------------------- runner
def generation_defaults(baseline: bool = False, **overrides: Any) -> dict[str, Any]:
    """The paper's decoding settings: TAG greedy; baselines top-p 0.9; 512 new tokens. ``None`` overrides are ignored."""
    cfg: dict[str, Any] = {"temperature": 1.0 if baseline else 0.0, "top_p": 0.9 if baseline else 1.0, "max_new_tokens": 512, "seed": 0,
                           "max_boxes": None if baseline else 3}  # TAG: at most three boxes, enforced at inference
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return cfg


#: Decode-time box limits a served model can be asked for (``gen["box_request"]``): vLLM's
#: structured outputs (``{"structured_outputs": {"regex": …}}``, vLLM ≥ 0.10.2) or the older
#: ``guided_regex`` field (vLLM ≤ 0.11). Without one, a served reply is repaired after the fact.
BOX_REQUESTS = ("structured_outputs", "guided_regex")


@dataclass
class _RequestConfig(GenerationConfig):
    """Decoding settings plus fields for the request body of an OpenAI-compatible server."""

    extra_body: dict[str, Any] = field(default_factory=dict)

    def openai_params(self) -> dict[str, Any]:
        return {**super().openai_params(), **self.extra_body}


def _decodes_box_limit(backend: Any) -> bool:
    """Whether ``backend`` enforces ``max_boxes`` while decoding (in-process transformers does)."""
    flag = getattr(backend, "decodes_box_limit", None)
    return bool(flag) if flag is not None else getattr(backend, "name", None) == "hf"


def _box_limit_plan(backend: Any, cfg: GenerationConfig, box_request: str | None) -> tuple[GenerationConfig, str]:
    """The config the backend gets and the mode of a reply that needs no repair.

    A backend that limits boxes while decoding gets ``max_boxes`` (mode ``decode``). Any other
    gets no limit (so it never cuts a reply) and its replies go through
    :func:`tagfer.traces.boxtags.limit_boxes` here; with ``box_request`` an OpenAI-compatible
    backend also sends the decode-time limit in the request body (mode ``decode``)."""
    if cfg.max_boxes is None:
        return cfg, "none"
    if _decodes_box_limit(backend):
        return cfg, "decode"
    base = {f.name: getattr(cfg, f.name) for f in fields(GenerationConfig)}
    base["max_boxes"] = None
    if box_request is not None:
        if box_request not in BOX_REQUESTS:
            raise ValueError(f"unknown box_request {box_request!r}: use one of {', '.join(BOX_REQUESTS)}")
        if getattr(backend, "client_config", None) is not None:  # an OpenAI-compatible backend
            return _RequestConfig(**base, extra_body=vllm_extra_body(cfg.max_boxes, box_request)), "decode"
    return GenerationConfig(**base), "none"


def _apply_box_limit(p: Prediction, text: str | None, info: dict[str, Any], max_boxes: int | None, mode: str) -> str | None:
    """Record how the box limit was met and return the text to parse (repaired when needed)."""
    if text is None:
        return None
    note = info.get("box_limit")
    if isinstance(note, str):
        mode = note
    elif isinstance(note, dict):  # a backend that limited the reply itself
        mode, p.box_limit_info = str(note.get("mode", "cut")), note
    fixed, lim = limit_boxes(text, max_boxes)
    if lim is not None:
        p.raw_output, p.box_limit_info, mode, text = text, lim, "repaired", fixed
    p.box_limit = mode
    return text


def size_warning(kind: str, split: str, count: int) -> str | None:
    """A warning when a full test split's size differs from the paper's (None when it matches or is unknown)."""
    want = PAPER_TEST_SIZES.get(kind)
    if split != "test" or want is None or count == want:
        return None
    return (
        f"{kind} test split has {count} images after removing excluded classes; the paper evaluates on {want}. "
        "Numbers are not directly comparable with the paper's."
    )


def _err(kind: str, message: str) -> dict[str, str]:
    return {"kind": str(kind), "message": str(message)[:500]}


def run_eval(
    records: Iterable[Any] | Callable[[], Iterable[Any]],
    backend: Any,
    out: str | os.PathLike,
    *,
    model: str = "",
    gen: dict[str, Any] | None = None,
    prompt: tuple[str, str] | None = None,
    resume: bool = True,
    retry_errors: bool = False,
    lenient: bool = False,
    limit: int | None = None,
    on_record: Callable[[Prediction], None] | None = None,
    encode_workers: int | None = None,
    on_event: Callable[[Event], None] | None = None,
) -> JobResult:
    """Predict every record not yet in ``out`` and append one :class:`Prediction` per record.

    ``records``: :class:`tagfer.data.sources.SourceRecord` objects (``id``, ``source``, ``split``,
    ``label``, ``image_path``, ``image``), or a function returning a fresh stream of them: then the
    records to predict are counted first, so the progress (``on_event``, :mod:`tagfer.core.jobs`)
    knows its total (a list is counted as it is). ``backend``: a :class:`tagfer.models.backends.Backend`, or a
    model spec (resolved by :func:`tagfer.models.backends.make_backend`, closed at the end);
    requests stream through it lazily (it bounds its own look-ahead), so memory stays
    constant whatever the dataset size, and a remote backend keeps its concurrency full.
    Image and request failures come back as per-item errors and are recorded.
    ``limit``: predict at most this many new records (the dataset is still counted).
    ``encode_workers``: for an OpenAI-compatible backend, threads that build the chat
    messages (image load, resize, encode: the client's main CPU cost) ahead of the backend,
    with :func:`tagfer.models.openai_client.user_message`; default ``min(4, CPUs)``, 0 = off.

    Box limit (``gen["max_boxes"]``): a backend that limits boxes while decoding (in-process
    ``hf``) gets it; any other backend gets no limit and each reply with more boxes is repaired
    here (:func:`tagfer.traces.boxtags.limit_boxes`: the extra box elements go, the answer stays),
    so a served model scores as the in-process path would. ``gen["box_request"]``
    (:data:`BOX_REQUESTS`) also asks an OpenAI-compatible (vLLM) server to hold the limit while
    decoding. Each record says how the limit was met (``box_limit``). Each record carries the key
    of its prompt (``prompt``), the first one of a run also its text (``prompt_text``), so the
    judge can be shown the query the model answered.

    Returns the run's :class:`tagfer.core.jobs.JobResult` (job ``eval``; metrics ``eval/correct``,
    ``eval/dataset_size`` (usable records of the split), ``eval/excluded``, ``eval/retried_errors``).
    """
    own = isinstance(backend, str)  # a model spec: resolved by the one registry, closed here
    if own:
        model = model or backend  # the spec names the model in the records
        backend = make_backend(backend)
    system, user = prompt or tag_prompt()
    gen = gen or generation_defaults()
    cfg = GenerationConfig(**{k: gen[k] for k in ("temperature", "top_p", "max_new_tokens", "seed", "max_boxes") if k in gen})
    backend_cfg, limit_mode = _box_limit_plan(backend, cfg, gen.get("box_request"))
    key = prompt_key(system, user)
    first_record = [True]
    job = JobRecorder("eval", on_event)
    summary = job.result
    for name in ("correct", "dataset_size", "excluded"):
        summary.set_metric(name, 0)
    out = Path(out)
    done = resume_from(out, "id", resume=resume, retry_errors=retry_errors)
    summary.set_metric("retried_errors", done.retried)
    fresh = records if callable(records) else None
    if fresh is None and not isinstance(records, (list, tuple)):
        job.start(None)  # a one-shot stream: the total is not known before it ends
    else:
        queued, seen_ids = 0, set()
        for rec in (fresh() if fresh is not None else records):
            if getattr(rec, "excluded", False) or rec.label not in LABELS or rec.id in done or rec.id in seen_ids:
                continue
            if limit is not None and queued >= limit:
                break
            seen_ids.add(rec.id)
            queued += 1
        job.start(queued)
    stream = fresh() if fresh is not None else records
    pending: dict[str, Prediction] = {}
    writer = JsonlWriter(out)

    def finish(p: Prediction) -> None:
        p.prompt = key
        if first_record[0]:  # the prompt's text once per run; every record has its key
            p.prompt_text, first_record[0] = {"system": system, "user": user}, False
        writer.write(p.to_json())
        if p.error is None and p.pred == p.label:
            summary.add_metric("correct")
        job.item(p.id, p.error["kind"] if p.error is not None else None)
        if on_record:
            on_record(p)

    def requests() -> Iterator[Any]:
        seen: set[str] = set()
        queued = 0
        for rec in stream:
            if getattr(rec, "excluded", False) or rec.label not in LABELS:
                summary.add_metric("excluded")
                continue
            summary.add_metric("dataset_size")
            if rec.id in done or rec.id in seen:
                job.skip(rec.id, done.status.get(rec.id, "ok"))
                continue
            if limit is not None and queued >= limit:
                continue  # keep counting the dataset size
            seen.add(rec.id)
            queued += 1
            p = Prediction(id=rec.id, source=rec.source, split=rec.split, image=rec.image_path, label=rec.label, model=model, gen=dict(gen))
            image = rec.image_path if rec.image_path is not None else getattr(rec, "image_bytes", None)
            if image is None:  # never ask a model about an image it cannot see
                p.error = _err("no_image", "the dataset record has neither an image path nor image bytes")
                finish(parse_prediction(p, None))
                continue
            pending[rec.id] = p
            yield GenRequest(id=rec.id, user=user, image=image, system=system)

    reqs: Iterator[Any] = requests()
    client_cfg = getattr(backend, "client_config", None)
    workers = min(4, os.cpu_count() or 1) if encode_workers is None else encode_workers
    if client_cfg is not None and workers > 0:
        reqs = _prebuilt_messages(reqs, client_cfg, workers)
    with writer, contextlib.ExitStack() as stack:
        if own:
            stack.callback(backend.close)
        for res in backend.generate(reqs, backend_cfg):
            p = pending.pop(res.id)
            err = res.error
            if err is not None:
                p.error = _err(err.get("kind", "backend_error"), err.get("message", ""))
            info = res.info or {}
            text = _apply_box_limit(p, res.text if err is None else None, info, cfg.max_boxes, limit_mode)
            parse_prediction(p, text, lenient)
            lat = info.get("latency_s")
            p.latency_s = float(lat) if lat is not None else None
            finish(p)
    return job.finish()


def _prebuilt_messages(reqs: Iterator[Any], client_cfg: Any, workers: int) -> Iterator[Any]:
    """Fill ``GenRequest.messages`` in a thread pool (bounded look-ahead, input order kept).

    Pillow releases the GIL while decoding, resizing and encoding, so this spreads the
    per-request image work over cores. A request whose image fails keeps its image instead,
    so the backend reports the failure with its usual error kind.
    """
    from tagfer.models.openai_client import chat_messages  # lazy (start-up time): httpx, PIL

    def build(req: Any) -> Any:
        try:
            images = [req.image] if req.image is not None else []
            req.messages = chat_messages(req.user, images, req.system, client_cfg.image_side, client_cfg.image_format)
        except Exception:  # noqa: BLE001 - the backend re-raises it as a per-item error
            pass
        return req

    yield from ordered_map(build, reqs, workers=workers, window=4 * workers, name="tagfer-encode")


def eval_source(
    dataset: str,
    backend: Any,
    out: str | os.PathLike,
    split: str = "test",
    check_size: bool = True,
    **kw: Any,
) -> JobResult:
    """:func:`run_eval` over ``open_source(dataset, split)`` plus the test-set size check."""
    from tagfer.data.sources import open_source, parse_source_spec  # lazy (start-up time): PIL

    summary = run_eval(lambda: open_source(dataset, split=split), backend, out, **kw)
    kind = parse_source_spec(dataset)[0]
    warning = size_warning(kind, split, summary.metric("dataset_size")) if check_size else None
    if warning:
        summary.warnings.append(warning)
    return summary


# ---------------------------------------------------------------------------------- AU truth
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
                        rec["error"] = _err("no_image", "prediction has no image path and the dataset was not given")
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


def _join(truth: dict[str, Any], pred: dict[str, Any]) -> Any:
    for key in (pred.get("id"), pred.get("image"), os.path.basename(pred.get("image") or "") or None):
        if key is not None and key in truth:
            return truth[key]
    return None


# ---------------------------------------------------------------------------------- scoring
def _latest(preds: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Predictions with duplicates (same id) resolved to the last one written."""
    last: dict[str, dict[str, Any]] = {}
    for p in preds:
        last[str(p.get("id"))] = p
    return iter(last.values())


def _paper_valid(rec: dict[str, Any]) -> bool:
    """The paper's R_fmt conditions (§3.3) hold for a prediction record: a reply without any of
    :data:`tagfer.traces.rewards.PAPER_FORMAT_VIOLATIONS` (a failed request has no reply)."""
    if rec.get("well_formed"):
        return True
    replied = rec.get("output") is not None if "output" in rec else not rec.get("error")
    return replied and PAPER_FORMAT_VIOLATIONS.isdisjoint(rec.get("violations") or ())


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


def score_predictions(
    preds: Iterable[dict[str, Any]],
    au: dict[str, Any] | None = None,
    cross_au: dict[str, Any] | None = None,
    bootstrap: Any = None,
    matching: str = "paper",
    canvas: int = CANVAS,
) -> dict[str, Any]:
    """Metrics (:func:`tagfer.evaluation.metrics.compute_scores`) of prediction records joined with AU boxes.

    ``au`` / ``cross_au``: key → activated AU boxes (id, image path or file name);
    a missing or empty entry skips that sample's AU IoU (the boxes must be on ``canvas``, the
    canvas the predictions' boxes are parsed on: checked by :func:`load_au_jsonl` / :func:`au_truth`). Per-sample AU IoU is
    :func:`tagfer.traces.rewards.r_au_batch` (Eq. 3–4, ``matching`` as in :class:`~tagfer.traces.rewards.RewardConfig`).
    """
    rows = list(_latest(preds))
    truth = encode_labels([normalize_label(r["label"]) for r in rows])
    keep = [i for i, t in enumerate(truth) if t >= 0]
    rows = [rows[i] for i in keep]
    pred_boxes = [r.get("boxes") or [] for r in rows]

    def ious(table: dict[str, Any] | None) -> list[float | None] | None:
        if table is None:
            return None
        gt = [_join(table, r) or [] for r in rows]
        return r_au_batch(pred_boxes, gt, matching, canvas)

    inp = ScoreInputs(
        truth=truth[keep],
        pred=encode_labels([r.get("pred") for r in rows]),
        well_formed=np.asarray([bool(r.get("well_formed")) for r in rows]),
        paper_valid=np.asarray([_paper_valid(r) for r in rows]),
        box_limit=[r.get("box_limit") if isinstance(r.get("box_limit"), str) else ("cut" if r.get("box_limit") else None) for r in rows],
        n_boxes=np.asarray([len(b) for b in pred_boxes], dtype=np.int64),
        au_iou=ious(au),
        cross_au_iou=ious(cross_au),
        errors=[(r.get("error") or {}).get("kind") for r in rows],
        violations=[r.get("violations") or [] for r in rows],
    )
    scores = compute_scores(inp, cfg=bootstrap or Bootstrap())
    scores["dropped_labels"] = len(truth) - len(keep)
    return scores


def score_file(
    preds_path: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    au: dict[str, Any] | None = None,
    cross_au: dict[str, Any] | None = None,
    au_source: str | None = None,
    cross_source: str | None = None,
    name: str | None = None,
    train_set: str | None = None,
    variant: str | None = None,
    png: str | os.PathLike | None = None,
    bootstrap: Any = None,
    matching: str = "paper",
    au_geometry: dict[str, int] | None = None,
    cross_geometry: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Score a predictions JSONL; write the score JSON (and a confusion PNG) when paths are given.

    The ``run`` block (read by :mod:`tagfer.evaluation.report`) takes the model, dataset and split of
    the predictions (most common values) unless overridden. ``au_geometry`` / ``cross_geometry``
    (:func:`au_geometries` of the AU tables) say which box geometry each AU IoU was measured
    against; they go to the run block and to the ``au_iou`` / ``cross_au_iou`` blocks.
    """
    preds = list(read_jsonl(preds_path))
    if not preds:
        raise ValueError(f"{preds_path}: no prediction records")
    scores = score_predictions(preds, au, cross_au, bootstrap, matching)

    def common(key: str) -> Any:
        c = Counter(str(p.get(key)) for p in preds if p.get(key) is not None)
        return c.most_common(1)[0][0] if c else None

    model = common("model")
    gen = next((p.get("gen") for p in preds if p.get("gen")), {})
    run = {
        "name": name or (Path(model).name if model else Path(preds_path).stem),
        "model": model,
        "dataset": common("source"),
        "split": common("split"),
        "train_set": train_set,
        "variant": variant,
        "gen": gen,
        "predictions": str(preds_path),
        "au_detector": au_source,
        "cross_detector": cross_source,
        "au_geometry": au_geometry,
        "cross_geometry": cross_geometry,
    }
    for key, geo in (("au_iou", au_geometry), ("cross_au_iou", cross_geometry)):
        if isinstance(scores.get(key), dict) and geo is not None:
            scores[key]["geometry"] = geo
    scores = {"run": run, **scores}
    if png:
        save_confusion_png(scores["confusion"], str(png), title=f"{run['name']} on {run['dataset']}")
        scores["confusion_png"] = str(png)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(scores, indent=2), encoding="utf-8")
    return scores
