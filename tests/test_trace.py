"""Tests for tagfer.traces.trace: the grammar, violations, AU_LIST and teacher-tag helpers."""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fixtures_text import CONFUSABLES, FUZZ_CHAR, unicode_tag_soup
from tiers import examples
from tagfer.core.canvas import is_valid_box
from tagfer.core.labels import LABELS
from tagfer.traces.rewards import PAPER_FORMAT_VIOLATIONS, RewardConfig, r_fmt
from tagfer.traces.trace import (
    VIOLATIONS,
    AUItem,
    BBox,
    ParsedTrace,
    _parse_general,
    convert_teacher_tags,
    format_au_list,
    format_box,
    is_blank,
    parse_au_list,
    parse_trace,
    strip_bboxes,
    validate_teacher_tags,
)

# Timings on shared CI machines vary a lot: no per-example deadline.
relaxed = settings(deadline=None)

# A trace in our own words using the paper's two example regions.
PAPER_TRACE = (
    "<think>The whole face looks strained, the gaze is lowered and the head is slightly turned.\n"
    "Around the chin and lower lip the skin bunches upward and the mouth is pressed "
    "(AU17, chin raiser) <bbox>[93, 306, 445, 417]</bbox>.\n"
    "One corner of the mouth is pulled tight and inward, AU14 <bbox>[191, 417, 328, 511]</bbox>, "
    "a one-sided tension.\n"
    "Pressed lips with a tightened corner read as rejection rather than joy.</think>\n"
    "<answer>Disgust</answer>"
)


# ----------------------------------------------------------------------------------------
# Strategies: valid traces, and arbitrary tag soup
# ----------------------------------------------------------------------------------------

SAFE_TEXT = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="<>", exclude_categories=("Cs",)),
    min_size=1,
    max_size=60,
).filter(lambda s: not is_blank(s))
WS = st.sampled_from(["", " ", "\n", "\n\n", "  \t"])
COORD = st.integers(0, 511)


@st.composite
def valid_boxes(draw: st.DrawFn) -> tuple[int, int, int, int]:
    x1, x2 = sorted(draw(st.lists(COORD, min_size=2, max_size=2, unique=True)))
    y1, y2 = sorted(draw(st.lists(COORD, min_size=2, max_size=2, unique=True)))
    return (x1, y1, x2, y2)


def box_text(b: tuple[int, ...], spaced: bool = True) -> str:
    return f"<bbox>{format_box(b)}</bbox>" if spaced else "<bbox>[" + ",".join(map(str, b)) + "]</bbox>"


ANSWERS = {"anger": ["anger", " ANGRY "], "happiness": ["Happiness.", "happy"], "neutral": ["calm", "Neutral"]}
ANSWERS.update({lab: [lab] for lab in LABELS if lab not in ANSWERS})


@st.composite
def valid_traces(draw: st.DrawFn, n_boxes: st.SearchStrategy[int] = st.integers(0, 3)):
    """(text, boxes, label) for a well-formed trace."""
    boxes = [draw(valid_boxes()) for _ in range(draw(n_boxes))]
    pieces = [draw(SAFE_TEXT)]
    for b in boxes:
        pieces.append(box_text(b, draw(st.booleans())))
        pieces.append(draw(SAFE_TEXT))
    label = draw(st.sampled_from(LABELS))
    answer = draw(st.sampled_from(ANSWERS[label]))
    text = f"{draw(WS)}<think>{''.join(pieces)}</think>{draw(WS)}<answer>{answer}</answer>{draw(WS)}"
    return text, boxes, label


TAG_PIECES = [
    "<think>", "</think>", "<answer>", "</answer>", "<bbox>", "</bbox>", "<Think>", "< /answer >",
    "[1, 2, 30, 40]", "<bbox>[5,6,70,80]</bbox>", "<bbox>[600, 0, 1, 2]</bbox>", "<bbox>[3, 3, 1, 1]</bbox>",
    "<bbox>[1,2,3]</bbox>", "happy", "sad or happy", "contempt", " ", "\n", "x", "<", ">", "AU12", "```",
]
TAG_SOUP = st.lists(st.sampled_from(TAG_PIECES), max_size=14).map("".join)


