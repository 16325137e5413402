"""TAG's verifiable rewards (paper §3.3): ``R = R_AU + R_ans + R_fmt`` (Eq. 5).

Reward functions are plain callables over a response (its text, or the
:class:`~tagfer.traces.trace.ParsedTrace` of :func:`~tagfer.traces.trace.parse_trace`) and
the sample's ground truth. The geometry is pure numpy on top of
:func:`tagfer.core.canvas.iou_matrix`; nothing here does I/O.

``R_AU`` (Eq. 3–4)
    With predicted boxes ``b_1..b_k`` and the detector's activated AU boxes
    ``b̂_1..b̂_n``: ``IoU(b_i) = max_j IoU(b_i, b̂_j)``; sort descending and
    average the top ``min(n, k)``. ``n = 0`` → ``None`` (*skipped*: no AU
    signal for this sample, trainers mask it); ``k = 0 < n`` → ``0.0``.
    Every ``<bbox>`` the response contains counts in ``k``, wherever it is
    and whether or not it is well-formed. Predicted coordinates are clipped
    to ``0 .. canvas-1`` first — our choice, the paper says nothing about
    out-of-canvas predictions (clipping keeps a box that overshoots the edge
    comparable instead of scoring it 0); a box that is unreadable, reversed
    (``x1 > x2``) or empty after clipping has IoU 0 with everything but still
    counts in ``k``.

    ``n`` (``au_count``). ``"aus"`` (default, the paper's definition: ``n``
    is the number of *activated AUs*): every row of ``au_boxes`` counts, so
    two AUs sharing one region box (the paper's own figure has AU4 and AU9 on
    one box) count twice. ``"boxes"``: ``n`` is the number of *distinct*
    boxes. They differ only when ``k > n_boxes``: predicted ``[X, Y, Z]``
    against ``X, X, Y`` gives ``(1 + 1 + 0) / 3 = 0.667`` with ``"aus"`` and
    ``(1 + 1) / 2 = 1.0`` with ``"boxes"``.

    Matching. ``"paper"`` takes each box's best AU box independently, so
    several predicted boxes may claim the same AU box: with ``n = 2``,
    writing the single best box twice scores as if both regions had been
    found. ``"one_to_one"`` fixes that with an optimal assignment
    (Hungarian, :func:`scipy.optimize.linear_sum_assignment`) of predicted
    boxes to *distinct* AU boxes maximising total IoU; unassigned boxes score
    0, then the same top-``min(n, k)`` average. It is never above the paper
    value and equal to it whenever no two predicted boxes share a best AU box.

``R_AU`` F1 variant (Table 4)
    F1 between the AU numbers named in the think block and the sample's
    annotated AUs. No annotated AU → ``None`` (skipped, like ``n = 0``);
    annotated AUs but none named → ``0.0``.

``R_ans``
    1 iff the single answer span normalises to the ground-truth label.

``R_fmt`` (``format_rules``)
    ``fmt_bonus`` iff the response passes the format rules, else 0.
    ``"paper"`` (default): the three conditions of §3.3 — a single think
    block (holding visible reasoning besides its boxes: an empty or invisible-only
    think block is no think block, our reading), at most ``max_boxes`` boxes, all inside it, and exactly one answer
    span holding one valid label (:data:`PAPER_FORMAT_VIOLATIONS` lists the
    parser's codes that break them). ``"strict"``: no violation at all (see
    :mod:`tagfer.traces.trace`): also no text outside the blocks, lower-case tags,
    boxes of four integers inside the canvas with ``x1 < x2``, ``y1 < y2``.
    The paper's rules are the default because they are what the paper
    rewards, and because the no-bbox ablation's empty ``<bbox></bbox>`` tags
    (kept by default, see :func:`tagfer.traces.trace.strip_bboxes`) would score 0
    under the strict rules.

Total: ``w_au·R_AU + w_ans·R_ans + w_fmt·R_fmt`` where a skipped ``R_AU``
contributes 0 but stays ``None`` in :class:`RewardBreakdown`.

:func:`score_batch` / :func:`score_group` compute the same values as the
single-rollout functions for many rollouts at once, with one IoU matrix per
distinct set of AU boxes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache
from itertools import chain
from typing import Any, Iterable, Literal, Mapping, Sequence

import numpy as np

from tagfer.core.canvas import CANVAS, clip_boxes, iou_matrix, iou_pairs
from tagfer.core.labels import LABELS, normalize_label
from tagfer.traces.trace import MAX_BOXES, ParsedTrace, parse_trace

__all__ = [
    "RewardConfig",
    "RewardBreakdown",
    "r_au",
    "r_au_f1",
    "r_ans",
    "r_fmt",
    "reward_breakdown",
    "total_reward",
    "r_au_batch",
    "score_batch",
    "score_group",
    "as_box_array",
    "PAPER_FORMAT_VIOLATIONS",
    "format_ok",
]

Matching = Literal["paper", "one_to_one"]
AUReward = Literal["iou", "f1"]
AUCount = Literal["aus", "boxes"]
FormatRules = Literal["paper", "strict"]

# Parser violations that break one of the paper's three R_fmt conditions (§3.3):
# a single think block; at most three boxes, inside it; exactly one answer span with a valid label.
# Our reading of "a think block": one that holds reasoning. A think block with nothing visible in it
# besides its boxes (empty, whitespace, zero-width or other invisible characters: trace.is_blank) is
# no reasoning at all and would let a policy collect R_fmt without thinking (issue 14 #12).
PAPER_FORMAT_VIOLATIONS: frozenset[str] = frozenset(
    {
        "not_text",
        "no_think",
        "think_empty",
        "multiple_think",
        "no_answer",
        "multiple_answer",
        "answer_empty",
        "answer_multiple_labels",
        "answer_excluded",
        "answer_unknown",
        "bbox_outside_think",
        "too_many_bboxes",
    }
)
Completion = str | ParsedTrace


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class RewardConfig:
    """Settings of the TAG reward.

    Attributes:
        fmt_bonus: value of ``R_fmt`` for a well-formed response (the paper's
            "small positive bonus" has no stated value).
        w_au, w_ans, w_fmt: weights in the total; ``w_au=0`` is the RLVR
            ablation (accuracy + format only).
        matching: ``"paper"`` (Eq. 3–4 as written) or ``"one_to_one"``.
        au_reward: ``"iou"`` (Eq. 3–4) or ``"f1"`` (the Table 4 variant).
        canvas: side of the virtual canvas, coordinates ``0 .. canvas-1``.
        max_boxes: most boxes a well-formed response may hold (paper: 3).
        format_rules: ``"paper"`` (the three conditions of §3.3, default) or
            ``"strict"`` (every parser rule); see the module docstring.
        au_count: ``n`` of Eq. 4: ``"aus"`` (activated AUs, the paper) or
            ``"boxes"`` (distinct AU boxes).
    """

    fmt_bonus: float = 0.5
    w_au: float = 1.0
    w_ans: float = 1.0
    w_fmt: float = 1.0
    matching: Matching = "paper"
    au_reward: AUReward = "iou"
    canvas: int = CANVAS
    max_boxes: int = MAX_BOXES
    format_rules: FormatRules = "paper"
    au_count: AUCount = "aus"

    def __post_init__(self) -> None:
        if self.format_rules not in ("paper", "strict"):
            raise ValueError(f"format_rules must be 'paper' or 'strict', got {self.format_rules!r}")
        if self.au_count not in ("aus", "boxes"):
            raise ValueError(f"au_count must be 'aus' or 'boxes', got {self.au_count!r}")
        if self.matching not in ("paper", "one_to_one"):
            raise ValueError(f"matching must be 'paper' or 'one_to_one', got {self.matching!r}")
        if self.au_reward not in ("iou", "f1"):
            raise ValueError(f"au_reward must be 'iou' or 'f1', got {self.au_reward!r}")
        if not _is_int(self.canvas) or self.canvas < 2:
            raise ValueError(f"canvas must be an integer >= 2, got {self.canvas!r}")
        if not _is_int(self.max_boxes) or self.max_boxes < 0:
            raise ValueError(f"max_boxes must be a non-negative integer, got {self.max_boxes!r}")
        for name in ("fmt_bonus", "w_au", "w_ans", "w_fmt"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")

    def replace(self, overrides: Mapping[str, Any] | None = None, /, **kw: Any) -> "RewardConfig":
        """A copy with some fields changed; unknown names raise ``ValueError``."""
        changes = {**(overrides or {}), **kw}
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown RewardConfig field(s) {unknown}; known: {sorted(known)}")
        return dataclasses.replace(self, **changes) if changes else self


DEFAULT_CONFIG = RewardConfig()


@dataclass(frozen=True, slots=True)
class RewardBreakdown:
    """The components of one rollout's reward; ``r_au is None`` means skipped."""

    r_au: float | None
    r_ans: float
    r_fmt: float
    total: float

    def as_dict(self) -> dict[str, float | None]:
        return {"r_au": self.r_au, "r_ans": self.r_ans, "r_fmt": self.r_fmt, "total": self.total}


