"""Report tables in the layout of the paper's Tables 1–5, from the score files of several runs.

Input: score JSON files written by ``tagfer score`` (:func:`tagfer.evaluation.eval.score_file`).
Each holds a ``run`` block (``name``, ``model``, ``dataset``, ``split``, optional
``train_set`` and ``variant``) and the metrics of :func:`tagfer.evaluation.metrics.compute_scores`.

Tables (every value in percent, two decimals; in each column the best value is
**bold** and the second best <u>underlined</u> — ties share the mark):

``main`` (Table 1)
    rows = run names, columns = datasets (RAF-DB, FERPlus, AffectNet, then any
    other) and ``Avg`` = mean accuracy over the row's datasets (*choice*: left
    empty when the row lacks a dataset another row has, so averages compare alike).
``ablation`` (Tables 2–4)
    rows = run names, columns = per dataset: Acc, AU IoU and, when computed,
    cross-detector AU IoU ("X-IoU").
``cross`` (Table 5)
    rows = training set (``run.train_set``), columns = test dataset, accuracy.
    Runs without ``train_set`` are left out of this table.
``details``
    per run × dataset: accuracy, macro-F1, format validity under the paper's R_fmt rules and
    under the strict grammar, AU IoU, cross AU IoU, each with its bootstrap 95% CI, the box
    geometry of each AU table (e.g. OpenFace's own landmarks or MediaPipe's regions), and n.

Markdown goes to one file; each table is also written as CSV (plain numbers,
no markup) next to it.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

__all__ = [
    "DATASET_ORDER",
    "DATASET_NAMES",
    "RunScores",
    "Table",
    "load_scores",
    "main_table",
    "ablation_table",
    "cross_table",
    "details_table",
    "geometry_label",
    "build_tables",
    "to_markdown",
    "write_report",
]

DATASET_ORDER = ("rafdb", "ferplus", "affectnet")
DATASET_NAMES = {"rafdb": "RAF-DB", "ferplus": "FERPlus", "affectnet": "AffectNet"}


@dataclass
class RunScores:
    """One score file: its run description and its metrics."""

    name: str
    dataset: str
    scores: dict[str, Any]
    train_set: str | None = None
    variant: str | None = None
    path: str | None = None

    def metric(self, key: str) -> float | None:
        block = self.scores.get(key)
        if isinstance(block, dict):
            v = block.get("value")
            return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)
        return None

    def ci(self, key: str) -> list[float] | None:
        block = self.scores.get(key)
        return block.get("ci") if isinstance(block, dict) else None


@dataclass
class Table:
    """A rectangular table of numbers (``None`` = empty) with row/column names."""

    key: str
    title: str
    corner: str
    rows: list[str]
    columns: list[str]
    values: list[list[float | None]]
    rank: bool = True  # mark best / second per column
    text: list[list[str]] | None = field(default=None)  # preformatted cells (details table)


def dataset_name(ds: str) -> str:
    return DATASET_NAMES.get(ds, ds)


def load_scores(paths: Iterable[str | os.PathLike], names: Sequence[str | None] | None = None) -> list[RunScores]:
    """Read score files; ``names`` (aligned, optional) override each run's display name."""
    out = []
    paths = list(paths)
    for i, p in enumerate(paths):
        data = json.loads(Path(p).read_text(encoding="utf-8"))
        if "run" not in data or "accuracy" not in data:
            raise ValueError(f"{p}: not a tagfer score file (no 'run'/'accuracy' block)")
        run = data["run"]
        name = (names[i] if names and i < len(names) and names[i] else None) or run.get("name") or run.get("model") or Path(p).stem
        out.append(
            RunScores(
                name=str(name),
                dataset=str(run.get("dataset") or "unknown"),
                scores=data,
                train_set=run.get("train_set"),
                variant=run.get("variant"),
                path=str(p),
            )
        )
    return out


def _ordered(items: Iterable[str], order: Sequence[str]) -> list[str]:
    seen: list[str] = []
    for x in items:
        if x not in seen:
            seen.append(x)
    return sorted(seen, key=lambda x: (order.index(x) if x in order else len(order), seen.index(x)))


def _datasets(runs: Sequence[RunScores]) -> list[str]:
    return _ordered((r.dataset for r in runs), DATASET_ORDER)


def _row_names(runs: Sequence[RunScores]) -> list[str]:
    return _ordered((r.name for r in runs), ())