# ----------------------------------------------------------------------------------------
# The paper example and basic parsing
# ----------------------------------------------------------------------------------------


def test_paper_example_boxes_and_spans():
    p = parse_trace(PAPER_TRACE)
    assert p.well_formed, p.violations
    assert p.box_coords == ((93, 306, 445, 417), (191, 417, 328, 511))
    for box, literal in zip(p.boxes, ["<bbox>[93, 306, 445, 417]</bbox>", "<bbox>[191, 417, 328, 511]</bbox>"]):
        assert PAPER_TRACE[box.span[0] : box.span[1]] == literal
        assert box.valid and box.in_think
    assert p.label == "disgust" and p.answer == "Disgust"
    assert p.au_mentions == (17, 14)
    assert p.think is not None and p.think.startswith("The whole face")


def test_general_walk_gives_the_same_result_as_the_fast_path_on_the_paper_example():
    assert _parse_general(PAPER_TRACE, 512, 3) == parse_trace(PAPER_TRACE)


@relaxed
@given(valid_traces())
def test_valid_traces_parse_well_formed(case):
    text, boxes, label = case
    p = parse_trace(text)
    assert p.violations == ()
    assert p.well_formed
    assert list(p.box_coords) == boxes
    assert p.label == label
    for b in p.boxes:
        assert text[b.span[0] : b.span[1]].startswith("<bbox>") and text[b.span[0] : b.span[1]].endswith("</bbox>")
        assert b.valid == is_valid_box(b.coords)


def test_whitespace_tolerated_inside_brackets_and_around_tags():
    text = "\n  <think>  look <bbox>[ 1 ,2,  30 , 40 ]</bbox>\n</think>\n\n<answer>  happy  </answer>  \n"
    p = parse_trace(text)
    assert p.well_formed, p.violations
    assert p.box_coords == ((1, 2, 30, 40),)


def test_whitespace_inside_angle_brackets_is_read_but_not_a_violation():
    p = parse_trace("<think>x <bbox>[1, 2, 30, 40]</bbox></think>< answer >sad</ answer>")
    assert p.label == "sadness"
    assert p.well_formed


def test_tags_are_recognised_case_insensitively_but_only_lower_case_is_well_formed():
    p = parse_trace("<THINK>eyes wide <BBOX>[1, 2, 30, 40]</BBOX></THINK><Answer>fear</Answer>")
    assert p.label == "fear"
    assert p.box_coords == ((1, 2, 30, 40),)
    assert p.violations == ("tag_case",)


def test_au_mentions_forms():
    p = parse_trace("<think>AU12 and AU 4, <AU6>, AU-9, AU04, TAU1, AU120, AU12 again</think><answer>happy</answer>")
    assert p.au_mentions == (12, 4, 6, 9)


def test_au_mentions_only_from_the_think_block():
    p = parse_trace("<think>AU1</think><answer>happy AU2</answer>")
    assert p.au_mentions == (1,)
    assert parse_trace("no think AU5 <answer>sad</answer>").au_mentions == ()


def test_answer_labels_and_answer_property():
    p = parse_trace("<think>x</think><answer>happiness or sadness</answer>")
    assert p.answer == "happiness or sadness"
    assert p.label is None
    assert p.answer_labels == ("happiness", "sadness")
    assert "answer_multiple_labels" in p.violations


@pytest.mark.parametrize(
    "answer, label, code",
    [
        ("Happiness.", "happiness", None),
        ("happy", "happiness", None),
        (" ANGRY ", "anger", None),
        ("calm", "neutral", None),
        ("", None, "answer_empty"),
        (" . ", None, "answer_empty"),
        ("happiness or sadness", None, "answer_multiple_labels"),
        ("contempt", "excluded", "answer_excluded"),
        ("bored", None, "answer_unknown"),
    ],
)
def test_answer_normalisation(answer, label, code):
    p = parse_trace(f"<think>x</think><answer>{answer}</answer>")
    assert p.label == label
    assert p.violations == (() if code is None else (code,))


# ----------------------------------------------------------------------------------------
# Totality
# ----------------------------------------------------------------------------------------