# ----------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------


def as_box_array(boxes: Any) -> np.ndarray:
    """Ground-truth boxes (``None``, ``[]``, list of 4-lists, array, array of arrays) → float ``(n, 4)``.

    Raises ``ValueError`` when the boxes are not 4 numbers each (a data bug).
    """
    if boxes is None:
        return np.zeros((0, 4))
    if isinstance(boxes, np.ndarray) and boxes.dtype != object:
        arr = boxes.astype(np.float64, copy=False)
    elif isinstance(boxes, list) and boxes and isinstance(boxes[0], (list, tuple)):
        try:  # the usual case: a list of 4-lists
            arr = np.array(boxes, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise ValueError(f"AU boxes must be [x1, y1, x2, y2] each, got {boxes!r}") from e
    else:
        rows = list(boxes)
        if not rows:
            return np.zeros((0, 4))
        try:
            arr = np.array([np.asarray(r, dtype=np.float64).reshape(-1) for r in rows])
        except (TypeError, ValueError) as e:
            raise ValueError(f"AU boxes must be [x1, y1, x2, y2] each, got {boxes!r}") from e
    if arr.ndim >= 1 and arr.shape[0] == 0:
        return np.zeros((0, 4))
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"AU boxes must have shape (n, 4), got {arr.shape}")
    return arr


