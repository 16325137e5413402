"""The FACS-prototype engine: scores, traces (strict grammar, exact detector boxes), samples."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tiers import examples

from tagfer.au.aus import AU_IDS, AUDetection, FaceAUs
from tagfer.au.detectors import MediaPipeAUDetector
from tagfer.au.facs import INHIBITORS, PROTOTYPES, TRAINING_CONFIG, FACSConfig, class_scores, evidence, explain, facs_sample
from tagfer.au.fusion import decide
from tagfer.au.grounded import explain_grounded
from tagfer.au.wording import ADJ
from tagfer.core.canvas import is_valid_box
from tagfer.core.imageio import load_image
from tagfer.core.labels import LABELS
from tagfer.core.records import TAGSample
from tagfer.traces.rewards import r_au, r_fmt
from tagfer.traces.trace import parse_trace


def face(scores: dict[int, float], boxes: dict[int, tuple] | None = None, threshold: float = 0.3) -> FaceAUs:
    dets = []
    for i, au in enumerate(AU_IDS):
        s = float(scores.get(au, 0.0))
        box = (boxes or {}).get(au, (10 + i, 20 + i, 100 + 2 * i, 120 + 3 * i))
        dets.append(AUDetection(au=au, score=s, active=s >= threshold, box=tuple(box)))
    dets.sort(key=lambda d: (-d.score, d.au))
    return FaceAUs(mesh=None, aus=dets, bbox_canvas=(0, 0, 511, 511))


def check_trace(fa: FaceAUs, ex) -> None:
    """Everything a facs trace must satisfy, whatever the input."""
    p = parse_trace(ex.trace)
    assert p.violations == (), (p.violations, ex.trace)
    assert r_fmt(p) > 0
    assert p.label == ex.label == max(LABELS, key=lambda c: (ex.scores[c], -LABELS.index(c)))
    assert abs(sum(ex.scores.values()) - 1.0) < 1e-9 and all(v >= 0 for v in ex.scores.values())
    assert len(p.boxes) <= 3 and len(p.boxes) == len(ex.boxes) == len(ex.evidence_aus)
    by_au = {d.au: d for d in fa.aus}
    for coords, au in zip(p.box_coords, ex.evidence_aus):
        d = by_au[au]
        assert d.active and coords == tuple(d.box)  # exactly the detector's box of an activated AU
        assert is_valid_box(coords)
    assert len(set(p.box_coords)) == len(p.box_coords)  # no box cited twice
    # Each box is preceded by its AU's name; the global impression (before the first box) names none.
    for b, au in zip(p.boxes, ex.evidence_aus):
        assert re.search(rf"AU{au} \([^)]*\) $", ex.trace[: b.span[0]]), ex.trace
    first = p.boxes[0].span[0] if p.boxes else ex.trace.index("</think>")
    glob = ex.trace[len("<think>") :].split(". ")[0]
    assert "AU" not in glob and first > len(glob)
    if p.boxes:
        assert r_au(p, fa.au_boxes) == pytest.approx(1.0)  # every cited box is an activated box


# --------------------------------------------------------------------------- real faces
@pytest.fixture(scope="module")
def real_faces(mp_detector: MediaPipeAUDetector, astronaut_path, grace_path):
    return {n: mp_detector.detect(load_image(p))[0] for n, p in (("astronaut", astronaut_path), ("grace", grace_path))}


def test_astronaut_is_happiness_with_the_au12_mouth_box(real_faces):
    fa = real_faces["astronaut"]
    ex = explain(fa)
    check_trace(fa, ex)
    assert ex.label == "happiness" and ex.scores["happiness"] > 0.5
    assert ex.evidence_aus[0] == 12  # the strongest supporting AU comes first
    au12 = next(d for d in fa.aus if d.au == 12)
    assert ex.boxes[0] == au12.box
    assert ex.checks[0].role == "support"


def test_grace_hopper_documented_behaviour(real_faces):
    """Grace Hopper: cheek raiser (AU6, from the infraorbital cheek) active; lip corner puller at rest level.

    Issue 13 changed this face: on the pose-normalised mesh her lip corners sit at the height the
    rest frames of the dev set show, so AU12 scores < 0.15. FACS (and the CK+ criteria) need AU12
    for happiness, and AU6 alone is no prototype, so the engine reads neutral and cites the active
    AUs as isolated movements. (Before, AU12 0.26 came from the un-normalised 6° head pitch.)
    """
    fa = real_faces["grace"]
    assert fa.score(12) < 0.15 and fa.score(6) >= 0.3
    ex = explain(fa)
    check_trace(fa, ex)
    assert ex.label == "neutral"
    assert 6 in ex.evidence_aus and all(c.role == "isolated" for c in ex.checks)
    # The best expressive reading is still happiness (the cheek raise counts towards it).
    assert max((c for c in LABELS if c != "neutral"), key=ex.scores.get) == "happiness"


def test_deterministic(real_faces):
    fa = real_faces["astronaut"]
    assert explain(fa) == explain(fa)


# --------------------------------------------------------------------------- synthetic faces
def test_nothing_active_is_neutral_with_zero_boxes():
    fa = face({12: 0.29, 6: 0.29, 4: 0.1})
    ex = explain(fa)
    check_trace(fa, ex)
    assert ex.label == "neutral" and ex.boxes == () and ex.scores["neutral"] == 1.0
    p = parse_trace(ex.trace)
    assert p.well_formed and p.boxes == () and r_fmt(p) > 0
    assert r_au(p, fa.au_boxes) is None  # skipped: no activated AU


def test_gate_holds_even_when_inactive_scores_are_high():
    """Per-AU thresholds can leave a high score inactive: no active prototype AU → neutral."""
    fa = face({12: 0.9, 6: 0.9}, threshold=0.95)
    assert class_scores(fa) == {c: float(c == "neutral") for c in LABELS}
    assert explain(fa, FACSConfig(require_active=False)).label == "happiness"


@pytest.mark.parametrize(
    "scores,label,must_cite",
    [
        ({12: 0.9, 6: 0.7}, "happiness", {12, 6}),
        ({1: 0.8, 4: 0.7, 15: 0.9}, "sadness", {15, 1, 4}),
        ({1: 0.8, 2: 0.8, 5: 0.8, 26: 0.9}, "surprise", {26, 5}),
        ({1: 0.7, 2: 0.6, 4: 0.7, 5: 0.9, 7: 0.6, 20: 0.9, 26: 0.6}, "fear", {5, 20}),
        ({4: 0.9, 5: 0.6, 7: 0.8, 23: 0.8}, "anger", {4, 23, 7}),
        ({4: 0.78, 7: 0.46, 17: 0.69, 23: 0.57}, "anger", {4, 17, 23}),  # closed-mouth anger: 4+7+17+23
        ({10: 0.8, 17: 0.6}, "disgust", {10, 17}),  # AU10 alone carries disgust (CK+: AU9 or AU10)
        ({9: 0.9, 10: 0.8, 16: 0.5}, "disgust", {9, 10}),
        ({25: 0.9}, "neutral", {25}),  # active, but part of no prototype
    ],
)
def test_prototypes_give_their_class(scores, label, must_cite):
    fa = face(scores)
    ex = explain(fa)
    check_trace(fa, ex)
    assert ex.label == label
    assert must_cite <= set(ex.evidence_aus)


def test_resting_brows_and_lids_alone_are_not_anger():
    """Low-set brows and narrow eyes at rest (AU4 0.22, AU7 0) with no lower-face action: neutral."""
    assert explain(face({4: 0.22, 7: 0.05, 17: 0.07})).label == "neutral"
    # A brow lowerer that is active but alone does not make anger either (needs 7/17/23/24).
    assert explain(face({4: 0.35})).label == "neutral"


def test_evidence_formula_and_monotonicity():
    fa = face({12: 0.8, 6: 0.4, 15: 0.5})
    ev = evidence(fa)
    w, v = PROTOTYPES["happiness"], INHIBITORS["happiness"]
    expected = (w[12] * 0.8 + w[6] * 0.4) / sum(w.values()) - v[15] * 0.5
    assert ev["happiness"] == pytest.approx(expected)
    assert ev["neutral"] == pytest.approx(0.5 * (1 - max(x for c, x in ev.items() if c != "neutral")))
    lower = class_scores(face({12: 0.5, 6: 0.4, 15: 0.5}))["happiness"]
    assert lower < class_scores(fa)["happiness"]


def test_shared_boxes_are_cited_once():
    lips = (200, 300, 320, 360)
    fa = face({23: 0.9, 24: 0.8, 4: 0.9, 7: 0.7}, boxes={23: lips, 24: lips})
    ex = explain(fa)
    check_trace(fa, ex)
    assert ex.label == "anger" and list(ex.boxes).count(lips) == 1


def test_config_validation_and_max_regions():
    with pytest.raises(ValueError):
        FACSConfig(prototypes={"neutral": {1: 1.0}})
    with pytest.raises(ValueError):
        FACSConfig(prototypes={"anger": {4: -1.0}})
    with pytest.raises(ValueError):
        FACSConfig(neutral_base=0)
    fa = face({4: 0.9, 5: 0.6, 7: 0.8, 23: 0.8})
    assert len(explain(fa, FACSConfig(max_regions=1)).boxes) == 1
    ex0 = explain(fa, FACSConfig(max_regions=0))
    assert ex0.boxes == () and parse_trace(ex0.trace).well_formed


au_scores = st.dictionaries(st.sampled_from(AU_IDS), st.floats(0, 1, allow_nan=False), max_size=len(AU_IDS))
box = st.one_of(
    st.tuples(st.integers(0, 500), st.integers(0, 500), st.integers(1, 11), st.integers(1, 11)).map(
        lambda t: (t[0], t[1], t[0] + t[2], t[1] + t[3])
    ),
    st.tuples(*[st.sampled_from([0, 511, 300])] * 4),  # clipped at the border: often degenerate
)
au_boxes = st.dictionaries(st.sampled_from(AU_IDS), box, max_size=len(AU_IDS))


@pytest.mark.slow
@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(au_scores, au_boxes, st.floats(0.05, 0.95))
def test_every_trace_is_well_formed_and_grounded(scores, boxes, threshold):
    fa = face(scores, boxes, threshold)
    ex = explain(fa)
    check_trace(fa, ex)
    assert explain(fa) == ex
    if not any(d.active for d in fa.aus):
        assert ex.label == "neutral" and ex.boxes == ()
    plain = explain(fa, TRAINING_CONFIG)  # same decision, same boxes, no numbers in the text
    check_trace(fa, plain)
    assert (plain.label, plain.boxes, plain.scores) == (ex.label, ex.boxes, ex.scores)
    assert not re.search(r"\d\.\d", plain.trace)


# --------------------------------------------------------------------------- samples
def test_facs_sample_accepts_only_the_right_label(real_faces):
    fa = real_faces["astronaut"]
    s = facs_sample(fa, label="Happy", id="generic/astro", source="generic", image="astro.png")
    assert isinstance(s, TAGSample) and s.label == "happiness" and s.teacher == "facs" and s.split == "train"
    assert s.completion == explain(fa, TRAINING_CONFIG).trace and "1.00" not in s.completion
    assert s.au_boxes == [list(b) for b in fa.au_boxes] and s.aus == [d.au for d in fa.active]
    assert s.meta["scores"]["happiness"] > 0.5 and s.meta["evidence_aus"][0] == 12
    assert TAGSample.from_json(s.to_json()) == s
    assert facs_sample(fa, label="sadness", id="x", source="generic", image="a.png") is None
    with pytest.raises(ValueError):
        facs_sample(fa, label="contempt", id="x", source="generic", image="a.png")


# --------------------------------------------------------------------------- grounded engine (global net + AUs)
def probs(**kw: float) -> dict[str, float]:
    rest = (1.0 - sum(kw.values())) / (len(LABELS) - len(kw))
    return {c: kw.get(c, rest) for c in LABELS}


def check_grounded(fa: FaceAUs, g: dict, ex, config: FACSConfig = FACSConfig()) -> None:
    """Everything a grounded trace must satisfy: the facs invariants, global first, honest roles and verdict."""
    check_trace(fa, ex)
    first = ex.trace[len("<think>"):].split(". ")[0]
    g1 = ex.global_["label"]
    assert re.search(rf"\b({g1}|{ADJ[g1]})\b", first), first  # the first sentence is the global impression
    proto = config.prototypes.get(ex.label, {})
    for rc in ex.checks:  # a support is a real prototype AU of the answer; a contrary AU is not
        assert (rc.role == "support") == (rc.detection.au in proto)
    d = decide(g, fa)
    assert ex.agreement == d.agreement and ex.decision["decided_by"] == d.decided_by
    concl = ex.trace.split("</think>")[0].rsplit("</bbox>", 1)[-1]
    if d.decided_by == "local":
        assert "uncertain" in concl or "unsure" in concl
    elif d.agreement == "disagree" and d.local_label != "neutral":
        assert d.local_label in concl  # the disagreement is said plainly
    elif d.agreement == "agree":
        assert "agree" in concl or "Both" in concl


def test_grounded_agreement_and_disagreement_are_plain():
    smile = face({12: 0.9, 6: 0.8, 25: 0.9})
    ex = explain_grounded(smile, probs(happiness=0.9))
    check_grounded(smile, probs(happiness=0.9), ex)
    assert ex.agreement == "agree" and ex.evidence_aus[:2] == (12, 6)
    g = probs(neutral=0.8)
    ex = explain_grounded(smile, g)  # a sure net keeps neutral; the smile AUs are cited against it
    check_grounded(smile, g, ex)
    assert ex.label == "neutral" and ex.agreement == "disagree" and ex.decision["decided_by"] == "global"
    assert all(c.role == "contrary" for c in ex.checks[:2]) and "happiness" in ex.trace.split("</bbox>")[-1]


def test_grounded_elimination_and_promotion_say_who_decided():
    rest = face({})
    g = probs(sadness=0.43, fear=0.28, neutral=0.25)
    ex = explain_grounded(rest, g)
    check_grounded(rest, g, ex)
    assert ex.label == "neutral" and not ex.boxes and ("ruled out" in ex.trace or "dropped" in ex.trace)
    smile = face({12: 0.9, 6: 0.9})
    g = probs(neutral=0.45, happiness=0.30)
    ex = explain_grounded(smile, g)
    check_grounded(smile, g, ex)
    assert ex.label == "happiness" and ex.decision["rule"] == "promoted" and ex.local["label"] == "happiness"


def test_grounded_training_text_has_no_numbers():
    fa = face({4: 0.8, 23: 0.7, 17: 0.6})
    ex = explain_grounded(fa, probs(anger=0.4, neutral=0.35), TRAINING_CONFIG)
    text = re.sub(r"<bbox>[^<]*</bbox>|AU\d+", "", ex.trace)
    assert not re.search(r"\d", text), ex.trace


@settings(max_examples=examples(200), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    scores=st.dictionaries(st.sampled_from(AU_IDS), st.floats(0.0, 1.0), max_size=10),
    raw=st.lists(st.floats(0.0, 1.0), min_size=7, max_size=7).filter(lambda v: sum(v) > 1e-6),
    numbers=st.booleans(),
)
def test_every_grounded_trace_is_well_formed_and_honest(scores, raw, numbers):
    fa = face(scores)
    g = dict(zip(LABELS, raw))
    cfg = FACSConfig(numbers=numbers)
    check_grounded(fa, g, explain_grounded(fa, g, cfg), cfg)


def test_rules_engine_stays_available_as_a_model_spec(astronaut_path, grace_path):
    from tagfer.explainer.analyze import Analyzer

    with Analyzer(engine="facs-rules") as rules, Analyzer() as default:
        for path in (astronaut_path, grace_path):
            r, d = rules.analyze_image(path)[0], default.analyze_image(path)[0]
            assert r.engine == "facs-rules" and d.engine == "facs"
            assert r.label == explain(r.face_aus).label and r.trace == explain(r.face_aus).trace
            assert "global" not in r.to_json() and d.to_json()["global"]["net"] == "fer"
            assert r.well_formed and d.well_formed and r.boxes and d.boxes


# --------------------------------------------------------------------------- grammar of every sentence (issue 22)
#: Mistakes a template can make when its slots are filled: a singular region with a plural verb
#: ("the mouth show"), a plural subject with a singular verb, a/an before the wrong sound, list
#: punctuation, empty parentheses, doubled words or spaces.
GRAMMAR_ERRORS = [
    r"(?<!of )\b(?:the|a|this|one) (mouth|nose|chin|jaw|lip|brow|eye|cheek|region|sign|face|movement)\s+(show|have|are|were|point|form|lean|agree)\b",
    # a plural subject at the start of a clause with a singular verb ("these regions is"; not "the pattern in these regions is")
    r"(?:^|[.;:,]\s+)(?:the |these |two |\w+er )?(signs|regions|movements|brows|eyes|lips|cheeks)\s+(shows|has|is|was|points|forms|leans|agrees)\b",
    r"\ba\s+[aeiou]\w*", r"\ban\s+[b-df-hj-np-tv-z]\w*", r"\(\s*\)", r"\)\s*\(", r"\s[,.;:]", r"\s{2,}", r"\b(\w+)\s+\1\b", r",\s*,", r"\.\.",
]


def _sentences(trace: str) -> str:
    return re.sub(r"\s*<bbox>\[[^\]]*\]</bbox>", "", parse_trace(trace).think or trace)


def _grammar_problems(text: str) -> list[str]:
    return [m.group(0) for pat in GRAMMAR_ERRORS for m in re.finditer(pat, text, re.I)
            if m.group(0).lower() not in ("a user", "an au", "an au12", "a one")]


def test_every_facs_template_sentence_is_grammatical():
    """Each template of both writers, filled with one region and with several, singular and plural
    areas, one and two weak signs: no agreement or article error (\"the mouth show a little change\")."""
    from tagfer.au import facs, grounded, wording

    areas = ("mouth", "brows", "eyes and mouth", "brows, eyes and mouth", "nose")
    fills = dict(label="happiness", second="surprise", other="fear", local="anger", p=0.81, q=0.12, e=0.4, ev="",
                 first="sadness", adj="happy", a_adj="a happy", items="AU12 (Lip Corner Puller) at 0.41")
    checked = 0
    for mod in (facs, grounded, wording):
        for name, value in vars(mod).items():
            if not (name.isupper() or name.startswith("_")) or not isinstance(value, tuple) or not all(isinstance(t, str) for t in value):
                continue
            for template in value:
                if "{" not in template and not template.strip()[:1].isupper():
                    continue
                for area in areas:
                    try:
                        text = template.format(areas=area, region=area, look="the lip corners are pulled up", au=12,
                                               name="Lip Corner Puller", box="[1, 2, 3, 4]", score=0.5, **fills)
                    except (KeyError, IndexError):
                        continue
                    assert not _grammar_problems(text), (name, text, _grammar_problems(text))
                    checked += 1
    assert checked >= 100


@pytest.mark.parametrize("n_weak", [1, 2])
def test_weak_signs_agree_with_their_count(n_weak):
    """The rules writer's note on weak AUs below the activation level: one sign \"points\", two \"point\"."""
    scores = {26: 0.95, 5: 0.2, 1: 0.2} if n_weak == 2 else {26: 0.95, 5: 0.2}  # surprise; weak AU5 (and AU1)
    cfg = FACSConfig(weak_level=0.1)
    for config in (cfg, FACSConfig(weak_level=0.1, numbers=False)):
        text = _sentences(explain(face(scores, {}, 0.5), config).trace)
        if "sign" in text:
            assert ("signs point" in text) == (n_weak == 2) and ("sign points" in text) == (n_weak == 1), text
        assert not _grammar_problems(text), text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(au_scores, st.floats(0.05, 0.95), st.dictionaries(st.sampled_from(LABELS), st.floats(0.0, 1.0), min_size=7, max_size=7))
def test_generated_traces_are_grammatical(scores, threshold, net):
    """Whatever the AU scores: the rules writer (with and without numbers, the training traces of
    `build --teacher facs`) and the grounded writer write no agreement or article error."""
    fa = face(scores, {}, threshold)
    total = sum(net.values()) or 1.0
    texts = [explain(fa).trace, explain(fa, TRAINING_CONFIG).trace,
             explain_grounded(fa, {k: v / total for k, v in net.items()}).trace]
    for t in texts:
        assert not _grammar_problems(_sentences(t)), (t, _grammar_problems(_sentences(t)))