@relaxed
@given(st.one_of(st.text(), TAG_SOUP, st.binary(), st.none(), st.integers(), st.lists(st.text())))
@example(b"\xff\xfe<think>x</think><answer>happy</answer>")
@example("<think>" * 50)
@example("</answer>" * 50)
def test_parser_is_total(value):
    p = parse_trace(value)
    assert isinstance(p, ParsedTrace)
    assert set(p.violations) <= set(VIOLATIONS)
    assert len(set(p.violations)) == len(p.violations)
    assert p.well_formed == (not p.violations)
    for b in p.boxes:
        assert isinstance(b, BBox)
        assert p.text[b.span[0]] == "<" and p.text[b.span[1] - 1] == ">"
        assert b.valid == (b.coords is not None and is_valid_box(b.coords))
    assert p.label is None or p.label in LABELS or p.label == "excluded"
    p.au_mentions, p.answer_labels, p.box_coords  # properties never raise either


def test_non_text_inputs():
    assert parse_trace(None).violations == ("not_text",)
    assert parse_trace(42).violations == ("not_text",)
    assert parse_trace(b"<think>x</think><answer>happy</answer>").well_formed
    assert parse_trace(bytearray(b"<think>x</think><answer>happy</answer>")).label == "happiness"


@settings(deadline=None, max_examples=examples(300))
@given(TAG_SOUP)
def test_fast_path_matches_general_walk_on_tag_soup(text):
    assert parse_trace(text) == _parse_general(text, 512, 3)


@relaxed
@given(valid_traces(), st.sampled_from([1, 2, 3, 5]), st.sampled_from([64, 512]))
def test_fast_path_matches_general_walk_on_traces(case, max_boxes, canvas):
    text = case[0]
    assert parse_trace(text, canvas, max_boxes) == _parse_general(text, canvas, max_boxes)


@pytest.mark.parametrize(
    "text",
    [
        "a" * 2_000_000,
        "<think>" * 200_000,
        "</answer>" * 200_000,
        "<think>" * 100_000 + "</answer>" * 100_000,
        "<think>" + "<bbox>[1, 2, 3, 4]</bbox>" * 50_000 + "</think><answer>happy</answer>",
        "<think>" + " " * 500_000 + "<" + "</think>",
        "<bbox>[" + "9" * 10_000 + ", 1, 2, 3]</bbox>",
    ],
)
def test_huge_and_adversarial_inputs_are_fast(text):
    t0 = time.perf_counter()
    p = parse_trace(text)
    assert time.perf_counter() - t0 < 5.0
    assert not p.well_formed


# ----------------------------------------------------------------------------------------
# One broken rule at a time: each gives its code and R_fmt = 0
# ----------------------------------------------------------------------------------------

BOX = "<bbox>[10, 20, 200, 220]</bbox>"
BASE = f"<think>A look at the face. The brows AU4 {BOX} are lowered.</think>\n<answer>anger</answer>"

ONE_RULE_BROKEN = {
    "no_think": "A look at the face. <answer>anger</answer>",
    "multiple_think": BASE.replace("\n<answer>", "<think>more</think>\n<answer>"),
    "think_empty": "<think>  \n</think><answer>anger</answer>",
    "no_answer": BASE.split("\n<answer>")[0],
    "multiple_answer": BASE + "<answer>anger</answer>",
    "answer_before_think": "<answer>anger</answer>\n" + BASE.split("\n<answer>")[0],
    "answer_empty": BASE.replace(">anger<", "><"),
    "answer_multiple_labels": BASE.replace(">anger<", ">happiness or sadness<"),
    "answer_excluded": BASE.replace(">anger<", ">contempt<"),
    "answer_unknown": BASE.replace(">anger<", ">bored<"),
    "nested_tags": BASE.replace("A look", "<think>A look</think>"),
    "unclosed_tag": BASE.replace("</answer>", ""),
    "unmatched_close": BASE.replace("A look", "</bbox>A look"),
    "text_outside": "Sure, here is my analysis.\n" + BASE,
    "tag_case": BASE.replace("<think>", "<Think>"),
    "bbox_outside_think": BASE.replace("\n<answer>", f"\n{BOX}\n<answer>"),
    "too_many_bboxes": BASE.replace(BOX, BOX * 4),
    "bbox_syntax": BASE.replace(BOX, "<bbox>[10, 20, 200]</bbox>"),
    "bbox_out_of_canvas": BASE.replace(BOX, "<bbox>[10, 20, 512, 220]</bbox>"),
    "bbox_degenerate": BASE.replace(BOX, "<bbox>[200, 20, 10, 220]</bbox>"),
}


