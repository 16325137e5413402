"""The decision rule: a learned global impression first, AU evidence only where it earns its say.

Pure (no I/O). Inputs: the global net's class probabilities ``g`` (:mod:`tagfer.au.impression`)
and the detector's AUs of the same face; the FACS prototypes of :mod:`tagfer.au.facs` give the
local evidence ``E_c`` (:func:`tagfer.au.facs.evidence`) and the local reading
``r = argmax E`` (the rules-only engine's label). Write ``g1 = argmax g`` and ``p1 = g[g1]``.

1. **The net decides when it is sure**: ``p1 ≥ unsure`` (1/2) → ``g1``. The AU boxes then
   only explain (support or contradict) the answer.
2. **Otherwise the AU evidence may choose among the net's plausible classes**
   ``P = {c : g_c ≥ plausible · p1}`` (``plausible`` = 1/2: within a factor two of the top):

   a. *promotion*: the local reading ``r`` is an expression, is in ``P``, differs from ``g1``
      and its evidence is strong, ``E_r ≥ strong`` (1/2) → ``r``;
   b. *elimination*: an expression in ``P`` that no active AU of its prototype supports is
      dropped (neutral is never dropped: its evidence is the absence of movement); the answer
      is the net's best remaining class (``g1`` when nothing remains: support is never invented).

Why each constant is what it is (none is fitted to faces; docs/analyze.md, "Decision rule"):

* ``unsure = 1/2``: below it the net itself puts more mass on the other classes than on its
  choice. On the held-out set the net alone was the best system (fer 19/24 expressive,
  67/68 neutral; the FACS rules 14/24, 59/68; averaging made both worse), so above it the
  AU evidence never changes the answer.
* ``plausible = 1/2``: the AU evidence may only pick a class the net itself finds at least
  half as likely as its choice; a class the net finds implausible stays out whatever the AUs
  say. This is what keeps a resting face neutral when AU6/AU12 fire at rest: the net gives
  happiness almost nothing on such faces.
* ``strong = 1/2``: the prototype is at least half matched (weighted mean AU score net of the
  inhibitors, :func:`tagfer.au.facs.evidence`); e.g. happiness needs AU12 and AU6 well above
  the activation threshold, not AU12 at rest.
* Elimination needs only the detector's activation threshold (0.3, docs/au.md): "no active AU
  of the prototype" is the one AU statement that held on every dev face.

Leave-one-subject-out on the development set (grid over the three constants, fitted on one
subject, tested on the other) is printed by ``benchmarks/bench_accuracy.py``.

Final ``scores`` (sum to 1, argmax = label): the net's probabilities, with eliminated classes
set to 0 and the rest renormalised; on promotion the promoted class and ``g1`` swap their
probabilities (the AU evidence decides the order, the numbers stay the net's).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from tagfer.au.aus import AUDetection, FaceAUs
from tagfer.au.facs import DEFAULT_CONFIG, FACSConfig, evidence, top_label
from tagfer.core.labels import LABELS

__all__ = ["FusionConfig", "DEFAULT_FUSION", "Decision", "decide", "support"]


@dataclass(frozen=True)
class FusionConfig:
    """Constants of the decision rule (module docstring). ``enabled=False``: the net alone decides."""

    unsure: float = 0.5
    plausible: float = 0.5
    strong: float = 0.5
    enabled: bool = True

    def __post_init__(self) -> None:
        for name in ("unsure", "plausible", "strong"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")


DEFAULT_FUSION = FusionConfig()


@dataclass(frozen=True)
class Decision:
    """The rule's verdict for one face.

    ``rule``: ``global_sure`` (step 1), ``global_kept`` (step 2, the net's class survives),
    ``eliminated`` (step 2b changed the answer), ``promoted`` (step 2a), ``global_only``
    (fusion disabled). ``support``: per expression class, its active prototype AUs (strongest
    contribution first). ``agreement``: ``"agree"`` when the local reading equals the global
    label, else ``"disagree"``; ``decided_by``: ``"global"`` when the answer is the net's
    label, else ``"local"``.
    """

    label: str
    scores: dict[str, float]
    global_label: str
    global_confidence: float
    global_scores: dict[str, float]
    local_label: str
    local_evidence: dict[str, float]
    support: dict[str, tuple[int, ...]]
    plausible: tuple[str, ...] = ()
    eliminated: tuple[str, ...] = ()
    rule: str = "global_sure"
    extra: dict = field(default_factory=dict)

    @property
    def agreement(self) -> str:
        return "agree" if self.local_label == self.global_label else "disagree"

    @property
    def decided_by(self) -> str:
        return "global" if self.label == self.global_label else "local"


def support(dets: Sequence[AUDetection], prototypes: Mapping[str, Mapping[int, float]]) -> dict[str, tuple[int, ...]]:
    """Per expression class: its prototype's *active* AUs, by contribution ``w·s`` (strongest first)."""
    out: dict[str, tuple[int, ...]] = {}
    for c, proto in prototypes.items():
        hits = [d for d in dets if d.active and d.au in proto]
        hits.sort(key=lambda d: (-proto[d.au] * d.score, d.au))
        out[c] = tuple(d.au for d in hits)
    return out


def _normalise(g: Mapping[str, float]) -> dict[str, float]:
    vals = {c: max(0.0, float(g.get(c, 0.0))) for c in LABELS}
    total = sum(vals.values())
    if total <= 0:
        return {c: float(c == "neutral") for c in LABELS}
    return {c: v / total for c, v in vals.items()}


def _leading(scores: dict[str, float], label: str) -> dict[str, float]:
    """``scores`` renormalised with ``label`` strictly first under :func:`top_label`'s tie rule.

    A tie can come from the net (two equal probabilities, broken by class order) or from
    rounding when near-equal probabilities are renormalised; the rule's answer must still be
    the argmax of the scores it reports, so the label is lifted just past the runner-up.
    """
    lead = max(v for c, v in scores.items() if c != label)
    if scores[label] > lead:
        return scores
    for bump in (1e-9, 1e-6):
        lifted = dict(scores)
        lifted[label] = lead + bump
        lifted = _normalise(lifted)
        if top_label(lifted) == label:
            return lifted
    raise AssertionError(f"cannot make {label!r} lead {scores}")  # unreachable: a 1e-6 lift survives renormalisation


def decide(global_scores: Mapping[str, float], face_aus: FaceAUs | Iterable[AUDetection],
           config: FusionConfig = DEFAULT_FUSION, facs_config: FACSConfig | None = None) -> Decision:
    """Apply the decision rule (module docstring) to one face."""
    fc = facs_config or DEFAULT_CONFIG
    dets = list(face_aus.aus if isinstance(face_aus, FaceAUs) else face_aus)
    g = _normalise(global_scores)
    ev = evidence(dets, fc)
    local = top_label(_normalise(ev))
    sup = support(dets, fc.prototypes)
    g1 = top_label(g)
    p1 = g[g1]
    common = dict(global_label=g1, global_confidence=p1, global_scores=g, local_label=local, local_evidence=ev, support=sup)
    if not config.enabled:
        return Decision(label=g1, scores=g, rule="global_only", **common)
    if p1 >= config.unsure:
        return Decision(label=g1, scores=g, rule="global_sure", **common)
    plausible = tuple(c for c in LABELS if g[c] >= config.plausible * p1)
    if local != "neutral" and local != g1 and local in plausible and ev[local] >= config.strong:
        scores = dict(g)
        scores[local], scores[g1] = g[g1], g[local]
        return Decision(label=local, scores=_leading(scores, local), plausible=plausible, rule="promoted", **common)
    eliminated = tuple(c for c in plausible if c != "neutral" and not sup.get(c))
    kept = [c for c in plausible if c not in eliminated]
    if not kept:  # every plausible class unsupported and neutral implausible: keep the net's answer
        return Decision(label=g1, scores=g, plausible=plausible, rule="global_kept", **common)
    label = max(kept, key=lambda c: (g[c], -LABELS.index(c)))
    scores = _leading(_normalise({c: (0.0 if c in eliminated else g[c]) for c in LABELS}), label)
    return Decision(label=label, scores=scores, plausible=plausible, eliminated=eliminated,
                    rule="eliminated" if label != g1 else "global_kept", **common)
