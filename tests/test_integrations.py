"""Tests for the TRL and verl adapters (neither trainer is imported)."""

from __future__ import annotations

import json
import pickle
import sys

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fixtures_text import FUZZ_CHAR, unicode_tag_soup
from tiers import examples

from tagfer.integrations import trl as tag_trl
from tagfer.integrations.trl import TAGReward, completion_text, make_reward_funcs, reward_weights
from tagfer.integrations.verl import compute_score, read_ground_truth
from tagfer.integrations.verl import _strip_trailing_special
from tagfer.traces.rewards import RewardConfig, reward_breakdown, score_batch
from tagfer.traces.trace import format_box

CHIN = [93, 306, 445, 417]
CORNER = [191, 417, 328, 511]


def trace(*boxes, answer="disgust", aus=("AU17",)):
    steps = " ".join(f"{au} <bbox>{format_box(b)}</bbox>" for au, b in zip(aus * len(boxes), boxes))
    return f"<think>The face is tense. {steps} Done.</think>\n<answer>{answer}</answer>"


GOOD = trace(CHIN)
WRONG = trace(CHIN, answer="happy")
BAD = "<think>draft</think>" + trace(CHIN)  # two think blocks: fails the paper's R_fmt conditions too


def test_adapters_import_without_the_trainers():
    import subprocess
    from pathlib import Path

    import tagfer

    src = str(Path(tagfer.__file__).resolve().parents[1])
    code = (
        "import sys; sys.path.insert(0, %r); sys.modules['trl'] = None; sys.modules['verl'] = None\n"
        "import tagfer.integrations.trl, tagfer.integrations.verl\n"
        "assert sys.modules['trl'] is None and sys.modules['verl'] is None\n" % src
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------------------
# TRL
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion",
    [
        GOOD,
        [{"role": "assistant", "content": GOOD}],
        [{"role": "assistant", "content": [{"type": "text", "text": GOOD[:20]}, {"type": "text", "text": GOOD[20:]}]}],
        {"role": "assistant", "content": GOOD},
    ],
)
def test_completion_text_forms(completion):
    assert completion_text(completion) == GOOD


def test_completion_text_skips_non_assistant_messages_and_unknown_types():
    msgs = [{"role": "tool", "content": "ignored"}, {"role": "assistant", "content": GOOD}]
    assert completion_text(msgs) == GOOD
    assert completion_text(42) == 42  # scored as not_text downstream


COLUMNS = {
    "label": ["disgust", "disgust", "disgust", "disgust"],
    "au_boxes": [[CHIN, CORNER], [CHIN, CORNER], [], [CHIN]],
    "aus": [[17, 14], [17], [], [4]],
    "trainer_state": object(),  # TRL passes these too; they must be ignored
    "log_extra": lambda **k: None,
    "log_metric": lambda *a: None,
}


@pytest.mark.parametrize("conversational", [False, True])
def test_trl_reward_funcs(conversational):
    texts = [GOOD, WRONG, GOOD, BAD]
    completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
    prompts = ["p"] * 4
    kwargs = dict(prompts=prompts, completions=completions, completion_ids=[[1]] * 4, **COLUMNS)
    au = tag_trl.r_au_reward(**kwargs)
    assert au[0] == pytest.approx(1.0)  # k=1 < n=2: mean over one box
    assert au[2] is None  # n = 0 → masked
    assert tag_trl.r_ans_reward(**kwargs) == [1.0, 0.0, 1.0, 1.0]
    assert tag_trl.r_fmt_reward(**kwargs) == [0.5, 0.5, 0.5, 0.0]
    f1 = tag_trl.r_au_f1_reward(**kwargs)
    assert f1[0] == pytest.approx(2 * 1 / (1 + 2)) and f1[1] == 1.0 and f1[2] is None and f1[3] == 0.0
    totals = tag_trl.tag_reward(**kwargs)
    expected = [
        reward_breakdown(t, lab, boxes).total for t, lab, boxes in zip(texts, COLUMNS["label"], COLUMNS["au_boxes"])
    ]
    assert totals == pytest.approx(expected)


def test_trl_names_and_factory():
    assert [f.__name__ for f in make_reward_funcs()] == ["r_au", "r_ans", "r_fmt"]
    assert [f.__name__ for f in make_reward_funcs(RewardConfig(au_reward="f1"))] == ["r_au_f1", "r_ans", "r_fmt"]
    assert tag_trl.tag_reward.__name__ == "tag_reward"
    assert reward_weights(RewardConfig(w_au=0.0, w_fmt=0.5)) == [0.0, 1.0, 0.5]
    assert TAGReward("r_au", name="au_iou").__name__ == "au_iou"
    with pytest.raises(ValueError):
        TAGReward("r_xyz")  # type: ignore[arg-type]