def test_base_trace_is_well_formed():
    assert parse_trace(BASE).well_formed


def test_every_violation_code_has_a_one_rule_example():
    assert set(ONE_RULE_BROKEN) == set(VIOLATIONS) - {"not_text"}


@pytest.mark.parametrize("code", sorted(ONE_RULE_BROKEN))
def test_one_rule_broken(code):
    p = parse_trace(ONE_RULE_BROKEN[code])
    assert code in p.violations
    assert not p.well_formed


MUTATIONS = {
    "no_think": lambda t: t.replace("<think>", "").replace("</think>", ""),
    "multiple_think": lambda t: t.replace("</think>", "</think><think>again</think>", 1),
    "no_answer": lambda t: t[: t.index("<answer>")],
    "multiple_answer": lambda t: t + "<answer>sad</answer>",
    "answer_before_think": lambda t: t[t.index("<answer>") :] + t[: t.index("<answer>")],
    "answer_empty": lambda t: t[: t.index("<answer>")] + "<answer> </answer>",
    "answer_multiple_labels": lambda t: t[: t.index("<answer>")] + "<answer>happiness or sadness</answer>",
    "answer_excluded": lambda t: t[: t.index("<answer>")] + "<answer>contempt</answer>",
    "nested_tags": lambda t: t.replace("<think>", "<think><answer>x</answer>", 1),
    "unclosed_tag": lambda t: t.replace("</answer>", ""),
    "unmatched_close": lambda t: t.replace("<think>", "<think></bbox>", 1),
    "text_outside": lambda t: "```\n" + t + "\n```",
    "tag_case": lambda t: t.replace("<answer>", "<ANSWER>"),
    "bbox_outside_think": lambda t: t + BOX,
    "too_many_bboxes": lambda t: t.replace("</think>", BOX * 4 + "</think>"),
    "bbox_syntax": lambda t: t.replace("</think>", "<bbox>[1, 2, 3.5, 4]</bbox></think>"),
    "bbox_out_of_canvas": lambda t: t.replace("</think>", "<bbox>[-1, 2, 30, 40]</bbox></think>"),
    "bbox_degenerate": lambda t: t.replace("</think>", "<bbox>[5, 2, 5, 40]</bbox></think>"),
}


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_traces(n_boxes=st.integers(0, 2)), st.sampled_from(sorted(MUTATIONS)))
def test_single_rule_mutations_of_valid_traces(case, code):
    text = case[0]
    broken = MUTATIONS[code](text)
    p = parse_trace(broken)
    assert code in p.violations, (code, broken, p.violations)
    assert r_fmt(broken, RewardConfig(format_rules="strict")) == 0.0
    if code in PAPER_FORMAT_VIOLATIONS:  # one of the paper's three R_fmt conditions
        assert r_fmt(broken) == 0.0
    assert r_fmt(text) > 0.0


def test_markdown_fence_and_preamble_fail():
    assert "text_outside" in parse_trace("```xml\n" + BASE + "\n```").violations
    assert "text_outside" in parse_trace(BASE + "\nHope this helps!").violations


def test_max_boxes_parameter():
    text = BASE.replace(BOX, BOX * 2)
    assert parse_trace(text).well_formed
    assert parse_trace(text, max_boxes=1).violations == ("too_many_bboxes",)


def test_canvas_parameter_changes_validity():
    text = BASE.replace(BOX, "<bbox>[10, 20, 600, 220]</bbox>")
    assert "bbox_out_of_canvas" in parse_trace(text).violations
    assert parse_trace(text, canvas=1024).well_formed


def test_boxes_outside_think_are_kept_for_rewards():
    p = parse_trace(BASE + BOX)
    assert [b.in_think for b in p.boxes] == [True, False]
    assert len(p.box_coords) == 2


