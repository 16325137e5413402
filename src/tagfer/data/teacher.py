"""Teacher prompts (rendering) and teacher-response validation for building TAG data (Algorithm 1).

Prompts
-------
Four packaged templates (``tagfer/models/prompts/teacher_*.txt``, ``$placeholders``),
each overridable by a file of the user's (:class:`TeacherPrompts`):

================== ==============================================================
teacher_quality     Stage I: image-quality judge; strict JSON
                    ``{"suitable_for_training": bool, "reason": str}``; unsure → unfit.
teacher_trace       Stage II: AU-grounded trace from the top-K AU list ($au_list),
                    all seven labels ($labels), ≤ $max_regions regions; JSON
                    ``{"CoT": str, "Answer": str}``.
teacher_candidates  Label elimination: same task, $labels = the remaining
                    candidates only.
teacher_trace_noau  Images without an activated AU (policy ``no_au="noau"``) and the
                    no-AU ablation: no tags, no coordinates; $labels = all or remaining.
================== ==============================================================

The ground-truth label is never passed to any renderer: the only label text
a prompt can contain is the candidate list (:func:`format_labels`, always in
the canonical :data:`tagfer.core.labels.LABELS` order, so a label's position says
nothing). The templates themselves name no label.

Validation
----------
:func:`check_quality` reads a Stage I verdict. :func:`check_trace` runs the
Stage III checks on a Stage II answer, reusing :mod:`tagfer.traces.trace` for every
tag rule (no new regexes):

* the reply holds a JSON object with string ``CoT`` and ``Answer`` (keys
  case-insensitive; code fences and chatter around the object are tolerated,
  see :func:`extract_json`);
* ``Answer`` normalises (:func:`tagfer.core.labels.normalize_label`) to a label of
  the candidate set;
* every ``<AUx> [box]`` tag copies an AU and its box verbatim from the AU list
  (:func:`tagfer.traces.trace.validate_teacher_tags`); with a non-empty AU list at least
  ``min_tags`` tags (default 0: the paper lets the teacher select zero AUs); with no AU
  list, no tag at all;
* the CoT names no AU outside the AU list, tagged or in plain text ("AU25 is visible"
  with AU25 not listed; App. D.3: "no new AUs");
* the global part names no AU (App. D.3/F: the global analysis comes "without AUs"): the
  sentences before the one holding the first tag (the whole CoT when it has no tag) contain
  no AU name ("AU12 AU6 AU25 are visible…" is rejected);
* rules of ours, beyond the paper, each switchable: no AU tagged twice (``unique_tags``),
  at most ``max_regions`` tags (``None``: no limit);
* the CoT makes no numerical AU claim (App. D.3: AU values are never evidence):
  it quotes no confidence of the AU list (``0.83``, ``.83``, ``83%``) and writes
  no decimal or percentage next to an AU name or the words confidence, score,
  probability, intensity (:func:`numeric_au_claims`);
* the CoT opens with a global analysis: at least ``min_global_words`` words
  before the first tag;
* the CoT contains none of the output-grammar tags (think/answer/bbox);
* the converted SFT completion (``<think>`` CoT with tags turned into
  ``AUx <bbox>[…]</bbox>`` by :func:`tagfer.traces.trace.convert_teacher_tags`,
  ``</think>`` then ``<answer>label</answer>``) is well formed for
  :func:`tagfer.traces.trace.parse_trace`.

Whether the label is *correct* is the builder's business (it needs the truth);
validation only checks the format and the candidate set.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from tagfer.core.jsonl import decode_json_at
from tagfer.core.labels import EXCLUDED, LABELS, normalize_label
from tagfer.models.prompts import load_prompt, render
from tagfer.traces.trace import (MAX_BOXES, AUItem, ParsedTrace, convert_teacher_tags, find_au_mentions, format_au_list, parse_au_list,
                                 parse_trace, validate_teacher_tags)

__all__ = [
    "TEACHER_PROMPTS",
    "TeacherPrompts",
    "QualityVerdict",
    "TraceCheck",
    "extract_json",
    "json_objects",
    "format_labels",
    "check_quality",
    "check_trace",
    "global_part",
    "build_completion",
    "numeric_au_claims",
]

TEACHER_PROMPTS = ("teacher_quality", "teacher_trace", "teacher_candidates", "teacher_trace_noau")


def format_labels(labels: Iterable[str]) -> str:
    """Candidate list text, canonical order: ``"anger, fear, neutral"``."""
    chosen = set(labels)
    unknown = chosen - set(LABELS)
    if unknown:
        raise ValueError(f"not labels of the 7-class protocol: {sorted(unknown)}")
    return ", ".join(lab for lab in LABELS if lab in chosen)


@dataclass
class TeacherPrompts:
    """The four teacher templates; each ``None`` = packaged, or a path to the user's own file."""

    quality: str | Path | None = None
    trace: str | Path | None = None
    candidates: str | Path | None = None
    trace_noau: str | Path | None = None
    max_regions: int = MAX_BOXES

    def __post_init__(self) -> None:
        self._text = {
            "quality": load_prompt("teacher_quality", self.quality),
            "trace": load_prompt("teacher_trace", self.trace),
            "candidates": load_prompt("teacher_candidates", self.candidates),
            "trace_noau": load_prompt("teacher_trace_noau", self.trace_noau),
        }

    def quality_prompt(self) -> str:
        return render(self._text["quality"])

    def trace_prompt(self, au_list: str | Sequence[Any], candidates: Iterable[str] = LABELS) -> str:
        """Stage II prompt. ``au_list``: AU_LIST text or (au, score, box) items; empty → no-AU variant.

        The full label set gives ``teacher_trace`` (or ``teacher_trace_noau``), a
        strict subset gives ``teacher_candidates`` (or ``teacher_trace_noau``
        with the remaining labels).
        """
        text = au_list if isinstance(au_list, str) else format_au_list(au_list)
        cands = [lab for lab in LABELS if lab in set(candidates)]
        if not cands:
            raise ValueError("no candidate label left")
        labels = format_labels(cands)
        if not text.strip():
            return render(self._text["trace_noau"], labels=labels, max_regions=self.max_regions)
        name = "trace" if len(cands) == len(LABELS) else "candidates"
        return render(self._text[name], au_list=text.strip(), labels=labels, max_regions=self.max_regions)