def test_trl_callables_pickle():
    f = pickle.loads(pickle.dumps(make_reward_funcs(RewardConfig(matching="one_to_one"))[0]))
    assert f.__name__ == "r_au" and f.cfg.matching == "one_to_one"
    assert f(completions=[GOOD], au_boxes=[[CHIN, CORNER]]) == [1.0]


def test_trl_one_to_one_factory_penalises_repeats():
    funcs = make_reward_funcs(RewardConfig(matching="one_to_one"))
    out = funcs[0](completions=[trace(CHIN, CHIN)], au_boxes=[[CHIN, [0, 0, 50, 50]]])
    assert out == [pytest.approx(0.5)]
    assert tag_trl.r_au_reward(completions=[trace(CHIN, CHIN)], au_boxes=[[CHIN, [0, 0, 50, 50]]]) == [1.0]


def test_trl_missing_column_is_a_clear_error():
    with pytest.raises(ValueError, match="au_boxes"):
        tag_trl.r_au_reward(prompts=["p"], completions=[GOOD], label=["disgust"])
    with pytest.raises(ValueError, match="label"):
        tag_trl.r_ans_reward(prompts=["p"], completions=[GOOD])
    with pytest.raises(ValueError, match="rows"):
        tag_trl.r_ans_reward(prompts=["p"], completions=[GOOD], label=["a", "b"])


def test_trl_parses_each_completion_list_once():
    completions = [GOOD, WRONG]
    calls = []
    real = tag_trl.parse_trace

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    tag_trl.parse_trace = counting
    try:
        for f in make_reward_funcs():
            f(completions=completions, **COLUMNS | {"label": ["disgust"] * 2, "au_boxes": [[CHIN]] * 2})
    finally:
        tag_trl.parse_trace = real
    assert len(calls) == 2


def test_trl_cache_follows_the_content_not_the_list_object():
    completions = [GOOD, GOOD]
    assert tag_trl.r_fmt_reward(completions=completions) == [0.5, 0.5]
    completions[1] = BAD  # same list object, new content
    assert tag_trl.r_fmt_reward(completions=completions) == [0.5, 0.0]
    completions.append(GOOD)
    assert tag_trl.r_fmt_reward(completions=completions) == [0.5, 0.0, 0.5]
    messages = [[{"role": "assistant", "content": GOOD}]]
    assert tag_trl.r_fmt_reward(completions=messages) == [0.5]
    messages[0][0]["content"] = BAD  # mutated in place, deep inside
    assert tag_trl.r_fmt_reward(completions=messages) == [0.0]
    payload = bytearray(GOOD.encode())
    assert tag_trl.r_fmt_reward(completions=[payload]) == [0.5]
    payload[:6] = b"Sure! "  # a mutable bytes completion changed in place
    assert tag_trl.r_fmt_reward(completions=[payload]) == [0.0]


def test_trl_cache_is_keyed_on_canvas_and_max_boxes():
    two = trace(CHIN, CORNER)
    assert TAGReward("r_fmt")(completions=[two]) == [0.5]
    assert TAGReward("r_fmt", RewardConfig(max_boxes=1))(completions=[two]) == [0.0]


ADVERSARIAL = st.one_of(unicode_tag_soup(), st.text(FUZZ_CHAR, max_size=40))


@settings(deadline=None, max_examples=examples(150))
@given(st.lists(ADVERSARIAL, min_size=1, max_size=4))
@example(["<th\u0131nk>x</th\u0131nk><answer>happiness</answer>", "<an\u017fwer>happy</AN\u017fWER>", "<\u212abox>"])
def test_reward_paths_never_raise_on_unicode_in_and_around_tags(texts):
    n = len(texts)
    labels, boxes, aus = ["happiness"] * n, [[CHIN]] * n, [[12]] * n
    for cfg in (RewardConfig(), RewardConfig(au_reward="f1")):
        expected = [reward_breakdown(t, "happiness", [CHIN], cfg, [12]).total for t in texts]
        assert [b.total for b in score_batch(texts, labels, boxes, cfg, aus)] == pytest.approx(expected)
        cols = {"label": labels, "au_boxes": boxes, "aus": aus}
        assert TAGReward("total", cfg)(completions=texts, **cols) == pytest.approx(expected)
        for f in make_reward_funcs(cfg):
            assert all(v is None or 0.0 <= v <= 1.0 for v in f(completions=texts, **cols))
    for t in texts:
        out = compute_score("rafdb", t, {"label": "happiness", "au_boxes": [CHIN]})
        assert set(out) == KEYS and all(isinstance(v, float) for v in out.values())