def test_unreadable_box_is_kept_with_no_coords():
    p = parse_trace(BASE.replace(BOX, "<bbox>the left eye</bbox>"))
    assert p.box_coords == (None,)
    assert p.violations == ("bbox_syntax",)


# ----------------------------------------------------------------------------------------
# AU_LIST
# ----------------------------------------------------------------------------------------


def test_format_au_list_exact_line():
    assert format_au_list([(12, 0.834, (191, 300, 330, 420))]) == "AU12 0.83 [191, 300, 330, 420]"
    text = format_au_list([AUItem(4, 1.0, (153, 115, 242, 188)), (9, 0.5, [153, 115, 242, 188])])
    assert text == "AU4 1.00 [153, 115, 242, 188]\nAU9 0.50 [153, 115, 242, 188]"


def test_format_au_list_accepts_objects_with_attributes():
    class Act:
        au, score, box = 17, 0.61, (93, 306, 445, 417)

    assert format_au_list([Act()]) == "AU17 0.61 [93, 306, 445, 417]"


@pytest.mark.parametrize("bad", [(0, 0.5, (1, 2, 3, 4)), (12, 0.5, (1, 2, 3)), (12, float("nan"), (1, 2, 3, 4)), (12, 0.5, (1.5, 2, 3, 4))])
def test_format_au_list_rejects_malformed_items(bad):
    with pytest.raises(ValueError):
        format_au_list([bad])


@relaxed
@given(
    st.lists(
        st.tuples(st.integers(1, 99), st.floats(0, 1), st.tuples(*[st.integers(-5, 600)] * 4)),
        max_size=8,
    )
)
def test_au_list_round_trip(items):
    parsed = parse_au_list(format_au_list(items))
    assert [(i.au, i.box) for i in parsed] == [(au, box) for au, _, box in items]
    assert all(abs(i.score - s) <= 0.005 + 1e-12 for i, (_, s, _) in zip(parsed, items))


def test_parse_au_list_skips_blank_lines_and_rejects_garbage():
    assert parse_au_list("\n AU12 0.83 [191, 300, 330, 420] \n\n") == [AUItem(12, 0.83, (191, 300, 330, 420))]
    with pytest.raises(ValueError, match="line 2"):
        parse_au_list("AU12 0.83 [191, 300, 330, 420]\nAU12 high [1, 2, 3, 4]")


# ----------------------------------------------------------------------------------------
# Teacher tags → SFT targets; validation; the no-bbox ablation
# ----------------------------------------------------------------------------------------

AU_LIST = format_au_list([(17, 0.91, (93, 306, 445, 417)), (14, 0.72, (191, 417, 328, 511)), (4, 0.55, (153, 115, 242, 188))])
TEACHER = (
    "The face looks strained overall. The chin is pushed up <AU17> [93, 306, 445, 417] and the lower lip "
    "bulges. A mouth corner tightens <AU14> [191, 417, 328, 511]. This points to disgust."
)


def test_convert_teacher_tags():
    out = convert_teacher_tags(TEACHER)
    assert "AU17 <bbox>[93, 306, 445, 417]</bbox>" in out
    assert "AU14 <bbox>[191, 417, 328, 511]</bbox>" in out
    assert "<AU" not in out
    sft = f"<think>{out}</think>\n<answer>disgust</answer>"
    p = parse_trace(sft)
    assert p.well_formed and p.box_coords == ((93, 306, 445, 417), (191, 417, 328, 511))
    assert p.au_mentions == (17, 14)


def test_convert_respells_boxes_and_leaves_boxless_tags():
    assert convert_teacher_tags("<AU4>[153,115 ,242, 188]") == "AU4 <bbox>[153, 115, 242, 188]</bbox>"
    assert convert_teacher_tags("<AU4> no box") == "<AU4> no box"