# --------------------------------------------------------------------------- JSON
_FENCE = re.compile(r"```[a-zA-Z0-9_-]*+[ \t]*+\n?+(.*?)```", re.DOTALL)  # possessive: linear on "```aaaa…"


def json_objects(text: str) -> Iterator[dict[str, Any]]:
    """Every JSON object in an LLM reply, in order: inside ```` ``` ```` fences first (any
    language tag), then anywhere in the text (chatter before or after is ignored).
    The one extractor of JSON from model replies (teacher and judge)."""
    if not isinstance(text, str) or "{" not in text:
        return
    chunks = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    for chunk in chunks:
        i = chunk.find("{")
        while i >= 0:
            try:
                obj = decode_json_at(chunk, i)
            except ValueError:
                obj = None
            if isinstance(obj, dict):
                yield obj
            i = chunk.find("{", i + 1)


def extract_json(text: str, required: Sequence[str] = ()) -> dict[str, Any] | None:
    """The first JSON object in ``text`` (:func:`json_objects`) holding every key of ``required``
    (case-insensitive), with its original keys; ``None`` when there is none."""
    need = {k.lower() for k in required}
    return next((obj for obj in json_objects(text) if need <= {str(k).lower() for k in obj}), None)


def _get(obj: dict[str, Any], key: str) -> Any:
    for k, v in obj.items():
        if str(k).lower() == key.lower():
            return v
    return None


# --------------------------------------------------------------------------- Stage I
@dataclass
class QualityVerdict:
    """A parsed Stage I answer: ``suitable`` is None when the reply is not a valid verdict (→ format retry)."""

    suitable: bool | None
    reason: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return self.suitable is not None


def check_quality(text: str) -> QualityVerdict:
    """Read ``{"suitable_for_training": bool, "reason": str}``; anything else is invalid.

    The verdict must be a JSON boolean (the strings ``"true"``/``"false"`` are
    also read); any other value is invalid (the builder retries, then rejects:
    when in doubt, reject).
    """
    obj = extract_json(text, ("suitable_for_training",))
    if obj is None:
        return QualityVerdict(None, "", ["no JSON object with suitable_for_training"])
    v = _get(obj, "suitable_for_training")
    reason = _get(obj, "reason")
    reason = reason if isinstance(reason, str) else ""
    if isinstance(v, bool):
        return QualityVerdict(v, reason)
    if isinstance(v, str) and v.strip().lower() in ("true", "false"):
        return QualityVerdict(v.strip().lower() == "true", reason)
    return QualityVerdict(None, reason, [f"suitable_for_training must be true or false, got {v!r}"])