def test_issue_examples_score_without_raising():
    for text in ("<thınk>x</thınk><answer>happiness</answer>", "<think>x</think><anſwer>happiness</anſwer>"):
        assert compute_score("rafdb", text, "happiness")["r_fmt"] == 0.0
        assert tag_trl.tag_reward(completions=[text, GOOD], label=["happiness", "disgust"], au_boxes=[[], [CHIN]])[1] > 0
    zero_width = "<think>\u200b\u200b<bbox>[93, 306, 445, 417]</bbox>\u200b</think><answer>disgust</answer>"
    out = compute_score("rafdb", zero_width, {"label": "disgust", "au_boxes": [CHIN]})
    assert out["r_fmt"] == 0.0 and out["score"] == 2.0  # was 2.5, the maximum


def test_verl_strips_many_trailing_special_tokens_in_one_pass():
    assert _strip_trailing_special(GOOD + " <|im_end|>\n<|endoftext|>  ") == GOOD
    assert _strip_trailing_special("x<|a|>" * 3) == "x<|a|>x<|a|>x"
    assert _strip_trailing_special("<|a|>" * 100_000) == ""
    assert _strip_trailing_special("keep <|not special|>") == "keep <|not special|>"
    assert _strip_trailing_special("|>") == "|>"


def test_trl_values_are_floats_or_none():
    out = tag_trl.r_au_reward(completions=["junk", GOOD], au_boxes=[[CHIN], None])
    assert out == [0.0, None]


# ----------------------------------------------------------------------------------------
# verl
# ----------------------------------------------------------------------------------------

KEYS = {"score", "r_au", "au_scored", "r_ans", "acc", "r_fmt"}


def test_verl_label_string():
    out = compute_score("rafdb", GOOD, "disgust")
    assert set(out) == KEYS
    assert out == {"score": 1.5, "r_au": 0.0, "au_scored": 0.0, "r_ans": 1.0, "acc": 1.0, "r_fmt": 0.5}


def test_verl_dict_ground_truth():
    out = compute_score("rafdb", GOOD, {"label": "Disgust", "au_boxes": [CHIN, CORNER], "aus": [17]})
    assert out["r_au"] == 1.0 and out["au_scored"] == 1.0 and out["score"] == 2.5


def test_verl_json_ground_truth_and_numpy_values():
    gt = json.dumps({"label": "disgust", "au_boxes": [CHIN], "aus": [17]})
    assert compute_score("x", GOOD, gt)["score"] == 2.5
    np_gt = {"label": np.str_("disgust"), "au_boxes": np.array([np.array(CHIN)], dtype=object), "aus": np.array([17])}
    assert compute_score("x", GOOD, np_gt)["score"] == 2.5


def test_verl_all_values_are_floats_with_the_same_keys():
    for gt in ("happiness", {"label": "disgust", "au_boxes": []}, {"label": "disgust", "au_boxes": [CHIN]}):
        for text in (GOOD, BAD, "", None):
            out = compute_score("x", text, gt)
            assert set(out) == KEYS and all(isinstance(v, float) for v in out.values())


def test_verl_overrides_from_extra_info_and_kwargs():
    gt = {"label": "disgust", "au_boxes": [CHIN, [0, 0, 50, 50]], "aus": [17, 14]}
    repeated = trace(CHIN, CHIN)
    assert compute_score("x", repeated, gt)["r_au"] == 1.0
    assert compute_score("x", repeated, gt, {"reward_config": {"matching": "one_to_one"}})["r_au"] == 0.5
    assert compute_score("x", repeated, gt, {"reward_config": '{"au_reward": "f1"}'})["r_au"] == pytest.approx(2 / 3)
    assert compute_score("x", repeated, gt, None, matching="one_to_one", unrelated_kwarg=1)["r_au"] == 0.5
    out = compute_score("x", repeated, gt, None, w_au=0.0, fmt_bonus=0.1)
    assert out["score"] == pytest.approx(1.1)
    with pytest.raises(ValueError, match="unknown"):
        compute_score("x", repeated, gt, {"reward_config": {"matchin": "one_to_one"}})


