"""Statistics and figures of a build (paper §4 / App. D): one streaming pass over accepted + rejected.

Summary JSON (``stats.json``)::

    {"accepted": int, "rejected": int, "processed": int, "acceptance_rate": float,
     "by_source": {source: {"accepted", "rejected", "acceptance_rate"}},
     "by_class": {label: accepted count}, "by_source_class": {source: {label: count}},
     "rejection_reasons": {reason: count},
     "retries": {"mean": float, "items_with_retry": float (fraction), "histogram": {n: count}},
     "eliminations": {"mean": float, "histogram": {n: count}},          # accepted samples
     "aus_per_image": {"mean", "histogram"},        # activated AUs, every grounded image
     "au_frequency": {"AU12": count, ...},          # activated AUs, every grounded image
     "candidate_pool": {"histogram": {size: count}, "no_candidate_rate": float},
     "activation": {"no_activated_rate": float, "no_candidate_but_activated_rate": float,
                    "au_threshold": float, "au_candidate_threshold": float},
     "aus_used_per_trace": {"mean", "histogram", "exactly_3_rate"},   # boxes in accepted targets
     "trace_tokens": {"mean", "max", "median", "tokenizer"}}

"Grounded images" are accepted samples plus rejected items that got past AU
detection (their records carry ``top``/``active``). Candidate pool = the top-K
AU list given to the teacher (size 0 = no candidate; paper: ~21%). The two
rates come from two thresholds (:class:`tagfer.au.aus.AUConfig`): activated AUs
(``aus_per_image``, paper ≈5–6; ``no_activated_rate``: images whose R_AU is
skipped) and confident candidates (``no_candidate_rate``;
``no_candidate_but_activated_rate``: images the teacher sees without an AU
list but whose R_AU still applies). The thresholds are read from
``build_config.json`` (the AUConfig defaults when it leaves them unset). AUs used
per trace = boxes in the accepted target (paper: 65% use exactly 3).
Trace length: tokens of the completion with the given tokenizer (a
transformers tokenizer folder), else the number of whitespace-separated
words — an approximation that under-counts BPE tokens by roughly 1.3–1.5× on
English prose; the ``tokenizer`` field says which was used.

Plots (PNG, matplotlib Agg): classes per source, rejection reasons, AU
frequency, AUs per image, candidate-pool sizes, AUs used per trace, trace
length.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable

from tagfer.au.aus import AUConfig
from tagfer.core.figures import DPI, READABLE, fill_integer_keys, integer_axis
from tagfer.core.jsonl import read_jsonl
from tagfer.core.labels import LABELS
from tagfer.traces.trace import parse_trace

__all__ = ["compute_stats", "plot_stats", "write_stats", "whitespace_tokens"]


def whitespace_tokens(text: str) -> int:
    return len(text.split())


def _hist(c: Counter) -> dict[str, int]:
    return {str(k): c[k] for k in sorted(c)}


def _mean(c: Counter) -> float:
    n = sum(c.values())
    return round(sum(k * v for k, v in c.items()) / n, 4) if n else 0.0


def _median(c: Counter) -> float:
    n = sum(c.values())
    if not n:
        return 0.0
    half, acc = n / 2, 0
    for k in sorted(c):
        acc += c[k]
        if acc >= half:
            return float(k)
    return 0.0  # pragma: no cover


def _files(build_dir: Path, stem: str) -> list[Path]:
    return sorted(build_dir.glob(f"{stem}*.jsonl"))


def _thresholds(build_dir: Path) -> dict[str, float]:
    """The activation and candidate thresholds of the build (its build_config*.json, else the AUConfig defaults)."""
    out = {"au_threshold": AUConfig.threshold, "au_candidate_threshold": AUConfig.candidate_threshold}
    for f in sorted(build_dir.glob("build_config*.json")):
        try:
            cfg = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        for key in out:
            if isinstance(cfg.get(key), (int, float)):
                out[key] = float(cfg[key])
        break
    return out


def compute_stats(build_dir: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> dict[str, Any]:
    """The summary dict (module docstring) of the build in ``build_dir``; plots need the raw counters (``_counters``)."""
    d = Path(build_dir)
    if not _files(d, "accepted") and not _files(d, "rejected"):
        raise FileNotFoundError(f"no accepted*.jsonl or rejected*.jsonl in {d}")
    count: Callable[[str], int] = whitespace_tokens
    tok_name = "whitespace"
    if tokenizer:
        from transformers import AutoTokenizer  # lazy (start-up time): transformers, PIL

        tok = AutoTokenizer.from_pretrained(str(tokenizer))
        count = lambda t: len(tok(t, add_special_tokens=False)["input_ids"])  # noqa: E731
        tok_name = str(tokenizer)

    acc_src: Counter = Counter()
    rej_src: Counter = Counter()
    src_cls: dict[str, Counter] = defaultdict(Counter)
    reasons: Counter = Counter()
    retries: Counter = Counter()
    elim: Counter = Counter()
    aus_per_image: Counter = Counter()
    au_freq: Counter = Counter()
    pool: Counter = Counter()
    used: Counter = Counter()
    tokens: Counter = Counter()
    seen: set[str] = set()
    pool_empty_active = 0

    def grounded(active: list[int] | None, top: list | None) -> None:
        nonlocal pool_empty_active
        if active is None:
            return
        aus_per_image[len(active)] += 1
        au_freq.update(f"AU{int(a)}" for a in active)
        pool[len(top or [])] += 1
        if not top and active:
            pool_empty_active += 1

    for f in _files(d, "accepted"):
        for r in read_jsonl(f):
            if r.get("id") in seen:
                continue
            seen.add(r.get("id"))
            src = r.get("source", "?")
            acc_src[src] += 1
            src_cls[src][r.get("label", "?")] += 1
            meta = r.get("meta") or {}
            retries[int(meta.get("retries", 0))] += 1
            elim[int(meta.get("eliminations", 0))] += 1
            grounded(r.get("aus") or [], meta.get("top") if "top" in meta else None)
            comp = r.get("completion", "")
            used[len(parse_trace(comp).boxes)] += 1
            tokens[count(comp)] += 1
    for f in _files(d, "rejected"):
        for r in read_jsonl(f):
            if r.get("id") in seen:
                continue
            seen.add(r.get("id"))
            rej_src[r.get("source", "?")] += 1
            reasons[r.get("reason", "?")] += 1
            retries[int(r.get("retries", 0) or 0)] += 1
            if "active" in r:
                grounded(r.get("active"), r.get("top"))

    n_acc, n_rej = sum(acc_src.values()), sum(rej_src.values())
    processed = n_acc + n_rej
    n_used = sum(used.values())
    n_pool = sum(pool.values())
    by_class = Counter()
    for c in src_cls.values():
        by_class.update(c)
    summary: dict[str, Any] = {
        "accepted": n_acc,
        "rejected": n_rej,
        "processed": processed,
        "acceptance_rate": round(n_acc / processed, 4) if processed else 0.0,
        "by_source": {
            s: {"accepted": acc_src[s], "rejected": rej_src[s], "acceptance_rate": round(acc_src[s] / (acc_src[s] + rej_src[s]), 4)}
            for s in sorted(set(acc_src) | set(rej_src))
        },
        "by_class": {lab: by_class[lab] for lab in LABELS},
        "by_source_class": {s: {lab: c[lab] for lab in LABELS} for s, c in sorted(src_cls.items())},
        "rejection_reasons": dict(reasons.most_common()),
        "retries": {"mean": _mean(retries), "items_with_retry": round(1 - retries[0] / processed, 4) if processed else 0.0, "histogram": _hist(retries)},
        "eliminations": {"mean": _mean(elim), "histogram": _hist(elim)},
        "aus_per_image": {"mean": _mean(aus_per_image), "histogram": _hist(aus_per_image)},
        "au_frequency": dict(au_freq.most_common()),
        "candidate_pool": {"histogram": _hist(pool), "no_candidate_rate": round(pool[0] / n_pool, 4) if n_pool else 0.0},
        "activation": {
            "no_activated_rate": round(aus_per_image[0] / n_pool, 4) if n_pool else 0.0,
            "no_candidate_but_activated_rate": round(pool_empty_active / n_pool, 4) if n_pool else 0.0,
            **_thresholds(d),
        },
        "aus_used_per_trace": {"mean": _mean(used), "histogram": _hist(used), "exactly_3_rate": round(used[3] / n_used, 4) if n_used else 0.0},
        "trace_tokens": {"mean": _mean(tokens), "max": max(tokens) if tokens else 0, "median": _median(tokens), "tokenizer": tok_name},
        "_counters": {"tokens": tokens},
    }
    return summary


def stats_figures(summary: dict[str, Any]) -> dict[str, Any]:
    """The figures of :func:`plot_stats` (name → matplotlib Figure), not saved: readable fonts
    (:data:`tagfer.core.figures.READABLE`), whole-number ticks on every count axis, histograms over
    whole numbers with their empty values shown (a bar of 0 for 3 between 2 and 4). The caller
    closes them."""
    import matplotlib  # lazy (start-up time): matplotlib, PIL

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy (start-up time): matplotlib, PIL

    figs: dict[str, Any] = {}
    with matplotlib.rc_context(READABLE):

        def bar(data: dict[str, Any], name: str, title: str, xlabel: str, rotate: bool = False) -> None:
            fig, ax = plt.subplots(figsize=(7, 3.8))
            data = fill_integer_keys(data)
            keys = list(data)
            ax.bar(range(len(keys)), [data[k] for k in keys], color="#4477aa")
            ax.set_xticks(range(len(keys)))
            ax.set_xticklabels(keys, rotation=45 if rotate else 0, ha="right" if rotate else "center")
            ax.set_title(title)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("count")
            integer_axis(ax.yaxis)
            figs[name] = fig

        # classes per source (stacked)
        fig, ax = plt.subplots(figsize=(7, 3.8))
        bottom = [0] * len(LABELS)
        for s, c in summary["by_source_class"].items():
            vals = [c.get(lab, 0) for lab in LABELS]
            ax.bar(LABELS, vals, bottom=bottom, label=s)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_title("accepted samples per class and source")
        ax.set_ylabel("count")
        if summary["by_source_class"]:
            ax.legend()
        ax.tick_params(axis="x", rotation=30)
        integer_axis(ax.yaxis)
        figs["classes"] = fig
        bar(summary["rejection_reasons"] or {"none": 0}, "rejections", "rejection reasons", "reason", rotate=True)
        bar(summary["au_frequency"] or {"none": 0}, "au_frequency", "activated AU frequency", "AU", rotate=True)
        bar(summary["aus_per_image"]["histogram"] or {"0": 0}, "aus_per_image", "activated AUs per image", "AUs")
        bar(summary["candidate_pool"]["histogram"] or {"0": 0}, "candidate_pool", "candidate-pool size (top-K AU list)", "AUs in the pool")
        bar(summary["aus_used_per_trace"]["histogram"] or {"0": 0}, "aus_used_per_trace", "grounded regions per accepted trace", "boxes")
        tokens: Counter = summary.get("_counters", {}).get("tokens", Counter())
        fig, ax = plt.subplots(figsize=(7, 3.8))
        if tokens:
            lo, hi = min(tokens), max(tokens)
            # whole-token bins: one per length while they fit in 50, else 50 bins of a whole width
            width = max(1, -(-(hi - lo + 1) // 50))
            edges = [lo - 0.5 + i * width for i in range(-(-(hi - lo + 1) // width) + 1)]
            ax.hist(list(tokens.keys()), weights=list(tokens.values()), bins=edges, color="#4477aa")
        ax.set_title(f"trace length ({summary['trace_tokens']['tokenizer']} tokens)")
        ax.set_xlabel("tokens")
        ax.set_ylabel("count")
        integer_axis(ax.xaxis)
        integer_axis(ax.yaxis)
        figs["trace_tokens"] = fig
        for f in figs.values():
            f.tight_layout()
    return figs


def plot_stats(summary: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """Write the PNG figures (:func:`stats_figures`); returns their paths."""
    import matplotlib.pyplot as plt  # lazy (start-up time): matplotlib, PIL

    o = Path(out_dir)
    o.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, fig in stats_figures(summary).items():
        p = o / f"{name}.png"
        fig.savefig(p, dpi=DPI)
        plt.close(fig)
        written.append(p)
    return written


def write_stats(build_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, tokenizer: str | os.PathLike | None = None, plots: bool = True) -> dict[str, Any]:
    """Compute, write ``stats.json`` (+ PNGs) to ``out_dir`` (default ``build_dir/stats``); returns the summary."""
    summary = compute_stats(build_dir, tokenizer)
    o = Path(out_dir) if out_dir else Path(build_dir) / "stats"
    o.mkdir(parents=True, exist_ok=True)
    figures = [p.name for p in plot_stats(summary, o)] if plots else []
    summary.pop("_counters", None)
    summary["figures"] = figures
    (o / "stats.json").write_text(json.dumps(summary, indent=2))
    return summary
