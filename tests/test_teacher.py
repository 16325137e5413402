"""Teacher prompt rendering and Stage III validation (tagfer.data.teacher)."""

from __future__ import annotations

import json
from itertools import combinations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures_text import unicode_tag_soup
from tiers import examples
from tagfer.core.labels import LABELS, find_labels
from tagfer.data.teacher import TEACHER_PROMPTS, TeacherPrompts, build_completion, check_quality, check_trace, extract_json, format_labels, global_part
from tagfer.models.prompts import load_prompt
from tagfer.traces.trace import parse_trace

ITEMS = [(12, 0.91, (191, 300, 330, 420)), (6, 0.72, (80, 200, 430, 300)), (25, 0.55, (200, 380, 320, 450))]
COT = (
    "Overall the face is relaxed, symmetric and bright, with an open gaze. "
    "The mouth corners are drawn up and back: <AU12> [191, 300, 330, 420] the corners lift clearly. "
    "Around the eyes the cheeks push up: <AU6> [80, 200, 430, 300] crow's feet appear. "
    "Both signs together point to a genuine expression."
)


def reply(cot=COT, answer="happiness", **extra):
    return json.dumps({"CoT": cot, "Answer": answer, **extra})


def test_templates_name_no_label():
    for name in TEACHER_PROMPTS:
        assert find_labels(load_prompt(name)) == [], name


def test_prompt_labels_only_in_candidate_list():
    p = TeacherPrompts()
    assert find_labels(p.quality_prompt()) == []
    full = p.trace_prompt(ITEMS)
    assert find_labels(full) == list(LABELS)
    assert "AU12 0.91 [191, 300, 330, 420]" in full and "$" not in full
    for k in (1, 2, 5):
        for cands in list(combinations(LABELS, k))[:5]:
            t = p.trace_prompt(ITEMS, cands)
            assert find_labels(t) == list(cands)  # canonical order, nothing else
            assert "remaining candidates" in t
    noau = p.trace_prompt("", ["fear", "anger"])
    assert find_labels(noau) == ["anger", "fear"] and "<AU" not in noau
    with pytest.raises(ValueError):
        p.trace_prompt(ITEMS, [])


