"""The offline FACS-prototype engine: AU scores → 7-class scores → a grounded TAG trace.

Pure and deterministic (no I/O, no randomness). The rules-only engine
(``tagfer analyze --model facs-rules``), a baseline for evaluation tables, and
the teacher-free generator of cold-start traces (``tagfer build --teacher facs``,
via :func:`facs_sample`). Its prototypes give the local evidence of the default
engine, whose decision rule is :mod:`tagfer.au.fusion` and whose trace writer is
:mod:`tagfer.au.grounded`; the sentences both writers share are in
:mod:`tagfer.au.wording`.

Scoring (all inputs are the detector's AU scores ``s_a`` in [0, 1])
-------------------------------------------------------------------
Each expression class ``c`` has a *prototype*: positive weights ``w_ca`` over
AUs (EMFACS-style), and optional *inhibitors*: weights ``v_ca ≥ 0`` of AUs that
argue against it. Its evidence is the weighted mean activation of its
prototype minus the inhibition, clipped to [0, 1]::

    E_c = clip( Σ_a w_ca·s_a / Σ_a w_ca  −  Σ_a v_ca·s_a , 0, 1)

Neutral has no prototype; its evidence falls as the best match rises::

    E_neutral = neutral_base · (1 − max_c E_c)

Gate: when no AU of any prototype is *active* (``AUDetection.active``, i.e.
score ≥ the detector's threshold) every expression class gets ``E_c = 0`` and
neutral takes all the mass — "neutral when nothing is active".

Class scores are the evidences normalised to sum to 1
(``p_c = E_c / Σ E``; never all zero since ``E_neutral > 0`` when every
``E_c < 1``, and ``E_c = 1`` for some class otherwise). The label is the
argmax; ties go to the class listed first in :data:`tagfer.core.labels.LABELS`.

Default weights (:data:`PROTOTYPES`, :data:`INHIBITORS`)
--------------------------------------------------------
=========  ===========================================================  ==================
class      prototype weights ``w``                                      inhibitors ``v``
=========  ===========================================================  ==================
happiness  AU12 1.0, AU6 0.6                                            AU15 0.3, AU4 0.2
sadness    AU15 1.0, AU1 0.8, AU4 0.7, AU17 0.3                         AU12 0.5
surprise   AU26 1.0, AU5 0.8, AU1 0.7, AU2 0.7                          AU4 0.3
fear       AU5 1.0, AU20 1.0, AU1 0.8, AU4 0.6, AU2 0.6, AU7 0.3,       AU12 0.3
           AU26 0.4
anger      AU4 1.0, AU23 0.8, AU7 0.7, AU17 0.6, AU24 0.6, AU5 0.3      AU12 0.5
disgust    AU9 1.0, AU10 1.0, AU15 0.4, AU17 0.4, AU16 0.3              AU12 0.3
=========  ===========================================================  ==================

Where the weights come from: EMFACS prototypes (Ekman & Friesen) and the
emotion criteria of the CK+ database (Lucey et al. 2010): happiness needs
AU12; sadness AU1+4+15; surprise AU1+2 or AU5 with the jaw dropped; fear
AU1+2+4 with AU5/AU20; anger AU4 with the lower-face AU23/AU24 (closed-mouth
anger: 4+7+17+23/24, so AU17 and AU24 weigh 0.6); disgust AU9 or AU10 (equal
weights: the still-image cues cannot tell them apart reliably), often with
AU17. Reasons per weight: docs/au.md, "Engine weights".

``neutral_base = 0.5``. With the default activation threshold (0.3) an
expression whose prototype is only weakly matched (best ``E_c`` below 1/3)
reads as neutral.

Trace (TAG structure, :mod:`tagfer.traces.trace` grammar)
--------------------------------------------------
``<think>`` a global impression that names no AU; then up to ``max_regions``
(3) region checks, each naming the region, describing its appearance, naming
the AU and carrying ``<bbox>[x1, y1, x2, y2]</bbox>`` equal to the detector's
box of that AU (``AUDetection.box``, canvas ints); then a conclusion quoting
the scores ``</think>`` and ``<answer>label</answer>``.

Which AUs are checked: only *active* AUs get a box. First the active AUs of
the winning prototype, by contribution ``w·s``; then, if room is left and
``cite_contrary`` is on, the strongest other active AUs (evidence that was
weighed and outweighed). For neutral: the strongest active AUs, described as
isolated movements; with no active AU the trace has no box at all (still
well-formed). An AU whose box equals a box already cited, or whose box is
not a valid canvas box (degenerate after clipping at the image border), is
skipped.
Supporting AUs of the winner that are below the activation threshold but
score ≥ ``weak_level`` are mentioned in the conclusion without a box.
Phrasing varies with the input through a checksum of the face's AU scores,
so the same face always gets the same words.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from tagfer.au.aus import AU_NAMES, AUDetection, FaceAUs
from tagfer.au.wording import ROLE_ISOLATED, ROLE_SUPPORT, check_text, face_seed, pick
from tagfer.core.canvas import CANVAS, is_valid_box
from tagfer.core.labels import LABELS, normalize_label
from tagfer.core.records import TAGSample

__all__ = [
    "PROTOTYPES",
    "INHIBITORS",
    "FACSConfig",
    "DEFAULT_CONFIG",
    "TRAINING_CONFIG",
    "FACSExplanation",
    "RegionCheck",
    "detections",
    "evidence",
    "class_scores",
    "top_label",
    "best_other",
    "explain",
    "facs_sample",
]

PROTOTYPES: dict[str, dict[int, float]] = {
    "happiness": {12: 1.0, 6: 0.6},
    "sadness": {15: 1.0, 1: 0.8, 4: 0.7, 17: 0.3},
    "surprise": {26: 1.0, 5: 0.8, 1: 0.7, 2: 0.7},
    "fear": {5: 1.0, 20: 1.0, 1: 0.8, 4: 0.6, 2: 0.6, 7: 0.3, 26: 0.4},
    "anger": {4: 1.0, 23: 0.8, 7: 0.7, 17: 0.6, 24: 0.6, 5: 0.3},
    "disgust": {9: 1.0, 10: 1.0, 15: 0.4, 17: 0.4, 16: 0.3},
}

INHIBITORS: dict[str, dict[int, float]] = {
    "happiness": {15: 0.3, 4: 0.2},
    "sadness": {12: 0.5},
    "surprise": {4: 0.3},
    "fear": {12: 0.3},
    "anger": {12: 0.5},
    "disgust": {12: 0.3},
}


@dataclass(frozen=True)
class FACSConfig:
    """Weights and options of the engine (see module docstring).

    ``prototypes`` / ``inhibitors``: {class: {AU: weight}} for the six
    expression classes (neutral has none). ``neutral_base``: neutral's
    evidence when nothing matches. ``max_regions``: most region checks (boxes)
    per trace (paper: 3). ``cite_contrary``: fill remaining region checks with
    active AUs that argue for another class. ``weak_level``: inactive
    supporting AUs scoring at least this are mentioned (no box) in the
    conclusion. ``require_active``: the "nothing active → neutral" gate.
    ``canvas``: boxes not valid on this canvas (degenerate after clipping at
    the image border) are never cited, so every trace stays well-formed.
    ``numbers``: quote the detector's AU scores and the class scores in the
    trace (on for ``tagfer analyze``, where they help a reader verify; off for
    training samples, :data:`TRAINING_CONFIG`, since a model cannot observe them).
    """

    prototypes: Mapping[str, Mapping[int, float]] = field(default_factory=lambda: PROTOTYPES)
    inhibitors: Mapping[str, Mapping[int, float]] = field(default_factory=lambda: INHIBITORS)
    neutral_base: float = 0.5
    max_regions: int = 3
    cite_contrary: bool = True
    weak_level: float = 0.15
    require_active: bool = True
    canvas: int = CANVAS
    numbers: bool = True

    def __post_init__(self) -> None:
        for c, proto in self.prototypes.items():
            if c not in LABELS or c == "neutral":
                raise ValueError(f"prototype for unknown or neutral class {c!r}; classes: {LABELS}")
            if not proto or any(w <= 0 for w in proto.values()):
                raise ValueError(f"prototype of {c} needs positive weights, got {dict(proto)}")
        for c, inh in self.inhibitors.items():
            if c not in self.prototypes:
                raise ValueError(f"inhibitors given for {c!r}, which has no prototype")
            if any(v < 0 for v in inh.values()):
                raise ValueError(f"inhibitor weights of {c} must be >= 0, got {dict(inh)}")
        if not 0 < self.neutral_base <= 1:
            raise ValueError(f"neutral_base must be in (0, 1], got {self.neutral_base}")
        if self.max_regions < 0:
            raise ValueError(f"max_regions must be >= 0, got {self.max_regions}")


DEFAULT_CONFIG = FACSConfig()
#: The engine as a teacher (:func:`facs_sample`): same decisions, no detector numbers in the text.
TRAINING_CONFIG = FACSConfig(numbers=False)


@dataclass(frozen=True)
class RegionCheck:
    """One cited AU: its detection, its role (``support`` | ``contrary`` | ``isolated``) and,
    for contrary evidence, the class it argues for."""

    detection: AUDetection
    role: str
    argues_for: str | None = None


@dataclass(frozen=True)
class FACSExplanation:
    """The engine's answer for one face.

    ``label``: argmax of ``scores`` (sum to 1, in :data:`LABELS` order);
    ``trace``: the TAG response text; ``boxes``: the cited canvas boxes in
    trace order; ``evidence_aus``: the cited AU numbers (same order);
    ``checks``: the region checks behind them. The grounded engine
    (:func:`tagfer.au.grounded.explain_grounded`) also fills ``global_`` (the net's impression:
    ``net``, ``label``, ``confidence``, ``scores``), ``local`` (the AU reading:
    ``label``, ``evidence`` per class, ``support`` per class, the cited ``steps``),
    ``agreement`` (``"agree"`` | ``"disagree"``: global label vs local reading) and
    ``decision`` (``decided_by``, ``rule``, ``plausible``, ``eliminated``); the rules-only
    engine leaves them ``None``.
    """

    label: str
    scores: dict[str, float]
    trace: str
    boxes: tuple[tuple[int, int, int, int], ...]
    evidence_aus: tuple[int, ...]
    checks: tuple[RegionCheck, ...] = ()
    global_: dict | None = None
    local: dict | None = None
    agreement: str | None = None
    decision: dict | None = None

    def views(self) -> dict:
        """``{"global", "local", "agreement", "decision"}`` for JSON records (empty for the rules-only engine)."""
        if self.global_ is None:
            return {}
        return {"global": self.global_, "local": self.local, "agreement": self.agreement, "decision": self.decision}


# --------------------------------------------------------------------------- scoring
def detections(face_aus: FaceAUs | Iterable[AUDetection]) -> list[AUDetection]:
    """The face's AU detections as a list (a :class:`FaceAUs` or any iterable of detections)."""
    return list(face_aus.aus if isinstance(face_aus, FaceAUs) else face_aus)


