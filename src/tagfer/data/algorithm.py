"""Algorithm 1 for one grounded item: Stages I–III with format retries and label elimination.

:func:`process_item` asks a prompted teacher (any :class:`tagfer.models.backends.Backend`);
:func:`write_from_face` is the path of a backend that writes a finished trace from the grounded
face (``reads_face``: the FACS engine). Both return ``("accepted", TAGSample json)`` or
``("rejected", rejection record)`` and never raise for the item; the caller writes the line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from tagfer.core.errors import ItemError
from tagfer.core.labels import LABELS
from tagfer.core.records import TAGSample
from tagfer.data.build_config import BuildConfig
from tagfer.data.ground import GroundedItem
from tagfer.data.sources import SourceRecord
from tagfer.data.teacher import TeacherPrompts, check_quality, check_trace
from tagfer.models.backends import GenerationConfig, GenRequest, agenerate_one
from tagfer.traces.trace import parse_trace

__all__ = ["Counters", "rejection", "feedback", "prepare_image", "process_item", "write_from_face"]


@dataclass
class Counters:
    """Request counts of a run, shared by the items in flight (summed into the build summary)."""

    requests: int = 0
    attempts: int = 0
    format_retries: int = 0
    eliminations: int = 0


class _Budget(Exception):
    pass


def rejection(rec: SourceRecord, reason: str, detail: str = "", *, retryable: bool = False, **info: Any) -> dict[str, Any]:
    """A ``rejected.jsonl`` record.

    Schema: ``{"id", "source", "split", "label", "image", "reason", "detail",
    "retryable", "retries", "eliminations", "predictions", "requests",
    "top", "active", "quality_reason"}`` (the last ones when known).
    Reasons: image error kinds (``not_found``, ``corrupt``, ...), ``no_face``,
    ``no_au``, ``quality`` (judged unfit), ``quality_invalid`` (no valid
    verdict), ``format`` (no valid trace after the retries), ``exhausted``
    (``max_eliminations`` wrong labels), ``one_candidate_left``
    (``last_candidate="stop"``), ``budget`` (``max_requests``), ``facs_mismatch``,
    ``teacher_error`` (retryable), ``internal``.
    """
    out = {
        "id": rec.id,
        "source": rec.source,
        "split": rec.split,
        "label": rec.label,
        "image": rec.image_path,
        "reason": reason,
        "detail": detail[:2000],
        "retryable": retryable,
    }
    out.update(info)
    return out


def feedback(problems: list[str], limit: int = 5) -> str:
    """The note appended to a format retry. Problems about the answer are replaced by a
    generic sentence so that no label word other than the candidate list enters a prompt."""
    out: list[str] = []
    for p in problems:
        q = "the Answer must be exactly one label from the list given above" if p.startswith("Answer") else p
        if q not in out:
            out.append(q)
    return "Your previous reply was not usable: " + "; ".join(out[:limit]) + ". Follow the instructions and the reply format exactly."


def prepare_image(backend: Any, image: Any) -> Any:
    """The item's image as the backend sends it, encoded once for all its requests (``prepare_image``)."""
    prep = getattr(backend, "prepare_image", None)
    return prep(image) if prep is not None else image


def _pool_json(item: GroundedItem) -> list[list[Any]]:
    return [list(a[:2]) + [list(a[2])] for a in item.au_pool]


