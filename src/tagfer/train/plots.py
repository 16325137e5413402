"""Training-dynamics figure (the paper's Figure 5) from a JSONL training log.

Panels (those present in the log): total reward, each reward component (R_AU, R_ans =
accuracy, R_fmt), KL to the reference, completion length; SFT logs show loss and the
validation accuracy / AU IoU. When a step was logged twice (resumed run), the last record wins.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from tagfer.core.figures import DPI, READABLE, integer_axis
from tagfer.core.jsonl import read_jsonl

__all__ = ["read_log", "plot_training", "training_figure", "PANELS"]

PANELS = [
    ("reward", "total reward R"),
    ("r_au", "R_AU (AU IoU)"),
    ("r_ans", "R_ans (accuracy)"),
    ("r_fmt", "R_fmt"),
    ("kl", "KL"),
    ("completion_length", "completion length (tokens)"),
    ("loss", "loss"),
]


def read_log(path: str | Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """``{"train": {key: [(step, value), ...]}, "validation": {...}}`` with one value per step."""
    by_event: dict[str, dict[int, dict[str, Any]]] = {"train": {}, "validation": {}}
    for rec in read_jsonl(path):
        ev = rec.get("event", "train")
        if ev in by_event and isinstance(rec.get("step"), int):
            by_event[ev].setdefault(rec["step"], {}).update(rec)
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for ev, steps in by_event.items():
        series: dict[str, list[tuple[int, float]]] = {}
        for step in sorted(steps):
            for k, v in steps[step].items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and k != "step":
                    series.setdefault(k, []).append((step, float(v)))
        out[ev] = series
    return out


def training_figure(data: dict[str, dict[str, list[tuple[int, float]]]], smooth: int = 1, source: str = "log") -> Any:
    """The training-dynamics figure of :func:`read_log`'s ``data`` (a matplotlib Figure, not saved):
    readable fonts (:data:`tagfer.core.figures.READABLE`), whole-number step ticks; a single
    logged point is drawn as a marker. The caller closes it."""
    import matplotlib  # lazy (start-up time): matplotlib, PIL

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy (start-up time): matplotlib, PIL

    train, val = data["train"], data["validation"]
    panels = [(k, t) for k, t in PANELS if k in train]
    if val:
        panels.append(("__val__", "validation"))
    if not panels:
        raise ValueError(f"{source}: no plottable training records")
    n = len(panels)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    with matplotlib.rc_context(READABLE):
        fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
        for ax, (key, title) in zip(axes.flat, panels):
            if key == "__val__":
                for k in ("accuracy", "au_iou"):
                    if k in val:
                        xs, ys = zip(*val[k])
                        ax.plot(xs, ys, marker="o", label=k)
                ax.legend()
            else:
                xs, ys = zip(*train[key])
                if smooth > 1 and len(ys) >= smooth:
                    ys = tuple(sum(ys[max(0, i - smooth + 1): i + 1]) / len(ys[max(0, i - smooth + 1): i + 1]) for i in range(len(ys)))
                ax.plot(xs, ys, marker="o" if len(xs) <= 12 else None, markersize=4)
            ax.set_title(title)
            ax.set_xlabel("step")
            integer_axis(ax.xaxis)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        fig.tight_layout()
    return fig


def plot_training(log: str | Path, out: str | Path, smooth: int = 1) -> Path:
    """Write the training-dynamics figure of ``log`` (:func:`training_figure`) to ``out`` (PNG/PDF/SVG by suffix)."""
    import matplotlib.pyplot as plt  # lazy (start-up time): matplotlib, PIL

    fig = training_figure(read_log(log), smooth, source=str(log))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out