def _evidence(dets: Sequence[AUDetection], config: FACSConfig) -> dict[str, float]:
    s = {d.au: float(d.score) for d in dets}
    active = {d.au for d in dets if d.active}
    proto_aus = {a for p in config.prototypes.values() for a in p}
    gated = config.require_active and not (active & proto_aus)
    ev: dict[str, float] = {}
    for c in LABELS:
        if c == "neutral":
            continue
        proto = config.prototypes.get(c)
        if not proto or gated:
            ev[c] = 0.0
            continue
        match = sum(w * s.get(a, 0.0) for a, w in proto.items()) / sum(proto.values())
        inhib = sum(v * s.get(a, 0.0) for a, v in config.inhibitors.get(c, {}).items())
        ev[c] = min(1.0, max(0.0, match - inhib))
    ev["neutral"] = config.neutral_base * (1.0 - max(ev.values(), default=0.0))
    return {c: ev[c] for c in LABELS}


def evidence(face_aus: FaceAUs | Iterable[AUDetection], config: FACSConfig = DEFAULT_CONFIG) -> dict[str, float]:
    """Unnormalised evidence ``E_c`` per class (module docstring), in :data:`LABELS` order."""
    return _evidence(detections(face_aus), config)


def _normalise(ev: Mapping[str, float]) -> dict[str, float]:
    total = sum(ev.values())
    if total <= 0:  # cannot happen with neutral_base > 0, kept for safety
        return {c: float(c == "neutral") for c in LABELS}
    return {c: ev[c] / total for c in LABELS}


