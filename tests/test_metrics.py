"""Metrics against hand-computed values and scikit-learn (tagfer.evaluation.metrics)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiers import examples
from tagfer.core.labels import LABELS
from tagfer.evaluation import metrics as M

K = len(LABELS)


def test_encode_labels_normalises_and_marks_invalid():
    codes = M.encode_labels(["happiness", "Happy.", "contempt", None, "happiness or sadness", "Anger", 3, 9])
    assert codes.tolist() == [3, 3, -1, -1, -1, 0, 3, -1]


def test_hand_computed_small_case():
    # truth: anger anger fear happiness ; pred: anger fear fear invalid
    t = [0, 0, 2, 3]
    p = [0, 2, 2, M.INVALID]
    assert M.accuracy(t, p) == pytest.approx(0.5)
    cm = M.confusion_matrix(t, p)
    assert cm.shape == (K, K + 1)
    assert cm[0, 0] == 1 and cm[0, 2] == 1 and cm[2, 2] == 1 and cm[3, K] == 1 and cm.sum() == 4
    rec = M.per_class_recall(t, p)
    assert rec[0] == 0.5 and rec[2] == 1.0 and rec[3] == 0.0 and math.isnan(rec[1])
    # F1: anger 2*1/(2+1)=2/3 ; fear 2*1/(1+2)=2/3 ; happiness 0 (fn only) ; macro over 3 present classes
    assert M.macro_f1(t, p) == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)


def test_boxes_histogram_and_mean_skipping_none():
    assert M.boxes_histogram([0, 1, 1, 3, 4, 7]) == {"0": 1, "1": 2, "2": 0, "3": 1, ">3": 2}
    mean, scored, skipped = M.mean_skipping_none([0.5, None, 1.0, None])
    assert (mean, scored, skipped) == (0.75, 2, 2)
    assert math.isnan(M.mean_skipping_none([None])[0])


def test_truth_must_be_a_class():
    with pytest.raises(ValueError):
        M.confusion_matrix([M.INVALID], [0])
    with pytest.raises(ValueError):
        M.confusion_matrix([0, 1], [0])


labels_pairs = st.integers(1, 60).flatmap(
    lambda n: st.tuples(st.lists(st.integers(0, K - 1), min_size=n, max_size=n), st.lists(st.integers(-1, K - 1), min_size=n, max_size=n))
)


@pytest.mark.slow
@settings(max_examples=examples(150), deadline=None)
@given(labels_pairs)
def test_against_sklearn(pair):
    from sklearn import metrics as skm  # imported here: 2 s of CPU that every fast-tier worker would pay at collection

    t, p = pair
    t, p = np.array(t), np.array(p)
    assert M.accuracy(t, p) == pytest.approx(skm.accuracy_score(t, p))
    present = sorted(set(t.tolist()) | set(p[p >= 0].tolist()))
    assert M.macro_f1(t, p) == pytest.approx(skm.f1_score(t, p, labels=present, average="macro", zero_division=0))
    rec = M.per_class_recall(t, p)
    sk_rec = skm.recall_score(t, p, labels=list(range(K)), average=None, zero_division=0)
    for c in range(K):
        if (t == c).any():
            assert rec[c] == pytest.approx(sk_rec[c])
        else:
            assert math.isnan(rec[c])
    cm = M.confusion_matrix(t, p)
    sk_cm = skm.confusion_matrix(t, p, labels=list(range(K)) + [-1])
    np.testing.assert_array_equal(cm[:, :K], sk_cm[:K, :K])
    np.testing.assert_array_equal(cm[:, K], sk_cm[:K, K])


def test_bootstrap_is_seeded_and_matches_index_resampling_in_distribution():
    rng = np.random.default_rng(5)
    t = rng.integers(0, K, 300)
    p = np.where(rng.random(300) < 0.7, t, rng.integers(-1, K, 300))
    cfg = M.Bootstrap(n_boot=2000, seed=3)
    a = M.bootstrap_confusions(t, p, K, cfg)
    np.testing.assert_array_equal(a, M.bootstrap_confusions(t, p, K, cfg))
    assert a.shape == (2000, K, K + 1) and (a.sum(axis=(1, 2)) == 300).all()
    assert not np.array_equal(a, M.bootstrap_confusions(t, p, K, M.Bootstrap(n_boot=2000, seed=4)))
    # same distribution as resampling sample indices: compare accuracy mean and spread
    idx = np.random.default_rng(9).integers(0, 300, (2000, 300))
    ref = (t[idx] == p[idx]).mean(axis=1)
    acc = np.trace(a[:, :, :K], axis1=1, axis2=2) / 300
    assert abs(acc.mean() - ref.mean()) < 0.003 and abs(acc.std() - ref.std()) < 0.003
    assert abs(acc.mean() - M.accuracy(t, p)) < 0.003
    # cells never observed are never drawn
    cm = M.confusion_matrix(t, p)
    assert (a[:, cm == 0] == 0).all()


def test_format_ci_uses_the_same_resamples():
    t = np.array([0] * 50 + [1] * 50)
    p = t.copy()
    wf = np.array([True] * 50 + [False] * 50)  # well-formed exactly when the truth is class 0
    cfg = M.Bootstrap(n_boot=500)
    pv = np.array([True] * 75 + [False] * 25)  # a second flag: paper-valid on class 0 and half of class 1
    cms, (m_wf, m_pv) = M._bootstrap_labels(t, p, [wf, pv], K, cfg)
    np.testing.assert_allclose(m_wf, cms[:, 0, 0] / 100)
    assert (m_pv >= m_wf).all() and (m_pv <= m_wf + (cms[:, 1, 1] / 100) + 1e-12).all() and m_pv.std() > 0


def test_format_validity_reports_the_papers_rules_and_the_strict_grammar():
    """R_fmt's rules (paper §3.3) and the strict grammar are two figures: a reply with text outside the
    blocks or a degenerate box passes the first and fails the second; a failed request fails both."""
    from tagfer.evaluation.eval import parse_prediction, Prediction, score_predictions

    good = "<think>calm face, AU12 <bbox>[10, 10, 60, 60]</bbox></think><answer>happiness</answer>"
    texts = [good, "Sure! " + good, good.replace("[10, 10, 60, 60]", "[60, 10, 10, 60]"), "no tags at all", None]
    recs = []
    for i, text in enumerate(texts):
        rec = parse_prediction(Prediction(str(i), "rafdb", "test", None, "happiness"), text)
        if text is None:
            rec.error = {"kind": "timeout", "message": ""}
        recs.append(rec.to_json())
    s = score_predictions(recs, bootstrap=M.Bootstrap(n_boot=200))
    assert s["format_validity_paper"]["value"] == pytest.approx(3 / 5)
    assert s["format_validity_strict"]["value"] == pytest.approx(1 / 5) == s["format_validity"]["value"]
    lo, hi = s["format_validity_paper"]["ci"]
    assert lo <= 0.6 <= hi and lo < hi


def test_ci_brackets_point_estimate_and_shrinks_with_n():
    rng = np.random.default_rng(0)

    def width(n):
        t = rng.integers(0, K, n)
        p = np.where(rng.random(n) < 0.6, t, (t + 1) % K)
        s = M.compute_scores(M.ScoreInputs(t, p, np.ones(n, bool), np.zeros(n, int)), cfg=M.Bootstrap(n_boot=300))
        lo, hi = s["accuracy"]["ci"]
        assert lo <= s["accuracy"]["value"] <= hi
        lo2, hi2 = s["macro_f1"]["ci"]
        assert lo2 <= s["macro_f1"]["value"] <= hi2
        return hi - lo

    assert width(2000) < width(100)


def test_compute_scores_full_block():
    t = M.encode_labels(["anger", "happiness", "happiness", "sadness"])
    p = M.encode_labels(["anger", "happiness", None, "anger"])
    s = M.compute_scores(
        M.ScoreInputs(
            truth=t,
            pred=p,
            well_formed=np.array([True, True, False, True]),
            n_boxes=np.array([3, 2, 0, 5]),
            au_iou=[0.5, None, 0.0, 1.0],
            cross_au_iou=None,
            errors=[None, None, "http_500", None],
            violations=[(), (), ("no_answer",), ("too_many_bboxes",)],
        ),
        cfg=M.Bootstrap(n_boot=100),
    )
    assert s["n"] == 4
    assert s["accuracy"]["value"] == 0.5
    assert s["format_validity"]["value"] == 0.75
    assert s["au_iou"]["value"] == pytest.approx(0.5) and s["au_iou"]["n_scored"] == 3 and s["au_iou"]["n_skipped"] == 1
    assert s["cross_au_iou"] is None
    assert s["per_class"]["happiness"] == {"recall": 0.5, "recall_ci": s["per_class"]["happiness"]["recall_ci"], "f1": pytest.approx(2 / 3), "support": 2}
    assert s["per_class"]["fear"]["recall"] is None and s["per_class"]["fear"]["support"] == 0
    assert s["confusion"]["matrix"][LABELS.index("sadness")][LABELS.index("anger")] == 1
    assert s["confusion"]["matrix"][LABELS.index("happiness")][K] == 1
    assert s["boxes_histogram"] == {"0": 1, "1": 0, "2": 1, "3": 1, ">3": 1}
    assert s["errors"] == {"http_500": 1} and s["violations"] == {"no_answer": 1, "too_many_bboxes": 1}


def test_empty_inputs_do_not_crash():
    e = np.zeros(0, dtype=int)
    s = M.compute_scores(M.ScoreInputs(e, e, e.astype(bool), e, au_iou=[]), cfg=M.Bootstrap(n_boot=10))
    assert s["n"] == 0 and s["accuracy"]["value"] is None and s["accuracy"]["ci"] is None
    assert s["au_iou"]["value"] is None and s["au_iou"]["ci"] is None


def test_confusion_png(tmp_path):
    t = M.encode_labels(["anger", "fear", "fear"])
    p = M.encode_labels(["anger", "fear", None])
    s = M.compute_scores(M.ScoreInputs(t, p, np.ones(3, bool), np.zeros(3, int)), cfg=M.Bootstrap(n_boot=10))
    out = M.save_confusion_png(s["confusion"], str(tmp_path / "cm.png"), title="x")
    from PIL import Image

    im = Image.open(out)
    assert im.size[0] > 300 and im.size[1] > 300
