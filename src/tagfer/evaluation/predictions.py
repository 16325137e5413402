"""The prediction record of ``tagfer eval`` and what fills it: the prompt's key, the parsed reply,
the paper's decoding settings and the box-limit plan (how ``max_boxes`` is met for a backend).

Pure (no I/O): :mod:`tagfer.evaluation.eval` runs the loop that writes these records.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterable

from tagfer.core.labels import LABELS, normalize_label
from tagfer.models.backends import GenerationConfig
from tagfer.traces.boxtags import limit_boxes, vllm_extra_body
from tagfer.traces.trace import parse_trace

__all__ = [
    "Prediction",
    "prompt_key",
    "prompt_texts",
    "parse_prediction",
    "item_error",
    "generation_defaults",
    "BOX_REQUESTS",
    "decodes_box_limit",
    "box_limit_plan",
    "apply_box_limit",
]


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


def item_error(kind: str, message: str) -> dict[str, str]:
    """The ``error`` field of a record: ``{"kind", "message"}`` (message cut to 500 characters)."""
    return {"kind": str(kind), "message": str(message)[:500]}


# ---------------------------------------------------------------------------------- decoding
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


def decodes_box_limit(backend: Any) -> bool:
    """Whether ``backend`` enforces ``max_boxes`` while decoding (in-process transformers does)."""
    flag = getattr(backend, "decodes_box_limit", None)
    return bool(flag) if flag is not None else getattr(backend, "name", None) == "hf"


def box_limit_plan(backend: Any, cfg: GenerationConfig, box_request: str | None) -> tuple[GenerationConfig, str]:
    """The config the backend gets and the mode of a reply that needs no repair.

    A backend that limits boxes while decoding gets ``max_boxes`` (mode ``decode``). Any other
    gets no limit (so it never cuts a reply) and its replies go through
    :func:`tagfer.traces.boxtags.limit_boxes` here; with ``box_request`` an OpenAI-compatible
    backend also sends the decode-time limit in the request body (mode ``decode``)."""
    if cfg.max_boxes is None:
        return cfg, "none"
    if decodes_box_limit(backend):
        return cfg, "decode"
    base = {f.name: getattr(cfg, f.name) for f in fields(GenerationConfig)}
    base["max_boxes"] = None
    if box_request is not None:
        if box_request not in BOX_REQUESTS:
            raise ValueError(f"unknown box_request {box_request!r}: use one of {', '.join(BOX_REQUESTS)}")
        if getattr(backend, "client_config", None) is not None:  # an OpenAI-compatible backend
            return _RequestConfig(**base, extra_body=vllm_extra_body(cfg.max_boxes, box_request)), "decode"
    return GenerationConfig(**base), "none"


def apply_box_limit(p: Prediction, text: str | None, info: dict[str, Any], max_boxes: int | None, mode: str) -> str | None:
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