def test_prompt_override(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("AUs:\n$au_list\nPick from $labels (max $max_regions).")
    p = TeacherPrompts(trace=f, max_regions=2)
    assert p.trace_prompt(ITEMS[:1]) == "AUs:\nAU12 0.91 [191, 300, 330, 420]\nPick from " + ", ".join(LABELS) + " (max 2)."


def test_format_labels():
    assert format_labels(["sadness", "anger"]) == "anger, sadness"
    with pytest.raises(ValueError):
        format_labels(["contempt"])


def test_extract_json_variants():
    obj = {"CoT": "a {b} \"c\"", "Answer": "fear"}
    s = json.dumps(obj)
    assert extract_json(s, ("cot", "answer")) == obj
    assert extract_json(f"```json\n{s}\n```", ("cot", "answer")) == obj
    assert extract_json(f"Here you go: {s} hope it helps {{", ("cot", "answer")) == obj
    assert extract_json('{"x": 1} then ' + s, ("cot", "answer")) == obj
    assert extract_json("{not json}", ("cot",)) is None
    assert extract_json("no braces", ()) is None
    assert extract_json(None, ()) is None  # type: ignore[arg-type]


@given(st.dictionaries(st.text(min_size=1, max_size=8), st.one_of(st.text(max_size=30), st.integers(), st.booleans()), max_size=4), st.text(max_size=20), st.text(max_size=20))
@settings(max_examples=examples(200), deadline=None)
def test_extract_json_property(obj, pre, post):
    obj = {**obj, "Answer": "x"}
    text = pre.replace("{", "(") + json.dumps(obj) + post
    got = extract_json(text, ("answer",))
    assert got is not None and got["Answer"] == "x"


@given(st.text(max_size=300))
@settings(max_examples=examples(300), deadline=None)
def test_check_trace_total(text):
    r = check_trace(text, ITEMS)
    assert r.ok is False or (r.completion and parse_trace(r.completion).well_formed)


def test_quality_verdicts():
    assert check_quality('{"suitable_for_training": true, "reason": "clear"}').suitable is True
    v = check_quality('```json\n{"suitable_for_training": false, "reason": "dark"}\n```')
    assert v.suitable is False and v.reason == "dark"
    assert check_quality('{"suitable_for_training": "TRUE", "reason": ""}').suitable is True
    for bad in ("yes", '{"suitable_for_training": "maybe"}', '{"suitable_for_training": 1}', '{"reason": "x"}', ""):
        v = check_quality(bad)
        assert v.suitable is None and not v.valid and v.problems


def test_good_trace_converts():
    r = check_trace(reply(answer="Happy."), ITEMS)
    assert r.ok, r.problems
    assert r.label == "happiness" and r.aus_used == [12, 6]
    p = parse_trace(r.completion)
    assert p.well_formed and p.label == "happiness"
    assert p.box_coords == ((191, 300, 330, 420), (80, 200, 430, 300))
    assert "AU12 <bbox>[191, 300, 330, 420]</bbox>" in r.completion
    assert r.completion == build_completion(COT, "happiness")


@pytest.mark.parametrize(
    "cot,answer,needle",
    [
        (COT.replace("<AU12>", "<AU17>"), "happiness", "AU17 is not in the AU list"),
        (COT.replace("330, 420", "331, 420"), "happiness", "differs from the AU list box"),
        (COT.replace("<AU6> [80, 200, 430, 300]", "<AU12> [191, 300, 330, 420]"), "happiness", "more than once"),
        (COT + " <AU25> [200, 380, 320, 450] and <AU6> [80, 200, 430, 300]", "happiness", "tagged more than once"),
        (COT.replace("<AU12>", "<AU 12>"), "happiness", "malformed AU tag"),
        ("<AU12> [191, 300, 330, 420] straight to the point.", "happiness", "global analysis"),
        (COT + " <think>", "happiness", "output tag"),
        (COT, "happy or sad", "not one label"),
        (COT, "contempt", "excluded class"),
        (COT, "", "not one label"),
    ],
)
def test_bad_traces(cot, answer, needle):
    r = check_trace(reply(cot, answer), ITEMS)
    assert not r.ok and r.completion is None
    assert any(needle in p for p in r.problems), r.problems


def test_zero_tags_allowed_by_default_min_tags_is_a_setting():
    """App. D.3: the teacher may select zero AUs; a minimum is an option, not the default."""
    cot = "Overall the face is relaxed and bright. The mouth corners lift and the cheeks rise; none of the listed units is needed."
    r = check_trace(reply(cot, "happiness"), ITEMS)
    assert r.ok and r.aus_used == [] and parse_trace(r.completion).boxes == ()
    r = check_trace(reply(cot, "happiness"), ITEMS, min_tags=1)
    assert not r.ok and any("at least 1 required" in p for p in r.problems)
    assert check_trace(reply(COT, "happiness"), ITEMS, min_tags=2).ok


@pytest.mark.parametrize(
    "extra",
    [
        " The detector gives AU12 0.91, so this is clear.",
        " AU12 (91%) dominates.",
        " Its confidence of .72 supports it.",
        " With a score of 0.4 the lips part.",
        " The cheek raiser is at 0.72 here.",  # a listed confidence quoted without naming the AU
        " AU6 has intensity 3.5.",
    ],
)
def test_traces_stating_au_values_are_rejected(extra):
    r = check_trace(reply(COT + extra, "happiness"), ITEMS)
    assert not r.ok and any("AU confidences are not evidence" in p for p in r.problems), r.problems


def test_numbers_that_are_not_au_values_pass():
    cot = COT + " Both corners rise by about 2 mm and the gaze holds for 1.5 s."  # not listed, no AU or score nearby
    assert check_trace(reply(cot, "happiness"), ITEMS).ok


def test_trace_prompt_states_every_constraint_of_the_paper():
    """App. D.3, in our words: global part without AUs, regions from visual impression, AU values never evidence
    and no numbers about AUs, tags only as zoom markers named after observation, zero AUs allowed."""
    p = TeacherPrompts()
    for text in (p.trace_prompt(ITEMS), p.trace_prompt(ITEMS, ["anger", "fear"])):
        low = " ".join(text.lower().split())
        assert "do not mention any action unit in this part" in low
        assert "from your own visual impression" in low and "not from the list or its confidences" in low
        assert "it is not evidence" in low and "never be a reason" in low
        assert "must not state any number about an action unit" in low
        assert "only marks where to look" in low and "only after describing what you saw" in low
        assert "you may tag zero action units" in low
    noau = " ".join(p.trace_prompt("", LABELS).lower().split())
    assert "from your own visual impression" in noau and "do not mention any action unit in this part" in noau


def test_too_many_regions_and_candidates():
    four = [(1, 0.9, (10, 10, 50, 50)), (2, 0.8, (60, 10, 100, 50)), (4, 0.7, (110, 10, 150, 50)), (5, 0.6, (160, 10, 200, 50))]
    cot = "A calm overall look at the face. " + " ".join(f"<AU{a}> [{b[0]}, {b[1]}, {b[2]}, {b[3]}] seen." for a, _, b in four)
    r = check_trace(reply(cot, "fear"), four)
    assert not r.ok and any("at most 3" in p for p in r.problems)
    r = check_trace(reply(answer="happiness"), ITEMS, ["anger", "fear"])
    assert not r.ok and r.label == "happiness" and any("not among the candidates" in p for p in r.problems)


def test_noau_traces():
    r = check_trace(reply("The whole face is calm; brows level; mouth closed.", "neutral"), [])
    assert r.ok and r.aus_used == [] and parse_trace(r.completion).boxes == ()
    r = check_trace(reply(COT, "happiness"), [])
    assert not r.ok and any("not allowed" in p for p in r.problems)


def test_malformed_json_and_types():
    assert not check_trace("{'CoT': 'single quotes'}", ITEMS).ok
    assert check_trace('{"CoT": 5, "Answer": "fear"}', ITEMS).problems[0].startswith("CoT is not")
    assert not check_trace('{"CoT": "x", "Answer": 3}', ITEMS).ok
    assert check_trace(json.dumps({"cot": COT, "answer": "happiness"}), ITEMS).ok  # keys are case-insensitive


_WORDS = st.text(alphabet=st.sampled_from("abcdefghijklmnopqrstuvwxyz ,.'"), min_size=0, max_size=40)


@given(st.lists(st.sampled_from(range(3)), min_size=1, max_size=3, unique=True), st.lists(_WORDS, min_size=4, max_size=4),
       st.sampled_from(LABELS), st.integers(0, 3), st.integers(-3, 3))
@settings(max_examples=examples(300), deadline=None)
def test_check_trace_property(order, words, label, coord, delta):
    """Any trace whose tags copy list entries verbatim is accepted; changing one coordinate always rejects it."""
    cot = "Overall the face shows a clear pattern " + words[0]
    for k, idx in enumerate(order):
        a, _, b = ITEMS[idx]
        cot += f" region {words[k + 1]} <AU{a}> [{b[0]}, {b[1]}, {b[2]}, {b[3]}] seen."
    r = check_trace(reply(cot, label), ITEMS)
    assert r.ok, r.problems
    assert r.aus_used == [ITEMS[i][0] for i in order] and r.label == label
    p = parse_trace(r.completion)
    assert p.well_formed and p.box_coords == tuple(ITEMS[i][2] for i in order)
    if delta:
        a, _, b = ITEMS[order[0]]
        bad = list(b)
        bad[coord] += delta
        altered = cot.replace(f"<AU{a}> [{b[0]}, {b[1]}, {b[2]}, {b[3]}]", f"<AU{a}> [{bad[0]}, {bad[1]}, {bad[2]}, {bad[3]}]")
        assert not check_trace(reply(altered, label), ITEMS).ok


# --------------------------------------------------------------------------- one JSON extractor (teacher and judge)
_json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8), lambda c: st.lists(c, max_size=3), max_leaves=6)


