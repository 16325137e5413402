"""Evaluation metrics over prediction records (paper §5): pure numpy, no I/O except the PNG helper.

Labels are encoded as integers ``0..K-1`` in the order of :data:`tagfer.core.labels.LABELS`;
a prediction that is not a label (no answer, two labels, excluded class, a failed
request) is encoded as :data:`INVALID` (``-1``). Invalid predictions always count as
wrong: they lower accuracy and the recall of the true class, and they appear in
the extra ``invalid`` column of the confusion matrix.

Definitions (choices where the paper is silent are marked *choice*):

accuracy
    ``mean(pred == truth)`` over every scored sample.
per-class recall
    ``tp_c / support_c`` (``NaN`` when class ``c`` has no sample).
macro-F1
    mean over the classes *present* (support > 0 or predicted at least once; the
    scikit-learn convention) of ``F1_c = 2·tp / (2·tp + fp + fn)``; an invalid
    prediction is a false negative of its true class and nobody's false positive.
format validity, two figures
    ``format_validity_paper``: share of responses that pass the paper's three R_fmt
    conditions (§3.3: one think block, at most three boxes inside it, one answer span with
    one valid label; :data:`tagfer.traces.rewards.PAPER_FORMAT_VIOLATIONS`) — what the
    default R_fmt rewards. ``format_validity_strict``: share with no grammar violation at all
    (:func:`tagfer.traces.trace.parse_trace`, ``ParsedTrace.well_formed``; the strict R_fmt).
    A failed request is invalid under both. ``format_validity`` is kept as an alias of the
    strict figure for older readers.
boxes histogram
    number of ``<bbox>`` elements per response: 0, 1, 2, 3 and ``>3``.
AU IoU
    mean of :func:`tagfer.traces.rewards.r_au` (Eq. 3–4) over samples whose detector has at
    least one activated AU; samples without (``None``) are *skipped*, not zero.
    A response with no box against a non-empty AU set scores 0 (*choice*: failed
    requests too — the model produced no grounded evidence).
bootstrap 95% CI
    percentile bootstrap over samples (``n_boot`` resamples with replacement,
    seeded :class:`numpy.random.Generator`, *choice*: 1,000 resamples, percentiles
    2.5 / 97.5). Label and format statistics of one call share the same resamples,
    drawn as multinomial cell counts (exactly the distribution of index resampling, at
    a cost independent of n); AU IoU means resample their scored subset by index, in
    vectorised chunks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from tagfer.core.labels import LABELS, normalize_label

__all__ = [
    "INVALID",
    "BOX_BINS",
    "encode_labels",
    "confusion_matrix",
    "accuracy",
    "per_class_recall",
    "per_class_f1",
    "macro_f1",
    "boxes_histogram",
    "mean_skipping_none",
    "Bootstrap",
    "bootstrap_confusions",
    "bootstrap_means",
    "percentile_ci",
    "ScoreInputs",
    "compute_scores",
    "save_confusion_png",
]

INVALID = -1
BOX_BINS = ("0", "1", "2", "3", ">3")


# ---------------------------------------------------------------------------- encoding
def encode_labels(labels: Iterable[Any], classes: Sequence[str] = LABELS) -> np.ndarray:
    """Label strings → int codes (``INVALID`` for anything that is not one of ``classes``).

    Strings are passed through :func:`tagfer.core.labels.normalize_label` first, so
    "Happy." encodes like "happiness"; ``None`` and excluded classes are invalid.
    """
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for lab in labels:
        if isinstance(lab, (int, np.integer)) and not isinstance(lab, bool):
            out.append(int(lab) if 0 <= int(lab) < len(classes) else INVALID)
            continue
        norm = lab if lab in index else normalize_label(lab)
        out.append(index.get(norm, INVALID) if norm is not None else INVALID)
    return np.asarray(out, dtype=np.int64)


def _codes(truth: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """Flat index ``truth·(k+1) + pred'`` with ``pred' = k`` for invalid predictions."""
    truth = np.asarray(truth, dtype=np.int64)
    pred = np.asarray(pred, dtype=np.int64)
    if truth.shape != pred.shape:
        raise ValueError(f"truth and prediction lengths differ: {truth.shape} vs {pred.shape}")
    if truth.size and (truth.min() < 0 or truth.max() >= k):
        raise ValueError("every ground-truth label must be one of the classes (excluded samples are dropped before scoring)")
    p = np.where((pred < 0) | (pred >= k), k, pred)
    return truth * (k + 1) + p


# ---------------------------------------------------------------------------- point metrics
def confusion_matrix(truth: Sequence[int], pred: Sequence[int], k: int = len(LABELS)) -> np.ndarray:
    """``k × (k+1)`` counts: rows = truth, columns = prediction, last column = invalid."""
    codes = _codes(np.asarray(truth), np.asarray(pred), k)
    return np.bincount(codes, minlength=k * (k + 1)).reshape(k, k + 1)


def _stats_from_confusion(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, recall, F1, macro-F1 from confusion matrices ``(..., k, k+1)`` (vectorised)."""
    k = cm.shape[-2]
    cm = cm.astype(np.float64)
    tp = np.diagonal(cm[..., :k], axis1=-2, axis2=-1)
    support = cm.sum(axis=-1)
    predicted = cm[..., :k].sum(axis=-2)
    n = support.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = tp.sum(axis=-1) / n
        recall = np.where(support > 0, tp / support, np.nan)
        denom = support + predicted  # 2tp + fp + fn
        f1 = np.where(denom > 0, 2.0 * tp / denom, np.nan)
        present = denom > 0
        macro = np.where(present.any(axis=-1), np.nansum(f1, axis=-1) / present.sum(axis=-1), np.nan)
    return {"accuracy": acc, "recall": recall, "f1": f1, "macro_f1": macro}