def _parsed(completion: Any, cfg: RewardConfig) -> ParsedTrace:
    """The ParsedTrace of a completion under ``cfg`` (re-parsed if it was parsed with other settings)."""
    if isinstance(completion, ParsedTrace):
        if completion.canvas == cfg.canvas and completion.max_boxes == cfg.max_boxes:
            return completion
        completion = completion.text
    return parse_trace(completion, cfg.canvas, cfg.max_boxes)


def _pred_rows(preds: Any) -> list[Sequence[float] | None]:
    """Predicted boxes as a list of 4-sequences or ``None`` (unreadable)."""
    if isinstance(preds, ParsedTrace):
        return [b.coords for b in preds.boxes]
    if isinstance(preds, (str, bytes)):
        return list(parse_trace(preds).box_coords)
    if preds is None:
        return []
    return list(preds)


_ZERO_BOX = (0.0, 0.0, 0.0, 0.0)  # zero area: IoU 0 with everything


def _pred_array(rows: Sequence[Sequence[float] | None], canvas: int) -> np.ndarray:
    """Predicted boxes → float ``(k, 4)`` clipped to the canvas; unreadable boxes become zero-area."""
    try:  # fast path: every row is four numbers (flattening first is faster for numpy)
        arr = np.array(list(chain.from_iterable(rows)), dtype=np.float64).reshape(len(rows), 4)
        if any(len(r) != 4 for r in rows):  # type: ignore[arg-type]
            raise ValueError
    except (TypeError, ValueError):
        clean: list[Sequence[float]] = []
        for r in rows:
            try:
                vals = [float(v) for v in r]  # type: ignore[union-attr]
            except (TypeError, ValueError):
                vals = []
            clean.append(vals if len(vals) == 4 else _ZERO_BOX)
        arr = np.array(clean, dtype=np.float64).reshape(-1, 4)
    return clip_boxes(arr, canvas)


@lru_cache(maxsize=256)
def _truth_label(label: str) -> str:
    norm = normalize_label(label)
    if norm not in LABELS:
        raise ValueError(f"ground-truth label {label!r} is not one of {LABELS}")
    return norm


def _truth(label: Any) -> str:
    if not isinstance(label, str):
        raise ValueError(f"ground-truth label must be a string, got {label!r}")
    return _truth_label(label)