def test_validate_teacher_tags_accepts_verbatim_copies():
    assert validate_teacher_tags(TEACHER, AU_LIST) == []
    assert validate_teacher_tags(TEACHER, parse_au_list(AU_LIST)) == []


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("<AU12> [191, 300, 330, 420]", "AU12 is not in the AU list"),
        ("<AU17> [93, 306, 445, 418]", "differs from the AU list box [93, 306, 445, 417]"),
        ("<AU17> chin", "is not followed by a box"),
        ("<AU 17> [93, 306, 445, 417]", "malformed AU tag"),
        ("<au17> [93, 306, 445, 417]", "malformed AU tag"),
        ("<AU17> [93, 306, 445, 417] <AU17> [93, 306, 445, 417]", "tagged more than once"),
        (
            "<AU17> [93, 306, 445, 417] <AU14> [191, 417, 328, 511] <AU4> [153, 115, 242, 188] "
            "<AU17> [93, 306, 445, 417]",
            "at most 3 allowed",
        ),
    ],
)
def test_validate_teacher_tags_problems(text, fragment):
    problems = validate_teacher_tags(text, AU_LIST)
    assert any(fragment in p for p in problems), problems


def test_shared_boxes_in_the_au_list_are_fine():
    au_list = format_au_list([(9, 0.8, (153, 115, 242, 188)), (4, 0.7, (153, 115, 242, 188))])
    assert validate_teacher_tags("<AU9> [153, 115, 242, 188] and <AU4> [153, 115, 242, 188]", au_list) == []


def test_strip_bboxes():
    text = "<think>The chin rises, AU17 <bbox>[93, 306, 445, 417]</bbox>, and AU14 <bbox>[1, 2, 3, 4]</bbox> tightens.</think>"
    assert strip_bboxes(text, keep_tags=False) == "<think>The chin rises, AU17, and AU14 tightens.</think>"
    assert strip_bboxes("a\n<bbox>[1, 2, 3, 4]</bbox> b", keep_tags=False) == "a\nb"
    assert strip_bboxes("end <bbox>bad</bbox>", keep_tags=False) == "end"
    assert strip_bboxes("no boxes here", keep_tags=False) == "no boxes here"
    assert strip_bboxes("mouth<bbox>[1, 2, 3, 4]</bbox>corner", keep_tags=False) == "mouth corner"
    assert strip_bboxes("(<bbox>[1, 2, 3, 4]</bbox>)", keep_tags=False) == "()"


def test_strip_bboxes_keeps_empty_tags_by_default():
    """The paper deletes what <bbox> and </bbox> enclose and keeps every other token: the empty tags stay."""
    text = "<think>The chin rises, AU17 <bbox>[93, 306, 445, 417]</bbox>, and AU14 <bbox> [1, 2, 3, 4] </bbox> tightens.</think>"
    assert strip_bboxes(text) == "<think>The chin rises, AU17 <bbox></bbox>, and AU14 <bbox></bbox> tightens.</think>"
    assert strip_bboxes("mouth<bbox>[1, 2, 3, 4]</bbox>corner") == "mouth<bbox></bbox>corner"
    assert strip_bboxes("no boxes here") == "no boxes here"


@relaxed
@given(valid_traces())
def test_strip_bboxes_removes_every_box_and_keeps_the_rest_parseable(case):
    stripped = strip_bboxes(case[0], keep_tags=False)
    p = parse_trace(stripped)
    assert "<bbox>" not in stripped and p.boxes == ()
    assert p.label == case[2]
    kept = strip_bboxes(case[0])
    q = parse_trace(kept)
    assert kept.count("<bbox></bbox>") == len(parse_trace(case[0]).boxes) == len(q.boxes)
    assert all(b.coords is None for b in q.boxes) and q.label == case[2]
    spans = [b.span for b in parse_trace(case[0]).boxes]
    outside = "".join(case[0][a:b] for a, b in zip([0] + [e for _, e in spans], [s for s, _ in spans] + [len(case[0])]))
    assert kept.replace("<bbox></bbox>", "") == outside  # nothing but the coordinates went away


@relaxed
@given(st.lists(st.sampled_from(["<bbox>", "</bbox>", "[1, 2, 3, 4]", "<think>", "</think>", "x"]), max_size=14).map("".join))
def test_box_spans_never_overlap(text):
    spans = [b.span for b in parse_trace(text).boxes]
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    assert all(text[s:e].lower().startswith("<") for s, e in spans)