# --------------------------------------------------------------------------- Stage III
_GRAMMAR_TAG = re.compile(r"<\s*+/?\s*+(?:think|answer|bbox)", re.IGNORECASE)
_AU_TAG_START = "<AU"


@dataclass
class TraceCheck:
    """Result of :func:`check_trace`.

    ``ok``: every check passed. ``label``: the normalised answer (even when
    other checks failed), ``cot``/``answer``: the raw fields, ``aus_used``: AU
    numbers tagged, in order, ``completion``: the SFT target (only when ``ok``),
    ``parsed``: :func:`tagfer.traces.trace.parse_trace` of the completion.
    """

    ok: bool
    problems: list[str] = field(default_factory=list)
    label: str | None = None
    cot: str | None = None
    answer: str | None = None
    aus_used: list[int] = field(default_factory=list)
    completion: str | None = None
    parsed: ParsedTrace | None = None


def build_completion(cot: str, label: str) -> str:
    """SFT target: ``<think>\\n{converted CoT}\\n</think>\\n<answer>{label}</answer>``."""
    return f"<think>\n{convert_teacher_tags(cot.strip())}\n</think>\n<answer>{label}</answer>"


def _aus_tagged(cot: str, items: list[AUItem]) -> list[int]:
    """AUs whose tag ``<AUx>`` appears, in order of appearance (list AUs only)."""
    pos = []
    for it in items:
        i = cot.find(f"<AU{it.au}>")
        if i >= 0:
            pos.append((i, it.au))
    return [au for _, au in sorted(pos)]


_NUM = r"(?:\d+\.\d+|\.\d+|\d+(?:\.\d+)?\s*%)"
_NEAR_AU = re.compile(r"\bAU[ _-]?\d{1,2}\b[^.\n<>]{0,40}?(" + _NUM + r")", re.IGNORECASE)
_NEAR_WORD = re.compile(r"\b(?:confidence|confident|score|probability|likelihood|intensity)\b[^.\n<>]{0,25}?(" + _NUM + r")", re.IGNORECASE)
_ANY_NUM = re.compile(r"(?<![\d.])" + _NUM)
_TEACHER_TAG_SPAN = re.compile(r"<AU\d{1,2}>\s*\[[^\]]*\]")


def _number_value(text: str) -> float:
    t = text.replace(" ", "")
    return float(t[:-1]) / 100 if t.endswith("%") else float(t)


def numeric_au_claims(cot: str, items: Sequence[AUItem] = ()) -> list[str]:
    """Numbers a CoT states about AUs: listed confidences it quotes, decimals/percentages next to
    an AU name or a word like "confidence". The ``<AUx> [box]`` tags themselves are ignored."""
    text = _TEACHER_TAG_SPAN.sub(" ", cot)
    scores = {round(float(it.score), 2) for it in items}
    found: list[str] = []
    for m in _ANY_NUM.finditer(text):
        if round(_number_value(m.group(0)), 2) in scores and m.group(0) not in found:
            found.append(m.group(0))
    for rx in (_NEAR_AU, _NEAR_WORD):
        for m in rx.finditer(text):
            if m.group(1) not in found:
                found.append(m.group(1))
    return found


_SENTENCE_END = re.compile(r"[.!?\n]")


def global_part(cot: str) -> str:
    """The global analysis of a teacher CoT: the text before the sentence that holds the first
    ``<AUx>`` tag (sentences end at ``.``, ``!``, ``?`` or a line break); the whole CoT without tags."""
    first = cot.find(_AU_TAG_START)
    if first < 0:
        return cot
    ends = [m.end() for m in _SENTENCE_END.finditer(cot, 0, first)]
    return cot[: ends[-1]] if ends else ""


