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

Modules: the record and the box-limit plan :mod:`tagfer.evaluation.predictions`, the AU tables
:mod:`tagfer.evaluation.au_tables`, the scores :mod:`tagfer.evaluation.scoring`; this module runs
the prediction loop and re-exports their public names.

Test-set sizes are checked against the paper's (RAF-DB 3,068, FERPlus 3,517,
AffectNet 3,500) when a full test split is evaluated; a different count is a warning.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from tagfer.core.jobs import Event, JobRecorder, JobResult, ordered_map, resume_from
from tagfer.core.jsonl import JsonlWriter
from tagfer.core.labels import LABELS
from tagfer.evaluation.au_tables import DEFAULT_GEOMETRY, CanvasMismatch, au_geometries, au_truth, check_canvas, load_au_jsonl
from tagfer.evaluation.predictions import (
    BOX_REQUESTS,
    Prediction,
    apply_box_limit,
    box_limit_plan,
    generation_defaults,
    item_error,
    parse_prediction,
    prompt_key,
    prompt_texts,
)
from tagfer.evaluation.scoring import score_file, score_predictions
from tagfer.models.backends import FACSBackend  # noqa: F401 - the `facs` model spec's backend, documented here too
from tagfer.models.backends import GenerationConfig, GenRequest, make_backend
from tagfer.models.prompts import tag_prompt

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


# ---------------------------------------------------------------------------------- runner


def size_warning(kind: str, split: str, count: int) -> str | None:
    """A warning when a full test split's size differs from the paper's (None when it matches or is unknown)."""
    want = PAPER_TEST_SIZES.get(kind)
    if split != "test" or want is None or count == want:
        return None
    return (
        f"{kind} test split has {count} images after removing excluded classes; the paper evaluates on {want}. "
        "Numbers are not directly comparable with the paper's."
    )


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
    system, user = prompt or tag_prompt()
    gen = gen or generation_defaults()
    cfg = GenerationConfig(**{k: gen[k] for k in ("temperature", "top_p", "max_new_tokens", "seed", "max_boxes") if k in gen})
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
    if own:  # a model is loaded only when something is left to ask it (a finished re-run loads nothing)
        backend = make_backend(backend) if job.result.total != 0 else _NothingLeft()
    backend_cfg, limit_mode = box_limit_plan(backend, cfg, gen.get("box_request"))
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
                p.error = item_error("no_image", "the dataset record has neither an image path nor image bytes")
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
                p.error = item_error(err.get("kind", "backend_error"), err.get("message", ""))
            info = res.info or {}
            text = apply_box_limit(p, res.text if err is None else None, info, cfg.max_boxes, limit_mode)
            parse_prediction(p, text, lenient)
            lat = info.get("latency_s")
            p.latency_s = float(lat) if lat is not None else None
            finish(p)
    return job.finish()


class _NothingLeft:
    """Stands in for a model on a re-run with every item done: the records are walked (skips and
    dataset counts are reported), no request is ever made."""

    name = "none"
    decodes_box_limit = False

    def generate(self, requests: Iterator[Any], config: Any) -> Iterator[Any]:
        for req in requests:  # never reached: every item was done (the count before said so)
            raise RuntimeError(f"item {req.id} was left to do after the count said nothing was")
        return iter(())

    def close(self) -> None:
        pass


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