def class_scores(face_aus: FaceAUs | Iterable[AUDetection], config: FACSConfig = DEFAULT_CONFIG) -> dict[str, float]:
    """Class scores ``p_c = E_c / Σ E`` (sum to 1), in :data:`LABELS` order."""
    return _normalise(evidence(face_aus, config))


def top_label(scores: Mapping[str, float]) -> str:
    """The highest-scoring label (a missing class scores 0; ties: the one listed first in LABELS)."""
    return max(LABELS, key=lambda c: (scores.get(c, 0.0), -LABELS.index(c)))


# --------------------------------------------------------------------------- wording (rules-only writer; shared sentences: tagfer.au.wording)
_ROLE_CONTRARY = (
    "Taken alone it would lean toward {other}, but the rest of the face does not follow.",
    "It could point to {other}, yet it is outweighed here.",
    "It belongs more to {other}, and it is too isolated to change the reading.",
)
_ROLE_CONTRARY_NONE = (
    "It is part of no expression pattern on its own.",
    "By itself it says little about the emotion.",
)
_AREA = {1: "brows", 2: "brows", 4: "brows", 5: "eyes", 6: "eyes", 7: "eyes", 43: "eyes", 45: "eyes", 9: "nose"}
_GLOBAL_ACTIVE = (
    "At first glance the face is clearly animated, with visible movement around the {areas}.",
    "Overall the expression is pronounced, with movement away from the resting shape around the {areas}.",
    "Seen as a whole, the face shows deliberate movement, most of it around the {areas}.",
)
_GLOBAL_MILD = (
    "At first glance the face looks fairly composed, with some movement around the {areas}.",
    "Overall the expression is mild, with a little change from rest around the {areas}.",
)
_GLOBAL_CALM = (
    "At first glance the face looks calm: the brows, eyes and mouth rest in their usual shape.",
    "Overall the face is relaxed and symmetric, with no visible tension in any feature.",
)
_CONCLUDE = (
    "Weighing these regions, the pattern fits {label} best (score {p:.2f}, next {second} at {q:.2f}).",
    "Putting the evidence together, {label} is the most consistent reading (score {p:.2f}; {second} follows at {q:.2f}).",
)
_CONCLUDE_NEUTRAL = (
    "No region shows a coherent pattern of change, so the expression reads as neutral (score {p:.2f}, next {second} at {q:.2f}).",
    "Without a combination of movements that forms an emotion, the face is best described as neutral (score {p:.2f}; {second} follows at {q:.2f}).",
)
_CONCLUDE_PLAIN = (
    "Weighing these regions, the pattern fits {label} best, ahead of {second}.",
    "Putting the evidence together, {label} is the most consistent reading; {second} is the closest alternative.",
)
_CONCLUDE_NEUTRAL_PLAIN = (
    "No region shows a coherent pattern of change, so the expression reads as neutral.",
    "Without a combination of movements that forms an emotion, the face is best described as neutral.",
)
# one weak sign, or two (subject and verb agree: "A weaker sign points" / "Two weaker signs point")
_WEAK = (" A weaker sign points the same way: {items}, below the activation level.",
         " Two weaker signs point the same way: {items}, both below the activation level.")
