"""Build statistics: exact counts on a hand-made build folder, plots written."""

from __future__ import annotations

import json

import pytest

from tagfer.core.jsonl import JsonlWriter
from tagfer.data.stats import compute_stats, write_stats


def comp(label: str, n_boxes: int, words: int = 0) -> str:
    boxes = " ".join(f"AU{i} <bbox>[{10 * i}, 10, {10 * i + 5}, 20]</bbox>" for i in range(1, n_boxes + 1))
    filler = " ".join(["w"] * words)
    return f"<think>\nglobal look {boxes} {filler}\n</think>\n<answer>{label}</answer>"


def acc(i, source, label, aus, top, n_boxes, retries=0, elim=0, words=0):
    return {"id": f"{source}/{i}", "source": source, "image": "x.png", "label": label, "completion": comp(label, n_boxes, words),
            "au_boxes": [[1, 2, 3, 4]] * len(aus), "aus": aus, "teacher": "t", "split": "train",
            "meta": {"retries": retries, "eliminations": elim, "top": [[a, 0.9, [1, 2, 3, 4]] for a in top]}}


def rej(i, source, reason, active=None, top=None, retries=0):
    r = {"id": f"{source}/r{i}", "source": source, "label": "fear", "reason": reason, "retries": retries, "eliminations": 0}
    if active is not None:
        r.update(active=active, top=top)
    return r


@pytest.fixture()
def build_dir(tmp_path):
    with JsonlWriter(tmp_path / "accepted.jsonl") as w:
        w.write(acc(1, "rafdb", "happiness", [12, 6, 25, 26], [12, 6, 25], 3, words=10))
        w.write(acc(2, "rafdb", "sadness", [4, 15], [4, 15], 2, retries=1, elim=2, words=20))
        w.write(acc(3, "affectnet", "happiness", [12], [12], 1, elim=1))
        w.write(acc(4, "affectnet", "neutral", [], [], 0))
        w.write(acc(1, "rafdb", "happiness", [12], [12], 1))  # duplicate id: ignored
    with JsonlWriter(tmp_path / "rejected-00000-of-00001.jsonl") as w:
        w.write(rej(1, "rafdb", "quality", active=[12, 6], top=[12, 6], retries=2))
        w.write(rej(2, "affectnet", "no_face"))
        w.write(rej(3, "affectnet", "format", active=[], top=[]))
    return tmp_path


def test_exact_counts(build_dir):
    s = compute_stats(build_dir)
    assert (s["accepted"], s["rejected"], s["processed"]) == (4, 3, 7)
    assert s["acceptance_rate"] == pytest.approx(4 / 7, abs=1e-4)
    assert s["by_source"]["rafdb"] == {"accepted": 2, "rejected": 1, "acceptance_rate": pytest.approx(2 / 3, abs=1e-4)}
    assert s["by_class"]["happiness"] == 2 and s["by_class"]["neutral"] == 1 and s["by_class"]["anger"] == 0
    assert s["by_source_class"]["affectnet"]["happiness"] == 1
    assert s["rejection_reasons"] == {"quality": 1, "no_face": 1, "format": 1}
    assert s["retries"]["histogram"] == {"0": 5, "1": 1, "2": 1} and s["retries"]["items_with_retry"] == pytest.approx(2 / 7, abs=1e-4)
    assert s["eliminations"]["histogram"] == {"0": 2, "1": 1, "2": 1} and s["eliminations"]["mean"] == 0.75
    # grounded images: 4 accepted + 2 rejected with AU info (no_face has none)
    assert s["aus_per_image"]["histogram"] == {"0": 2, "1": 1, "2": 2, "4": 1}
    assert s["au_frequency"]["AU12"] == 3 and s["au_frequency"]["AU26"] == 1
    assert s["candidate_pool"]["histogram"] == {"0": 2, "1": 1, "2": 2, "3": 1}
    assert s["candidate_pool"]["no_candidate_rate"] == pytest.approx(2 / 6, abs=1e-4)
    assert s["activation"]["no_activated_rate"] == pytest.approx(2 / 6, abs=1e-4)
    assert s["activation"]["no_candidate_but_activated_rate"] == 0.0  # these records came from one threshold
    assert (s["activation"]["au_threshold"], s["activation"]["au_candidate_threshold"]) == (0.3, 0.5)  # the AUConfig defaults
    assert s["aus_used_per_trace"]["histogram"] == {"0": 1, "1": 1, "2": 1, "3": 1} and s["aus_used_per_trace"]["exactly_3_rate"] == 0.25
    tok = s["trace_tokens"]
    assert tok["tokenizer"] == "whitespace" and tok["max"] == len(comp("sadness", 2, 20).split())