def test_verl_extra_info_fallbacks_and_trailing_special_tokens():
    out = compute_score("x", GOOD + "<|im_end|>\n<|endoftext|>", "disgust", {"au_boxes": [CHIN], "index": 3})
    assert out["r_fmt"] == 0.5 and out["r_au"] == 1.0


def test_verl_bad_ground_truth():
    with pytest.raises(ValueError):
        compute_score("x", GOOD, {"au_boxes": [CHIN]})
    with pytest.raises(ValueError):
        compute_score("x", GOOD, "{not json")
    with pytest.raises(ValueError):
        compute_score("x", GOOD, 3)
    with pytest.raises(ValueError):
        compute_score("x", GOOD, "contempt")


def test_read_ground_truth():
    assert read_ground_truth("sad") == {"label": "sad", "au_boxes": None, "aus": None, "trace_aus": None}
    assert read_ground_truth({"label": "sad", "aus": [1]}, {"au_boxes": [CHIN]})["au_boxes"] == [CHIN]


@pytest.mark.slow
def test_trl_sees_our_names_and_sync_callables():
    utils = pytest.importorskip("trl.trainer.utils")
    funcs = make_reward_funcs() + [tag_trl.tag_reward]
    assert [utils.get_callable_name(f) for f in funcs] == ["r_au", "r_ans", "r_fmt", "tag_reward"]
    assert not any(utils.is_async_callable(f) for f in funcs)


# --- the F1 variant's reference set (issue 20 #6c): a documented, switchable reading

F1_TEXT = "<think>Smile. AU12 <bbox>[1, 2, 30, 40]</bbox> and AU6 around the eyes.</think><answer>happiness</answer>"


def test_f1_reference_default_is_every_activated_au():
    """Default ("activated", the paper's "annotated AUs"): named {12, 6} against the 5 activated AUs → 2·2/(2+5)."""
    cfg = RewardConfig(au_reward="f1")
    cols = {"label": ["happiness"], "au_boxes": [[]], "aus": [[12, 6, 25, 1, 2]], "trace_aus": [[12, 6]]}
    r_au = make_reward_funcs(cfg)[0]
    assert r_au.f1_reference == "activated" and r_au.__name__ == "r_au_f1"
    assert r_au(completions=[F1_TEXT], **cols) == pytest.approx([4 / 7])
    total = TAGReward("total", cfg)(completions=[F1_TEXT], **cols)
    assert total == pytest.approx([4 / 7 + 1.0 + cfg.fmt_bonus])


def test_f1_reference_trace_scores_against_the_aus_the_trace_names():
    """Alternative ("trace"): the same response against the trace's own AUs {12, 6} → F1 1.0; the column is required."""
    cfg = RewardConfig(au_reward="f1")
    cols = {"label": ["happiness"], "au_boxes": [[]], "aus": [[12, 6, 25, 1, 2]], "trace_aus": [[12, 6]]}
    r_au = make_reward_funcs(cfg, f1_reference="trace")[0]
    assert r_au(completions=[F1_TEXT], **cols) == pytest.approx([1.0])
    assert TAGReward("total", cfg, f1_reference="trace")(completions=[F1_TEXT], **cols) == pytest.approx([2.0 + cfg.fmt_bonus])
    with pytest.raises(ValueError, match="trace_aus"):
        r_au(completions=[F1_TEXT], label=["happiness"], au_boxes=[[]], aus=[[12]])
    with pytest.raises(ValueError, match="f1_reference"):
        TAGReward("r_au", cfg, f1_reference="all")
    # the IoU form does not read either column
    iou_cols = {**cols, "au_boxes": [[[1, 2, 30, 40]]]}
    assert make_reward_funcs(RewardConfig(), f1_reference="trace")[0](completions=[F1_TEXT], **iou_cols) == [1.0]


def test_verl_f1_reference_switch():
    gt = {"label": "happiness", "aus": [12, 6, 25, 1, 2], "trace_aus": [12, 6]}
    assert compute_score("rafdb", F1_TEXT, gt, au_reward="f1")["r_au"] == pytest.approx(4 / 7)
    assert compute_score("rafdb", F1_TEXT, gt, au_reward="f1", f1_reference="trace")["r_au"] == pytest.approx(1.0)
    via_extra = compute_score("rafdb", F1_TEXT, {"label": "happiness", "aus": [12]}, {"trace_aus": [12, 6]},
                              au_reward="f1", f1_reference="trace")
    assert via_extra["r_au"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="trace_aus"):
        compute_score("rafdb", F1_TEXT, {"label": "happiness", "aus": [12]}, au_reward="f1", f1_reference="trace")