_WEAK_PLAIN = (" A fainter sign points the same way: {items}.", " Two fainter signs point the same way: {items}.")


def _areas(dets: Sequence[AUDetection]) -> str:
    names: list[str] = []
    for d in dets:
        a = _AREA.get(d.au, "mouth")
        if a not in names:
            names.append(a)
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + " and " + names[-1]


def best_other(au: int, label: str, config: FACSConfig) -> str | None:
    """The class (other than ``label``) whose prototype gives ``au`` the largest relative weight."""
    best, best_w = None, 0.0
    for c in LABELS:
        proto = config.prototypes.get(c)
        if c == label or not proto or au not in proto:
            continue
        w = proto[au] / sum(proto.values())
        if w > best_w:
            best, best_w = c, w
    return best


def _choose_checks(dets: Sequence[AUDetection], label: str, config: FACSConfig) -> list[RegionCheck]:
    active = [d for d in dets if d.active]
    chosen: list[RegionCheck] = []
    used_boxes: set[tuple[int, ...]] = set()

    def take(d: AUDetection, role: str, other: str | None = None) -> None:
        box = tuple(d.box)
        if len(chosen) >= config.max_regions or box in used_boxes or d.au in {c.detection.au for c in chosen}:
            return
        if not is_valid_box(box, config.canvas):
            return
        used_boxes.add(box)
        chosen.append(RegionCheck(d, role, other))

    if label == "neutral":
        for d in sorted(active, key=lambda d: (-d.score, d.au)):
            take(d, "isolated")
        return chosen
    proto = config.prototypes.get(label, {})
    for d in sorted((d for d in active if d.au in proto), key=lambda d: (-proto[d.au] * d.score, d.au)):
        take(d, "support")
    if config.cite_contrary:
        for d in sorted((d for d in active if d.au not in proto), key=lambda d: (-d.score, d.au)):
            take(d, "contrary", best_other(d.au, label, config))
    return chosen


def _check_sentence(rc: RegionCheck, label: str, seed: int, k: int, numbers: bool = True) -> str:
    text = check_text(rc.detection, seed, k, numbers)
    if rc.role == "support":
        role = pick(ROLE_SUPPORT, seed, k).format(label=label)
    elif rc.role == "contrary" and rc.argues_for:
        role = pick(_ROLE_CONTRARY, seed, k).format(other=rc.argues_for)
    elif rc.role == "contrary":
        role = pick(_ROLE_CONTRARY_NONE, seed, k)
    else:
        role = pick(ROLE_ISOLATED, seed, k)
    return f"{text} {role}"


