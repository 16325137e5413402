"""Training-dynamics figure (the paper's Figure 5) from a JSONL training log.

Panels (those present in the log): total reward, each reward component (R_AU, R_ans =
accuracy, R_fmt), KL to the reference, completion length; SFT logs show loss and the
validation accuracy / AU IoU. When a step was logged twice (resumed run), the last record wins.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from tagfer.core.jsonl import read_jsonl

__all__ = ["read_log", "plot_training", "PANELS"]

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


def plot_training(log: str | Path, out: str | Path, smooth: int = 1) -> Path:
    """Write the training-dynamics figure of ``log`` to ``out`` (PNG/PDF/SVG by suffix)."""
    import matplotlib  # lazy (start-up time): matplotlib, PIL

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy (start-up time): matplotlib, PIL

    data = read_log(log)
    train, val = data["train"], data["validation"]
    panels = [(k, t) for k, t in PANELS if k in train]
    if val:
        panels.append(("__val__", "validation"))
    if not panels:
        raise ValueError(f"{log}: no plottable training records")
    n = len(panels)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
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
                ys = [sum(ys[max(0, i - smooth + 1): i + 1]) / len(ys[max(0, i - smooth + 1): i + 1]) for i in range(len(ys))]
            ax.plot(xs, ys)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