async def process_item(
    rec: SourceRecord,
    item: GroundedItem,
    teacher: Any,
    config: BuildConfig,
    prompts: TeacherPrompts,
    counters: Counters | None = None,
    prepared: Any = None,
    *,
    executor: Any = None,
    teacher_name: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """Stages I–III for one grounded item → ``("accepted", TAGSample json)`` or ``("rejected", record)``.

    ``teacher``: a :class:`tagfer.models.backends.Backend`, awaited through its ``agenerate`` or
    run in ``executor``'s threads (:func:`tagfer.models.backends.agenerate_one`); ``teacher_name``:
    the sample's ``teacher`` (default: the backend's ``name``). ``prepared``: the item's image
    already encoded (:func:`prepare_image`, done off the event loop). ``image`` of an accepted
    sample is filled in by the caller.
    """
    c = counters or Counters()
    truth = rec.label
    info: dict[str, Any] = {"top": [a for a, _, _ in item.au_pool], "active": item.active}
    n_req = 0
    retries = 0
    eliminations = 0
    predictions: list[str] = []
    if prepared is None:
        prepared = prepare_image(teacher, item.image)
    name = getattr(teacher, "name", "") if teacher_name is None else teacher_name

    async def ask(prompt: str, temperature: float) -> str:
        nonlocal n_req
        if n_req >= config.max_requests:
            raise _Budget()
        n_req += 1
        c.requests += 1
        req = GenRequest(rec.id, user=prompt, image=prepared)
        res = await agenerate_one(teacher, req, GenerationConfig(temperature=temperature, max_new_tokens=config.max_tokens), executor)
        if res.error:
            raise ItemError(str(res.error.get("kind", "generation_failed")), str(res.error.get("message", "")))
        c.attempts += int((res.info or {}).get("attempts", 1))
        return res.text or ""

    async def ask_until_valid(prompt: str, check: Callable[[str], Any], valid: Callable[[Any], bool], *,
                              first: bool, with_feedback: bool) -> Any:
        """The one format-retry loop: a reply that fails ``check`` is asked again, up to
        ``max_format_retries`` times, with the same inputs (plus the problems found, in
        ``"feedback"`` mode where ``with_feedback``) sampled at ``retry_temperature``. Only the
        first request of an item's first round uses ``temperature``. Returns the last check."""
        nonlocal retries
        result = None
        for k in range(config.max_format_retries + 1):
            text_prompt = prompt
            if k and with_feedback and config.format_retry == "feedback" and result is not None and result.problems:
                text_prompt = prompt + "\n\n" + feedback(result.problems)
            text = await ask(text_prompt, config.temperature if first and not k else config.retry_temperature)
            if k:  # a retry is a request sent again (counted once it went out), not the failed reply before it
                retries += 1
                c.format_retries += 1
            result = check(text)
            if valid(result):
                break
        return result

    def rejected(reason: str, detail: str = "", retryable: bool = False) -> tuple[str, dict[str, Any]]:
        return "rejected", rejection(
            rec, reason, detail, retryable=retryable, retries=retries, eliminations=eliminations, predictions=predictions, requests=n_req, **info
        )

    if not item.au_pool and config.no_au == "skip":
        return rejected("no_au", "no confident AU candidate (empty AU list)")
    try:
        # ---- Stage I: quality
        if config.quality:
            verdict = await ask_until_valid(prompts.quality_prompt(), check_quality, lambda v: v.valid,
                                            first=True, with_feedback=False)
            if not verdict.valid:
                return rejected("quality_invalid", "no valid quality verdict: " + "; ".join(verdict.problems))
            info["quality_reason"] = verdict.reason
            if not verdict.suitable:
                return rejected("quality", verdict.reason)
        # ---- Stages II + III with label elimination
        candidates = list(LABELS)
        first = True
        while True:
            check = await ask_until_valid(
                prompts.trace_prompt(item.au_list_text, candidates),
                lambda text: check_trace(text, item.au_pool, candidates, max_regions=config.max_regions if config.limit_tags else None,
                                           min_tags=config.min_tags, unique_tags=config.unique_tags),
                lambda ch: ch.ok, first=first, with_feedback=True)
            first = False
            if not check.ok:
                return rejected("format", "; ".join(check.problems))
            predictions.append(check.label)  # type: ignore[arg-type]
            if check.label == truth:
                meta = {
                    "retries": retries,
                    "eliminations": eliminations,
                    "predictions": predictions,
                    "candidates": candidates,
                    "n_candidates": len(candidates),
                    "requests": n_req,
                    "aus_used": check.aus_used,
                    "top": _pool_json(item),
                    "no_au_prompt": not item.au_pool,
                    "quality_reason": info.get("quality_reason"),
                    "original_label": rec.original_label,
                    "detector": item.detector,
                }
                sample = TAGSample(
                    id=rec.id,
                    source=rec.source,
                    image="",
                    label=truth,
                    completion=check.completion,  # type: ignore[arg-type]
                    au_boxes=item.au_boxes,
                    aus=item.active,
                    teacher=name,
                    split=rec.split,
                    meta=meta,
                )
                return "accepted", sample.to_json()
            # wrong but well-formed: eliminate the predicted label
            eliminations += 1
            c.eliminations += 1
            candidates = [lab for lab in candidates if lab != check.label]
            if eliminations > config.max_eliminations or not candidates:
                return rejected("exhausted", f"wrong labels: {', '.join(predictions)}")
            if len(candidates) == 1 and config.last_candidate == "stop":
                return rejected("one_candidate_left", f"wrong labels: {', '.join(predictions)}")
    except _Budget:
        return rejected("budget", f"more than {config.max_requests} requests")
    except ItemError as e:
        return rejected("teacher_error", f"{e.kind}: {e.message}", retryable=True)


async def write_from_face(
    rec: SourceRecord,
    item: GroundedItem,
    backend: Any,
    config: BuildConfig,
    *,
    executor: Any = None,
    teacher_name: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """A backend that writes a finished trace from the grounded face (``reads_face``: the offline
    FACS engine) — no prompt, no quality stage. The sample is kept only when the trace is
    well-formed and its answer is the ground truth (``facs_mismatch`` otherwise: the engine is
    deterministic, so asking again cannot change its answer). ``meta`` holds the engine's class
    ``scores`` and cited ``evidence_aus`` when the backend reports them."""
    info: dict[str, Any] = {"top": [a for a, _, _ in item.au_pool], "active": item.active}
    if not item.au_pool and config.no_au == "skip":
        return "rejected", rejection(rec, "no_au", "no confident AU candidate (empty AU list)", **info)
    res = await agenerate_one(backend, GenRequest(rec.id, face=item.face), GenerationConfig(), executor)
    if res.error or res.text is None:
        err = res.error or {"kind": "empty", "message": "no text returned"}
        return "rejected", rejection(rec, "teacher_error", f"{err.get('kind')}: {err.get('message', '')}", retryable=True, **info)
    parsed = parse_trace(res.text)
    if not parsed.well_formed:
        return "rejected", rejection(rec, "format", "; ".join(parsed.violations), **info)
    if parsed.label != rec.label:
        return "rejected", rejection(rec, "facs_mismatch", "the FACS engine's label differs from the ground truth", **info)
    meta: dict[str, Any] = {}
    if res.info.get("scores") is not None:
        meta["scores"] = {c: round(v, 4) for c, v in res.info["scores"].items()}
    if res.info.get("evidence_aus") is not None:
        meta["evidence_aus"] = list(res.info["evidence_aus"])
    meta.update({"detector": item.detector, "top": _pool_json(item), "original_label": rec.original_label})
    sample = TAGSample(
        id=rec.id,
        source=rec.source,
        image="",
        label=rec.label,
        completion=res.text,
        au_boxes=item.au_boxes,
        aus=item.active,
        teacher=getattr(backend, "name", "") if teacher_name is None else teacher_name,
        split=rec.split,
        meta=meta,
    )
    return "accepted", sample.to_json()