def _explain(dets: Sequence[AUDetection], config: FACSConfig) -> FACSExplanation:
    scores = _normalise(_evidence(dets, config))
    label = top_label(scores)
    seed = face_seed(dets)
    checks = _choose_checks(dets, label, config)

    active = [d for d in dets if d.active]
    if not active:
        glob = pick(_GLOBAL_CALM, seed, 0)
    elif label == "neutral" or max(d.score for d in active) < 0.6:
        glob = pick(_GLOBAL_MILD, seed, 0).format(areas=_areas(sorted(active, key=lambda d: (-d.score, d.au))))
    else:
        glob = pick(_GLOBAL_ACTIVE, seed, 0).format(areas=_areas(sorted(active, key=lambda d: (-d.score, d.au))))

    parts = [glob]
    parts += [_check_sentence(rc, label, seed, k, config.numbers) for k, rc in enumerate(checks, start=1)]
    second = max((c for c in LABELS if c != label), key=lambda c: (scores[c], -LABELS.index(c)))
    if config.numbers:
        conclude = _CONCLUDE_NEUTRAL if label == "neutral" else _CONCLUDE
    else:
        conclude = _CONCLUDE_NEUTRAL_PLAIN if label == "neutral" else _CONCLUDE_PLAIN
    concl = pick(conclude, seed, 5).format(label=label, p=scores[label], second=second, q=scores[second])
    if label != "neutral":
        proto = config.prototypes.get(label, {})
        weak = [d for d in dets if not d.active and d.au in proto and d.score >= config.weak_level]
        weak.sort(key=lambda d: (-proto[d.au] * d.score, d.au))
        if weak:
            if config.numbers:
                items = " and ".join(f"AU{d.au} ({AU_NAMES.get(d.au, '')}) at {d.score:.2f}" for d in weak[:2])
                concl += _WEAK[len(weak[:2]) - 1].format(items=items)
            else:
                items = " and ".join(f"AU{d.au} ({AU_NAMES.get(d.au, '')})" for d in weak[:2])
                concl += _WEAK_PLAIN[len(weak[:2]) - 1].format(items=items)
    parts.append(concl)
    trace = f"<think>{' '.join(parts)}</think>\n<answer>{label}</answer>"
    return FACSExplanation(
        label=label,
        scores=scores,
        trace=trace,
        boxes=tuple(tuple(int(v) for v in rc.detection.box) for rc in checks),  # type: ignore[misc]
        evidence_aus=tuple(rc.detection.au for rc in checks),
        checks=tuple(checks),
    )


def explain(face_aus: FaceAUs | Iterable[AUDetection], config: FACSConfig = DEFAULT_CONFIG) -> FACSExplanation:
    """Label, class scores and a TAG trace for one face (module docstring)."""
    return _explain(detections(face_aus), config)


# --------------------------------------------------------------------------- data building
def facs_sample(
    face_aus: FaceAUs,
    *,
    label: str,
    id: str,
    source: str,
    image: str,
    split: str = "train",
    config: FACSConfig = TRAINING_CONFIG,
) -> TAGSample | None:
    """A teacher-free SFT sample, or ``None`` unless the engine's label equals the ground truth.

    ``au_boxes``: the face's activated AU boxes (B_AU, ``FaceAUs.au_boxes``);
    ``aus``: activated AU numbers; ``teacher="facs"``; ``meta`` holds the
    class scores and the cited AUs. The trace quotes no detector numbers
    (:data:`TRAINING_CONFIG`): a model trained on it cannot observe them. Raises ``ValueError`` for a ground-truth
    label outside :data:`LABELS`.
    """
    truth = normalize_label(label)
    if truth not in LABELS:
        raise ValueError(f"ground-truth label {label!r} is not one of {LABELS}")
    ex = explain(face_aus, config)
    if ex.label != truth:
        return None
    return TAGSample(
        id=id,
        source=source,
        image=image,
        label=truth,
        completion=ex.trace,
        au_boxes=[list(b) for b in face_aus.au_boxes],
        aus=[d.au for d in face_aus.active],
        teacher="facs",
        split=split,
        meta={
            "scores": {c: round(v, 4) for c, v in ex.scores.items()},
            "evidence_aus": list(ex.evidence_aus),
            "detector": face_aus.detector,
        },
    )
