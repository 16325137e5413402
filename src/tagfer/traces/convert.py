"""Texts written around a TAG trace: the box spelling, AU_LIST, teacher tags, the no-bbox ablation.

The parser of the grammar is :mod:`tagfer.traces.trace` (which re-exports every name here);
this module holds what *writes or rewrites* trace text, and the few pieces both sides share:

* the one spelling of box coordinates in text, both ways: :func:`format_box` writes
  ``[x1, y1, x2, y2]``, :data:`BOX_LIST` (regex text) and :func:`read_box` read it back;
  the parser builds its tokenizer from :data:`BOX_LIST`;
* :data:`MAX_BOXES`, the paper's limit of three grounded AUs (boxes) per trace;
* the AU_LIST text a teacher prompt receives (:func:`format_au_list`, :func:`parse_au_list`);
* the teacher-tag → SFT conversion (:func:`convert_teacher_tags`, :func:`validate_teacher_tags`);
* the no-bbox ablation (:func:`strip_bboxes`, Table 3).

Box *tags* (``<bbox>``, ``</bbox>``) are defined once, in :mod:`tagfer.traces.boxtags`.
All pure, no I/O.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, NamedTuple, Sequence

from tagfer.traces.boxtags import BOX_TAG, remove_spans

__all__ = [
    "MAX_BOXES",
    "BOX_LIST",
    "read_box",
    "format_box",
    "AUItem",
    "format_au_list",
    "parse_au_list",
    "convert_teacher_tags",
    "validate_teacher_tags",
    "strip_bboxes",
]

#: At most three grounded AUs (boxes) per trace: the grammar's default and the teacher's limit.
MAX_BOXES = 3

# Box content: exactly four (possibly negative) ASCII integers of at most 9
# digits (the cap keeps int() cheap and safe on adversarial input).
# Every whitespace run is possessive ("\s*+"): no backtracking, so a "<"
# followed by a million spaces costs one scan of them, not a million.
_INT = r"\s*+(-?[0-9]{1,9})\s*+"
#: Regex text of ``[x1, y1, x2, y2]`` (four groups: the coordinates); the parser's tokenizer uses it.
BOX_LIST = r"\[" + ",".join([_INT] * 4) + r"\]"
_BOX_CONTENT = re.compile(r"\s*+" + BOX_LIST + r"\s*+")


def read_box(content: str, start: int = 0, end: int | None = None) -> tuple[int, int, int, int] | None:
    """The four integers of ``content[start:end]`` (read in place, no copy), or ``None``."""
    m = _BOX_CONTENT.fullmatch(content, start, len(content) if end is None else end)
    if m is None:
        return None
    x1, y1, x2, y2 = m.groups()
    return (int(x1), int(y1), int(x2), int(y2))


def format_box(box: Sequence[int]) -> str:
    """``(1, 2, 3, 4)`` → ``"[1, 2, 3, 4]"`` (the one spelling of a box in text)."""
    x1, y1, x2, y2 = (int(v) for v in box)
    return f"[{x1}, {y1}, {x2}, {y2}]"


# ----------------------------------------------------------------------------------------
# AU_LIST: the text the teacher prompt receives, one AU per line.
# ----------------------------------------------------------------------------------------


class AUItem(NamedTuple):
    """One activated AU: number, detector confidence, canvas box."""

    au: int
    score: float
    box: tuple[int, int, int, int]


_AU_LINE = re.compile(r"AU([1-9][0-9]?)\s+(-?\d+(?:\.\d+)?)\s+" + BOX_LIST)


def _as_au_item(item: Any) -> AUItem:
    if isinstance(item, AUItem):
        au, score, box = item
    elif all(hasattr(item, a) for a in ("au", "score", "box")):
        au, score, box = item.au, item.score, item.box
    else:
        au, score, box = item
    if isinstance(au, str):
        au = int(au.upper().removeprefix("AU"))
    au = int(au)
    if not 1 <= au <= 99:
        raise ValueError(f"AU number must be in 1..99, got {au}")
    box_t = tuple(int(v) for v in box)
    if len(box_t) != 4 or any(float(v) != int(float(v)) for v in box):
        raise ValueError(f"AU{au}: box must be 4 integers, got {box!r}")
    score = float(score)
    if score != score or score in (float("inf"), float("-inf")):
        raise ValueError(f"AU{au}: score must be finite, got {score}")
    return AUItem(au, score, box_t)  # type: ignore[arg-type]


def format_au_list(items: Iterable[Any]) -> str:
    """AU_LIST text: one line ``AU12 0.83 [191, 300, 330, 420]`` per item, in the given order.

    Items are ``(au, score, box)`` triples (or objects with those attributes);
    the score is written with two decimals. Malformed items raise ``ValueError``.
    """
    lines = []
    for item in items:
        it = _as_au_item(item)
        lines.append(f"AU{it.au} {it.score:.2f} {format_box(it.box)}")
    return "\n".join(lines)


def parse_au_list(text: str) -> list[AUItem]:
    """Inverse of :func:`format_au_list`; blank lines are skipped, anything else malformed raises ``ValueError``."""
    items: list[AUItem] = []
    for lineno, line in enumerate(str(text).splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        m = _AU_LINE.fullmatch(line)
        if m is None:
            raise ValueError(f"AU_LIST line {lineno} is malformed: {line!r}")
        g = m.groups()
        items.append(AUItem(int(g[0]), float(g[1]), (int(g[2]), int(g[3]), int(g[4]), int(g[5]))))
    return items


# ----------------------------------------------------------------------------------------
# Teacher tags → SFT targets, and the no-bbox ablation.
# ----------------------------------------------------------------------------------------

# "<AU12> [x1, y1, x2, y2]" as the teacher is told to write it; the box is optional
# here so that a tag without one can be reported.
_TEACHER_TAG = re.compile(r"<AU([1-9][0-9]?)>(?:[ \t]*(\[[^\[\]<>\n]*\]))?")
# Anything that looks like an attempt at an AU tag, to catch "<AU 12>", "<au12>", "<AU12 >".
# Possessive whitespace runs: "<" + a million spaces is one scan, not a quadratic one.
_LOOSE_AU_TAG = re.compile(r"<\s*+/?\s*+(?ai:AU)[^<>\n]{0,12}>", re.IGNORECASE)


def convert_teacher_tags(text: str) -> str:
    """Turn every teacher tag ``<AU12> [x1, y1, x2, y2]`` into ``AU12 <bbox>[x1, y1, x2, y2]</bbox>``.

    The AU name stays in the text as plain ``AU12`` (the paper's traces name
    the AU next to its box) and the box is re-spelled canonically. Tags whose
    box is missing or unreadable are left as they are: run
    :func:`validate_teacher_tags` first and reject such traces.
    """

    def repl(m: re.Match[str]) -> str:
        coords = read_box(m.group(2)) if m.group(2) else None
        if coords is None:
            return m.group(0)
        return f"AU{int(m.group(1))} <bbox>{format_box(coords)}</bbox>"

    return _TEACHER_TAG.sub(repl, text)


def validate_teacher_tags(text: str, au_list: str | Iterable[Any], max_tags: int | None = MAX_BOXES) -> list[str]:
    """Problems with the AU tags of a teacher trace (empty list = acceptable).

    Every ``<AUx> [box]`` must copy an AU and its box verbatim (same four
    integers) from ``au_list`` (AU_LIST text or ``(au, score, box)`` items): no
    new AUs, no altered coordinates. Also reported: a tag without a readable
    box, a malformed tag (``<AU 12>``), an AU tagged twice, more than
    ``max_tags`` tags (``None`` = no limit).
    """
    items = parse_au_list(au_list) if isinstance(au_list, str) else [_as_au_item(i) for i in au_list]
    allowed: dict[int, set[tuple[int, int, int, int]]] = {}
    for it in items:
        allowed.setdefault(it.au, set()).add(it.box)

    problems: list[str] = []
    seen: list[int] = []
    strict_spans: set[int] = set()
    for m in _TEACHER_TAG.finditer(text):
        strict_spans.add(m.start())
        au = int(m.group(1))
        coords = read_box(m.group(2)) if m.group(2) else None
        if au in seen:
            problems.append(f"AU{au} is tagged more than once")
        seen.append(au)
        if au not in allowed:
            problems.append(f"AU{au} is not in the AU list")
        if coords is None:
            problems.append(f"<AU{au}> is not followed by a box [x1, y1, x2, y2]")
        elif au in allowed and coords not in allowed[au]:
            expected = " or ".join(format_box(b) for b in sorted(allowed[au]))
            problems.append(f"AU{au}: box {format_box(coords)} differs from the AU list box {expected}")
    for m in _LOOSE_AU_TAG.finditer(text):
        if m.start() not in strict_spans:
            problems.append(f"malformed AU tag {m.group(0)!r} (expected <AUx> [x1, y1, x2, y2])")
    if max_tags is not None and len(seen) > max_tags:
        problems.append(f"{len(seen)} AU tags, at most {max_tags} allowed")
    return problems


def strip_bboxes(text: str, keep_tags: bool = True) -> str:
    """The no-bbox ablation (Table 3): remove the coordinates of every box.

    ``keep_tags=True`` (default, the paper read literally: it deletes the
    content enclosed by ``<bbox>`` and ``</bbox>`` and keeps every other token
    and the structure) leaves an empty ``<bbox></bbox>`` in place (the tags as
    written); nothing else changes. ``keep_tags=False`` deletes the whole
    element, tags included; AU names are kept either way. The spaces around a
    deleted element collapse to one, or to none before punctuation, a line
    break or the end of the text, and after a line break or the start of the
    text. An element glued between two words (no spaces) leaves one space. An
    element runs from an opening tag to the first closing tag after it;
    opening tags with no closing tag after them stay. One pass over the text
    (linear time).
    """
    spans: list[tuple[int, int]] = []
    kept: list[str] = []
    last = 0
    tags = BOX_TAG.finditer(text)  # the one definition of a box tag (tagfer.traces.boxtags)
    for m in tags:
        if m.group(1):  # a closing tag with no opening tag before it: kept as text
            continue
        close = next((c for c in tags if c.group(1)), None)
        if close is None:  # no closing tag anywhere after this one
            break
        if keep_tags:
            kept.append(text[last:m.start()])
            kept.append(m.group(0) + close.group(0))
            last = close.end()
        else:
            spans.append((m.start(), close.end()))
    if keep_tags:
        kept.append(text[last:])
        return "".join(kept)
    return remove_spans(text, spans)