# ----------------------------------------------------------------------------------------
# R_AU core, shared by the single-rollout and batched paths
# ----------------------------------------------------------------------------------------


def _top_mean(values: list[float], n: int) -> float:
    """Mean of the ``min(n, len(values))`` largest values (Eq. 4); 0.0 when there are none."""
    k = len(values)
    if k == 0 or n <= 0:
        return 0.0
    if k > 1:
        values = sorted(values, reverse=True)
    m = k if k < n else n
    return sum(values[:m]) / m


def _one_to_one(ious: np.ndarray) -> float:
    """Top-``min(n, k)`` mean of IoUs after an optimal one-to-one assignment (k×n matrix)."""
    k, n = ious.shape
    if k == 0:
        return 0.0
    best = ious.argmax(axis=1)
    if k <= n and len(set(best.tolist())) == k:
        # every box already has its own best AU box: that assignment is optimal
        return _top_mean(ious.max(axis=1).tolist(), n)
    from scipy.optimize import linear_sum_assignment  # lazy: scipy costs ~0.5 s at CLI start

    rows, cols = linear_sum_assignment(ious, maximize=True)
    assigned = ious[rows, cols].tolist()
    return _top_mean(assigned + [0.0] * (k - len(assigned)), n)


def _truth_boxes(au_boxes: Any, au_count: str) -> np.ndarray:
    """Ground-truth boxes as ``(n, 4)``; ``au_count="boxes"`` keeps one row per distinct box (first-seen order)."""
    truth = as_box_array(au_boxes)
    if au_count == "boxes" and truth.shape[0] > 1:
        _, first = np.unique(truth, axis=0, return_index=True)
        truth = truth[np.sort(first)]
    return truth


def _check_au_count(au_count: str) -> None:
    if au_count not in ("aus", "boxes"):
        raise ValueError(f"au_count must be 'aus' or 'boxes', got {au_count!r}")


def _r_au_from_ious(ious: np.ndarray, matching: str) -> float:
    if matching == "paper":
        return _top_mean(ious.max(axis=1).tolist() if ious.shape[0] else [], ious.shape[1])
    return _one_to_one(ious)


def r_au(
    pred_boxes: Any,
    au_boxes: Any,
    matching: Matching = "paper",
    canvas: int = CANVAS,
    au_count: AUCount = "aus",
) -> float | None:
    """``R_AU`` of Eq. 3–4 (see the module docstring for every edge case).

    ``pred_boxes``: a response (text or ParsedTrace) or a sequence of boxes
    (``None`` entries = unreadable boxes); ``au_boxes``: the activated AU
    boxes on the canvas, one per activated AU. ``au_count``: what ``n``
    counts (``"aus"``: rows of ``au_boxes``; ``"boxes"``: distinct boxes).
    Returns ``None`` when there is no AU box.
    """
    if matching not in ("paper", "one_to_one"):
        raise ValueError(f"matching must be 'paper' or 'one_to_one', got {matching!r}")
    _check_au_count(au_count)
    truth = _truth_boxes(au_boxes, au_count)
    if truth.shape[0] == 0:
        return None
    rows = _pred_rows(pred_boxes)
    if not rows:
        return 0.0
    ious = iou_matrix(_pred_array(rows, canvas), clip_boxes(truth.astype(np.float64), canvas))
    return _r_au_from_ious(ious, matching)


def _au_numbers(aus: Any) -> set[int]:
    out: set[int] = set()
    for a in aus if aus is not None else ():
        if isinstance(a, str):
            a = a.strip().upper().removeprefix("AU")
        try:
            out.add(int(a))
        except (TypeError, ValueError):
            raise ValueError(f"annotated AUs must be numbers like 12 or 'AU12', got {a!r}") from None
    return out


def r_au_f1(completion: Completion, annotated_aus: Iterable[int | str] | None, cfg: RewardConfig = DEFAULT_CONFIG) -> float | None:
    """F1 variant of ``R_AU`` (Table 4): AUs named in the think block vs. the annotated AUs.

    ``None`` when the sample has no annotated AU; 0.0 when the response names none.
    """
    truth = _au_numbers(annotated_aus)
    if not truth:
        return None
    named = set(_parsed(completion, cfg).au_mentions)
    if not named:
        return 0.0
    return 2.0 * len(named & truth) / (len(named) + len(truth))


