"""The one definition of a box tag (tagfer.traces.boxtags): pattern, automaton, served-reply limit, decode-time regex."""

from __future__ import annotations

import re
import sys
import types

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tiers import examples

from tagfer.traces import boxtags as B
from tagfer.traces.trace import parse_trace

# pieces that spell box tags in every way the parser reads them, plus ordinary text
PIECES = ["<", ">", "/", " ", "\t", "\u3000", "\xa0", "b", "B", "o", "O", "x", "X", "bbox", "BBox", "<bbox>", "</bbox>",
          "< bbox >", "<BBOX>", "</ BBOX>", "[1, 2, 30, 40]", "<think>", "</think>", "<answer>", "fear", "</answer>", " so", "."]
texts = st.lists(st.sampled_from(PIECES), max_size=40).map("".join)


def _processor_allows(pieces: list[str], max_boxes: int) -> bool:
    """The rule of BoxLimitProcessor applied piece by piece: no stem once max_boxes openings are done."""
    state = count = 0
    for piece in pieces:
        state, opened, m = B.advance(state, piece)
        if m >= 0 and count + m >= max_boxes:
            return False
        count += opened
    return True


def test_whitespace_is_exactly_python_s():
    every = "".join(c for c in map(chr, range(sys.maxunicode + 1)) if re.match(r"\s", c))
    assert B.WHITESPACE == every and all(c.isspace() for c in every)


@settings(max_examples=examples(400), deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=40), st.randoms(use_true_random=False))
def test_automaton_counts_openings_as_the_pattern_on_any_split(pieces, rnd):
    text = "".join(pieces)
    cuts = sorted(rnd.sample(range(len(text) + 1), min(len(text) + 1, 6)))
    parts = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    state = total = 0
    for part in parts:
        state, opened, _ = B.advance(state, part)
        total += opened
    assert total == B.count_box_openings(text) == sum(1 for m in B.TAG.finditer(text) if not m.group(1) and m.group(2).lower() == "bbox")
    assert state == B.advance(0, text)[0]


@settings(max_examples=examples(400), deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=40), st.integers(0, 4))
def test_regex_is_the_language_of_the_processor(pieces, k):
    text = "".join(pieces)
    allowed = _processor_allows(list(text), k)  # character by character: the finest split
    assert allowed == _processor_allows(pieces, k)  # ... and the same on coarser ones
    assert allowed == bool(re.fullmatch(B.box_limit_regex(k), text))


def test_regex_accepts_three_box_traces_and_refuses_a_fourth():
    rx = re.compile(B.box_limit_regex(3))
    three = "<think>calm " + " ".join(f"r{i} <bbox>[{i}, 0, 50, 50]</bbox>" for i in range(3)) + " so.</think><answer>fear</answer>"
    assert rx.fullmatch(three) and rx.fullmatch("") and rx.fullmatch("<think>no boxes</think><answer>fear</answer>")
    for fourth in ("<bbox>", "< bbox >", "<BBOX>", "<\u3000Bbox", "<bbox"):
        assert not rx.fullmatch(three.replace(" so.", f" {fourth}[1, 1, 9, 9]</bbox> so.")), fourth
    assert rx.fullmatch(three.replace(" so.", " <bboa> and <bbo so."))  # not stems
    with pytest.raises(ValueError):
        B.box_limit_regex(-1)


@settings(max_examples=examples(400), deadline=None)
@given(texts, st.integers(0, 3))
@example(text="<bbox><answer></ BBOX></answer>", k=0)  # found by make test-stress: the parser hid the answer in the box
@example(text="</bbox<bbox>>", k=0)  # found by make test-stress: the deletion joined "</bbox" and ">" into a new tag
@example(text="<bbox><bbox></bbox><answer></bbox></answer>", k=0)  # the answer hidden two boxes deep
@example(text="<bbox><bbox><bbox></bbox></bbox><answer></bbox></answer>", k=1)  # ... inside the kept box
def test_limit_boxes_keeps_everything_but_the_extra_box_elements(text, k):
    out, info = B.limit_boxes(text, k)
    n = B.count_box_openings(text)
    if n <= k:
        assert out == text and info is None
        return
    assert info["mode"] == "repaired" and info["boxes"] == n and info["max_boxes"] == k
    assert B.count_box_openings(out) == k and B.limit_boxes(out, k) == (out, None)
    removed = info["spans"]
    assert info["removed"] == len(removed) == n - k and all(B.BOX_TAG.match(text, s) for s, _ in removed)
    # every tag outside the removed elements survives, in order: think/answer structure is never touched
    kept = [m.group(0) for m in B.TAG.finditer(text) if not any(s <= m.start() < e for s, e in removed)]
    assert [m.group(0) for m in B.TAG.finditer(out)] == kept
    before = parse_trace(text).answers
    # an answer that holds a box loses that box, nothing else; an answer the parser lost inside an
    # unclosed box (its opening removed here) comes back, as the decode-time limit would have left it
    if not any(B.count_box_openings(a) for a in before) and not _answer_inside_unclosed_box(text, removed):
        assert parse_trace(out).answers == before


