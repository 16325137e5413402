"""The human A/B study (tagfer.evaluation.study): database rules, agreement statistics, and a real browser session."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest

from tagfer.evaluation.judge import Pair
from tagfer.evaluation.study.db import DuplicateVote, NameTaken, StudyDB, clean_name, export, fleiss_kappa, pairwise_agreement

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
    import os

    pw = pytest.importorskip("playwright.sync_api")
    if not os.path.exists("/usr/bin/chromium"):
        pytest.skip("no Chromium at /usr/bin/chromium")
    sync_playwright = pw.sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        yield b
        b.close()


def test_browser_full_session_resume_and_export(tmp_path, astronaut_path, browser):
    """Real headless Chromium: two evaluators click through every pair; a reload mid-session resumes at the next pair."""
    from typer.testing import CliRunner

    from tagfer.cli import app
    from tagfer.evaluation.study.app import StudyServer

    pairs = _pairs(astronaut_path, 5)
    dbp = tmp_path / "study.sqlite"
    shown_by = {}
    shown_url = None
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
                # this pair's image was served: a new blob URL (the previous pair's image stays complete until
                # the new one replaces it, so "complete" alone can be the old picture), then loaded
                page.wait_for_function("prev => { const im = document.getElementById('image'); return !!im.dataset.url && "
                                       "im.dataset.url !== prev && im.complete && im.naturalWidth > 0; }",
                                       arg=shown_url, timeout=10_000)
                shown_url = page.get_attribute("#image", "data-url")
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
        # a new browser context (no token) cannot take Ann's name: refused, nothing shown
        ctx = browser.new_context()
        page = ctx.new_page()
        page.goto(srv.url)
        page.fill("#name", "Ann")
        page.click("#start")
        page.wait_for_selector("#error:has-text('already in use')")
        assert page.is_hidden("#task") and page.is_hidden("#done")
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


# ----------------------------------------------------------------------------- sessions, names, GET without writes

@pytest.mark.parametrize("bad", [None, 5, 1.5, True, ["Ann"], {"n": "Ann"}, "", "   ", "a" * 81, "x" * 10_000,
                                 "Ann\x00", "\u200b", "Ann\u202eLee"])
def test_bad_evaluator_names_are_refused(bad):
    with pytest.raises(ValueError):
        clean_name(bad)


def test_names_are_collapsed():
    assert clean_name("  Ann \t  Lee\n") == "Ann Lee" and clean_name("é" * 80) == "é" * 80


@pytest.fixture()
def study(tmp_path, astronaut_path):
    from fastapi.testclient import TestClient

    from tagfer.evaluation.study.app import create_app

    app = create_app(_pairs(astronaut_path, 3), tmp_path / "s.sqlite", seed=2)
    with TestClient(app, base_url="http://127.0.0.1") as c:
        yield c, tmp_path / "s.sqlite"


def _dump(dbp) -> list[str]:
    with sqlite3.connect(dbp) as c:
        return list(c.iterdump())


@pytest.mark.parametrize("payload", [{"name": None}, {"name": ["Ann"]}, {"name": 7}, {"name": {"x": 1}}, {"name": ""},
                                     {"name": "a" * 81}, {}, ["Ann"], "Ann", {"name": "Ann", "token": 5}])
def test_start_refuses_non_string_empty_or_overlong_names_with_422(study, payload):
    c, dbp = study
    before = _dump(dbp)
    r = c.post("/api/start", json=payload)
    assert r.status_code == 422, r.text
    assert _dump(dbp) == before  # nothing registered


def test_token_is_required_and_the_evaluator_cannot_be_impersonated(study):
    c, _ = study
    r = c.post("/api/start", json={"name": " Ann "})
    assert r.status_code == 200
    ann = r.json()
    tok = ann["token"]
    assert ann["evaluator"] == "Ann" and len(tok) >= 40 and not ann["done"]
    # someone else cannot start a session as Ann, with no token or a guessed one
    assert c.post("/api/start", json={"name": "Ann"}).status_code == 403
    assert c.post("/api/start", json={"name": "Ann", "token": "x" * 43}).status_code == 403
    # votes need a valid token; the name in the body means nothing
    vote = {"name": "Ann", "pair_id": ann["pair_id"], "choice": "A"}
    assert c.post("/api/vote", json=vote).status_code == 401
    assert c.post("/api/vote", json=vote, headers={"X-Study-Token": "forged"}).status_code == 401
    mal = c.post("/api/start", json={"name": "Mallory"}).json()["token"]
    r = c.post("/api/vote", json=vote, headers={"X-Study-Token": mal})
    assert r.status_code == 200 and r.json()["evaluator"] == "Mallory"
    # ...so Ann's own vote on that pair is still hers to cast (no 409)
    r = c.post("/api/vote", json=vote, headers={"X-Study-Token": tok})
    assert r.status_code == 200 and r.json()["completed"] == 1 and r.json()["evaluator"] == "Ann"
    assert c.post("/api/vote", json=vote, headers={"X-Study-Token": tok}).status_code == 409
    # Ann resumes with her token (same token back)
    again = c.post("/api/start", json={"name": "Ann", "token": tok})
    assert again.status_code == 200 and again.json()["token"] == tok and again.json()["completed"] == 1
    # malformed votes are 422, unknown pairs 404, bad choices 400
    h = {"X-Study-Token": tok}
    assert c.post("/api/vote", json={"pair_id": None, "choice": "A"}, headers=h).status_code == 422
    assert c.post("/api/vote", json={"pair_id": ann["pair_id"], "choice": ["A"]}, headers=h).status_code == 422
    assert c.post("/api/vote", json=["A"], headers=h).status_code == 422
    assert c.post("/api/vote", json={"pair_id": "nope", "choice": "A"}, headers=h).status_code == 404
    nxt = c.get("/api/next", headers=h).json()["pair_id"]
    assert c.post("/api/vote", json={"pair_id": nxt, "choice": "maybe"}, headers=h).status_code == 400


def test_get_next_writes_nothing(study):
    c, dbp = study
    tok = c.post("/api/start", json={"name": "Ann"}).json()["token"]
    before = _dump(dbp)
    for i in range(100):  # random names (the old API) and random tokens: 401, no row each
        r = c.get(f"/api/next?name=rand{i}", headers={"X-Study-Token": f"guess{i}"})
        assert r.status_code == 401
    assert c.get("/api/next").status_code == 401
    first = c.get("/api/next", headers={"X-Study-Token": tok}).json()
    assert c.get("/api/next", headers={"X-Study-Token": tok}).json() == first
    assert _dump(dbp) == before
    # the order GET shows is the one stored at start, and the one a vote is scored against
    with sqlite3.connect(dbp) as con:
        (stored,) = con.execute("SELECT first FROM shown WHERE evaluator='Ann' AND pair_id=?", (first["pair_id"],)).fetchone()
    pair = _pairs("x", 3)[int(first["pair_id"].split("_")[-1])]
    assert first["responses"]["A"] == (pair.a if stored == "a" else pair.b)["text"]


def test_study_app_host_check_and_no_cdn_docs(study):
    c, dbp = study
    before = _dump(dbp)
    for host in ("evil.example", "evil.example:8765", "192.168.1.50"):
        assert c.get("/", headers={"host": host}).status_code == 400
        assert c.post("/api/start", json={"name": "Eve"}, headers={"host": host}).status_code == 400
    assert _dump(dbp) == before
    assert c.get("/", headers={"host": "localhost:8765"}).status_code == 200
    assert c.get("/docs").status_code == 404 and c.get("/redoc").status_code == 404
    assert "/api/vote" in c.get("/openapi.json").json()["paths"]
    page = c.get("/").text
    assert "http://" not in page and "https://" not in page  # the page loads nothing from elsewhere


def test_database_from_before_tokens_is_migrated(tmp_path, astronaut_path):
    dbp = tmp_path / "old.sqlite"
    with sqlite3.connect(dbp) as c:  # the schema before tokens, with one evaluator
        c.execute("CREATE TABLE evaluators(name TEXT PRIMARY KEY, created REAL NOT NULL)")
        c.execute("INSERT INTO evaluators VALUES ('Ann', 0)")
    db = StudyDB(dbp, _pairs(astronaut_path, 2))
    name, tok = db.register("Ann")  # the first start claims the name
    assert name == "Ann" and db.evaluator(tok) == "Ann" and db.evaluator("other") is None
    with pytest.raises(NameTaken):
        db.register("Ann")
    assert db.register("Ann", tok) == ("Ann", tok)
    with sqlite3.connect(dbp) as c:
        (h,) = c.execute("SELECT token_hash FROM evaluators WHERE name='Ann'").fetchone()
    assert len(h) == 64 and tok not in h  # only a hash is stored


def test_study_cli_allowed_host_option(tmp_path, astronaut_path, monkeypatch):
    import uvicorn
    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    from tagfer.cli import app

    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p.to_json()) + "\n" for p in _pairs(astronaut_path, 2)))
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app_, **kw: seen.update(app=app_, **kw))
    args = ["study", "serve", "--pairs", str(tmp_path / "p.jsonl"), "--db", str(tmp_path / "s.sqlite")]
    r = CliRunner().invoke(app, [*args, "--allowed-host", "study.lan"])
    assert r.exit_code == 0, r.output
    with TestClient(seen["app"], base_url="http://study.lan") as c:
        assert c.get("/api/health").status_code == 200
        assert c.get("/api/health", headers={"host": "other.lan"}).status_code == 400
    r = CliRunner().invoke(app, [*args, "--allowed-host", "study.lan:80"])
    assert r.exit_code == 2 and "not a host name" in r.output


def test_oversized_request_bodies_get_413_unread(study):
    c, dbp = study
    before = _dump(dbp)
    big = {"name": "Ann", "pad": "x" * 100_000}
    assert c.post("/api/start", json=big).status_code == 413  # declared length

    def chunks():  # no Content-Length: cut off while streaming
        yield b'{"name": "Ann", "pad": "'
        for _ in range(64):
            yield b"x" * 4096
        yield b'"}'

    r = c.post("/api/start", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert _dump(dbp) == before
    assert c.post("/api/start", json={"name": "Ann", "pad": "x" * 1000}).status_code == 200  # small extras are fine

def test_page_asks_raters_to_weigh_correctness_with_the_rubric(tmp_path, astronaut_path):
    """The paper's rubric weighs correctness beside faithfulness, precision and coherence: the page says so."""
    import re
    import urllib.request

    from tagfer.evaluation.study.app import StudyServer

    with StudyServer(_pairs(astronaut_path, 1), tmp_path / "s.sqlite", seed=0) as srv:
        html = urllib.request.urlopen(srv.url, timeout=10).read().decode("utf-8")
    rubric = re.search(r'<div id="rubric" class="rubric">(.*?)</div>', html, re.DOTALL).group(1)
    text = " ".join(re.sub(r"<[^>]+>", " ", rubric).split()).lower()
    for criterion in ("correctness", "visual faithfulness", "anatomical precision", "logical coherence"):
        assert criterion in text
    assert "wrong expression should not win over a correct one" in text
    assert '$("rubric-intro").innerHTML = $("rubric").innerHTML' in html  # shown before the first pair too