def r_ans(completion: Completion, label: str, cfg: RewardConfig = DEFAULT_CONFIG) -> float:
    """``R_ans``: 1.0 iff the single answer span normalises to ``label`` (also normalised).

    Missing, empty, two-label ("happiness or sadness"), excluded (contempt) or
    repeated answers score 0.0. An invalid ground truth raises ``ValueError``.
    """
    truth = _truth(label)
    return 1.0 if _parsed(completion, cfg).label == truth else 0.0


def format_ok(parsed: ParsedTrace, rules: FormatRules = "paper") -> bool:
    """Whether a parsed response passes the format rules (``"paper"``: §3.3's three conditions; ``"strict"``: no violation)."""
    if rules == "strict":
        return not parsed.violations
    if rules == "paper":
        return PAPER_FORMAT_VIOLATIONS.isdisjoint(parsed.violations)
    raise ValueError(f"format_rules must be 'paper' or 'strict', got {rules!r}")


def r_fmt(completion: Completion, cfg: RewardConfig = DEFAULT_CONFIG) -> float:
    """``R_fmt``: ``cfg.fmt_bonus`` iff the response passes ``cfg.format_rules``, else 0.0."""
    return cfg.fmt_bonus if format_ok(_parsed(completion, cfg), cfg.format_rules) else 0.0


def _total(au: float | None, ans: float, fmt: float, cfg: RewardConfig) -> RewardBreakdown:
    """Eq. 5 with weights; a skipped ``R_AU`` adds nothing."""
    total = cfg.w_ans * ans + cfg.w_fmt * fmt
    if au is not None:
        total += cfg.w_au * au
    return RewardBreakdown(au, ans, fmt, total)


def reward_breakdown(
    completion: Completion,
    label: str,
    au_boxes: Any = None,
    cfg: RewardConfig = DEFAULT_CONFIG,
    aus: Iterable[int | str] | None = None,
) -> RewardBreakdown:
    """All components of one rollout's reward (Eq. 5); the reference semantics of :func:`score_batch`."""
    p = _parsed(completion, cfg)
    if cfg.au_reward == "iou":
        au = r_au(p, au_boxes, cfg.matching, cfg.canvas, cfg.au_count)
    else:
        au = r_au_f1(p, aus, cfg)
    return _total(au, r_ans(p, label, cfg), r_fmt(p, cfg), cfg)


def total_reward(
    completion: Completion,
    label: str,
    au_boxes: Any = None,
    cfg: RewardConfig = DEFAULT_CONFIG,
    aus: Iterable[int | str] | None = None,
) -> float:
    """``R = R_AU + R_ans + R_fmt`` (Eq. 5, weighted by ``cfg``) as one float."""
    return reward_breakdown(completion, label, au_boxes, cfg, aus).total


# ----------------------------------------------------------------------------------------
# Batched path
# ----------------------------------------------------------------------------------------