def accuracy(truth: Sequence[int], pred: Sequence[int]) -> float:
    """Share of predictions equal to the truth (invalid = wrong); NaN for no sample."""
    t = np.asarray(truth, dtype=np.int64)
    if t.size == 0:
        return float("nan")
    return float(np.mean(t == np.asarray(pred, dtype=np.int64)))


def per_class_recall(truth: Sequence[int], pred: Sequence[int], k: int = len(LABELS)) -> np.ndarray:
    """Recall of each class (``NaN`` where the class has no sample)."""
    return _stats_from_confusion(confusion_matrix(truth, pred, k))["recall"]


def per_class_f1(truth: Sequence[int], pred: Sequence[int], k: int = len(LABELS)) -> np.ndarray:
    """F1 of each class (``NaN`` where the class is neither present nor predicted)."""
    return _stats_from_confusion(confusion_matrix(truth, pred, k))["f1"]


def macro_f1(truth: Sequence[int], pred: Sequence[int], k: int = len(LABELS)) -> float:
    """Unweighted mean F1 over the classes present in truth or prediction (module docstring)."""
    return float(_stats_from_confusion(confusion_matrix(truth, pred, k))["macro_f1"])


def boxes_histogram(n_boxes: Sequence[int]) -> dict[str, int]:
    """Counts of responses with 0, 1, 2, 3 and more than 3 boxes."""
    a = np.minimum(np.asarray(n_boxes, dtype=np.int64), 4)
    counts = np.bincount(a, minlength=5)
    return {b: int(c) for b, c in zip(BOX_BINS, counts)}


