"""tagfer.explainer.display: degenerate model output collapsed for display; the terminal's trace panel stays small."""

from __future__ import annotations

import dataclasses
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from tagfer.explainer.display import MAX_CHARS, MAX_LINES, collapse_segments, collapse_text


def test_blank_runs_become_one_marker_line_and_short_text_is_untouched():
    assert collapse_text("a\n\nb\n \n\t\nc") == "a\n\nb\n \n\t\nc"  # two empty lines in a row are kept
    out = collapse_text("<think>" + "\n" * 512 + "x</think>")
    assert out == "<think>\n⋯ 511 empty lines ⋯\nx</think>"
    assert collapse_text("") == ""


def test_long_output_is_cut_with_a_count_of_what_is_left():
    out = collapse_text("y" * 50_000)
    assert out.startswith("y" * MAX_CHARS + "\n⋯ ") and "46,000 more characters" in out
    assert len(out) < MAX_CHARS + 100
    many = collapse_text("\n".join(f"line {i}" for i in range(500)))
    assert many.count("\n") == MAX_LINES and "line 59" in many and "line 60" not in many


def test_boxes_are_kept_whole_or_dropped():
    segs = [{"text": "z" * 3990, "box": None}, {"text": "<bbox>[1, 2, 3, 4]</bbox>", "box": 0}, {"text": "tail", "box": None}]
    out = collapse_segments(segs)
    assert [s["box"] for s in out if s["box"] is not None] == []  # it would pass the limit: left out, not cut
    assert out[-1]["note"] and "29 more characters" in out[-1]["text"]
    segs[0]["text"] = "z" * 10
    assert collapse_segments(segs) == segs  # within the limits: unchanged


segment_lists = st.lists(
    st.one_of(
        st.builds(lambda t: {"text": t, "box": None}, st.text(alphabet="ab \n\t", max_size=400)),
        st.builds(lambda b: {"text": f"<bbox>[{b}, 1, 2, 3]</bbox>", "box": None}, st.integers(0, 9)),
    ),
    max_size=12,
).map(lambda segs: [{**s, "box": i if s["text"].startswith("<bbox>") else None} for i, s in enumerate(segs)])


@settings(deadline=None, max_examples=500)
@given(segment_lists, st.integers(1, 300), st.integers(1, 30), st.integers(0, 3))
def test_collapse_segments_bounds_and_order(segs, max_chars, max_lines, max_blank):
    out = collapse_segments(segs, max_chars=max_chars, max_lines=max_lines, max_blank=max_blank)
    shown = [s for s in out if not s.get("note")]
    assert sum(len(s["text"]) for s in shown) <= max_chars
    text = "".join(s["text"] for s in out)
    notes = sum(1 for s in out if s.get("note"))
    assert text.count("\n") <= max_lines - 1 + notes  # max_lines lines; a closing marker adds its own line
    assert not re.search(r"\n(?:[ \t]*\n){%d,}" % (max_blank + 1), text)  # no long blank run survives
    boxes = [s for s in out if s["box"] is not None]
    assert boxes == [s for s in segs if s["box"] is not None][: len(boxes)]  # whole, in order
    if not notes:  # nothing collapsed or cut: the very same text
        assert text == "".join(s["text"] for s in segs)


def test_terminal_panel_of_a_degenerate_output_is_short(astronaut_analysis):
    """`tagfer analyze` printing a 512-newline and a 50k-character output: a few dozen lines, not 512."""
    from tagfer.cli._app import out_console
    from tagfer.cli.analyze import _print_result
    from tagfer.explainer.records import ImageResult

    for trace in ("<think>" + "\n" * 512 + "</think>\n<answer>happy</answer>", "<think>" + "w" * 50_000 + "</think>"):
        a = dataclasses.replace(astronaut_analysis, trace=trace, segments=[{"text": trace, "box": None}], well_formed=False)
        res = ImageResult("x.png", 512, 512, [a])
        with out_console.capture() as cap:
            _print_result(res, show_scores=False, show_all_aus=False)
        lines = cap.get().splitlines()
        panel = [ln for ln in lines if ln.startswith("│")]
        assert len(panel) <= MAX_LINES + 2, len(panel)
        assert any("empty lines" in ln or "more characters" in ln for ln in panel)
