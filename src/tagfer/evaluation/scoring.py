"""Scores of ``tagfer score``: prediction records joined with AU tables → the metrics of
:mod:`tagfer.evaluation.metrics` → one score JSON (input of :mod:`tagfer.evaluation.report`)."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from tagfer.core.canvas import CANVAS
from tagfer.core.jsonl import read_jsonl
from tagfer.core.labels import normalize_label
from tagfer.evaluation.au_tables import table_boxes
from tagfer.evaluation.metrics import Bootstrap, ScoreInputs, compute_scores, encode_labels, save_confusion_png
from tagfer.traces.rewards import PAPER_FORMAT_VIOLATIONS, r_au_batch

__all__ = ["score_predictions", "score_file"]


def _latest(preds: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Predictions with duplicates (same id) resolved to the last one written."""
    last: dict[str, dict[str, Any]] = {}
    for p in preds:
        last[str(p.get("id"))] = p
    return iter(last.values())


def _paper_valid(rec: dict[str, Any]) -> bool:
    """The paper's R_fmt conditions (§3.3) hold for a prediction record: a reply without any of
    :data:`tagfer.traces.rewards.PAPER_FORMAT_VIOLATIONS` (a failed request has no reply)."""
    if rec.get("well_formed"):
        return True
    replied = rec.get("output") is not None if "output" in rec else not rec.get("error")
    return replied and PAPER_FORMAT_VIOLATIONS.isdisjoint(rec.get("violations") or ())


def score_predictions(
    preds: Iterable[dict[str, Any]],
    au: dict[str, Any] | None = None,
    cross_au: dict[str, Any] | None = None,
    bootstrap: Any = None,
    matching: str = "paper",
    canvas: int = CANVAS,
) -> dict[str, Any]:
    """Metrics (:func:`tagfer.evaluation.metrics.compute_scores`) of prediction records joined with AU boxes.

    ``au`` / ``cross_au``: key → activated AU boxes (id, image path or file name);
    a missing or empty entry skips that sample's AU IoU (the boxes must be on ``canvas``, the
    canvas the predictions' boxes are parsed on: checked by :func:`load_au_jsonl` / :func:`au_truth`). Per-sample AU IoU is
    :func:`tagfer.traces.rewards.r_au_batch` (Eq. 3–4, ``matching`` as in :class:`~tagfer.traces.rewards.RewardConfig`).
    """
    rows = list(_latest(preds))
    truth = encode_labels([normalize_label(r["label"]) for r in rows])
    keep = [i for i, t in enumerate(truth) if t >= 0]
    rows = [rows[i] for i in keep]
    pred_boxes = [r.get("boxes") or [] for r in rows]

    def ious(table: dict[str, Any] | None) -> list[float | None] | None:
        if table is None:
            return None
        gt = [table_boxes(table, r) or [] for r in rows]
        return r_au_batch(pred_boxes, gt, matching, canvas)

    inp = ScoreInputs(
        truth=truth[keep],
        pred=encode_labels([r.get("pred") for r in rows]),
        well_formed=np.asarray([bool(r.get("well_formed")) for r in rows]),
        paper_valid=np.asarray([_paper_valid(r) for r in rows]),
        box_limit=[r.get("box_limit") if isinstance(r.get("box_limit"), str) else ("cut" if r.get("box_limit") else None) for r in rows],
        n_boxes=np.asarray([len(b) for b in pred_boxes], dtype=np.int64),
        au_iou=ious(au),
        cross_au_iou=ious(cross_au),
        errors=[(r.get("error") or {}).get("kind") for r in rows],
        violations=[r.get("violations") or [] for r in rows],
    )
    scores = compute_scores(inp, cfg=bootstrap or Bootstrap())
    scores["dropped_labels"] = len(truth) - len(keep)
    return scores


def score_file(
    preds_path: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    au: dict[str, Any] | None = None,
    cross_au: dict[str, Any] | None = None,
    au_source: str | None = None,
    cross_source: str | None = None,
    name: str | None = None,
    train_set: str | None = None,
    variant: str | None = None,
    png: str | os.PathLike | None = None,
    bootstrap: Any = None,
    matching: str = "paper",
    au_geometry: dict[str, int] | None = None,
    cross_geometry: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Score a predictions JSONL; write the score JSON (and a confusion PNG) when paths are given.

    The ``run`` block (read by :mod:`tagfer.evaluation.report`) takes the model, dataset and split of
    the predictions (most common values) unless overridden. ``au_geometry`` / ``cross_geometry``
    (:func:`au_geometries` of the AU tables) say which box geometry each AU IoU was measured
    against; they go to the run block and to the ``au_iou`` / ``cross_au_iou`` blocks.
    """
    preds = list(read_jsonl(preds_path))
    if not preds:
        raise ValueError(f"{preds_path}: no prediction records")
    scores = score_predictions(preds, au, cross_au, bootstrap, matching)

    def common(key: str) -> Any:
        c = Counter(str(p.get(key)) for p in preds if p.get(key) is not None)
        return c.most_common(1)[0][0] if c else None

    model = common("model")
    gen = next((p.get("gen") for p in preds if p.get("gen")), {})
    run = {
        "name": name or (Path(model).name if model else Path(preds_path).stem),
        "model": model,
        "dataset": common("source"),
        "split": common("split"),
        "train_set": train_set,
        "variant": variant,
        "gen": gen,
        "predictions": str(preds_path),
        "au_detector": au_source,
        "cross_detector": cross_source,
        "au_geometry": au_geometry,
        "cross_geometry": cross_geometry,
    }
    for key, geo in (("au_iou", au_geometry), ("cross_au_iou", cross_geometry)):
        if isinstance(scores.get(key), dict) and geo is not None:
            scores[key]["geometry"] = geo
    scores = {"run": run, **scores}
    if png:
        save_confusion_png(scores["confusion"], str(png), title=f"{run['name']} on {run['dataset']}")
        scores["confusion_png"] = str(png)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(scores, indent=2), encoding="utf-8")
    return scores
