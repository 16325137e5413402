"""The decision rule (tagfer.au.fusion): the net decides when sure; AU evidence only eliminates or promotes."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tiers import examples

from tagfer.au.aus import AU_IDS, AUDetection, FaceAUs
from tagfer.au.facs import PROTOTYPES
from tagfer.au.facs import top_label as argmax
from tagfer.au.fusion import FusionConfig, decide, support
from tagfer.core.labels import LABELS


def face(scores: dict[int, float], threshold: float = 0.3) -> FaceAUs:
    dets = [AUDetection(au=au, score=float(scores.get(au, 0.0)), active=scores.get(au, 0.0) >= threshold,
                        box=(10 + i, 20 + i, 100 + 2 * i, 120 + 3 * i)) for i, au in enumerate(AU_IDS)]
    dets.sort(key=lambda d: (-d.score, d.au))
    return FaceAUs(mesh=None, aus=dets, bbox_canvas=(0, 0, 511, 511))


def probs(**kw: float) -> dict[str, float]:
    rest = (1.0 - sum(kw.values())) / (len(LABELS) - len(kw))
    return {c: kw.get(c, rest) for c in LABELS}


REST = face({})  # nothing active: a face at rest


def test_a_sure_net_decides_whatever_the_aus():
    strong_smile = face({12: 1.0, 6: 1.0})
    d = decide(probs(neutral=0.55, happiness=0.40), strong_smile)
    assert d.label == "neutral" and d.rule == "global_sure" and d.decided_by == "global"
    assert d.local_label == "happiness" and d.agreement == "disagree"


def test_unsure_unsupported_expression_is_eliminated():
    # the S052 onset frames: the net is torn between sadness, fear and neutral, nothing moves
    d = decide(probs(sadness=0.43, fear=0.28, neutral=0.25), REST)
    assert d.label == "neutral" and d.rule == "eliminated" and set(d.eliminated) == {"sadness", "fear"}
    assert d.scores["sadness"] == d.scores["fear"] == 0.0 and argmax(d.scores) == "neutral"
    # with sadness AUs active, sadness keeps the net's vote
    d = decide(probs(sadness=0.43, fear=0.28, neutral=0.25), face({15: 0.6, 1: 0.5}))
    assert d.label == "sadness" and d.rule == "global_kept" and d.decided_by == "global"


def test_neutral_is_never_eliminated_and_nothing_is_invented():
    # no plausible class is supported and neutral is implausible: the net's answer stays
    d = decide(probs(anger=0.45, disgust=0.40, neutral=0.01), REST)
    assert d.label == "anger" and d.rule == "global_kept"


def test_strong_au_pattern_promotes_a_plausible_class():
    smile = face({12: 0.9, 6: 0.9})
    d = decide(probs(neutral=0.45, happiness=0.30), smile)
    assert d.label == "happiness" and d.rule == "promoted" and d.decided_by == "local"
    assert argmax(d.scores) == "happiness" and d.scores["happiness"] == pytest.approx(0.45)


def test_rest_level_smile_cues_do_not_turn_neutral_into_happiness():
    # AU6/AU12 firing at rest (just above the threshold): evidence below 'strong'
    weak = face({12: 0.35, 6: 0.4})
    assert decide(probs(neutral=0.45, happiness=0.30), weak).label == "neutral"
    # strong cues, but the net finds happiness implausible (< half its top)
    strong = face({12: 0.9, 6: 0.9})
    assert decide(probs(neutral=0.45, happiness=0.20), strong).label == "neutral"


def test_disabled_fusion_is_the_net_alone():
    d = decide(probs(sadness=0.43, fear=0.28, neutral=0.25), REST, FusionConfig(enabled=False))
    assert d.label == "sadness" and d.rule == "global_only"


def test_support_orders_by_contribution():
    s = support(face({4: 0.5, 23: 0.9, 7: 0.31}).aus, PROTOTYPES)
    assert s["anger"] == (23, 4, 7)  # 0.8*0.9 > 1.0*0.5 > 0.7*0.31
    assert s["happiness"] == ()


@pytest.mark.parametrize("field", ["unsure", "plausible", "strong"])
def test_config_validation(field):
    with pytest.raises(ValueError):
        FusionConfig(**{field: 1.5})


@settings(max_examples=examples(300), deadline=None)
@given(
    raw=st.lists(st.floats(0.0, 1.0), min_size=7, max_size=7).filter(lambda v: sum(v) > 1e-6),
    aus=st.dictionaries(st.sampled_from(AU_IDS), st.floats(0.0, 1.0), max_size=8),
)
# CI found this one: fear and sadness differ by one ulp and renormalisation after elimination
# rounded them to a tie that class order broke the other way.
@example(raw=[0.5, 0.0, 0.9999999999999999, 1.0, 0.0, 1.0, 0.5], aus={1: 1.0, 5: 1.0})
def test_rule_invariants(raw, aus):
    g = dict(zip(LABELS, raw))
    d = decide(g, face(aus))
    assert abs(sum(d.scores.values()) - 1.0) < 1e-6 and all(v >= 0 for v in d.scores.values())
    assert argmax(d.scores) == d.label
    g1 = argmax(d.global_scores)  # the net's probabilities, normalised (raw near-ties may round to ties)
    assert d.global_label == g1 and g[g1] >= max(g.values()) * (1 - 1e-9)
    if d.global_confidence >= 0.5:
        assert d.label == g1
    else:
        assert d.label == g1 or d.label in d.plausible  # the AUs only choose among the net's plausible classes
    if d.label != g1:
        # the answer is supported (promotion) or neutral (elimination): support is never invented
        assert d.label == "neutral" or d.support[d.label]
        assert d.rule in ("promoted", "eliminated")
