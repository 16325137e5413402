"""A model output made fit to show: blank runs collapsed, long output cut (the terminal's trace panel).

A degenerate output (hundreds of empty lines, tens of thousands of characters) must not fill a
screen: :func:`collapse_segments` replaces every run of more than ``max_blank`` empty lines by
one marker line (``⋯ 509 empty lines ⋯``) and stops after ``max_chars`` characters or
``max_lines`` lines with a closing marker (``⋯ 45,120 more characters ⋯``). The web pages do the
same in JavaScript (``collapseSegments`` in ``explainer/web/app.js``, ``collapseText`` in the
study page) with the same rules and constants; the JSON keeps the full text.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

__all__ = ["MAX_CHARS", "MAX_LINES", "MAX_BLANK", "collapse_segments", "collapse_text"]

MAX_CHARS = 4000  # characters shown before the rest is cut
MAX_LINES = 60  # lines shown before the rest is cut
MAX_BLANK = 2  # empty lines kept in a row; a longer run becomes one marker line


def _blank_runs(max_blank: int) -> re.Pattern[str]:
    # a line break followed by more than max_blank lines holding only spaces/tabs
    return re.compile(r"\n(?:[ \t\r\f\v]*\n){%d,}" % (max_blank + 1))


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _nth_newline(text: str, n: int) -> int:
    """Index of the ``n``-th line break of ``text`` (``n ≥ 1``), or -1 when it has fewer."""
    i = -1
    for _ in range(n):
        i = text.find("\n", i + 1)
        if i < 0:
            return -1
    return i


def collapse_segments(
    segments: Iterable[dict[str, Any]], max_chars: int = MAX_CHARS, max_lines: int = MAX_LINES, max_blank: int = MAX_BLANK
) -> list[dict[str, Any]]:
    """The trace ``segments`` of an analysis (``{"text", "box"}``, :func:`tagfer.explainer.records.segments`)
    ready to display: each run of more than ``max_blank`` empty lines in a text segment becomes
    ``"\\n⋯ N empty lines ⋯\\n"``; the output stops after ``max_chars`` shown characters or
    ``max_lines`` line breaks, and a last segment says how many characters were left out.
    Marker segments carry ``"note": True`` (shown dimmed); box segments are kept whole or
    dropped, never cut. Pure."""
    pat = _blank_runs(max_blank)
    merged: list[dict[str, Any]] = []
    for seg in segments:  # neighbouring text segments joined: a blank run may span them
        if merged and seg["box"] is None and merged[-1]["box"] is None:
            merged[-1] = {"text": merged[-1]["text"] + seg["text"], "box": None}
        else:
            merged.append({"text": seg["text"], "box": seg["box"]})
    pieces: list[dict[str, Any]] = []
    for seg in merged:
        text, box = seg["text"], seg["box"]
        if box is not None:
            pieces.append({"text": text, "box": box})
            continue
        pos = 0
        for m in pat.finditer(text):
            if m.start() > pos:
                pieces.append({"text": text[pos : m.start()], "box": None})
            n_empty = m.group(0).count("\n") - 1
            pieces.append({"text": "\n", "box": None})
            pieces.append({"text": f"⋯ {_plural(n_empty, 'empty line')} ⋯", "box": None, "note": True})
            pieces.append({"text": "\n", "box": None})
            pos = m.end()
        if pos < len(text):
            pieces.append({"text": text[pos:], "box": None})
    out: list[dict[str, Any]] = []
    chars = lines = 0
    for i, p in enumerate(pieces):
        t = p["text"]
        if p.get("note"):
            out.append(p)
            continue
        cut = min(len(t), max(0, max_chars - chars))
        breaks_left = max_lines - 1 - lines  # line breaks still allowed: at most max_lines lines shown
        nl = _nth_newline(t, breaks_left + 1) if breaks_left >= 0 else 0
        if nl >= 0:
            cut = min(cut, nl)
        if cut < len(t) and p["box"] is not None:
            cut = 0  # a box is shown whole or not at all
        if cut > 0:
            out.append({**p, "text": t[:cut]})
            chars += cut
            lines += t.count("\n", 0, cut)
        if cut < len(t):
            left = len(t) - cut + sum(len(q["text"]) for q in pieces[i + 1 :] if not q.get("note"))
            shown = "".join(q["text"] for q in out)
            lead = "" if re.search(r"\n[ \t\r\f\v]*\Z", shown) else "\n"  # never an extra blank line
            out.append({"text": f"{lead}⋯ {_plural(left, 'more character')} (the full output is in the JSON) ⋯", "box": None, "note": True})
            break
    return out


def collapse_text(text: str, max_chars: int = MAX_CHARS, max_lines: int = MAX_LINES, max_blank: int = MAX_BLANK) -> str:
    """:func:`collapse_segments` for plain text (one segment): the shown string, markers included."""
    return "".join(s["text"] for s in collapse_segments([{"text": text, "box": None}], max_chars, max_lines, max_blank))