def test_activation_and_candidate_rates_are_reported_separately(tmp_path):
    """Two thresholds: images with activated AUs but no confident candidate (paper: ~21% without a candidate)."""
    with JsonlWriter(tmp_path / "accepted.jsonl") as w:
        w.write(acc(1, "rafdb", "happiness", [12, 6, 25, 26, 1], [12, 6, 25], 3))
        w.write(acc(2, "rafdb", "sadness", [4, 15], [], 0))  # activated, no candidate: the no-AU prompt, R_AU applies
        w.write(acc(3, "rafdb", "neutral", [], [], 0))  # nothing activated: R_AU skipped
    with JsonlWriter(tmp_path / "rejected.jsonl") as w:
        w.write(rej(1, "rafdb", "format", active=[12, 7, 9], top=[]))
    (tmp_path / "build_config.json").write_text(json.dumps({"au_threshold": 0.2, "au_candidate_threshold": None}))
    s = compute_stats(tmp_path)
    assert s["aus_per_image"]["mean"] == pytest.approx(10 / 4)
    assert s["candidate_pool"]["no_candidate_rate"] == pytest.approx(3 / 4)
    assert s["activation"] == {"no_activated_rate": 0.25, "no_candidate_but_activated_rate": 0.5, "au_threshold": 0.2, "au_candidate_threshold": 0.5}


def test_write_stats_json_and_plots(build_dir):
    s = write_stats(build_dir)
    out = build_dir / "stats"
    assert json.loads((out / "stats.json").read_text())["accepted"] == 4
    assert set(s["figures"]) == {"classes.png", "rejections.png", "au_frequency.png", "aus_per_image.png", "candidate_pool.png", "aus_used_per_trace.png", "trace_tokens.png"}
    for f in s["figures"]:
        assert (out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tokenizer_counts(build_dir, tiny_vlm_dir):
    s = compute_stats(build_dir, tokenizer=tiny_vlm_dir)
    assert s["trace_tokens"]["tokenizer"] == str(tiny_vlm_dir) and s["trace_tokens"]["max"] > 0


def test_empty_dir(tmp_path):
    with pytest.raises(FileNotFoundError):
        compute_stats(tmp_path)


def test_figures_count_in_whole_numbers_with_readable_fonts(build_dir):
    """Small data (counts of 1 and 2): ticks at whole numbers only, fonts ≥ 11 pt, integer histograms without holes."""
    import matplotlib.pyplot as plt

    from tagfer.data.stats import stats_figures

    figs = stats_figures(compute_stats(build_dir))
    try:
        assert set(figs) == {"classes", "rejections", "au_frequency", "aus_per_image", "candidate_pool", "aus_used_per_trace", "trace_tokens"}
        for name, fig in figs.items():
            (ax,) = fig.axes
            lo, hi = ax.get_ylim()
            ticks = [t for t in ax.get_yticks() if lo <= t <= hi]
            assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), (name, ticks)
            assert all(lab.get_fontsize() >= 11 for lab in ax.get_xticklabels() + ax.get_yticklabels()), name
            assert ax.title.get_fontsize() >= 12 and ax.yaxis.label.get_fontsize() >= 11
        # 0, 1, 2 and 4 AUs were seen: 3 is shown as an empty bar, not left out
        assert [t.get_text() for t in figs["aus_per_image"].axes[0].get_xticklabels()] == ["0", "1", "2", "3", "4"]
        ax = figs["trace_tokens"].axes[0]
        lo, hi = ax.get_xlim()
        assert all(float(t).is_integer() for t in ax.get_xticks() if lo <= t <= hi)
        edges = sorted({round(p.get_x(), 6) for p in ax.patches})
        assert all(float(e + 0.5).is_integer() for e in edges)  # whole-token bins
    finally:
        for fig in figs.values():
            plt.close(fig)