def mean_skipping_none(values: Iterable[float | None]) -> tuple[float, int, int]:
    """(mean of the non-``None`` values, number scored, number skipped); NaN mean when none."""
    arr = np.asarray([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    ok = ~np.isnan(arr)
    n = int(ok.sum())
    return (float(arr[ok].mean()) if n else float("nan")), n, int(arr.size - n)


# ---------------------------------------------------------------------------- bootstrap
@dataclass(frozen=True)
class Bootstrap:
    """Bootstrap settings: resamples, seed, confidence level, rows per vectorised chunk."""

    n_boot: int = 1000
    seed: int = 0
    level: float = 0.95
    chunk: int = 250


def _index_chunks(n: int, cfg: Bootstrap) -> Iterable[np.ndarray]:
    """Resample index arrays ``(rows, n)``, ``n_boot`` rows in total, from one seeded generator."""
    rng = np.random.default_rng(cfg.seed)
    done = 0
    while done < cfg.n_boot:
        rows = min(cfg.chunk, cfg.n_boot - done)
        yield rng.integers(0, n, size=(rows, n), dtype=np.int64 if n > 2**31 - 1 else np.int32)
        done += rows


def bootstrap_confusions(truth: Sequence[int], pred: Sequence[int], k: int = len(LABELS), cfg: Bootstrap = Bootstrap()) -> np.ndarray:
    """Confusion matrices of ``cfg.n_boot`` resamples: ``(n_boot, k, k+1)`` (one bincount per chunk)."""
    return _bootstrap_labels(truth, pred, None, k, cfg)[0]


def _bootstrap_labels(
    truth: Sequence[int], pred: Sequence[int], flags: Sequence[Sequence[float]] | None, k: int, cfg: Bootstrap
) -> tuple[np.ndarray, np.ndarray]:
    """Resampled confusion matrices and, on the *same* resamples, the means of binary ``flags``
    (a list of per-sample flag arrays, e.g. [well-formed, paper-valid]): ``(n_boot, k, k+1)``
    and ``(len(flags), n_boot)``.

    A resample's statistics depend only on how many of its ``n`` draws fall in each joint
    cell (truth, prediction, flags), and those counts follow ``Multinomial(n, observed cell
    shares)`` exactly, so they are drawn directly: O(n_boot × cells), independent of ``n``.
    """
    codes = _codes(np.asarray(truth), np.asarray(pred), k)
    n, cells = codes.size, k * (k + 1)
    nf = len(flags) if flags is not None else 0
    if n == 0 or cfg.n_boot <= 0:
        return np.zeros((0, k, k + 1), dtype=np.int64), np.zeros((nf, 0))
    bits = np.zeros(n, dtype=np.int64)
    for j, f in enumerate(flags or ()):
        bits |= (np.asarray(f, dtype=np.float64) > 0).astype(np.int64) << j
    m = 1 << nf
    joint = np.bincount(codes * m + bits, minlength=m * cells)
    rng = np.random.default_rng(cfg.seed)
    draws = rng.multinomial(n, joint / n, size=cfg.n_boot).reshape(cfg.n_boot, k, k + 1, m)
    per_bits = draws.sum(axis=(1, 2))  # (n_boot, m)
    means = np.stack([per_bits[:, [c for c in range(m) if c >> j & 1]].sum(axis=1) / n for j in range(nf)]) if nf else np.zeros((0, cfg.n_boot))
    return draws.sum(axis=-1), means


def bootstrap_means(values: Sequence[float], cfg: Bootstrap = Bootstrap()) -> np.ndarray:
    """Means of ``cfg.n_boot`` resamples of ``values`` (NaN values must be removed first)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0 or cfg.n_boot <= 0:
        return np.zeros(0)
    return np.concatenate([v[idx].mean(axis=1) for idx in _index_chunks(v.size, cfg)])


def percentile_ci(samples: np.ndarray, level: float = 0.95) -> tuple[float, float] | None:
    """Percentile interval of bootstrap ``samples`` along axis 0 (NaNs ignored); None when empty."""
    s = np.asarray(samples, dtype=np.float64)
    if s.size == 0 or np.all(np.isnan(s)):
        return None
    a = (1.0 - level) / 2.0
    lo, hi = np.nanquantile(s, [a, 1.0 - a])
    return float(lo), float(hi)


# ---------------------------------------------------------------------------- all scores
@dataclass
class ScoreInputs:
    """Aligned per-sample arrays for :func:`compute_scores` (one entry per scored sample).

    ``truth``/``pred``: label codes; ``well_formed``: no grammar violation (strict);
    ``paper_valid``: the paper's R_fmt conditions hold (``None``: taken as ``well_formed``);
    ``box_limit``: per-sample box-limit mode of the prediction (counted);
    ``n_boxes``: boxes in the response; ``au_iou`` / ``cross_au_iou``: per-sample
    R_AU against the training detector / an independent detector (``None`` = skipped;
    the whole list ``None`` = not computed); ``errors``: per-sample error kind or None.
    """

    truth: np.ndarray
    pred: np.ndarray
    well_formed: np.ndarray
    n_boxes: np.ndarray
    au_iou: list[float | None] | None = None
    cross_au_iou: list[float | None] | None = None
    errors: list[str | None] | None = None
    violations: list[Sequence[str]] | None = None
    paper_valid: np.ndarray | None = None
    box_limit: list[str | None] | None = None


def _value(v: float, ci: tuple[float, float] | None) -> dict[str, Any]:
    return {"value": None if math.isnan(v) else float(v), "ci": list(ci) if ci else None}


def _au_block(values: list[float | None] | None, cfg: Bootstrap) -> dict[str, Any] | None:
    if values is None:
        return None
    mean, scored, skipped = mean_skipping_none(values)
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    ci = percentile_ci(bootstrap_means(arr, cfg), cfg.level)
    return {**_value(mean, ci), "n_scored": scored, "n_skipped": skipped}


def compute_scores(inp: ScoreInputs, classes: Sequence[str] = LABELS, cfg: Bootstrap = Bootstrap()) -> dict[str, Any]:
    """Every metric of the module docstring as a JSON-ready dict (values are fractions in [0, 1]).

    Keys: ``n``, ``accuracy``, ``macro_f1``, ``format_validity_paper``,
    ``format_validity_strict`` (and its alias ``format_validity``), ``au_iou``,
    ``cross_au_iou`` (each ``{"value", "ci"[, "n_scored", "n_skipped"]}``),
    ``per_class`` (``{label: {"recall", "recall_ci", "f1", "support"}}``),
    ``confusion`` (``{"labels", "columns", "matrix"}``), ``boxes_histogram``,
    ``errors``, ``violations`` and ``box_limit`` (counts by kind / mode), ``bootstrap`` (settings).
    """
    k = len(classes)
    truth = np.asarray(inp.truth, dtype=np.int64)
    pred = np.asarray(inp.pred, dtype=np.int64)
    wf = np.asarray(inp.well_formed, dtype=np.float64)
    pv = wf if inp.paper_valid is None else np.asarray(inp.paper_valid, dtype=np.float64)
    cm = confusion_matrix(truth, pred, k)
    point = _stats_from_confusion(cm)
    boot_cm, (boot_wf, boot_pv) = _bootstrap_labels(truth, pred, [wf, pv], k, cfg)
    boot = _stats_from_confusion(boot_cm) if truth.size else None
    support = cm.sum(axis=1)

    def ci(name: str, axis_index: int | None = None):
        if boot is None:
            return None
        s = boot[name] if axis_index is None else boot[name][:, axis_index]
        return percentile_ci(s, cfg.level)

    per_class = {}
    for i, c in enumerate(classes):
        r, f = float(point["recall"][i]), float(point["f1"][i])
        per_class[c] = {
            "recall": None if math.isnan(r) else r,
            "recall_ci": ci("recall", i) and list(ci("recall", i)),
            "f1": None if math.isnan(f) else f,
            "support": int(support[i]),
        }
    fv = float(wf.mean()) if wf.size else float("nan")
    fp = float(pv.mean()) if pv.size else float("nan")
    limits: dict[str, int] = {}
    for mode in inp.box_limit or ():
        if mode:
            limits[str(mode)] = limits.get(str(mode), 0) + 1
    errors: dict[str, int] = {}
    for e in inp.errors or ():
        if e:
            errors[e] = errors.get(e, 0) + 1
    violations: dict[str, int] = {}
    for vs in inp.violations or ():
        for v in vs:
            violations[v] = violations.get(v, 0) + 1
    return {
        "n": int(truth.size),
        "accuracy": _value(float(point["accuracy"]) if truth.size else float("nan"), ci("accuracy")),
        "macro_f1": _value(float(point["macro_f1"]) if truth.size else float("nan"), ci("macro_f1")),
        "format_validity_paper": _value(fp, percentile_ci(boot_pv, cfg.level)),
        "format_validity_strict": _value(fv, percentile_ci(boot_wf, cfg.level)),
        "format_validity": _value(fv, percentile_ci(boot_wf, cfg.level)),  # alias of the strict figure (older readers)
        "au_iou": _au_block(inp.au_iou, cfg),
        "cross_au_iou": _au_block(inp.cross_au_iou, cfg),
        "per_class": per_class,
        "confusion": {"labels": list(classes), "columns": list(classes) + ["invalid"], "matrix": cm.tolist()},
        "boxes_histogram": boxes_histogram(inp.n_boxes),
        "mean_boxes": float(np.mean(inp.n_boxes)) if len(inp.n_boxes) else None,
        "errors": errors,
        "violations": dict(sorted(violations.items(), key=lambda kv: -kv[1])),
        "box_limit": limits,
        "bootstrap": {"n_boot": cfg.n_boot, "seed": cfg.seed, "level": cfg.level},
    }


def save_confusion_png(confusion: Mapping[str, Any], path: str, title: str = "", normalize: bool = True) -> str:
    """Draw a confusion block (as in :func:`compute_scores`) to ``path`` (matplotlib, Agg backend)."""
    import matplotlib  # lazy (start-up time): matplotlib, PIL

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure  # lazy (start-up time): matplotlib, PIL

    m = np.asarray(confusion["matrix"], dtype=np.float64)
    rows, cols = confusion["labels"], confusion["columns"]
    shown = m / np.maximum(m.sum(axis=1, keepdims=True), 1) if normalize else m
    fig = Figure(figsize=(1.0 + 0.9 * len(cols), 1.0 + 0.8 * len(rows)), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else max(1.0, float(shown.max())))
    ax.set_xticks(range(len(cols)), labels=cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), labels=rows)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if m[i, j]:
                txt = f"{shown[i, j]:.2f}" if normalize else f"{int(m[i, j])}"
                ax.text(j, i, txt, ha="center", va="center", fontsize=7, color="white" if shown[i, j] > 0.5 * (shown.max() or 1) else "black")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    return path