def _same_boxes(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        try:
            return bool(a == b)
        except ValueError:  # lists holding numpy arrays
            return False
    return False


def r_au_batch(
    preds: Sequence[Any],
    au_boxes: Sequence[Any],
    matching: Matching = "paper",
    canvas: int = CANVAS,
    au_count: AUCount = "aus",
) -> list[float | None]:
    """:func:`r_au` for many rollouts: ``preds[i]`` is scored against ``au_boxes[i]``.

    Same values as calling :func:`r_au` per rollout. The IoUs of the whole
    call come from one numpy pass: a single IoU matrix when every rollout
    shares its AU boxes (one GRPO group), otherwise the IoU of every
    (predicted box, AU box of the same sample) pair, built with index arithmetic.
    """
    if matching not in ("paper", "one_to_one"):
        raise ValueError(f"matching must be 'paper' or 'one_to_one', got {matching!r}")
    _check_au_count(au_count)
    count = len(preds)
    if count != len(au_boxes):
        raise ValueError(f"{count} rollouts but {len(au_boxes)} AU box lists")
    out: list[float | None] = [None] * count
    # Runs of consecutive rollouts with equal AU boxes share one truth array.
    truths: list[np.ndarray] = []
    scored: list[tuple[int, int, int, int]] = []  # rollout, k, n, first row of its truth in the stack
    flat: list[Sequence[float] | None] = []
    n_truth_rows = 0
    start = 0
    while start < count:
        stop = start + 1
        while stop < count and _same_boxes(au_boxes[stop], au_boxes[start]):
            stop += 1
        truth = _truth_boxes(au_boxes[start], au_count)
        n = truth.shape[0]
        if n:
            truths.append(truth)
            for i in range(start, stop):
                rows = _pred_rows(preds[i])
                if rows:
                    flat.extend(rows)
                    scored.append((i, len(rows), n, n_truth_rows))
                else:
                    out[i] = 0.0
            n_truth_rows += n
        start = stop
    if not scored:
        return out

    boxes = _pred_array(flat, canvas)
    truth_all = truths[0] if len(truths) == 1 else np.concatenate(truths)
    truth_all = clip_boxes(truth_all.astype(np.float64), canvas)
    if len(truths) == 1:  # one group: a plain k_total × n matrix
        matrix = iou_matrix(boxes, truth_all)
        ious = matrix.reshape(-1)
        best = matrix.max(axis=1).tolist() if matching == "paper" else []
    else:  # pairs (box, AU box of the same sample), box-major
        _, ks, ns, firsts = (np.array(c) for c in zip(*scored))
        n_of_box = np.repeat(ns, ks)
        pair_box = np.repeat(np.arange(len(flat)), n_of_box)
        first_pair = np.cumsum(n_of_box) - n_of_box
        within = np.arange(pair_box.size) - np.repeat(first_pair, n_of_box)
        pair_truth = np.repeat(np.repeat(firsts, ks), n_of_box) + within
        ious = iou_pairs(boxes[pair_box], truth_all[pair_truth])
        best = np.maximum.reduceat(ious, first_pair).tolist() if matching == "paper" else []

    box_at = pair_at = 0
    for i, k, n, _ in scored:
        if matching == "paper":  # Eq. 4 on each box's best IoU
            out[i] = _top_mean(best[box_at : box_at + k], n)
        else:
            out[i] = _one_to_one(ious[pair_at : pair_at + k * n].reshape(k, n))
        box_at += k
        pair_at += k * n
    return out


def score_batch(
    completions: Sequence[Any],
    labels: Sequence[str],
    au_boxes: Sequence[Any] | None = None,
    cfg: RewardConfig = DEFAULT_CONFIG,
    aus: Sequence[Any] | None = None,
) -> list[RewardBreakdown]:
    """:func:`reward_breakdown` for many rollouts (aligned lists), vectorised per group of equal AU boxes."""
    parsed = [_parsed(c, cfg) for c in completions]
    count = len(parsed)
    if len(labels) != count:
        raise ValueError(f"{count} completions but {len(labels)} labels")
    if cfg.au_reward == "iou":
        boxes = au_boxes if au_boxes is not None else [None] * count
        au_vals = r_au_batch(parsed, boxes, cfg.matching, cfg.canvas, cfg.au_count)
    else:
        annotated = aus if aus is not None else [None] * count
        if len(annotated) != count:
            raise ValueError(f"{count} completions but {len(annotated)} AU lists")
        au_vals = [r_au_f1(p, a, cfg) for p, a in zip(parsed, annotated)]
    bonus = cfg.fmt_bonus
    rules = cfg.format_rules
    truths: dict[str, str] = {}
    out = []
    for p, label, au in zip(parsed, labels, au_vals):
        truth = truths.get(label) if isinstance(label, str) else None
        if truth is None:
            truth = truths[label] = _truth(label)
        out.append(_total(au, 1.0 if p.label == truth else 0.0, bonus if format_ok(p, rules) else 0.0, cfg))
    return out


def score_group(
    completions: Sequence[Any],
    label: str,
    au_boxes: Any = None,
    cfg: RewardConfig = DEFAULT_CONFIG,
    aus: Any = None,
) -> list[RewardBreakdown]:
    """Score the rollouts of one prompt (a GRPO group): one label, one set of AU boxes."""
    n = len(completions)
    return score_batch(completions, [label] * n, [au_boxes] * n, cfg, [aus] * n)