def test_nested_boxes_fold_into_one_unreadable_box():
    p = parse_trace("<think>a <bbox><bbox>[0, 0, 9, 9]</bbox></bbox></think><answer>fear</answer>")
    assert [b.coords for b in p.boxes] == [None] and "nested_tags" in p.violations


# ----------------------------------------------------------------------------------------
# Hardening (issue 14): look-alike tag names, invisible reasoning, linear size
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "text",
    [
        "<thınk>x</thınk><answer>happiness</answer>",
        "<think>x</think><anſwer>happiness</anſwer>",
        "<think>x</think><ANſWER>happiness</ANſWER>",
        "<thin\u212a>x</thin\u212a><answer>happiness</answer>",
        "<ｔｈｉｎｋ>x</ｔｈｉｎｋ><answer>happiness</answer>",
        "＜think＞x＜/think＞<answer>happiness</answer>",
        "<think>x</think><answer>happiness</answer><bbox\u0307>",
    ],
)
def test_look_alike_tag_names_are_text_not_tags(text):
    p = parse_trace(text)
    assert not p.well_formed
    # the look-alike is not a tag: it is never reported as a badly written tag
    assert "tag_case" not in p.violations
    assert set(p.violations) & {"no_think", "no_answer", "text_outside"}


def test_look_alike_inside_think_is_plain_reasoning_text():
    p = parse_trace("<think>the <thınk> and <anſwer> are just words</think><answer>happy</answer>")
    assert p.well_formed and "<thınk>" in p.think and p.label == "happiness"


def test_ascii_case_variants_are_still_tags():
    assert parse_trace("<THINK>x</THINK><Answer>happy</Answer>").violations == ("tag_case",)


@settings(deadline=None, max_examples=examples(400))
@given(st.one_of(unicode_tag_soup(), st.text(FUZZ_CHAR, max_size=40)))
@example("<th\u0131nk>x</th\u0131nk><answer>happiness</answer>")
@example("<think>x</think><AN\u017fWER>happy</AN\u017fWER>")
@example("<bbox>[1, 2, 3, 4]</bbox><th\u0130nk></th\u0130nk>")
def test_parser_is_total_on_unicode_in_and_around_tags(text):
    p = parse_trace(text)
    assert set(p.violations) <= set(VIOLATIONS)
    assert p == _parse_general(text, 512, 3)  # fast path and walk agree here too
    assert sum(len(a) for a in p.answers) <= len(text)  # answer texts never overlap
    for b in p.boxes:
        assert text[b.span[0]] == "<" and text[b.span[1] - 1] == ">"
    p.au_mentions, p.answer_labels, p.box_coords, r_fmt(p)


def test_nested_answers_fold_into_the_outermost_one():
    p = parse_trace("<think>x</think><answer><answer><answer>happy</answer></answer></answer>")
    assert p.answers == ("<answer><answer>happy</answer></answer>",)
    assert "nested_tags" in p.violations and p.label is None and not p.well_formed
    q = parse_trace("<answer>" * 1000 + "</answer>" * 1000)
    assert len(q.answers) == 1 and sum(map(len, q.answers)) < len(q.text)


@pytest.mark.parametrize(
    "think",
    [
        "\u200b", "\u200b\u200c\u200d\u2060", "\ufeff \u00ad", " \u200b\n\u200b ", "\u0301\u0308", "\x00\x07",
        "\u3164\u115f", "\u2800\u2800", "\u2028\u2029\u3000\u00a0", "\U000e0020\U000e0041",
    ],
)
def test_invisible_reasoning_counts_as_empty(think):
    box = "<bbox>[10, 20, 200, 220]</bbox>"
    for text in (f"<think>{think}</think><answer>happy</answer>", f"<think>{think}{box}{think}</think><answer>happy</answer>"):
        p = parse_trace(text)
        assert "think_empty" in p.violations, (text, p.violations)
        assert r_fmt(text) == 0.0
        assert p == _parse_general(text, 512, 3)


@pytest.mark.parametrize("think", [".", "x", "\u200bx", "😀", "١", "漢", "\u00a0\u00e9", "a\u0301"])
def test_visible_reasoning_is_not_empty(think):
    assert not is_blank(think)
    assert parse_trace(f"<think>{think}</think><answer>happy</answer>").well_formed


