"""Tests for tagfer.traces.rewards: Eq. 3–5, edge cases, hacking attempts, batched == single."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tagfer.core.canvas import iou, iou_matrix
from tagfer.core.labels import LABELS
from tagfer.traces.rewards import (
    RewardBreakdown,
    RewardConfig,
    as_box_array,
    r_ans,
    r_au,
    r_au_batch,
    r_au_f1,
    r_fmt,
    reward_breakdown,
    score_batch,
    score_group,
    total_reward,
)
from tagfer.traces.trace import format_box, parse_trace

relaxed = settings(deadline=None)

CHIN = (93, 306, 445, 417)  # AU17 in the paper's example
CORNER = (191, 417, 328, 511)  # AU14
EYES = (80, 323, 416, 407)
BROW = (235, 119, 345, 188)
STRICT = RewardConfig(format_rules="strict")


def trace(*boxes, answer: str = "disgust", pre: str = "", post: str = "") -> str:
    steps = " ".join(f"Region {i} looks tense <bbox>{format_box(b)}</bbox>." for i, b in enumerate(boxes))
    return f"{pre}<think>Overall the face is strained. {steps} So the mood is clear.</think>\n<answer>{answer}</answer>{post}"


# ----------------------------------------------------------------------------------------
# Strategies
# ----------------------------------------------------------------------------------------


@st.composite
def boxes(draw: st.DrawFn, lo: int = 0, hi: int = 511) -> tuple[int, int, int, int]:
    x1 = draw(st.integers(lo, hi - 1))
    y1 = draw(st.integers(lo, hi - 1))
    x2 = draw(st.integers(x1 + 1, hi))
    y2 = draw(st.integers(y1 + 1, hi))
    return (x1, y1, x2, y2)


BOX_LISTS = st.lists(boxes(), min_size=1, max_size=6)
PRED_LISTS = st.lists(boxes(), min_size=0, max_size=6)
MATCHINGS = st.sampled_from(["paper", "one_to_one"])


def best_ious(pred, au) -> list[float]:
    return iou_matrix(pred, au).max(axis=1).tolist()


# ----------------------------------------------------------------------------------------
# R_AU, Eq. 3–4
# ----------------------------------------------------------------------------------------


def test_paper_worked_example_k3_n2_mean_of_best_two():
    au_boxes = [CHIN, CORNER]
    pred = [(90, 300, 440, 420), (200, 410, 330, 505), BROW]  # near chin, near corner, far away
    per_box = [max(iou(p, a) for a in au_boxes) for p in pred]
    expected = sum(sorted(per_box, reverse=True)[:2]) / 2
    assert r_au(pred, au_boxes) == pytest.approx(expected)
    assert per_box[2] == 0.0  # the third box cannot pull the score down when k > n
    assert r_au(pred, au_boxes) == pytest.approx(r_au(pred[:2], au_boxes))


def test_r_au_from_the_paper_trace_text():
    text = trace(CHIN, CORNER)
    assert r_au(text, [CHIN, CORNER]) == 1.0
    assert r_au(parse_trace(text), [CHIN, CORNER, EYES]) == 1.0  # k=2 < n=3: mean over 2


def test_r_au_skipped_and_zero():
    assert r_au([CHIN], []) is None
    assert r_au([CHIN], None) is None
    assert r_au([], [CHIN]) == 0.0
    assert r_au(trace(), [CHIN]) == 0.0  # a trace without boxes
    assert r_au("garbage", [CHIN]) == 0.0


def test_r_au_k_less_than_n_averages_over_k():
    assert r_au([CHIN], [CHIN, CORNER, EYES]) == 1.0


def test_r_au_rejects_bad_matching_and_bad_truth():
    with pytest.raises(ValueError):
        r_au([CHIN], [CHIN], matching="greedy")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        r_au([CHIN], [[1, 2, 3]])


def test_out_of_canvas_boxes_are_clipped():
    # [-50, 306, 600, 417] clips to [0, 306, 511, 417]
    assert r_au([(-50, 306, 600, 417)], [(0, 306, 511, 417)]) == 1.0
    assert r_au([(600, 600, 700, 700)], [(400, 400, 511, 511)]) == 0.0  # clips to an empty box


def test_reversed_or_unreadable_boxes_score_zero_but_count_in_k():
    assert r_au([(445, 417, 93, 306)], [CHIN]) == 0.0
    # k=2 (one good, one reversed), n=2 → (1 + 0) / 2
    assert r_au([CHIN, (445, 417, 93, 306)], [CHIN, CORNER]) == 0.5
    assert r_au([CHIN, None], [CHIN, CORNER]) == 0.5
    text = trace(CHIN).replace("</think>", "<bbox>left eye</bbox></think>")
    assert r_au(text, [CHIN, CORNER]) == 0.5


@relaxed
@given(PRED_LISTS, BOX_LISTS, MATCHINGS)
def test_r_au_in_unit_interval(pred, au, matching):
    v = r_au(pred, au, matching)
    assert v is not None and 0.0 <= v <= 1.0


@relaxed
@given(PRED_LISTS, BOX_LISTS, st.randoms(use_true_random=False))
def test_r_au_invariant_to_permutations(pred, au, rnd):
    p2, a2 = list(pred), list(au)
    rnd.shuffle(p2)
    rnd.shuffle(a2)
    assert r_au(p2, a2) == r_au(pred, au)  # exact for paper matching
    assert r_au(p2, a2, "one_to_one") == pytest.approx(r_au(pred, au, "one_to_one"), abs=1e-12)


@relaxed
@given(st.lists(boxes(), min_size=1, max_size=5), BOX_LISTS, st.data())
def test_r_au_monotone_when_a_box_moves_towards_its_best_au_box(pred, au, data):
    i = data.draw(st.integers(0, len(pred) - 1))
    j = int(np.argmax(iou_matrix([pred[i]], au)[0]))
    t = data.draw(st.floats(0.0, 1.0))
    moved = tuple(int(round(p + t * (a - p))) for p, a in zip(pred[i], au[j]))
    assume(moved[0] < moved[2] and moved[1] < moved[3])
    assume(max(best_ious([moved], au)) >= max(best_ious([pred[i]], au)))
    new = list(pred)
    new[i] = moved
    assert r_au(new, au) >= r_au(pred, au) - 1e-12


@pytest.mark.slow
@relaxed
@given(BOX_LISTS, BOX_LISTS, boxes())
def test_r_au_adding_a_weak_box_changes_nothing_when_k_ge_n(pred, au, extra):
    assume(len(pred) >= len(au))
    top = sorted(best_ious(pred, au), reverse=True)[: len(au)]
    assume(max(best_ious([extra], au)) <= top[-1])
    assert r_au(pred + [extra], au) == pytest.approx(r_au(pred, au), abs=1e-12)


@relaxed
@given(PRED_LISTS, BOX_LISTS)
def test_one_to_one_never_above_paper_and_equal_without_shared_best(pred, au):
    paper, one = r_au(pred, au, "paper"), r_au(pred, au, "one_to_one")
    assert one <= paper + 1e-12
    if pred:
        m = iou_matrix(pred, au)
        best = m.argmax(axis=1)
        if len(set(best.tolist())) == len(pred):
            assert one == pytest.approx(paper, abs=1e-12)


def test_one_to_one_uses_an_optimal_assignment():
    # box A overlaps both AU boxes, box B only the first: greedy-by-box would give A→0, B→0 clash.
    au = [(0, 0, 100, 100), (100, 0, 200, 100)]
    a = (50, 0, 150, 100)  # IoU 1/3 with both
    b = (0, 0, 100, 100)  # IoU 1 with the first
    assert r_au([a, b], au, "one_to_one") == pytest.approx((1 + 1 / 3) / 2)


# ----------------------------------------------------------------------------------------
# Reward hacking attempts
# ----------------------------------------------------------------------------------------


X, Y, Z = CHIN, BROW, (0, 0, 40, 40)


def test_n_counts_activated_aus_by_default_distinct_boxes_as_an_option():
    # AU4 and AU9 sharing one box (the paper's figure): X, X, Y are three activated AUs.
    shared = [X, X, Y]
    assert r_au([X, Y, Z], shared) == pytest.approx(2 / 3)  # n = 3 AUs: (1 + 1 + 0) / 3
    assert r_au([X, Y, Z], shared, au_count="boxes") == pytest.approx(1.0)  # n = 2 boxes: (1 + 1) / 2
    assert r_au([X, Y], shared) == r_au([X, Y], shared, au_count="boxes") == 1.0  # k <= n: same
    cfg = RewardConfig(au_count="boxes")
    assert reward_breakdown(trace(X, Y, Z), "disgust", shared).r_au == pytest.approx(2 / 3)
    assert reward_breakdown(trace(X, Y, Z), "disgust", shared, cfg).r_au == pytest.approx(1.0)
    assert r_au_batch([[X, Y, Z]] * 2, [shared, shared]) == [pytest.approx(2 / 3)] * 2
    assert r_au_batch([[X, Y, Z]] * 2, [shared, [X, Y]], au_count="boxes") == [1.0, 1.0]
    with pytest.raises(ValueError, match="au_count"):
        r_au([X], shared, au_count="regions")


def test_hack_whole_canvas_box():
    whole = (0, 0, 511, 511)
    assert r_au([whole], [CHIN, CORNER]) < 0.2
    assert r_au([whole], [CHIN, CORNER]) == pytest.approx(iou(whole, CHIN))


def test_hack_best_box_repeated_paper_rewards_it_one_to_one_does_not():
    au = [CHIN, BROW]
    honest = [CHIN, BROW]
    repeated = [CHIN, CHIN]
    assert r_au(honest, au) == r_au(honest, au, "one_to_one") == 1.0
    assert r_au(repeated, au) == 1.0  # the paper's Eq. 3–4 cannot tell
    assert r_au(repeated, au, "one_to_one") == 0.5


def test_hack_ten_copies_of_the_best_box():
    au = [CHIN, CORNER]
    text = trace(*([CHIN] * 10))
    p = parse_trace(text)
    assert "too_many_bboxes" in p.violations and r_fmt(text) == r_fmt(text, STRICT) == 0.0
    assert len(p.boxes) == 10
    assert r_au(text, au) == 1.0  # bounded, but paper matching is fooled
    one = r_au(text, au, "one_to_one")
    assert one <= r_au([CHIN], au, "one_to_one") + 1e-12  # no better than writing it once
    assert one == pytest.approx((1.0 + iou(CHIN, CORNER)) / 2)


def test_hack_boxes_outside_canvas_and_reversed():
    text = trace((-10, 306, 700, 417))
    assert "bbox_out_of_canvas" in parse_trace(text).violations and r_fmt(text, STRICT) == 0.0
    assert r_fmt(text) == 0.5  # the paper's three conditions say nothing about coordinates
    assert 0.0 < r_au(text, [CHIN]) <= 1.0  # clipped, still measured
    rev = trace((445, 417, 93, 306))
    assert "bbox_degenerate" in parse_trace(rev).violations
    assert r_au(rev, [CHIN]) == 0.0


@pytest.mark.parametrize(
    "text",
    [
        trace(CHIN, answer=""),
        trace(CHIN, answer="happiness or sadness"),
        trace(CHIN, answer="contempt"),
        f"<answer>disgust</answer>\n<think>tense <bbox>{format_box(CHIN)}</bbox></think>",
        f"<think>tense <think>nested</think></think><answer>disgust</answer>",
        "```\n" + trace(CHIN) + "\n```",
        "Here is my answer: " + trace(CHIN),
        trace(CHIN).replace("</answer>", ""),
    ],
)
def test_hack_malformed_outputs_get_no_format_bonus(text):
    assert r_fmt(text, STRICT) == 0.0


@pytest.mark.parametrize(
    "text, paper",
    [
        (trace(CHIN), 0.5),
        (trace(CHIN, answer=""), 0.0),  # no valid label
        (trace(CHIN, answer="happiness or sadness"), 0.0),
        (trace(CHIN, answer="contempt"), 0.0),
        (trace(CHIN, CHIN, CHIN, CHIN), 0.0),  # more than three boxes
        (trace(CHIN) + "<answer>anger</answer>", 0.0),  # two answer spans
        ("<think>a</think><think>b</think><answer>anger</answer>", 0.0),  # two think blocks
        (f"<bbox>{format_box(CHIN)}</bbox>" + trace(), 0.0),  # a box outside the think block
        ("```\n" + trace(CHIN) + "\n```", 0.5),  # text outside the blocks: strict only
        ("Here is my answer: " + trace(CHIN), 0.5),
        (trace(CHIN).replace("<think>", "<THINK>").replace("</think>", "</THINK>"), 0.5),  # tag case: strict only
        (trace((445, 417, 93, 306)), 0.5),  # reversed box: strict only
        (trace().replace("strained.", "strained. <bbox></bbox>"), 0.5),  # empty box of the no-bbox ablation
    ],
)
def test_r_fmt_paper_rules_check_the_three_conditions_strict_rules_everything(text, paper):
    assert r_fmt(text) == paper
    assert r_fmt(text, RewardConfig(format_rules="paper")) == paper
    strict = r_fmt(text, STRICT)
    assert strict <= paper
    assert strict == (0.5 if parse_trace(text).well_formed else 0.0)


def test_format_rules_is_validated():
    with pytest.raises(ValueError, match="format_rules"):
        RewardConfig(format_rules="loose")
    with pytest.raises(ValueError, match="au_count"):
        RewardConfig(au_count="regions")


def test_r_ans_hacks():
    assert r_ans(trace(CHIN, answer=""), "disgust") == 0.0
    assert r_ans(trace(CHIN, answer="disgust or anger"), "disgust") == 0.0
    assert r_ans(trace(CHIN) + "<answer>anger</answer>", "disgust") == 0.0  # two answer spans
    assert r_ans("no tags, just disgust", "disgust") == 0.0
    assert r_ans(trace(CHIN).replace("</answer>", ""), "disgust") == 0.0  # truncated


# ----------------------------------------------------------------------------------------
# R_ans, R_fmt, F1 variant, totals
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer, truth, expected",
    [
        ("Disgust.", "disgust", 1.0),
        ("disgusted", "Disgust", 1.0),
        ("happy", "happiness", 1.0),
        (" ANGRY ", "anger", 1.0),
        ("calm", "neutral", 1.0),
        ("sad", "happiness", 0.0),
        ("contempt", "neutral", 0.0),
    ],
)
def test_r_ans(answer, truth, expected):
    assert r_ans(trace(CHIN, answer=answer), truth) == expected


def test_r_ans_with_parsed_trace_and_invalid_truth():
    assert r_ans(parse_trace(trace(answer="fear")), "fear") == 1.0
    for bad in ("contempt", "bored", "", None, 3):
        with pytest.raises(ValueError):
            r_ans(trace(), bad)  # type: ignore[arg-type]


def test_r_fmt_value_is_configurable():
    assert r_fmt(trace(CHIN)) == 0.5
    assert r_fmt(trace(CHIN), RewardConfig(fmt_bonus=0.2)) == 0.2
    assert r_fmt(trace(CHIN, CHIN), RewardConfig(max_boxes=1)) == 0.0


def test_r_fmt_reparses_a_trace_parsed_with_other_settings():
    parsed = parse_trace(trace(CHIN, CHIN), max_boxes=1)
    assert not parsed.well_formed
    assert r_fmt(parsed) == 0.5  # re-parsed with the config's max_boxes=3


def test_r_au_f1():
    text = "<think>AU4 brows down, AU7 lids tight, AU23 lips pressed</think><answer>anger</answer>"
    assert r_au_f1(text, [4, 7, 17]) == pytest.approx(2 * 2 / (3 + 3))
    assert r_au_f1(text, ["AU4", "au7", "23"]) == 1.0
    assert r_au_f1(text, []) is None
    assert r_au_f1(text, None) is None
    assert r_au_f1("<think>nothing named</think><answer>anger</answer>", [4]) == 0.0
    with pytest.raises(ValueError):
        r_au_f1(text, ["brow"])


def test_breakdown_and_total():
    text = trace(CHIN, CORNER)
    b = reward_breakdown(text, "disgust", [CHIN, CORNER])
    assert b == RewardBreakdown(r_au=1.0, r_ans=1.0, r_fmt=0.5, total=2.5)
    assert total_reward(text, "disgust", [CHIN, CORNER]) == 2.5
    skipped = reward_breakdown(text, "disgust", [])
    assert skipped.r_au is None and skipped.total == 1.5
    rlvr = RewardConfig(w_au=0.0)
    assert reward_breakdown(text, "disgust", [CHIN], rlvr).total == 1.5
    assert reward_breakdown(text, "disgust", [CHIN], rlvr).r_au == 1.0  # still reported
    f1 = RewardConfig(au_reward="f1")
    b = reward_breakdown("<think>AU12 smile</think><answer>happy</answer>", "happiness", None, f1, aus=[12])
    assert b.r_au == 1.0 and b.total == 2.5
    assert b.as_dict() == {"r_au": 1.0, "r_ans": 1.0, "r_fmt": 0.5, "total": 2.5}


def test_reward_config_validation_and_replace():
    with pytest.raises(ValueError):
        RewardConfig(matching="greedy")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        RewardConfig(au_reward="giou")  # type: ignore[arg-type]
    for bad in ({"canvas": 0}, {"canvas": "512"}, {"max_boxes": -1}, {"fmt_bonus": float("nan")}, {"w_au": "1"}):
        with pytest.raises(ValueError):
            RewardConfig(**bad)
    cfg = RewardConfig().replace({"matching": "one_to_one"}, w_au=0.5)
    assert cfg.matching == "one_to_one" and cfg.w_au == 0.5
    with pytest.raises(ValueError, match="unknown"):
        RewardConfig().replace(wau=1)
    assert pickle.loads(pickle.dumps(cfg)) == cfg


def test_as_box_array_forms():
    assert as_box_array(None).shape == (0, 4)
    assert as_box_array([]).shape == (0, 4)
    assert as_box_array(np.zeros((0, 4))).shape == (0, 4)
    obj = np.array([np.array([1, 2, 3, 4]), np.array([5, 6, 7, 8])], dtype=object)
    assert as_box_array(obj).tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert as_box_array([(1, 2, 3, 4)]).tolist() == [[1, 2, 3, 4]]
    for bad in ([[1, 2, 3]], [[1, 2, 3, 4], [1, 2]], [["a", "b", "c", "d"]], [[]], np.zeros((2, 3))):
        with pytest.raises(ValueError):
            as_box_array(bad)


def test_truth_boxes_are_not_modified():
    truth = np.array([[-5.0, 0.0, 600.0, 100.0]])
    r_au([CHIN], truth)
    r_au_batch([[CHIN], [CHIN]], [truth, truth])
    assert truth.tolist() == [[-5.0, 0.0, 600.0, 100.0]]


# ----------------------------------------------------------------------------------------
# The batched path agrees with the single-rollout reference
# ----------------------------------------------------------------------------------------

ANSWER_FORMS = ["happy", "Disgust.", "anger", "", "happiness or sadness", "contempt", "calm"]


@st.composite
def rollouts(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["good", "good", "good", "many", "junk", "garbage"]))
    bxs = draw(st.lists(boxes(-20, 530), max_size=3 if kind != "many" else 6))
    answer = draw(st.sampled_from(ANSWER_FORMS))
    if kind == "garbage":
        return draw(st.text(max_size=40))
    text = trace(*bxs, answer=answer) if all(b[0] >= 0 for b in bxs) else trace(answer=answer) + "".join(
        f"<bbox>{format_box(b)}</bbox>" for b in bxs
    )
    if kind == "junk":
        text = text.replace("</think>", "<bbox>nose</bbox> AU12 AU6</think>")
    return text


@st.composite
def batches(draw: st.DrawFn):
    groups = []
    for _ in range(draw(st.integers(1, 4))):
        label = draw(st.sampled_from(LABELS))
        pool = draw(st.lists(boxes(), min_size=1, max_size=3))
        au = draw(st.lists(st.sampled_from(pool), max_size=4))  # repeated boxes: AUs sharing a region
        aus = draw(st.lists(st.integers(1, 30), max_size=4))
        texts = draw(st.lists(rollouts(), min_size=1, max_size=5))
        groups.append((texts, label, au, aus))
    return groups


@pytest.mark.slow
@relaxed
@given(batches(), MATCHINGS, st.sampled_from(["iou", "f1"]), st.sampled_from(["aus", "boxes"]), st.sampled_from(["paper", "strict"]))
def test_score_batch_and_score_group_equal_reward_breakdown(groups, matching, au_reward, au_count, format_rules):
    cfg = RewardConfig(matching=matching, au_reward=au_reward, au_count=au_count, format_rules=format_rules)
    texts = [t for g in groups for t in g[0]]
    labels = [g[1] for g in groups for _ in g[0]]
    au_boxes = [g[2] for g in groups for _ in g[0]]
    aus = [g[3] for g in groups for _ in g[0]]
    expected = [reward_breakdown(t, lab, a, cfg, u) for t, lab, a, u in zip(texts, labels, au_boxes, aus)]
    assert score_batch(texts, labels, au_boxes, cfg, aus) == expected
    grouped = [b for texts_, label, au, u in groups for b in score_group(texts_, label, au, cfg, u)]
    assert grouped == expected
    if au_reward == "iou":
        assert r_au_batch(texts, au_boxes, matching, au_count=au_count) == [b.r_au for b in expected]


def test_score_batch_handles_non_consecutive_equal_groups_and_numpy_truth():
    a, b = [CHIN, CORNER], np.array([BROW, EYES], dtype=float)
    texts = [trace(CHIN), trace(BROW), trace(CORNER), trace()]
    truth = [a, b, list(a), []]
    out = score_batch(texts, ["disgust"] * 4, truth)
    assert [o.r_au for o in out] == [reward_breakdown(t, "disgust", x).r_au for t, x in zip(texts, truth)]
    assert out[3].r_au is None


def test_score_batch_length_mismatch():
    with pytest.raises(ValueError):
        score_batch([trace()], [], [[CHIN]])
    with pytest.raises(ValueError):
        r_au_batch([trace()], [])


def test_reward_values_are_finite_floats():
    for b in score_group([trace(CHIN), "junk", trace((600, 0, 1, 1))], "disgust", [CHIN]):
        for v in (b.r_au, b.r_ans, b.r_fmt, b.total):
            assert isinstance(v, float) and math.isfinite(v)