@settings(max_examples=examples(150), deadline=None)
@given(obj=st.dictionaries(st.text(max_size=6).filter(lambda k: k.lower() != "decoy"), _json_values, min_size=1, max_size=4),
       before=st.text(max_size=20).filter(lambda t: "{" not in t and "`" not in t),
       after=st.text(max_size=20).filter(lambda t: "`" not in t),
       tag=st.sampled_from(["", "json", "JSON", "jsonc", "javascript"]))
def test_json_objects_finds_a_fenced_object_before_loose_ones(obj, before, after, tag):
    from tagfer.data.teacher import json_objects
    from tagfer.evaluation import judge

    loose = {"decoy": True}
    text = f"{before}{json.dumps(loose)} ```{tag}\n{json.dumps(obj)}\n``` {after}"
    found = list(json_objects(text))
    assert found[0] == obj and loose in found  # fenced first, then the loose text
    assert extract_json(text, ["decoy"]) == loose
    # the judge reads replies with the same extractor (one fence rule for both)
    reply = {"A": dict.fromkeys(judge.CRITERIA, 4), "B": dict.fromkeys(judge.CRITERIA, 2), "overall": "A", "reason": "x"}
    parsed = judge.parse_judgment(f"{before}```{tag}\n{json.dumps(reply)}\n```{after}")
    assert parsed["overall"] == "A"