def _answer_inside_unclosed_box(text: str, removed) -> bool:
    """Whether an ``<answer>`` opens while the parser has a box open (box depth counted from the
    start) after a removed lone box opening: the parser drops that answer with the box, and
    removing the opening changes which box closing ends which element."""
    lone = [s for s, e in removed if B.BOX_TAG.fullmatch(text, s, e)]
    if not lone:
        return False
    depth = 0
    for m in B.TAG.finditer(text):
        name = m.group(2).lower()
        if name == "bbox":
            depth = max(0, depth + (-1 if m.group(1) else 1))
        elif name == "answer" and not m.group(1) and depth and m.start() > lone[0]:
            return True
    return False


def test_limit_boxes_removes_elements_and_unclosed_openings():
    four = "<think>a <bbox>[1, 1, 5, 5]</bbox> b <bbox>[2, 2, 6, 6]</bbox>, c <BBOX >[3, 3, 7, 7]</bbox>.</think><answer>fear</answer>"
    out, info = B.limit_boxes(four, 1)
    assert out == "<think>a <bbox>[1, 1, 5, 5]</bbox> b, c.</think><answer>fear</answer>" and info["boxes"] == 3
    unclosed = "<think>x <bbox>[1, 1, 5, 5]</bbox> y <bbox>[2, 2 </think><answer>fear</answer>"
    out, _ = B.limit_boxes(unclosed, 1)
    assert out == "<think>x <bbox>[1, 1, 5, 5]</bbox> y [2, 2 </think><answer>fear</answer>"  # the answer is never swallowed
    assert B.limit_boxes(None, 3) == (None, None) and B.limit_boxes(four, None) == (four, None)
    many = "<think>look" + " x <bbox>[1, 1, 5, 5]</bbox>" * 100 + "</think><answer>fear</answer>"
    out, info = B.limit_boxes(many, 3)
    assert info["removed"] == 97 and len(info["spans"]) == B.MAX_LISTED_SPANS and parse_trace(out).well_formed


def test_vllm_request_fields_and_sampling_arguments():
    rx = B.box_limit_regex(3)
    assert B.vllm_extra_body(3) == {"structured_outputs": {"regex": rx}}
    assert B.vllm_extra_body(3, "guided_regex") == {"guided_regex": rx}
    with pytest.raises(ValueError):
        B.vllm_extra_body(3, "json")

    class Params:
        def __init__(self, regex):
            self.regex = regex

    new = types.SimpleNamespace(sampling_params=types.SimpleNamespace(StructuredOutputsParams=Params, GuidedDecodingParams=None))
    kw = B.vllm_sampling_kwargs(new, 3)
    assert list(kw) == ["structured_outputs"] and kw["structured_outputs"].regex == rx
    old = types.SimpleNamespace(sampling_params=types.SimpleNamespace(GuidedDecodingParams=Params))
    assert B.vllm_sampling_kwargs(old, 2)["guided_decoding"].regex == B.box_limit_regex(2)
    with pytest.raises(RuntimeError):
        B.vllm_sampling_kwargs(types.SimpleNamespace(), 3)


def test_a_removal_that_would_join_a_new_opening_is_still_held_to_the_limit():
    for text, k in (("<bbox<bbox>>", 0), ("a <bbox>[1, 1, 5, 5]</bbox> <bbox<bbox>[2, 2, 6, 6]</bbox>> b", 1), ("<bbox" * 50 + ">" * 50, 0)):
        out, info = B.limit_boxes(text, k)
        assert B.count_box_openings(out) <= k and info["mode"] == "repaired", (text, out)


@settings(max_examples=examples(400), deadline=None)
@given(texts, st.data())
def test_remove_spans_never_makes_a_tag(text, data):
    """Whatever spans are deleted, the tags of the output are exactly the source's tags that lay wholly
    outside them, in order: a join never completes a new one (``</bbox`` + ``>``, ``</`` + ``think>``)."""
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(text)), max_size=8))))
    spans = [(a, b) for a, b in zip(cuts[::2], cuts[1::2]) if a < b]
    out = B.remove_spans(text, spans)
    kept = [m.group(0) for m in B.TAG.finditer(text) if not any(s < m.end() and m.start() < e for s, e in spans)]
    assert [m.group(0) for m in B.TAG.finditer(out)] == kept


@pytest.mark.parametrize("text,span,want", [
    ("</bbox<bbox>>", (6, 12), "</bbox"),
    ("</<bbox>think>", (2, 8), "</think"),
    ("<bbox <bbox> >", (6, 12), "<bbox "),
    ("<<<<BBOX><think><bbox>>", (1, 17), "<bbox"),  # make test-stress: each further ">" would complete it again
    ("</<bbox>think> \t> >x", (2, 8), "</think \t x"),
    ("a <bbox>[1, 2, 3, 4]</bbox> b", (2, 27), "a b"),
])
def test_remove_spans_breaks_joined_tags(text, span, want):
    assert B.remove_spans(text, [span]) == want