def check_trace(
    text: str,
    au_list: str | Sequence[Any],
    candidates: Iterable[str] = LABELS,
    *,
    max_regions: int | None = MAX_BOXES,
    min_tags: int = 0,
    min_global_words: int = 3,
    unique_tags: bool = True,
) -> TraceCheck:
    """Stage III format checks of one teacher reply (module docstring lists them).

    Paper rules (App. D.3/F) are always on; ``max_regions`` (``None``: any number of tags),
    ``unique_tags`` and ``min_global_words`` are ours (documented in docs/data.md)."""
    items = parse_au_list(au_list) if isinstance(au_list, str) else [AUItem(*i) if not isinstance(i, AUItem) else i for i in au_list]
    cands = set(candidates)
    obj = extract_json(text, ("cot", "answer"))
    if obj is None:
        return TraceCheck(False, ["no JSON object with CoT and Answer"])
    cot, answer = _get(obj, "cot"), _get(obj, "answer")
    problems: list[str] = []
    if not isinstance(cot, str) or not cot.strip():
        problems.append("CoT is not a non-empty string")
        cot = cot if isinstance(cot, str) else None
    if not isinstance(answer, str):
        problems.append("Answer is not a string")
        answer = None
    label = normalize_label(answer) if answer is not None else None
    if answer is not None:
        if label is None:
            problems.append(f"Answer {answer!r} is not one label")
        elif label == EXCLUDED:
            problems.append(f"Answer {answer!r} is an excluded class")
            label = None
        elif label not in cands:
            problems.append(f"Answer {label!r} is not among the candidates")
    res = TraceCheck(False, problems, label if label in LABELS else None, cot, answer)
    if cot is None or not cot.strip():
        return res
    low = cot.lower()
    # output tags and their look-alikes: NFKC folds fullwidth forms, Unicode case-insensitive
    # matching equates "ı", "ſ", "K" (Kelvin) with i, s, k; the student parser reads none of them
    grammar_tag = _GRAMMAR_TAG.search(unicodedata.normalize("NFKC", cot))
    if grammar_tag is not None:
        problems.append(f"CoT contains the output tag {grammar_tag.group(0)!r}")
    claims = numeric_au_claims(cot, items)
    if claims:
        problems.append(f"the CoT states AU values ({', '.join(claims[:3])}): AU confidences are not evidence, describe what is visible")
    listed = {it.au for it in items}
    unlisted = sorted({au for au, _ in find_au_mentions(cot)} - listed)
    if unlisted and items:  # without a list, the rule below names the problem
        problems.append(f"the CoT names {', '.join(f'AU{a}' for a in unlisted)}, not in the AU list (no new AUs)")
    global_aus = list(dict.fromkeys(au for au, _ in find_au_mentions(global_part(cot))))
    if global_aus:
        problems.append(f"the global analysis names {', '.join(f'AU{a}' for a in global_aus)}: "
                        "it describes the whole face without AUs; AUs come with the regions")
    if items:
        tag_problems = validate_teacher_tags(cot, items, max_tags=max_regions)
        if not unique_tags:
            tag_problems = [p for p in tag_problems if not p.endswith("is tagged more than once")]
        problems.extend(tag_problems)
        res.aus_used = _aus_tagged(cot, items)
        n_tags = cot.count(_AU_TAG_START)
        if n_tags < min_tags:
            problems.append(f"{n_tags} AU tags, at least {min_tags} required")
        first = cot.find(_AU_TAG_START)
        head = cot if first < 0 else cot[:first]
        if first >= 0 and len(head.split()) < min_global_words:
            problems.append("the CoT does not open with a global analysis before the first AU tag")
    else:
        tag_problems = validate_teacher_tags(cot, [], max_tags=None)
        if tag_problems or _AU_TAG_START.lower() in low:
            problems.append("AU tags are not allowed without an AU list")
        elif unlisted:
            problems.append(f"the CoT names {', '.join(f'AU{a}' for a in unlisted)}: no AU may be named without an AU list")
    if problems:
        return res
    completion = build_completion(cot, label)  # type: ignore[arg-type]
    parsed = parse_trace(completion, max_boxes=max_regions if max_regions is not None else len(completion))
    if not parsed.well_formed:
        problems.extend(f"completion: {v}" for v in parsed.violations)
        res.parsed = parsed
        return res
    res.ok, res.completion, res.parsed = True, completion, parsed
    return res