# ----------------------------------------------------------------------------- names, registration limits, image token (issue 21 #10)
from tagfer.evaluation.study.db import StudyFull, name_key


@pytest.mark.parametrize("twin", ["ALICE", "ａｌｉｃｅ", "alice\u0301", "alicé", " Alice ", "\U0001d41a\U0001d425ice",  # bold math a, l
                                  "\u0430\u04cf\u0456\u0441\u0435"])  # all Cyrillic: а ӏ і с е
def test_look_alike_names_are_the_same_evaluator(tmp_path, astronaut_path, twin):
    db = StudyDB(tmp_path / "s.sqlite", _pairs(astronaut_path, 2))
    name, tok = db.register("Alice")
    assert name_key(twin) == name_key("Alice") == "alice"
    with pytest.raises(NameTaken):
        db.register(twin)
    assert db.register(twin, tok) == ("Alice", tok)  # the owner may type it either way


@pytest.mark.parametrize("mixed", ["\u0430lice", "Alic\u0435", "p\u03b1ul", "Ann \u0410nn"])  # Cyrillic а/е, Greek α
def test_names_mixing_look_alike_alphabets_are_refused(mixed):
    with pytest.raises(ValueError, match="mix alphabets"):
        clean_name(mixed)


@pytest.mark.parametrize("name", ["Alicia", "Ann Lee", "Αλίκη", "Алиса", "山田 はなこ", "José", "O'Brien-Smith"])
def test_distinct_names_in_one_alphabet_are_accepted(tmp_path, astronaut_path, name):
    db = StudyDB(tmp_path / "s.sqlite", _pairs(astronaut_path, 1))
    db.register("Alice")
    assert db.register(name)[0] == name


