"""What a box tag is: the one definition, shared by the parser, the decoders and the rewriters.

A *box opening* is ``<`` + optional whitespace + ``bbox`` (ASCII letters, any case) +
optional whitespace + ``>``: ``<bbox>``, ``< bbox >``, ``<BBOX>``, ``<\\tBbox\\n>``. A closing
tag has a ``/`` after the ``<`` (``</bbox>``, ``< / BBOX >``). Whitespace is Python's ``\\s``
(= :meth:`str.isspace`: 29 code points, non-breaking and ideographic spaces included);
Unicode look-alikes of the letters (fullwidth ``ｂ``, …) are not tag letters. Everything
that reads box tags uses this module:

* :data:`BOX_TAG` / :data:`TAG` — the compiled patterns (:mod:`tagfer.traces.trace` builds its
  tokenizer from the same pieces, :func:`tagfer.traces.convert.strip_bboxes` uses :data:`BOX_TAG`);
* :func:`advance` — the same definition as a six-state automaton that reads text piece by
  piece (a decoder's tokens), for :class:`tagfer.models.vlm.BoxLimitProcessor`;
* :func:`limit_boxes` — the box limit for replies that were generated without one (served
  models): the 4th and later box *elements* are removed, the rest of the reply (the answer
  included) is kept;
* :func:`box_limit_regex` — the limit as a regular expression, for servers that constrain
  decoding with one (vLLM's structured outputs: :func:`vllm_extra_body`,
  :func:`vllm_sampling_kwargs`).

The *stem* of an opening is the part before its optional whitespace and ``>``: ``<`` +
whitespace + ``bbox``. A decoder that must not open another box forbids completing a stem
(every opening starts with one, so no spelling slips through); a stem that is never closed by
``>`` is not an opening, so it does not count toward the limit. Pure functions, no I/O.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = [
    "BBOX_NAME",
    "TAG_NAMES",
    "BOX_TAG",
    "TAG",
    "WHITESPACE",
    "BOX_LIMIT_MODES",
    "STEM",
    "count_box_openings",
    "remove_spans",
    "advance",
    "limit_boxes",
    "box_limit_regex",
    "vllm_extra_body",
    "vllm_sampling_kwargs",
]

#: The tag name, matched case-insensitively in ASCII only (look-alikes are not tag letters).
BBOX_NAME = r"(?ai:bbox)"
#: Every tag name of the output grammar (same matching).
TAG_NAMES = r"(?ai:think|answer|bbox)"
#: One box tag, opening or closing (group 1: the slash). Possessive runs: linear on any input.
BOX_TAG = re.compile(r"<\s*+(/?)\s*+" + BBOX_NAME + r"\s*+>")
#: Any tag of the output grammar (group 1: the slash, group 2: the name as written).
TAG = re.compile(r"<\s*+(/?)\s*+(" + TAG_NAMES + r")\s*+>")
#: The characters of ``\s`` (and of :meth:`str.isspace`), listed for regex engines whose ``\s`` is ASCII.
WHITESPACE = "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"

#: How the box limit was met for one prediction: ``decode`` (a 4th box could not be generated:
#: in-process logits processor, or a server-side constraint), ``repaired`` (the reply had more
#: boxes; the extra elements were removed by :func:`limit_boxes`), ``none`` (the reply is the
#: model's, unaltered, and no decode-time limit acted on it).
BOX_LIMIT_MODES = ("decode", "repaired", "none")


def count_box_openings(text: str) -> int:
    """Number of box openings in ``text`` (closing tags not counted)."""
    return sum(1 for m in BOX_TAG.finditer(text) if not m.group(1))


# ------------------------------------------------------------------------ the automaton
# States: 0 nothing pending; 1 "<" + whitespace; 2 "<b"; 3 "<bb"; 4 "<bbo"; 5 a stem "<bbox"
# + whitespace (a ">" now completes an opening). "<" leads to state 1 from every state.
STEM = 5
_NEXT_LETTER = {1: "bB", 2: "bB", 3: "oO", 4: "xX"}


def advance(state: int, text: str) -> tuple[int, int, int]:
    """Read ``text`` from automaton ``state``: ``(state after it, openings completed in it, m)``.

    ``m`` is the largest number of openings completed *before* a stem completed in ``text``
    (``-1``: no stem completed in it). A decoder that has ``c`` openings and may open at most
    ``max_boxes`` must forbid a piece with ``m >= 0`` and ``c + m >= max_boxes``: it would
    start an opening beyond the limit. Equal to :func:`count_box_openings` on any split of a
    text into pieces (property-tested). Time linear in ``text``; pieces without ``<`` cost a
    few character tests.
    """
    openings, m = 0, -1
    i, n = 0, len(text)
    while i < n:
        if state == 0:
            j = text.find("<", i)
            if j < 0:
                break
            state, i = 1, j + 1
            continue
        ch = text[i]
        i += 1
        if ch == "<":
            state = 1
        elif state == STEM:
            if ch == ">":
                openings += 1
                state = 0
            elif not ch.isspace():
                state = 0
        elif ch in _NEXT_LETTER[state]:
            state += 1
            if state == STEM:
                m = openings
        elif not (state == 1 and ch.isspace()):
            state = 0
    return state, openings, m


# ------------------------------------------------------------------------ served replies
_SPACE_RUN = " \t"
_NO_SPACE_BEFORE = frozenset(".,;:!?)]}\n\r")


#: What may still grow into a tag of the grammar: ``<``, spaces, an optional ``/``, a name's letters, spaces.
_TAG_PREFIX = re.compile(r"<\s*+/?\s*+[A-Za-z]*\s*+")


def _open_tag_prefix(frag: str | None, piece: str) -> str | None:
    """The output's unfinished tag (from its last ``<``, no ``>`` after it) once ``piece`` is appended,
    or None when the output does not end inside something that may still become a tag."""
    i, j = piece.rfind("<"), piece.rfind(">")
    if i > j:
        frag = piece[i:]
    elif j >= 0 or frag is None:
        return None
    else:
        frag += piece
    return frag if _TAG_PREFIX.fullmatch(frag) else None


def _break_joined_tag(frag: str, piece: str) -> str:
    """``piece`` (joined after the unfinished tag ``frag``) without the ``>`` that would complete a new
    tag, nor any ``>`` after it that only white space separates from it (each would complete it again)."""
    gt, lt = piece.find(">"), piece.find("<")
    if gt < 0 or 0 <= lt < gt or not TAG.fullmatch(frag + piece[: gt + 1]):
        return piece
    keep, i = [piece[:gt]], gt + 1
    while True:
        j = i
        while j < len(piece) and piece[j].isspace():
            j += 1
        if j == len(piece) or piece[j] != ">":
            break
        keep.append(piece[i:j])
        i = j + 1
    return "".join(keep) + piece[i:]


def remove_spans(text: str, spans: list[tuple[int, int]]) -> str:
    """``text`` without the (sorted, disjoint) ``spans``; the spaces around each deleted span
    collapse to one, or to none before punctuation / a line end and after a line start.

    A deletion never makes a tag: where the pieces it joins would complete a tag of the grammar
    that the text did not have (``</bbox`` + ``>``, ``<bbox`` + ``>``), the ``>`` after the join
    is dropped too. Linear in ``text``."""
    out: list[str] = []
    frag: str | None = None  # the output's unfinished tag, if it ends inside one

    def emit(piece: str) -> None:
        nonlocal frag
        if frag is not None:  # the piece starts at a join (nothing is unfinished before the first one)
            piece = _break_joined_tag(frag, piece)
        out.append(piece)
        frag = _open_tag_prefix(frag, piece)

    last, n = 0, len(text)
    for start, end in spans:
        pre = start
        while pre > last and text[pre - 1] in _SPACE_RUN:
            pre -= 1
        post = end
        while post < n and text[post] in _SPACE_RUN:
            post += 1
        before = text[pre - 1] if pre > 0 else "\n"
        after = text[post] if post < n else "\n"
        if pre == start and post == end:  # glued between two words: keep them apart
            sep = " " if before.isalnum() and after.isalnum() else ""
        elif before in "\n\r" or after in _NO_SPACE_BEFORE:
            sep = ""
        else:
            sep = " "
        emit(text[last:pre])
        emit(sep)
        last = post
    emit(text[last:])
    return "".join(out)


#: Spans of removed elements listed in a repair's info (the count is always exact).
MAX_LISTED_SPANS = 32


def limit_boxes(text: str | None, max_boxes: int | None) -> tuple[str | None, dict[str, Any] | None]:
    """Hold a reply to ``max_boxes`` boxes after the fact: remove the later box elements, keep the rest.

    The served-model counterpart of the in-process :class:`tagfer.models.vlm.BoxLimitProcessor`:
    the model's reasoning after the extra boxes and its answer stay, so the item scores as
    the in-process path would have let it. An element is an opening tag through the first
    closing box tag after it, when no other tag of the grammar comes in between; otherwise
    (an unclosed box) the opening tag alone. Returns ``(text, None)`` when the reply has at
    most ``max_boxes`` openings (or no limit / no text), else ``(repaired text, {"mode":
    "repaired", "max_boxes", "boxes": openings in the reply, "removed": elements removed,
    "spans": [[start, end], …] of the first :data:`MAX_LISTED_SPANS` of them in the reply})``.
    Linear time; one tag is looked at a time (memory: the removed spans).
    """
    if text is None or max_boxes is None:
        return text, None
    n_open = count_box_openings(text)
    if n_open <= max_boxes:
        return text, None
    spans: list[tuple[int, int]] = []
    seen = 0
    pending: tuple[int, int] | None = None  # an extra opening whose element end is not known yet
    for m in TAG.finditer(text):
        is_box = m.group(2).lower() == "bbox"
        if pending is not None:
            spans.append((pending[0], m.end()) if is_box and m.group(1) else pending)
            pending = None
        if is_box and not m.group(1):
            seen += 1
            if seen > max_boxes:
                pending = m.span()
    if pending is not None:
        spans.append(pending)
    info = {"mode": "repaired", "max_boxes": int(max_boxes), "boxes": n_open, "removed": len(spans),
            "spans": [list(sp) for sp in spans[:MAX_LISTED_SPANS]]}
    out = remove_spans(text, spans)
    if count_box_openings(out) > max_boxes:  # a removal joined two pieces into a new opening ("<bbox<bbox>>")
        out = _drop_extra_stems(out, max_boxes)
    return out, info


def _drop_extra_stems(text: str, max_boxes: int) -> str:
    """``text`` without each character that would complete a stem once ``max_boxes`` openings are
    done: what the decode-time limit does, at character level. Linear; only for odd texts."""
    out: list[str] = []
    state = count = 0
    for ch in text:
        nxt, opened, m = advance(state, ch)
        if m >= 0 and count >= max_boxes:
            state = 0  # the character is dropped: the pending stem is broken
            continue
        out.append(ch)
        state, count = nxt, count + opened
    return "".join(out)


# ------------------------------------------------------------------------ decode-time limit as a regex
def _cls(chars: str, negate: bool = False) -> str:
    """A regex character class of ``chars`` written with ECMAScript/Python escapes only."""
    def esc(c: str) -> str:
        o = ord(c)
        if c.isalnum() and o < 128:
            return c
        return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}"
    return "[" + ("^" if negate else "") + "".join(esc(c) for c in chars) + "]"


def _segment(allow_stem: bool) -> str:
    """What may follow one ``<`` up to the next ``<`` without completing an opening
    (``allow_stem=True``) or without completing even a stem (``False``)."""
    n = _cls("<", True) + "*"
    w = _cls(WHITESPACE) + "*"
    tail = ""
    if allow_stem:  # the stem "<bbox" + whitespace, not followed by ">"
        tail = "|[xX]" + w + "(?:" + _cls("<>" + WHITESPACE, True) + n + ")?"
    s4 = "(?:" + _cls("<xX", True) + n + tail + ")?"
    s3 = "(?:" + _cls("<oO", True) + n + "|[oO]" + s4 + ")?"
    s2 = "(?:" + _cls("<bB", True) + n + "|[bB]" + s3 + ")?"
    return w + "(?:" + _cls("<bB" + WHITESPACE, True) + n + "|[bB]" + s2 + ")?"


def box_limit_regex(max_boxes: int) -> str:
    """A regular expression matching exactly the texts a decoder limited to ``max_boxes`` boxes
    can write (the language of :class:`tagfer.models.vlm.BoxLimitProcessor`): at most
    ``max_boxes`` openings and, after the last allowed one, no stem of another. Any other text
    is free. Written without look-around, lazy or possessive quantifiers, with ``\\x``/``\\u``
    escapes only, so grammar engines (xgrammar, outlines, llguidance) can compile it; a whole
    reply must match it (``re.fullmatch``).
    """
    if max_boxes < 0:
        raise ValueError(f"max_boxes must be >= 0, got {max_boxes}")
    n = _cls("<", True) + "*"
    w = _cls(WHITESPACE) + "*"
    opening = "<" + w + "[bB][bB][oO][xX]" + w + ">"
    free = n + "(?:<" + _segment(allow_stem=True) + ")*"  # no opening
    closed = n + "(?:<" + _segment(allow_stem=False) + ")*"  # no stem either
    if max_boxes == 0:
        return closed
    return free + "(?:" + opening + free + "){0," + str(max_boxes - 1) + "}(?:" + opening + closed + ")?"


def vllm_extra_body(max_boxes: int, api: str = "structured_outputs") -> dict[str, Any]:
    """Request fields that make a vLLM OpenAI-compatible server enforce the box limit while decoding.

    ``api="structured_outputs"`` (vLLM ≥ 0.10.2; the only form from 0.12):
    ``{"structured_outputs": {"regex": …}}``; ``api="guided_regex"`` (vLLM ≤ 0.11, SGLang-style
    servers): ``{"guided_regex": …}``. The regex is :func:`box_limit_regex`. The fields go at
    the top level of the JSON body (the OpenAI Python client's ``extra_body``).
    """
    regex = box_limit_regex(max_boxes)
    if api == "structured_outputs":
        return {"structured_outputs": {"regex": regex}}
    if api == "guided_regex":
        return {"guided_regex": regex}
    raise ValueError(f"unknown structured-output API {api!r}: use structured_outputs or guided_regex")


def vllm_sampling_kwargs(vllm: Any, max_boxes: int) -> dict[str, Any]:
    """``SamplingParams`` keyword arguments for vLLM's offline engine that enforce the box limit
    while decoding: ``structured_outputs=StructuredOutputsParams(regex=…)`` where the installed
    vLLM has it, else ``guided_decoding=GuidedDecodingParams(regex=…)`` (older vLLM).
    ``vllm``: the imported ``vllm`` module."""
    sp = getattr(vllm, "sampling_params", None)
    regex = box_limit_regex(max_boxes)
    for mod in (sp, vllm):
        cls = getattr(mod, "StructuredOutputsParams", None)
        if cls is not None:
            return {"structured_outputs": cls(regex=regex)}
    for mod in (sp, vllm):
        cls = getattr(mod, "GuidedDecodingParams", None)
        if cls is not None:
            return {"guided_decoding": cls(regex=regex)}
    raise RuntimeError("this vLLM has neither StructuredOutputsParams nor GuidedDecodingParams")
