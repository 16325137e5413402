"""The human A/B study (tagfer.study): database rules, agreement statistics, and a real browser session."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest

from tagfer.judge import Pair
from tagfer.study.db import DuplicateVote, StudyDB, export, fleiss_kappa, pairwise_agreement

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _pairs(image, n=5):
    return [Pair(id=f"rafdb/test_{i}", image=str(image), a={"name": "TAG", "text": f"TAG-{i} <think>smile</think><answer>happiness</answer>"},
                 b={"name": "Base", "text": f"BASE-{i} it is happy"}, label="happiness") for i in range(n)]


def test_fleiss_kappa_hand_computed_and_against_statsmodels_formula():
    # Fleiss (1971) style toy example: 4 items, 3 raters, 3 categories
    m = np.array([[3, 0, 0], [0, 3, 0], [2, 1, 0], [1, 1, 1]])
    p_i = ((m**2).sum(1) - 3) / 6  # [1, 1, 1/3, 0]
    pj = m.sum(0) / 12
    expected = (p_i.mean() - (pj**2).sum()) / (1 - (pj**2).sum())
    assert fleiss_kappa(m) == pytest.approx(expected)
    assert fleiss_kappa(np.array([[2, 0, 0], [0, 2, 0]])) == pytest.approx(1.0)
    assert fleiss_kappa(np.array([[2, 0, 0], [2, 0, 0]])) is None  # chance agreement 1: undefined
    with pytest.raises(ValueError):
        fleiss_kappa(np.array([[2, 0, 0], [1, 0, 0]]))
    assert pairwise_agreement({"x": {"p1": "a", "p2": "b"}, "y": {"p1": "a", "p2": "a"}, "z": {"p3": "a"}}) == 0.5


def test_db_order_is_stored_votes_are_unique_and_mapped(tmp_path, astronaut_path):
    db = StudyDB(tmp_path / "s.sqlite", _pairs(astronaut_path), seed=0)
    with sqlite3.connect(tmp_path / "s.sqlite") as c:
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    item = db.next_item("Ann")
    assert not item["done"] and item["total"] == 5 and item["completed"] == 0
    first = db.first_shown("Ann", item["pair_id"])
    i = item["pair_id"].split("_")[-1]
    assert item["responses"]["A"].startswith("TAG-" if first == "a" else "BASE-") and i in item["responses"]["B"]
    assert db.next_item("Ann") == item  # same pair, same order until voted
    winner = db.vote("Ann", item["pair_id"], "A")
    assert winner == first
    with pytest.raises(DuplicateVote):
        db.vote("Ann", item["pair_id"], "B")
    with pytest.raises(ValueError):
        db.vote("Ann", db.next_item("Ann")["pair_id"], "maybe")
    with pytest.raises(KeyError):
        db.vote("Ann", "nope", "A")
    with pytest.raises(ValueError):
        db.register("   ")
    # a reopened database keeps everything
    db2 = StudyDB(tmp_path / "s.sqlite", _pairs(astronaut_path), seed=0)
    assert db2.next_item("Ann")["completed"] == 1
    assert db2.first_shown("Ann", item["pair_id"]) == first


def test_export_preferences_and_agreement(tmp_path, astronaut_path):
    db = StudyDB(tmp_path / "s.sqlite", _pairs(astronaut_path, 4), seed=3)
    plan = {"Ann": ["a", "a", "a", "b"], "Bob": ["a", "a", "tie", "b"]}
    for name, winners in plan.items():
        for k, want in enumerate(winners):
            pid = f"rafdb/test_{k}"
            first = db.first_shown(name, pid)
            choice = "tie" if want == "tie" else ("A" if want == first else "B")
            assert db.vote(name, pid, choice) == want
    agg = export(tmp_path / "s.sqlite", tmp_path / "agg.json")
    assert agg["systems"] == {"a": "TAG", "b": "Base"} and agg["n_votes"] == 8 and agg["n_evaluators"] == 2
    assert agg["preference_pct"] == {"a": pytest.approx(62.5), "b": pytest.approx(25.0), "tie": pytest.approx(12.5)}
    assert agg["agreement"]["pairwise_percent"] == pytest.approx(75.0)
    counts = np.array([[2, 0, 0], [2, 0, 0], [1, 0, 1], [0, 2, 0]])
    assert agg["agreement"]["fleiss_kappa"] == pytest.approx(fleiss_kappa(counts))
    assert json.loads((tmp_path / "agg.json").read_text()) == agg


@pytest.fixture()
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        yield b
        b.close()


def test_browser_full_session_resume_and_export(tmp_path, astronaut_path, browser):
    """Real headless Chromium: two evaluators click through every pair; a reload mid-session resumes at the next pair."""
    from typer.testing import CliRunner

    from tagfer.cli import app
    from tagfer.study.app import StudyServer

    pairs = _pairs(astronaut_path, 5)
    dbp = tmp_path / "study.sqlite"
    shown_by = {}
    with StudyServer(pairs, dbp, seed=1) as srv:
        for name, prefer_tag in (("Ann", True), ("Bob", False)):
            ctx = browser.new_context()
            page = ctx.new_page()
            page.goto(srv.url)
            page.fill("#name", name)
            page.click("#start")
            for step in range(5):
                page.wait_for_selector(f"#progress:has-text('{step} / 5 done')")
                pid = page.get_attribute("#task", "data-pair-id")
                a_text = page.text_content("#resp-A")
                assert page.evaluate("document.getElementById('image').naturalWidth") > 0  # the image was served
                shown_by[(name, pid)] = "a" if a_text.startswith("TAG-") else "b"
                tag_slot = "A" if a_text.startswith("TAG-") else "B"
                other = "B" if tag_slot == "A" else "A"
                if step == 2 and name == "Ann":
                    page.reload()  # resume check: same pair again, nothing lost
                    page.wait_for_selector("#progress:has-text('2 / 5 done')")
                    assert page.get_attribute("#task", "data-pair-id") == pid
                    assert page.text_content("#resp-A") == a_text  # the stored order, not a new draw
                choice = "tie" if (not prefer_tag and step == 0) else (tag_slot if prefer_tag else other)
                page.click(f"#choose-{choice}")
            page.wait_for_selector("#done:not(.hidden)")
            assert "5 / 5 done" in page.text_content("#progress")
            ctx.close()
        # a new browser context as Ann again: already finished
        ctx = browser.new_context()
        page = ctx.new_page()
        page.goto(srv.url)
        page.fill("#name", "Ann")
        page.click("#start")
        page.wait_for_selector("#done:not(.hidden)")
        ctx.close()

    with sqlite3.connect(dbp) as c:
        rows = c.execute("SELECT evaluator, pair_id, choice, winner, first FROM votes").fetchall()
        assert len(rows) == 10 and len({(r[0], r[1]) for r in rows}) == 10
        for ev, pid, choice, winner, first in rows:
            assert first == shown_by[(ev, pid)]
            assert winner == ("a" if ev == "Ann" else ("tie" if choice == "tie" else "b"))
        shown = c.execute("SELECT evaluator, pair_id, first FROM shown").fetchall()
        assert {(e, p): f for e, p, f in shown} == shown_by
    r = CliRunner().invoke(app, ["study", "export", "--db", str(dbp), "--out", str(tmp_path / "agg.json")])
    assert r.exit_code == 0, r.output
    agg = json.loads((tmp_path / "agg.json").read_text())
    assert agg["per_evaluator"]["Ann"]["a"] == 100.0 and agg["per_evaluator"]["Bob"]["b"] == 80.0
    assert agg["preference_pct"]["a"] == pytest.approx(50.0) and agg["preference_pct"]["tie"] == pytest.approx(10.0)
    assert agg["agreement"]["pairwise_percent"] == pytest.approx(0.0) and agg["agreement"]["n_pairs_all_rated"] == 5


def test_study_cli_pairs_and_bad_inputs(tmp_path, astronaut_path):
    from typer.testing import CliRunner

    from tagfer.cli import app

    for name in ("a", "b"):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            for i in range(3):
                f.write(json.dumps({"id": f"x/{i}", "source": "rafdb", "split": "test", "image": str(astronaut_path), "label": "fear",
                                    "output": f"{name}-{i}", "error": None, "model": name.upper()}) + "\n")
    r = CliRunner().invoke(app, ["study", "pairs", "--a", str(tmp_path / "a.jsonl"), "--b", str(tmp_path / "b.jsonl"), "--out", str(tmp_path / "p.jsonl"), "--n", "2"])
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and lines[0]["a"]["name"] == "A" and lines[0]["b"]["text"].startswith("b-")
    r = CliRunner().invoke(app, ["study", "export", "--db", str(tmp_path / "none.sqlite"), "--out", str(tmp_path / "x.json")])
    assert r.exit_code == 2


def test_page_asks_raters_to_weigh_correctness_with_the_rubric(tmp_path, astronaut_path):
    """The paper's rubric weighs correctness beside faithfulness, precision and coherence: the page says so."""
    import re
    import urllib.request

    from tagfer.study.app import StudyServer

    with StudyServer(_pairs(astronaut_path, 1), tmp_path / "s.sqlite", seed=0) as srv:
        html = urllib.request.urlopen(srv.url, timeout=10).read().decode("utf-8")
    rubric = re.search(r'<div id="rubric" class="rubric">(.*?)</div>', html, re.DOTALL).group(1)
    text = " ".join(re.sub(r"<[^>]+>", " ", rubric).split()).lower()
    for criterion in ("correctness", "visual faithfulness", "anatomical precision", "logical coherence"):
        assert criterion in text
    assert "wrong expression should not win over a correct one" in text
    assert '$("rubric-intro").innerHTML = $("rubric").innerHTML' in html  # shown before the first pair too