def test_older_database_gets_name_keys(tmp_path, astronaut_path):
    dbp = tmp_path / "old.sqlite"
    StudyDB(dbp, _pairs(astronaut_path, 1)).register("Bob")
    with sqlite3.connect(dbp) as c:  # as written before name keys
        c.execute("DROP INDEX evaluators_key")
        c.execute("ALTER TABLE evaluators DROP COLUMN name_key")
    db = StudyDB(dbp, _pairs(astronaut_path, 1))
    with pytest.raises(NameTaken):
        db.register("BOB")


def test_registration_is_rate_limited_per_client_and_capped_per_study(tmp_path, astronaut_path):
    from fastapi.testclient import TestClient

    from tagfer.evaluation.study.app import create_app

    app = create_app(_pairs(astronaut_path, 1), tmp_path / "s.sqlite", registrations_per_client=3, registration_window_s=60)
    with TestClient(app, base_url="http://127.0.0.1") as c:
        codes = [c.post("/api/start", json={"name": f"bot{i}"}).status_code for i in range(10)]  # one client, in a loop
        assert codes == [200] * 3 + [429] * 7
        r = c.post("/api/start", json={"name": "bot99"})
        assert 1 <= int(r.headers["retry-after"]) <= 60 and "too many new names" in r.json()["detail"]
        tok = c.post("/api/start", json={"name": "bot0"}).status_code  # resuming is not a new name...
        assert tok == 403  # ...(without the token it is refused as before, not rate-limited)
    with sqlite3.connect(tmp_path / "s.sqlite") as con:
        assert con.execute("SELECT COUNT(*) FROM evaluators").fetchone()[0] == 3
    app = create_app(_pairs(astronaut_path, 1), tmp_path / "t.sqlite", max_evaluators=2, registrations_per_client=100)
    with TestClient(app, base_url="http://127.0.0.1") as c:
        toks = [c.post("/api/start", json={"name": n}).json()["token"] for n in ("Ann", "Bob")]
        r = c.post("/api/start", json={"name": "Cy"})
        assert r.status_code == 403 and "full" in r.json()["detail"]
        assert c.post("/api/start", json={"name": "Ann", "token": toks[0]}).status_code == 200  # members resume
    with pytest.raises(StudyFull):
        StudyDB(tmp_path / "t.sqlite", _pairs(astronaut_path, 1), max_evaluators=2).register("Dee")


