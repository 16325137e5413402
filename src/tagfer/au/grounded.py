"""The grounded engine's trace writer (issue 19), the default engine of ``tagfer analyze``.

The TAG shape: a global impression (the FER net's label and confidence, no AU named) → up to
``max_regions`` local steps on the detector's AU boxes that support or contradict the answer →
a conclusion saying whether the regions agree with the impression and which of the two decided.
The answer comes from the decision rule of :mod:`tagfer.au.fusion`; the prototypes and the
region checks' sentences from :mod:`tagfer.au.facs` and :mod:`tagfer.au.wording`. Pure (no I/O).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from tagfer.au.aus import AUDetection, FaceAUs
from tagfer.au.facs import DEFAULT_CONFIG, FACSConfig, FACSExplanation, RegionCheck, best_other, detections
from tagfer.au.fusion import DEFAULT_FUSION, FusionConfig, decide
from tagfer.au.wording import ADJ, ROLE_ISOLATED, ROLE_SUPPORT, check_text, face_seed, pick
from tagfer.core.canvas import is_valid_box
from tagfer.core.labels import LABELS

__all__ = ["explain_grounded"]

_G_SURE = (
    "At first glance, the face as a whole looks {adj} (confidence {p:.2f}).",
    "Taken as a whole, the face reads as {adj}, with confidence {p:.2f}.",
    "Seen as a whole, the face gives {a_adj} impression (confidence {p:.2f}).",
)
_G_SURE_PLAIN = (
    "At first glance, the face as a whole looks {adj}.",
    "Taken as a whole, the face reads as {adj}.",
    "Seen as a whole, the face gives {a_adj} impression.",
)
_G_UNSURE = (
    "At first glance, the face is hard to read: {label} leads with {p:.2f}, and {second} follows at {q:.2f}.",
    "Taken as a whole, the face gives no clear impression; {label} is the best guess at {p:.2f}, ahead of {second} at {q:.2f}.",
)
_G_UNSURE_PLAIN = (
    "At first glance, the face is hard to read; {label} is the best guess, followed by {second}.",
    "Taken as a whole, the face gives no clear impression; {label} seems most likely, followed by {second}.",
)
_ROLE_AGAINST = (
    "It points to {other} rather than {label}.",
    "This belongs to {other}, not to {label}.",
    "It argues for {other} instead of {label}.",
)
_C_AGREE = (
    "The regions agree with the overall impression, so the answer is {label}.",
    "Both the whole face and its regions point to {label}.",
)
_C_AGREE_NEUTRAL_CALM = (
    "No region shows a coherent pattern of movement, which agrees with the overall impression: the face is neutral.",
    "Nothing in the regions forms an expression, so they agree with the overall impression: neutral.",
)
_C_AGREE_NEUTRAL = (
    "These movements form no expression pattern, which agrees with the overall impression: the face is neutral.",
    "Taken together, these movements do not form an expression, so they agree with the overall impression: neutral.",
)
_C_SURE_AGAINST = (
    "The regions point to {local}{ev} instead, but the overall impression is confident, so the answer stays {label}.",
    "The local evidence favours {local}{ev}, yet the overall impression is clear enough to keep {label}.",
)
_C_KEPT_AGAINST = (
    "The regions point to {local}{ev} instead, but not strongly enough to overrule the overall impression, so the answer stays {label}.",
    "The local evidence favours {local}{ev}, yet it is too weak to outweigh the overall impression; the answer remains {label}.",
)
_C_KEPT_UNLIKELY = (
    "The regions point to {local}{ev} instead, but the overall impression finds {local} unlikely, so the answer stays {label}.",
    "The local evidence favours {local}{ev}, yet the face as a whole hardly suggests it; the answer remains {label}.",
)
_C_KEPT_WEAK = (
    "The regions alone are too weak to show an expression, but they do not contradict the overall impression, so the answer stays {label}.",
    "The movements in the regions are slight, yet they are consistent with the overall impression; the answer remains {label}.",
)
_C_KEPT_UNSUPPORTED = (
    "No active AU supports {label}, so the answer rests on the overall impression alone: {label}.",
    "None of the active AUs belongs to the {label} pattern, so the answer comes from the overall impression only: {label}.",
)
_C_ELIMINATED = (
    "The overall impression was uncertain and no active AU supports {first}, so {first} is ruled out; the best remaining reading is {label}.",
    "Since the first impression was unsure and no active AU backs {first}, that reading is dropped, and {label} is the most likely one left.",
)
_C_PROMOTED = (
    "The overall impression was uncertain, and the {label} pattern in these regions is strong, so the local evidence decides: {label}{ev}.",
    "Because the first impression was unsure and these regions show a clear {label} pattern, the local evidence settles it: {label}{ev}.",
)
_N_LOCAL = " (AU evidence {e:.2f})"


def _grounded_checks(dets: Sequence[AUDetection], label: str, local: str, config: FACSConfig) -> list[RegionCheck]:
    """Up to ``max_regions`` active AUs: the label's support (by ``w·s``), then the AUs that argue for another
    class (those of the local reading first); at least one slot is kept for a contrary AU when there is one."""
    active = [d for d in dets if d.active]
    proto = config.prototypes.get(label, {})
    local_proto = config.prototypes.get(local, {}) if local not in ("neutral", label) else {}
    supp = sorted((d for d in active if d.au in proto), key=lambda d: (-proto[d.au] * d.score, d.au))
    contra = sorted((d for d in active if d.au not in proto), key=lambda d: (d.au not in local_proto, -d.score, d.au))
    chosen: list[RegionCheck] = []
    used: set[tuple[int, ...]] = set()

    def take(d: AUDetection, limit: int) -> None:
        box = tuple(d.box)
        if len(chosen) >= limit or box in used or d.au in {c.detection.au for c in chosen} or not is_valid_box(box, config.canvas):
            return
        used.add(box)
        if d.au in proto:
            chosen.append(RegionCheck(d, "support"))
            return
        other = local if d.au in local_proto else best_other(d.au, label, config)
        chosen.append(RegionCheck(d, "contrary" if other else "isolated", other))

    room = config.max_regions - (1 if contra and config.cite_contrary else 0)
    for d in supp:
        take(d, room)
    if config.cite_contrary:
        for d in contra:
            take(d, config.max_regions)
    for d in supp:
        take(d, config.max_regions)
    return chosen


def _grounded_sentence(rc: RegionCheck, label: str, seed: int, k: int, numbers: bool) -> str:
    text = check_text(rc.detection, seed, k, numbers)
    if rc.role == "support":
        role = pick(ROLE_SUPPORT, seed, k).format(label=label)
    elif rc.role == "contrary" and rc.argues_for:
        role = pick(_ROLE_AGAINST, seed, k).format(other=rc.argues_for, label=label)
    else:
        role = pick(ROLE_ISOLATED, seed, k)
    return f"{text} {role}"


def explain_grounded(face_aus: FaceAUs | Iterable[AUDetection], global_scores: Mapping[str, float],
                     config: FACSConfig = DEFAULT_CONFIG, fusion: FusionConfig | None = None,
                     net: str = "fer") -> FACSExplanation:
    """The default engine of ``tagfer analyze``: a TAG trace from a global impression and the AU boxes.

    ``global_scores``: the FER net's class probabilities for this face
    (:class:`tagfer.au.impression.GlobalImpression`); the label comes from the decision rule of
    :func:`tagfer.au.fusion.decide`. Trace: the global impression (label and confidence, no AU
    named), then up to ``max_regions`` local steps, each an *active* AU with exactly the
    detector's box, saying whether it supports the answer or argues for another class (never a
    support that is not there), then a conclusion saying plainly whether the regions agree with
    the global impression and which of the two decided. ``scores``: the decision's scores.
    """
    dets = detections(face_aus)
    dec = decide(global_scores, dets, fusion or DEFAULT_FUSION, config)
    label, g1, local = dec.label, dec.global_label, dec.local_label
    seed = face_seed(dets) + LABELS.index(g1)
    nums = config.numbers
    g = dec.global_scores
    second = max((c for c in LABELS if c != g1), key=lambda c: (g[c], -LABELS.index(c)))
    if dec.global_confidence >= (fusion or DEFAULT_FUSION).unsure:
        glob = pick(_G_SURE if nums else _G_SURE_PLAIN, seed, 0).format(
            adj=ADJ[g1], a_adj=("an " if ADJ[g1][0] in "aeiou" else "a ") + ADJ[g1], p=dec.global_confidence)
    else:
        glob = pick(_G_UNSURE if nums else _G_UNSURE_PLAIN, seed, 0).format(
            label=g1, p=dec.global_confidence, second=second, q=g[second])

    checks = _grounded_checks(dets, label, local, config)
    parts = [glob] + [_grounded_sentence(rc, label, seed, k, nums) for k, rc in enumerate(checks, start=1)]

    e_local = _N_LOCAL.format(e=dec.local_evidence[local]) if nums and local != "neutral" else ""
    if dec.rule == "promoted":
        concl = pick(_C_PROMOTED, seed, 5).format(label=label, ev=e_local)
    elif dec.rule == "eliminated":
        concl = pick(_C_ELIMINATED, seed, 5).format(first=g1, label=label)
    elif dec.agreement == "agree":
        if label != "neutral":
            concl = pick(_C_AGREE, seed, 5).format(label=label)
        else:
            concl = pick(_C_AGREE_NEUTRAL if checks else _C_AGREE_NEUTRAL_CALM, seed, 5)
    elif local != "neutral":
        options = (_C_SURE_AGAINST if dec.rule in ("global_sure", "global_only")
                   else _C_KEPT_AGAINST if local in dec.plausible else _C_KEPT_UNLIKELY)
        concl = pick(options, seed, 5).format(local=local, label=label, ev=e_local)
    elif label != "neutral" and dec.support.get(label):
        concl = pick(_C_KEPT_WEAK, seed, 5).format(label=label)
    else:
        concl = pick(_C_KEPT_UNSUPPORTED, seed, 5).format(label=label)
    parts.append(concl)
    trace = f"<think>{' '.join(parts)}</think>\n<answer>{label}</answer>"

    r4 = lambda d: {c: round(float(v), 4) for c, v in d.items()}  # noqa: E731
    return FACSExplanation(
        label=label,
        scores=dict(dec.scores),
        trace=trace,
        boxes=tuple(tuple(int(v) for v in rc.detection.box) for rc in checks),  # type: ignore[misc]
        evidence_aus=tuple(rc.detection.au for rc in checks),
        checks=tuple(checks),
        global_={"net": net, "label": g1, "confidence": round(dec.global_confidence, 4), "scores": r4(g)},
        local={"label": local, "evidence": r4(dec.local_evidence),
               "support": {c: list(v) for c, v in dec.support.items() if v},
               "steps": [{"au": rc.detection.au, "role": rc.role, "for": label if rc.role == "support" else rc.argues_for}
                         for rc in checks]},
        agreement=dec.agreement,
        decision={"decided_by": dec.decided_by, "rule": dec.rule, "plausible": list(dec.plausible),
                  "eliminated": list(dec.eliminated)},
    )