@pytest.mark.parametrize("tag", ["<th\u0131nk>", "</an\u017fwer>", "<THIN\u212a>", "\uff1c\uff42\uff42\uff4f\uff58\uff1e", "< /think >"])
def test_look_alike_output_tags_in_the_cot_are_a_format_problem(tag):
    # build re-asks on format problems; the parser used to raise KeyError here (-> "internal")
    r = check_trace(reply(COT + " " + tag + "x", "happiness"), ITEMS)
    assert not r.ok and any("output tag" in p for p in r.problems), r.problems


@settings(max_examples=examples(150), deadline=None)
@given(unicode_tag_soup(), st.sampled_from(LABELS))
def test_check_trace_never_raises_on_unicode_in_and_around_tags(cot, label):
    r = check_trace(reply(COT + cot, label), ITEMS)
    assert r.ok == (not r.problems) and (r.completion is None or r.parsed.well_formed)
    r = check_trace(cot, ITEMS)  # the raw text as a reply
    assert isinstance(r.problems, list)


@pytest.mark.parametrize(
    "cot",
    [
        "AU12 AU6 AU25 are visible on this face. " + COT,  # the global part lists AUs
        COT.replace("with an open gaze.", "with an open gaze and AU6 at the eyes."),
        "The face, AU 12 and all, looks bright.\n" + COT,
        "Broad smile with AU12 throughout.",  # no tag at all: the whole CoT is the global part
    ],
)
def test_a_global_part_that_names_aus_is_rejected(cot):
    """App. D.3/F: the global analysis comes without AUs; a reply naming them there is asked again."""
    r = check_trace(reply(cot, "happiness"), ITEMS)
    assert not r.ok and r.completion is None
    assert any("the global analysis names AU" in p for p in r.problems), r.problems


def test_global_part_ends_before_the_sentence_of_the_first_tag():
    assert global_part(COT) == "Overall the face is relaxed, symmetric and bright, with an open gaze."
    assert global_part("Broad smile.\nMouth: AU12 <AU12> [1, 2, 3, 4] up.") == "Broad smile.\n"  # "AU12" belongs to the region
    assert check_trace(reply("Broad smile overall, eyes bright. Mouth: AU12, the lip corner puller <AU12> [191, 300, 330, 420] lifts."), ITEMS).ok
    assert global_part("no tags here AU4") == "no tags here AU4" and global_part("<AU4> [1, 2, 3, 4]") == ""


@pytest.mark.parametrize(
    "extra",
    [" The lips also part, which is AU27.", " AU4 is absent.", " Compare <AU12> with AU 17."],
)
def test_a_reply_naming_an_au_not_in_the_list_is_rejected(extra):
    """App. D.3: no new AUs, in a tag or in plain text."""
    r = check_trace(reply(COT + extra, "happiness"), ITEMS)
    assert not r.ok and any("not in the AU list (no new AUs)" in p for p in r.problems), r.problems
    assert check_trace(reply(COT + " AU25 plays no part here.", "happiness"), ITEMS).ok  # AU25 is listed
    r = check_trace(reply("The whole face is calm; AU4 is absent.", "neutral"), [])
    assert not r.ok and any("no AU may be named without an AU list" in p for p in r.problems)


def test_our_rules_beyond_the_paper_are_switchable():
    """At most N tags and no AU tagged twice are ours (docs/data.md): each can be turned off."""
    twice = COT + " Once more the corners: <AU12> [191, 300, 330, 420] still up."
    assert not check_trace(reply(twice, "happiness"), ITEMS).ok
    r = check_trace(reply(twice, "happiness"), ITEMS, unique_tags=False)
    assert r.ok, r.problems
    four = [(1, 0.9, (10, 10, 50, 50)), (2, 0.8, (60, 10, 100, 50)), (4, 0.7, (110, 10, 150, 50)), (5, 0.6, (160, 10, 200, 50))]
    cot = "A calm overall look at the face. " + " ".join(f"<AU{a}> [{b[0]}, {b[1]}, {b[2]}, {b[3]}] seen." for a, _, b in four)
    assert not check_trace(reply(cot, "fear"), four).ok
    r = check_trace(reply(cot, "fear"), four, max_regions=None)
    assert r.ok and len(parse_trace(r.completion, max_boxes=4).boxes) == 4
