"""tagfer.train.plots: the training-dynamics figure on a short run (whole step ticks, readable fonts)."""

from __future__ import annotations

import pytest

from tagfer.core.jsonl import JsonlWriter
from tagfer.train.plots import read_log, training_figure


@pytest.mark.parametrize("steps", [1, 3, 40])
def test_short_runs_have_whole_step_ticks_and_readable_fonts(tmp_path, steps):
    import matplotlib.pyplot as plt

    log = tmp_path / "train_log.jsonl"
    with JsonlWriter(log) as w:
        for step in range(1, steps + 1):
            w.write({"event": "train", "step": step, "loss": 2.0 / step, "reward": step / 5, "completion_length": 90.5 + step})
        w.write({"event": "validation", "step": steps, "accuracy": 0.4, "au_iou": 0.3})
    fig = training_figure(read_log(log))
    try:
        axes = [ax for ax in fig.axes if ax.get_visible() and ax.axison]
        assert len(axes) == 4  # reward, completion length, loss, validation
        for ax in axes:
            lo, hi = ax.get_xlim()
            ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
            assert ticks and all(float(t).is_integer() for t in ticks), (ax.get_title(), ticks)
            assert all(lab.get_fontsize() >= 11 for lab in ax.get_xticklabels() + ax.get_yticklabels())
            assert ax.title.get_fontsize() >= 12
            if steps == 1 and ax.get_title() != "validation":
                assert ax.lines[0].get_marker() == "o"  # a single point is visible
    finally:
        plt.close(fig)
    with pytest.raises(ValueError, match="no plottable"):
        training_figure({"train": {}, "validation": {}})