def _lookup(runs: Sequence[RunScores], row: Callable[[RunScores], str | None]) -> dict[tuple[str, str], RunScores]:
    """(row key, dataset) → the last run with that key (later files override earlier ones)."""
    out: dict[tuple[str, str], RunScores] = {}
    for r in runs:
        k = row(r)
        if k is not None:
            out[(k, r.dataset)] = r
    return out


def _pct(v: float | None) -> float | None:
    return None if v is None else 100.0 * v


def main_table(runs: Sequence[RunScores], metric: str = "accuracy") -> Table:
    """Table 1: models × datasets with the average (see module docstring)."""
    ds = _datasets(runs)
    rows = _row_names(runs)
    at = _lookup(runs, lambda r: r.name)
    values = []
    for name in rows:
        vals = [_pct(at[(name, d)].metric(metric)) if (name, d) in at else None for d in ds]
        avg = sum(vals) / len(vals) if vals and all(v is not None for v in vals) else None  # type: ignore[misc]
        values.append(vals + [avg])
    cols = [dataset_name(d) for d in ds] + ["Avg"]
    title = "Accuracy (%) on the test sets" if metric == "accuracy" else f"{metric} (%) on the test sets"
    return Table("main", title, "Model", rows, cols, values)


def ablation_table(runs: Sequence[RunScores]) -> Table:
    """Tables 2–4: runs × (Acc, AU IoU, cross AU IoU) per dataset; empty columns dropped."""
    ds = _datasets(runs)
    rows = _row_names(runs)
    at = _lookup(runs, lambda r: r.name)
    spec = [(d, m, lab) for d in ds for m, lab in (("accuracy", "Acc"), ("au_iou", "AU IoU"), ("cross_au_iou", "X-IoU"))]
    grid = [[_pct(at[(n, d)].metric(m)) if (n, d) in at else None for d, m, _ in spec] for n in rows]
    keep = [j for j in range(len(spec)) if any(row[j] is not None for row in grid)]
    cols = [f"{dataset_name(spec[j][0])} {spec[j][2]}" for j in keep]
    return Table("ablation", "Ablation: accuracy and AU grounding (%)", "Variant", rows, cols, [[row[j] for j in keep] for row in grid])


def cross_table(runs: Sequence[RunScores]) -> Table:
    """Table 5: training set × test set accuracy (runs with ``train_set`` only)."""
    with_train = [r for r in runs if r.train_set]
    ds = _datasets(with_train)
    rows = _ordered((str(r.train_set) for r in with_train), DATASET_ORDER)
    at = _lookup(with_train, lambda r: str(r.train_set))
    values = [[_pct(at[(t, d)].metric("accuracy")) if (t, d) in at else None for d in ds] for t in rows]
    return Table(
        "cross", "Cross-dataset accuracy (%): trained on (rows) / tested on (columns)", "Train \\ Test",
        [dataset_name(t) for t in rows], [dataset_name(d) for d in ds], values,
    )


def _fmt_ci(block: Any) -> str:
    if not isinstance(block, dict) or block.get("value") is None:
        return ""
    s = f"{100 * block['value']:.2f}"
    if block.get("ci"):
        lo, hi = block["ci"]
        s += f" [{100 * lo:.1f}, {100 * hi:.1f}]"
    return s


def geometry_label(geo: Any) -> str:
    """The box geometry of an AU table as text: ``{"openface-landmarks": 3000}`` → ``openface-landmarks``;
    several → each with its count (``openface-landmarks 3000, mediapipe-regions 68``)."""
    if not geo:
        return ""
    if isinstance(geo, str):
        return geo
    if isinstance(geo, dict):
        items = sorted(geo.items(), key=lambda kv: -kv[1])
        return items[0][0] if len(items) == 1 else ", ".join(f"{k} {v}" for k, v in items)
    return str(geo)


def _validity(r: RunScores, key: str) -> Any:
    """A format-validity block; score files from before the split have one ``format_validity`` (the strict figure)."""
    block = r.scores.get(key)
    if block is None and key == "format_validity_strict":
        block = r.scores.get("format_validity")
    return block