def test_rate_limit_window_and_clients_are_separate():
    from tagfer.evaluation.study.app import RateLimit

    rl = RateLimit(2, 10.0, max_clients=3)
    assert [rl.hit("a", t) for t in (0, 1)] == [0.0, 0.0]
    assert rl.hit("a", 2) == pytest.approx(8.0) and rl.hit("b", 2) == 0.0  # another client is not held up
    assert rl.hit("a", 10.5) == 0.0  # the first event left the window
    for c in "cdef":
        rl.hit(c, 11)
    assert len(rl._seen) == 3  # memory bounded in the number of clients


def test_image_needs_a_token_and_cross_origin_posts_are_refused(study):
    c, dbp = study
    assert c.get("/api/image/0").status_code == 401
    assert c.get("/api/image/0", headers={"X-Study-Token": "guess"}).status_code == 401
    tok = c.post("/api/start", json={"name": "Ann"}).json()["token"]
    r = c.get("/api/image/0", headers={"X-Study-Token": tok})
    assert r.status_code == 200 and r.content[:4] == b"\x89PNG"
    before = _dump(dbp)
    for h in ({"origin": "http://evil.example"}, {"origin": "null"}, {"sec-fetch-site": "cross-site"}):
        r = c.post("/api/start", json={"name": "Eve"}, headers=h)
        assert r.status_code == 403 and "cross-origin" in r.json()["detail"]
        assert c.post("/api/vote", json={"pair_id": "x", "choice": "A"}, headers={**h, "X-Study-Token": tok}).status_code == 403
    assert _dump(dbp) == before
    assert c.post("/api/start", json={"name": "Eve"}, headers={"origin": "http://127.0.0.1"}).status_code == 200


def test_stalled_request_body_is_closed(tmp_path, astronaut_path, monkeypatch):
    import socket

    from tagfer.evaluation.study import app as study_app
    from tagfer.evaluation.study.app import StudyServer

    monkeypatch.setattr(study_app, "BODY_TIMEOUT_S", 0.5)
    with StudyServer(_pairs(astronaut_path, 1), tmp_path / "s.sqlite") as srv:
        s = socket.create_connection((srv.host, srv.port), timeout=10)
        s.sendall(f"POST /api/start HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\nContent-Type: application/json\r\n"
                  f"Content-Length: 100\r\n\r\n{{\"name\": ".encode())
        got = b""
        while chunk := s.recv(65536):  # answered and closed (a socket timeout would fail the test)
            got += chunk
        s.close()
    assert got.startswith(b"HTTP/1.1 408") and b"stalled" in got