@relaxed
@given(st.text(st.one_of(st.characters(codec="utf-8", exclude_categories=("Cs",)), st.sampled_from(CONFUSABLES))))
def test_is_blank_is_the_absence_of_letters_numbers_punctuation_and_symbols(text):
    import unicodedata

    visible = [c for c in text if unicodedata.category(c)[0] in "LNPS" and c not in "\u115f\u1160\u3164\uffa0\u2800"]
    assert is_blank(text) == (not visible)


@pytest.mark.parametrize(
    "text",
    [
        "<" + " " * 300_000,
        "<" + "\n" * 300_000,
        "< " * 200_000,
        "<think>look <" + " " * 300_000 + " done</think><answer>happy</answer>",
        "<answer>" * 30_000 + "</answer>" * 30_000,
        "<think><answer><bbox>" * 15_000 + "</bbox></answer></think>" * 15_000,
        "<bbox>" * 100_000,
        "<bbox>" + " " * 300_000 + "[1, 2, 3, 4]",
        "<think>" + "\u200b" * 300_000 + "</think><answer>happy</answer>",
    ],
    ids=["lt_spaces", "lt_newlines", "lt_space_pairs", "lt_in_think", "nested_answer", "nested_mix", "open_boxes",
         "box_spaces", "zero_width_think"],
)
def test_adversarial_shapes_parse_in_linear_time(text):
    # These took minutes to hours (quadratic) before; a generous bound guards against a regression,
    # the size/time/memory table is benchmarks/bench_parse.py.
    t0 = time.perf_counter()
    p = parse_trace(text)
    assert time.perf_counter() - t0 < 5.0
    assert p.well_formed == text.startswith("<think>look")


def _strip_bboxes_regex(text: str) -> str:
    """The former regex implementation of strip_bboxes (quadratic on unclosed tags), as a reference."""
    import re

    pat = re.compile(r"(?P<pre>[ \t]*)<\s*bbox\s*>.*?<\s*/\s*bbox\s*>(?P<post>[ \t]*)", re.IGNORECASE | re.DOTALL)

    def repl(m):
        s = m.string
        before = s[m.start() - 1] if m.start() > 0 else "\n"
        after = s[m.end()] if m.end() < len(s) else "\n"
        if not (m.group("pre") or m.group("post")):
            return " " if before.isalnum() and after.isalnum() else ""
        if before in "\n\r" or after in ".,;:!?)]}\n\r":
            return ""
        return " "

    return pat.sub(repl, text)


@settings(deadline=None, max_examples=examples(400))
@given(st.lists(st.sampled_from(["<bbox>", "</bbox>", "< BBOX >", "</ bbox>", "[1, 2, 3, 4]", " ", "\t", "\n", "x", ".", "<"]), max_size=16).map("".join))
def test_strip_bboxes_matches_the_regex_definition(text):
    import re

    assert strip_bboxes(text, keep_tags=False) == _strip_bboxes_regex(text)
    # default (the paper's reading): only the content goes, the tags as written stay
    keep = re.compile(r"(<\s*bbox\s*>).*?(<\s*/\s*bbox\s*>)", re.IGNORECASE | re.DOTALL)
    assert strip_bboxes(text) == keep.sub(r"\1\2", text)


def test_loose_au_tag_check_still_reports_spaced_tags():
    assert any("malformed AU tag" in p for p in validate_teacher_tags("<  AU 12 >", []))
    assert validate_teacher_tags("<" + " " * 200_000, []) == []


def test_text_subclasses_are_read_through_the_base_class():
    good = "<think>x</think><answer>happy</answer>"

    class Hostile(str):
        def __str__(self):
            raise RuntimeError("no")

        def __getitem__(self, i):
            raise RuntimeError("no")

    class HostileBytes(bytes):
        def __bytes__(self):
            raise RuntimeError("no")

        def decode(self, *a):
            raise RuntimeError("no")

    class Pretender:
        __class__ = property(lambda self: str)

    assert parse_trace(Hostile(good)).well_formed and type(parse_trace(Hostile(good)).text) is str
    assert parse_trace(HostileBytes(good.encode())).label == "happiness"
    assert parse_trace(Pretender()).violations == ("not_text",)
