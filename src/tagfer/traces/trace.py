"""The TAG output grammar: parsing and checking grounded traces (the one parser).

A TAG response is one reasoning block followed by one answer::

    <think> global look … AU12 <bbox>[191, 300, 330, 420]</bbox> … conclusion </think>
    <answer>happiness</answer>

Boxes are integer coordinates on the virtual ``canvas × canvas`` square
(:mod:`tagfer.core.canvas`). :func:`parse_trace` is the only parser of this
grammar in the package; the rewards (:mod:`tagfer.traces.rewards`) read its result.

Tags
    ``<think>``, ``</think>``, ``<answer>``, ``</answer>``, ``<bbox>``,
    ``</bbox>``. Tag names are *recognised* case-insensitively and with
    optional whitespace inside the angle brackets (``< /Answer >``), so the
    answer can still be read from a sloppy response, but only lower-case
    names are well-formed (violation ``tag_case``). Whitespace around tags
    and inside ``[ ]`` is free. Case is folded in ASCII only: Unicode
    look-alikes of the names (dotless "ı", long "ſ", Kelvin "K", fullwidth
    forms) are plain text, never tags.

Guarantees: :func:`parse_trace` never raises, runs in time linear in the
input for every input (no backtracking regex, no rescanned segment) and
keeps memory linear in it (one token at a time; nested answers fold into
the outermost one as nested boxes do, so stored texts never overlap).
``benchmarks/bench_parse.py`` measures both on adversarial shapes.

Well-formedness (what the strict ``R_fmt`` checks; the paper's three §3.3 conditions, the
default ``R_fmt``, are a subset: see :mod:`tagfer.traces.rewards`): no violation at all,
i.e. exactly one think block with visible reasoning besides its boxes
(:func:`is_blank`), at most ``max_boxes`` (3) boxes, all
inside it, each exactly four integers ``0 ≤ v ≤ canvas-1`` with
``x1 < x2`` and ``y1 < y2``; exactly one answer span after the think block
whose content normalises to one of the seven labels; nothing but whitespace
outside the two blocks.

Violation codes (stable; a trace lists each code at most once, in the order
first met):

==========================  =================================================
``not_text``                input is not a string (or bytes)
``no_think``                no complete ``<think>…</think>`` block
``multiple_think``          more than one think block
``think_empty``             the think block shows no reasoning: apart from
                            its boxes it holds only whitespace or other
                            invisible characters (:func:`is_blank`)
``no_answer``               no complete ``<answer>…</answer>`` span
``multiple_answer``         more than one answer span
``answer_before_think``     the answer span starts before the think block
``answer_empty``            the answer span holds only whitespace/punctuation
``answer_multiple_labels``  the answer names two or more labels
``answer_excluded``         the answer is an excluded class (contempt)
``answer_unknown``          the answer is not a known label
``nested_tags``             a think/answer tag inside a block, or any tag
                            inside a box or answer (other than a box)
``unclosed_tag``            an opening tag never closed
``unmatched_close``         a closing tag with no matching opening tag
``text_outside``            non-whitespace text outside the two blocks
                            (preambles, markdown fences, trailing notes)
``tag_case``                a tag name not written in lower case
``bbox_outside_think``      a box outside the think block
``too_many_bboxes``         more than ``max_boxes`` boxes
``bbox_syntax``             box content is not ``[int, int, int, int]``
``bbox_out_of_canvas``      a coordinate outside ``0 .. canvas-1``
``bbox_degenerate``         ``x1 >= x2`` or ``y1 >= y2`` (reversed or empty)
==========================  =================================================

The texts written around a trace (the box spelling :func:`format_box`, the AU_LIST text
a teacher prompt receives, the teacher-tag → SFT conversion, the no-bbox ablation
:func:`strip_bboxes` of Table 3) live in :mod:`tagfer.traces.convert`; they are imported
here too, so ``from tagfer.traces.trace import format_au_list`` works. All pure, no I/O.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterable, NamedTuple

from tagfer.core.canvas import CANVAS, is_valid_box
from tagfer.core.labels import EXCLUDED, find_labels, normalize_label
from tagfer.traces.boxtags import BBOX_NAME, TAG_NAMES
# The writers, imported for their old path (tagfer.traces.trace.format_box, ...); the parser
# itself uses only the box spelling (BOX_LIST, read_box) and MAX_BOXES.
from tagfer.traces.convert import (BOX_LIST, MAX_BOXES, AUItem, convert_teacher_tags, format_au_list, format_box,
                                   parse_au_list, read_box, strip_bboxes, validate_teacher_tags)

__all__ = [
    "VIOLATIONS",
    "BBox",
    "ParsedTrace",
    "parse_trace",
    "is_blank",
    "format_box",
    "AUItem",
    "format_au_list",
    "parse_au_list",
    "convert_teacher_tags",
    "validate_teacher_tags",
    "strip_bboxes",
]

VIOLATIONS: tuple[str, ...] = (
    "not_text",
    "no_think",
    "multiple_think",
    "think_empty",
    "no_answer",
    "multiple_answer",
    "answer_before_think",
    "answer_empty",
    "answer_multiple_labels",
    "answer_excluded",
    "answer_unknown",
    "nested_tags",
    "unclosed_tag",
    "unmatched_close",
    "text_outside",
    "tag_case",
    "bbox_outside_think",
    "too_many_bboxes",
    "bbox_syntax",
    "bbox_out_of_canvas",
    "bbox_degenerate",
)

# Box content (four integers in "[ ]") is spelled once, in tagfer.traces.convert (BOX_LIST):
# possessive whitespace runs, no backtracking.
# Tag names are ASCII, matched case-insensitively in ASCII only ("(?ai:"):
# look-alikes that Unicode case folding would equate with them (dotless
# "ı" U+0131, long "ſ" U+017F, Kelvin "K" U+212A, fullwidth letters) are
# not tag names, so "<thınk>" is plain text.
# The tag spelling (name, whitespace, case) is defined once, in tagfer.traces.boxtags.
_BBOX = BBOX_NAME
# The tokenizer: either a complete well-spelled box element (coordinates
# captured by the regex engine, the common case) or a single tag (optional
# "/" then a name; whitespace tolerated inside the angle brackets: boxtags.TAG).
# Groups: 1 box element (2-5 its coordinates), 6 tag, 7 slash, 8 name.
# The leading "<" is kept outside the alternation so that the regex engine can
# jump from "<" to "<" (an alternation at the start costs ~30x more).
_TOKEN = re.compile(
    r"<(?:(\s*+" + _BBOX + r"\s*+>\s*+" + BOX_LIST + r"\s*+<\s*+/\s*+" + _BBOX + r"\s*+>)"
    r"|(\s*+(/?)\s*+(" + TAG_NAMES + r")\s*+>))"
)
_NON_SPACE = re.compile(r"\S")
# AU mentions: "AU12", "AU 4", "AU-6", "<AU6>", "AU04"; not "AU120". The
# pattern starts with a literal so the regex engine can skip ahead fast; the
# "not preceded by a letter or digit" rule ("TAU1") is checked in Python.
_AU_MENTION = re.compile(r"AU[ _-]?+0*+([1-9][0-9]?)(?![0-9])")
_WORD_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")


def find_au_mentions(text: str) -> list[tuple[int, int]]:
    """Every AU named in ``text`` ("AU12", "AU 4", "AU_06", "<AU6>") as ``(au, start offset)``, in order.

    A name glued to a preceding word character ("XAU12") is not a mention.
    """
    return [
        (int(m.group(1)), m.start())
        for m in _AU_MENTION.finditer(text)
        if not (m.start() and text[m.start() - 1] in _WORD_CHARS)
    ]


class BBox(NamedTuple):
    """One ``<bbox>…</bbox>`` element of a response (an immutable record).

    ``coords`` are the four integers as written, or ``None`` when the content
    is not four integers. ``span`` indexes the original text so that
    ``text[span[0]:span[1]]`` is the whole element, tags included. ``valid``
    is :func:`tagfer.core.canvas.is_valid_box` of the coordinates.
    """

    coords: tuple[int, int, int, int] | None
    span: tuple[int, int]
    in_think: bool
    valid: bool


@dataclass(frozen=True, slots=True)
class ParsedTrace:
    """Everything the rewards need from one response (see module docstring)."""

    text: str
    think: str | None = None
    boxes: tuple[BBox, ...] = ()
    answers: tuple[str, ...] = ()
    label: str | None = None
    violations: tuple[str, ...] = ()
    canvas: int = CANVAS
    max_boxes: int = MAX_BOXES

    @property
    def answer(self) -> str | None:
        """Content of the answer span (stripped) when there is exactly one, else ``None``."""
        return self.answers[0] if len(self.answers) == 1 else None

    @property
    def answer_labels(self) -> tuple[str, ...]:
        """Every label named in the answer (:func:`tagfer.core.labels.find_labels`), in order."""
        return tuple(find_labels(self.answer)) if self.answer is not None else ()

    @property
    def au_mentions(self) -> tuple[int, ...]:
        """AU numbers written in the think block ("AU12", "AU 4", "<AU6>"), first-seen order, unique.

        Computed on access: only the F1 variant of R_AU (Table 4) needs it.
        """
        if not self.think:
            return ()
        return tuple(dict.fromkeys(au for au, _ in find_au_mentions(self.think)))

    @property
    def well_formed(self) -> bool:
        return not self.violations

    @property
    def box_coords(self) -> tuple[tuple[int, int, int, int] | None, ...]:
        """Coordinates of every box in order (``None`` for unreadable ones)."""
        return tuple([b.coords for b in self.boxes])


_LOWER_NAMES = frozenset(("think", "answer", "bbox"))
_ANSWER_PUNCT = " \t\r\n\"'`.,;:!?()[]{}*_-"

# The canonical layout, matched in one go by the fast path: optional
# whitespace, <think>, text without "<" except up to three well-spelled
# lower-case boxes, </think>, whitespace, <answer>, text without "<",
# </answer>, whitespace. Groups: 1 think; per box i (0..2) 2+5i the element
# and 3+5i..6+5i its coordinates; 17 answer. Possessive quantifiers: no
# backtracking, linear time on any input. Everything else (4+ boxes, stray
# "<", odd spelling) goes to the general walk.
_BOX_GROUP = r"(<bbox>\s*+" + BOX_LIST + r"\s*+</bbox>)[^<]*+"
_CANONICAL = re.compile(
    r"\s*+<think>([^<]*+(?:" + _BOX_GROUP + r"(?:" + _BOX_GROUP + r"(?:" + _BOX_GROUP + r")?+)?+)?+)"
    r"</think>\s*+<answer>([^<]*+)</answer>\s*+"
)
_CANONICAL_BOX_GROUPS = (2, 7, 12)


# Characters that show as something: letters, numbers, punctuation, symbols
# (Unicode general categories L*, N*, P*, S*), except these letters/symbols
# that render as blank space: Hangul fillers and the blank Braille pattern.
_VISIBLE_CATEGORIES = frozenset("LNPS")
_BLANK_GLYPHS = frozenset("\u115f\u1160\u3164\uffa0\u2800")
_ASCII_VISIBLE = re.compile(r"[!-~]")


def is_blank(text: str | None) -> bool:
    """True when ``text`` shows nothing: no character is a letter, number, punctuation mark or symbol.

    So whitespace, zero-width and other format characters (U+200B, U+200D,
    U+2060, U+FEFF, soft hyphen; category Cf), controls (Cc), separators
    (Z*), combining marks with nothing to combine with (M*), private-use,
    surrogate and unassigned code points, and the blank-looking Hangul
    fillers / Braille blank count as empty. A think block for which this
    holds is ``think_empty``. Linear time; stops at the first visible character.
    """
    if not text or text.isspace():
        return True
    if text.isascii():
        return _ASCII_VISIBLE.search(text) is None
    category = unicodedata.category
    for ch in text:
        if category(ch)[0] in _VISIBLE_CATEGORIES and ch not in _BLANK_GLYPHS:
            return False
    return True


def _reasoning_blank(text: str, start: int, end: int, box_spans: Iterable[tuple[int, int]]) -> bool:
    """:func:`is_blank` of ``text[start:end]`` with the box elements at ``box_spans`` (sorted) left out.

    Boxes are not reasoning: a think block holding boxes and nothing visible is empty.
    """
    pos = start
    for b_start, b_end in box_spans:
        if b_start < pos or b_end > end:
            continue
        if not is_blank(text[pos:b_start]):
            return False
        pos = b_end
    return is_blank(text[pos:end])


def _add(codes: list[str], code: str) -> None:
    if code not in codes:
        codes.append(code)


def _check_answer(ans: str, add: Callable[[str], None]) -> str | None:
    """Normalised label of one answer span; reports why it is not a valid label."""
    label = normalize_label(ans)
    if label is None:
        if len(find_labels(ans)) > 1:
            add("answer_multiple_labels")
        elif not ans.strip(_ANSWER_PUNCT):
            add("answer_empty")
        else:
            add("answer_unknown")
    elif label == EXCLUDED:
        add("answer_excluded")
    return label


def _make_boxes(
    raw_boxes: Iterable[tuple[int, int, tuple[int, int, int, int] | None, bool]],
    canvas: int,
    max_boxes: int,
    add: Callable[[str], None],
) -> tuple[BBox, ...]:
    """(start, end, coords, in_think) records → BBox objects, reporting box violations."""
    boxes: list[BBox] = []
    hi = canvas - 1
    for b_start, b_end, coords, in_think in raw_boxes:
        if not in_think:
            add("bbox_outside_think")
        if coords is None:
            valid = False
            add("bbox_syntax")
        else:
            valid = is_valid_box(coords, canvas)
            if not valid:
                if min(coords) < 0 or max(coords) > hi:
                    add("bbox_out_of_canvas")
                if coords[0] >= coords[2] or coords[1] >= coords[3]:
                    add("bbox_degenerate")
        boxes.append(BBox(coords, (b_start, b_end), in_think, valid))
    if len(boxes) > max_boxes:
        add("too_many_bboxes")
    return tuple(boxes)


def _parse_canonical(text: str, m: re.Match[str], canvas: int, max_boxes: int) -> ParsedTrace:
    """Fast path for text matching :data:`_CANONICAL`.

    The layout rules (one think block, one answer after it, at most three
    boxes all inside think, lower-case tags, nothing outside) hold by
    construction; only the content checks remain. Written flat for speed
    (it runs once per rollout in RL); must give exactly what
    :func:`_parse_general` gives, which the tests check.
    """
    g = m.groups()
    think = g[0]
    codes: list[str] = []
    c = think[:1]
    if not ("!" <= c <= "~" and c != "<"):  # else: visible reasoning right at the start (the usual case)
        if g[1] is None:
            if is_blank(think):
                codes.append("think_empty")
        elif _reasoning_blank(text, m.start(1), m.end(1), [m.span(k) for k in _CANONICAL_BOX_GROUPS if g[k - 1] is not None]):
            codes.append("think_empty")
    ans = g[16].strip()
    label = normalize_label(ans)
    if label is None or label == EXCLUDED:
        _check_answer(ans, codes.append)
    boxes: tuple[BBox, ...] = ()
    if g[1] is not None:
        hi = canvas - 1
        found = []
        for k in _CANONICAL_BOX_GROUPS:
            if g[k - 1] is None:
                break
            x1, y1, x2, y2 = int(g[k]), int(g[k + 1]), int(g[k + 2]), int(g[k + 3])
            # the rule of canvas.is_valid_box, inlined for plain ints
            valid = 0 <= x1 < x2 <= hi and 0 <= y1 < y2 <= hi
            if not valid:
                if min(x1, y1, x2, y2) < 0 or max(x1, y1, x2, y2) > hi:
                    _add(codes, "bbox_out_of_canvas")
                if x1 >= x2 or y1 >= y2:
                    _add(codes, "bbox_degenerate")
            found.append(BBox((x1, y1, x2, y2), m.span(k), True, valid))
        if len(found) > max_boxes:
            codes.append("too_many_bboxes")
        boxes = tuple(found)
    return ParsedTrace(text, think, boxes, (ans,), label, tuple(codes), canvas, max_boxes)


def _parse(text: str, canvas: int, max_boxes: int) -> ParsedTrace:
    m = _CANONICAL.fullmatch(text)
    if m is not None:
        return _parse_canonical(text, m, canvas, max_boxes)
    return _parse_general(text, canvas, max_boxes)


def _parse_general(text: str, canvas: int, max_boxes: int) -> ParsedTrace:
    """The full tag walk: handles any input, reports every violation."""
    codes: list[str] = []  # violation codes, first-met order, unique
    add = partial(_add, codes)

    # One token (Match) at a time, so nothing per tag is kept beyond the open-element stack
    # and the records below: memory stays linear with a small constant even for tag soup.
    outside = False  # non-whitespace text outside every element
    pos = 0  # end of the previous token
    stack: list[tuple[str, int, int, bool]] = []  # name, tag start, content start, inside think
    depth = {"think": 0, "answer": 0, "bbox": 0}  # open elements per name (keeps the walk linear)
    thinks: list[tuple[int, int, int]] = []  # tag start, content start, content end
    answers: list[tuple[int, int, int]] = []
    raw_boxes: list[tuple[int, int, tuple[int, int, int, int] | None, bool]] = []  # start, end, coords, in think
    non_space = _NON_SPACE.search
    for m in _TOKEN.finditer(text):
        start, end = m.span()
        if not stack and not outside and start > pos and non_space(text, pos, start):
            outside = True
        pos = end
        box_tok, x1, y1, x2, y2, _, slash, name = m.groups()
        if box_tok is not None:  # a complete <bbox>[x1, y1, x2, y2]</bbox>
            if box_tok.count("bbox") != 2:
                add("tag_case")
            if stack:
                in_think = stack[-1][0] == "think" or stack[-1][3]
                if stack[-1][0] == "bbox":
                    add("nested_tags")
            else:
                in_think = False
            coords = (int(x1), int(y1), int(x2), int(y2))
            raw_boxes.append((start, end, coords, in_think))
        else:
            if name not in _LOWER_NAMES:
                add("tag_case")
                name = name.lower()
            if not slash:
                if stack:
                    parent = stack[-1][0]
                    in_think = parent == "think" or stack[-1][3]
                    if name != "bbox" or parent == "bbox":
                        add("nested_tags")
                else:
                    in_think = False
                stack.append((name, start, end, in_think))
                depth[name] += 1
                continue
            if depth[name]:
                if stack[-1][0] != name:
                    add("unclosed_tag")
                    while stack[-1][0] != name:
                        depth[stack.pop()[0]] -= 1
                opened = stack.pop()
                depth[name] -= 1
            else:
                add("unmatched_close")
                opened = None
            if opened is not None:
                if name == "think":
                    thinks.append((opened[1], opened[2], start))
                elif name == "answer":
                    # Like boxes, answers nested inside this one (already nested_tags) fold into it:
                    # answer spans never overlap, so their texts total at most len(text).
                    while answers and answers[-1][0] > opened[1]:
                        answers.pop()
                    answers.append((opened[1], opened[2], start))
                else:  # a box whose content is not four integers
                    # Boxes nested inside this element (already flagged nested_tags) fold into it,
                    # so box spans never overlap: one unreadable box per outermost element.
                    while raw_boxes and raw_boxes[-1][0] > opened[1]:
                        raw_boxes.pop()
                    raw_boxes.append((opened[1], end, read_box(text, opened[2], start), opened[3]))
    if not stack and not outside and pos < len(text) and non_space(text, pos):
        outside = True
    if stack:
        add("unclosed_tag")

    if len(raw_boxes) > 1:
        raw_boxes.sort()  # closing order differs from opening order only when boxes nest

    think: str | None = None
    if not thinks:
        add("no_think")
    else:
        if len(thinks) > 1:
            add("multiple_think")
        first_think = min(thinks)
        think = text[first_think[1] : first_think[2]]
        c = think[:1]
        if not ("!" <= c <= "~" and c != "<") and _reasoning_blank(text, first_think[1], first_think[2], [(b[0], b[1]) for b in raw_boxes]):
            add("think_empty")

    label: str | None = None
    if not answers:
        add("no_answer")
        answer_texts: tuple[str, ...] = ()
    else:
        answers.sort()
        answer_texts = tuple(text[a[1] : a[2]].strip() for a in answers)
        if len(answers) > 1:
            add("multiple_answer")
        else:
            label = _check_answer(answer_texts[0], add)
        if thinks and answers[0][0] < min(thinks)[0]:
            add("answer_before_think")
    if outside:
        add("text_outside")

    boxes = _make_boxes(raw_boxes, canvas, max_boxes, add)

    return ParsedTrace(text, think, boxes, answer_texts, label, tuple(codes), canvas, max_boxes)


def parse_trace(text: Any, canvas: int = CANVAS, max_boxes: int = MAX_BOXES) -> ParsedTrace:
    """Parse one response. Total: never raises, whatever ``text`` is.

    ``bytes`` are decoded as UTF-8 (invalid bytes replaced); any other
    non-string yields an empty trace with the single violation ``not_text``.
    Canonical-looking text (the usual case) takes a single-regex fast path;
    anything else gets the full tag walk. Both give identical results.
    """
    if type(text) is str:  # the usual case
        return _parse(text, canvas, max_boxes)
    if isinstance(text, ParsedTrace):
        return text
    try:  # the base-class methods: a subclass's own __str__/__bytes__/decode are never called
        if isinstance(text, str):
            return _parse(str.__getitem__(text, slice(None)), canvas, max_boxes)
        if isinstance(text, (bytes, bytearray)):
            decode = bytes.decode if isinstance(text, bytes) else bytearray.decode
            return _parse(decode(text, "utf-8", "replace"), canvas, max_boxes)
    except TypeError:  # an object that only pretends to be text (a __class__ property)
        pass
    return ParsedTrace(text="", violations=("not_text",), canvas=canvas, max_boxes=max_boxes)