def details_table(runs: Sequence[RunScores]) -> Table:
    """Every run × dataset with CIs (not ranked), both format-validity figures and the box geometry
    each AU IoU was measured against."""
    keys = [("accuracy", "Acc"), ("macro_f1", "Macro-F1"), ("format_validity_paper", "Format valid (paper)"),
            ("format_validity_strict", "Format valid (strict)"), ("au_iou", "AU IoU"), ("cross_au_iou", "X-IoU")]
    rows, values, text = [], [], []
    for r in runs:
        blocks = [_validity(r, k) if k.startswith("format_validity") else r.scores.get(k) for k, _ in keys]
        run = r.scores.get("run") or {}
        geos = [geometry_label(run.get("au_geometry")), geometry_label(run.get("cross_geometry"))]
        rows.append(f"{r.name} / {dataset_name(r.dataset)}")
        values.append([_pct(b.get("value")) if isinstance(b, dict) and b.get("value") is not None else None for b in blocks]
                      + [None, None, float(r.scores.get("n", 0))])
        text.append([_fmt_ci(b) for b in blocks] + geos + [str(r.scores.get("n", ""))])
    cols = [lab for _, lab in keys] + ["AU boxes", "X-IoU boxes", "n"]
    return Table("details", "Details with bootstrap 95% CIs (%)", "Run / dataset", rows, cols, values, rank=False, text=text)


def build_tables(runs: Sequence[RunScores], which: Sequence[str] = ("main", "ablation", "cross", "details"), metric: str = "accuracy") -> list[Table]:
    """The requested tables; ``cross`` is skipped when no run has a ``train_set``. ``metric``: of the main table."""
    makers = {"main": lambda r: main_table(r, metric), "ablation": ablation_table, "cross": cross_table, "details": details_table}
    unknown = [w for w in which if w not in makers]
    if unknown:
        raise ValueError(f"unknown table(s) {unknown}; choose from {sorted(makers)}")
    out = []
    for w in which:
        if w == "cross" and not any(r.train_set for r in runs):
            continue
        out.append(makers[w](runs))
    return out


def ranks(column: Sequence[float | None], decimals: int = 2) -> list[int]:
    """Per cell: 1 = best, 2 = second best (distinct values, rounded as displayed), 0 = other/empty."""
    shown = [None if v is None else round(v, decimals) for v in column]
    distinct = sorted({v for v in shown if v is not None}, reverse=True)
    best = distinct[0] if distinct else None
    second = distinct[1] if len(distinct) > 1 else None
    return [0 if v is None else 1 if v == best else 2 if v == second else 0 for v in shown]


def _cell(v: float | None, rank: int) -> str:
    if v is None:
        return "–"
    s = f"{v:.2f}"
    return f"**{s}**" if rank == 1 else f"<u>{s}</u>" if rank == 2 else s


def to_markdown(table: Table) -> str:
    """One table as GitHub markdown (best bold, second underlined when ``table.rank``)."""
    ncol = len(table.columns)
    marks = [[0] * ncol for _ in table.rows]
    if table.rank and len(table.rows) > 1:
        for j in range(ncol):
            for i, rk in enumerate(ranks([row[j] for row in table.values])):
                marks[i][j] = rk
    lines = [f"### {table.title}", "", "| " + " | ".join([table.corner, *table.columns]) + " |", "|" + "---|" * (ncol + 1)]
    for i, name in enumerate(table.rows):
        if table.text is not None:
            cells = [c or "–" for c in table.text[i]]
        else:
            cells = [_cell(v, marks[i][j]) for j, v in enumerate(table.values[i])]
        lines.append("| " + " | ".join([name.replace("|", "\\|"), *cells]) + " |")
    return "\n".join(lines) + "\n"


def _write_csv(table: Table, path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow([table.corner, *table.columns])
        for name, row in zip(table.rows, table.values):
            w.writerow([name, *["" if v is None else f"{v:.4f}" for v in row]])


def write_report(
    runs: Sequence[RunScores],
    out_md: str | os.PathLike,
    which: Sequence[str] = ("main", "ablation", "cross", "details"),
    title: str = "TAG evaluation report",
    csv_dir: str | os.PathLike | None = None,
    metric: str = "accuracy",
) -> tuple[str, list[Path]]:
    """Write the markdown report and one CSV per table (``<stem>_<table>.csv``). Returns (markdown, csv paths)."""
    tables = build_tables(runs, which, metric)
    md = f"# {title}\n\n" + "\n".join(to_markdown(t) for t in tables)
    md += "\nSources: " + ", ".join(f"`{r.path}`" for r in runs if r.path) + "\n"
    out = Path(out_md)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md, encoding="utf-8")
    cdir = Path(csv_dir) if csv_dir else out.parent
    cdir.mkdir(parents=True, exist_ok=True)
    paths = []
    for t in tables:
        p = cdir / f"{out.stem}_{t.key}.csv"
        _write_csv(t, p)
        paths.append(p)
    return md, paths
