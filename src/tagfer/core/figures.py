"""Shared look of the matplotlib figures (build statistics, training dynamics, video plots).

Readable at the size they are saved, whatever the data: fonts of at least 11 pt
(:data:`READABLE`, used as an ``rc_context``), integer ticks on axes that hold counts or steps
(:func:`integer_axis`), and a saving resolution of :data:`DPI`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["READABLE", "DPI", "integer_axis", "fill_integer_keys"]

#: rcParams of every tagfer figure (``with matplotlib.rc_context(READABLE): ...``).
READABLE: dict[str, Any] = {
    "font.size": 12,
    "axes.titlesize": 13,
    "axes.labelsize": 12,
    "xtick.labelsize": 11,
    "ytick.labelsize": 11,
    "legend.fontsize": 11,
}
DPI = 120


def integer_axis(axis: Any, min_top: float = 1.0) -> None:
    """Ticks of ``axis`` (``ax.yaxis`` / ``ax.xaxis``) only at whole numbers: a count y axis whose
    data are all 0 spans ``[0, min_top]``, an axis narrower than 2 (one step) is widened by one on
    each side, so at least two whole numbers are in view. Call it after plotting."""
    from matplotlib.ticker import MaxNLocator  # lazy (start-up time): matplotlib

    axis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=2))
    ax = axis.axes
    get, set_ = (ax.get_ylim, ax.set_ylim) if axis is ax.yaxis else (ax.get_xlim, ax.set_xlim)
    lo, hi = get()
    if axis is ax.yaxis and hi < min_top:
        set_(min(lo, 0.0), min_top)
    elif hi - lo < 2:  # fewer than two whole numbers in view (e.g. a single step): widen around it
        mid = round((lo + hi) / 2)
        set_(min(lo, mid - 1), max(hi, mid + 1))


def fill_integer_keys(hist: dict[str, int]) -> dict[str, int]:
    """A histogram keyed by whole numbers (``{"0": 2, "4": 1}``) with the missing keys between its
    smallest and largest filled with 0 (``{"0": 2, "1": 0, …, "4": 1}``); other keys unchanged."""
    if not hist or not all(k.lstrip("-").isdigit() for k in hist):
        return dict(hist)
    ks = [int(k) for k in hist]
    return {str(i): hist.get(str(i), 0) for i in range(min(ks), max(ks) + 1)}