def test_browser_vote_buttons_stay_in_view_with_a_degenerate_response(tmp_path, astronaut_path, browser):
    """Response A is 512 newlines, response B 50,000 characters without a space: both boxes stay short,
    the page does not scroll sideways and the vote buttons are inside the first viewport."""
    from tagfer.evaluation.study.app import StudyServer

    pairs = [Pair(id="rafdb/test_0", image=str(astronaut_path), a={"name": "TAG", "text": "TAG-0 <think>" + "\n" * 512 + "</think>"},
                  b={"name": "Base", "text": "BASE-0 " + "y" * 50_000}, label="happiness")]
    with StudyServer(pairs, tmp_path / "s.sqlite", seed=0) as srv:
        ctx = browser.new_context(viewport={"width": 1280, "height": 720})
        page = ctx.new_page()
        page.goto(srv.url)
        page.fill("#name", "Ann")
        page.click("#start")
        page.wait_for_selector("#progress:has-text('0 / 1 done')")
        for b in ("#choose-A", "#choose-tie", "#choose-B"):
            box = page.eval_on_selector(b, "e => { const r = e.getBoundingClientRect(); return [r.top, r.bottom]; }")
            assert 0 <= box[0] and box[1] <= 720, (b, box)  # was 11,000 px below the fold
        texts = {s: page.text_content(f"#resp-{s}") for s in "AB"}
        tag = "A" if texts["A"].startswith("TAG-") else "B"
        assert "511 empty lines" in texts[tag] and texts[tag].count("\n") < 10
        assert "y" * 1000 in texts["B" if tag == "A" else "A"]  # long text is kept (it scrolls), not hidden
        assert page.evaluate("document.documentElement.scrollWidth") <= 1280
        page.click("#choose-tie")
        page.wait_for_selector("#done:not(.hidden)")
        ctx.close()


def test_study_server_connection_limits(tmp_path, astronaut_path):
    """The study app under :class:`tagfer.core.serving.ServerLimits` on a real uvicorn: a client
    dribbling its headers gets 408 at the header timeout, connections over the limit get 503, and
    the health route answers again once the idle ones are cut."""
    import socket
    import time

    from tagfer.core.serving import ServerLimits
    from tagfer.evaluation.study.app import StudyServer

    def get(srv) -> bytes:
        with socket.create_connection((srv.host, srv.port), timeout=10) as s:
            s.sendall(f"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\nConnection: close\r\n\r\n".encode())
            got = b""
            while chunk := s.recv(65536):
                got += chunk
            return got

    with StudyServer(_pairs(astronaut_path, 1), tmp_path / "s.sqlite", limits=ServerLimits(max_connections=3, header_timeout_s=1.0)) as srv:
        assert get(srv).startswith(b"HTTP/1.1 200")
        slow = socket.create_connection((srv.host, srv.port), timeout=10)
        slow.sendall(b"POST /api/start HTTP/1.1\r\n")
        t0 = time.monotonic()
        idle = socket.create_connection((srv.host, srv.port), timeout=10)
        time.sleep(0.2)
        assert get(srv).startswith(b"HTTP/1.1 503")  # slow + idle + this one: 3
        answer = b""
        for _ in range(40):
            try:
                slow.sendall(b"X: y\r\n")
            except OSError:
                break
            slow.settimeout(0.1)
            try:
                answer += slow.recv(4096)
                if answer:
                    break
            except socket.timeout:
                pass
        assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - t0 < 3
        idle.settimeout(5)
        assert idle.recv(100) == b""  # closed without an answer
        slow.close()
        idle.close()
        assert get(srv).startswith(b"HTTP/1.1 200")


def test_study_cli_connection_limit_options(tmp_path, astronaut_path, monkeypatch):
    import uvicorn
    from typer.testing import CliRunner

    from tagfer.cli import app
    from tagfer.core.serving import ServerLimits

    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p.to_json()) + "\n" for p in _pairs(astronaut_path, 2)))
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app_, **kw: seen.update(app=app_, **kw))
    args = ["study", "serve", "--pairs", str(tmp_path / "p.jsonl"), "--db", str(tmp_path / "s.sqlite")]
    assert CliRunner().invoke(app, args).exit_code == 0
    assert seen["limit_concurrency"] == ServerLimits().max_connections and seen["http"].header_timeout_s == ServerLimits().header_timeout_s
    r = CliRunner().invoke(app, [*args, "--max-connections", "30", "--header-timeout", "4", "--keep-alive", "1.5", "--max-header-kb", "32"])
    assert r.exit_code == 0, r.output
    assert (seen["limit_concurrency"], seen["http"].header_timeout_s, seen["timeout_keep_alive"], seen["http"].max_header_bytes) == (
        30, 4.0, 1.5, 32 * 1024)
    assert CliRunner().invoke(app, [*args, "--max-connections", "1"]).exit_code == 2
