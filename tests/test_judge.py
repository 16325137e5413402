"""LLM-as-judge (tagfer.evaluation.judge): strict parsing, anonymised random order, retries, aggregation; the scripted server as the judge."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiers import examples

from tagfer.evaluation import judge as J
from tagfer.models.backends import make_backend

GOOD = {"A": {"visual_faithfulness": 4, "anatomical_precision": 5, "logical_coherence": 3}, "B": {"visual_faithfulness": 2, "anatomical_precision": 2, "logical_coherence": 2}, "overall": "A", "reason": "A is grounded."}


def test_parse_judgment_accepts_wrapped_json_and_checks_strictly():
    j = J.parse_judgment("Sure! Here it is:\n```json\n" + json.dumps(GOOD) + "\n```")
    assert j["overall"] == "A" and j["scores"]["A"]["anatomical_precision"] == 5 and j["reason"] == "A is grounded."
    loose = json.loads(json.dumps(GOOD))
    loose["a"] = {"Visual Faithfulness": "4", "anatomical_precision": 5.0, "logical_coherence": 3}
    del loose["A"]
    loose["overall"] = "Tie."
    j = J.parse_judgment(json.dumps(loose))
    assert j["overall"] == "tie" and j["scores"]["A"]["visual_faithfulness"] == 4
    cases = {
        "I can't evaluate images of people.": "no_json",
        json.dumps(GOOD)[:60]: "bad_json",  # truncated
        json.dumps({**GOOD, "B": {"visual_faithfulness": 6, "anatomical_precision": 2, "logical_coherence": 2}}): "invalid_scores",
        json.dumps({**GOOD, "A": {"visual_faithfulness": 3.5, "anatomical_precision": 2, "logical_coherence": 2}}): "invalid_scores",
        json.dumps({k: v for k, v in GOOD.items() if k != "B"}): "invalid_scores",
        json.dumps({**GOOD, "overall": "both"}): "invalid_overall",
        json.dumps({**GOOD, "overall": True}): "invalid_overall",
        "[1, 2, 3] {": "bad_json",
    }
    for text, kind in cases.items():
        with pytest.raises(J.JudgeParseError) as e:
            J.parse_judgment(text)
        assert e.value.kind == kind, text


@settings(max_examples=examples(200), deadline=None)
@given(st.one_of(st.text(max_size=300), st.recursive(st.none() | st.booleans() | st.integers(-3, 9) | st.text(max_size=8),
                                                       lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(["A", "B", "overall", "visual_faithfulness", "x"]), c, max_size=4), max_leaves=12).map(json.dumps)))
def test_parse_judgment_raises_only_its_own_error(text):
    try:
        j = J.parse_judgment(text)
    except J.JudgeParseError as e:
        assert e.kind in ("no_json", "bad_json", "invalid_scores", "invalid_overall")
    else:
        assert j["overall"] in ("A", "B", "tie")
        assert all(1 <= v <= 5 for s in j["scores"].values() for v in s.values())


def test_shown_order_is_seeded_and_balanced():
    orders = [J.shown_order(f"p{i}", 0) for i in range(400)]
    assert orders == [J.shown_order(f"p{i}", 0) for i in range(400)]
    assert 150 < sum(o == ("a", "b") for o in orders) < 250
    assert [J.shown_order(f"p{i}", 1) for i in range(50)] != orders[:50]  # another seed, another order


def _pairs(image, n=4):
    return [J.Pair(id=f"p{i}", image=str(image), a={"name": "TAG", "text": f"[TAG p{i}] <think>AU12 <bbox>[1, 2, 30, 40]</bbox></think><answer>happiness</answer>"},
                   b={"name": "Base", "text": f"[BASE p{i}] It is happiness."}, label="happiness") for i in range(n)]


def _judge_prefers_tag(fail_always=(), fail_first=()):
    attempts: dict[str, int] = {}

    def script(req, i):
        user = next(m for m in req["messages"] if m["role"] == "user")
        text = " ".join(part.get("text", "") for part in user["content"] if isinstance(part, dict)) if isinstance(user["content"], list) else user["content"]
        pid = re.search(r"\[(?:TAG|BASE) (p\d+)\]", text).group(1)
        attempts[pid] = attempts.get(pid, 0) + 1
        if pid in fail_always:
            return "I'm sorry, I can't help with that."
        if pid in fail_first and attempts[pid] == 1:
            return json.dumps(GOOD)[:50]
        tag_first = text.index("[TAG") < text.index("[BASE")
        out = json.loads(json.dumps(GOOD))
        out["overall"] = "A" if tag_first else "B"
        if not tag_first:
            out["A"], out["B"] = out["B"], out["A"]
        return json.dumps(out)

    return script


def test_run_judge_with_server_failures_retries_resume(tmp_path, eval_server, astronaut_path):
    eval_server.reset(_judge_prefers_tag(fail_always={"p3"}, fail_first={"p1"}))
    pairs = _pairs(astronaut_path)
    out = tmp_path / "j.jsonl"
    be = make_backend(f"openai:{eval_server.url}", max_retries=0, timeout_s=5)
    recs = J.run_judge(pairs, be, out, repeats=3, seed=10, max_retries=2)
    assert len(recs) == 12 and sorted({r["seed"] for r in recs}) == [10, 11, 12]
    bad = [r for r in recs if r["pair_id"] == "p3"]
    assert all(not r["ok"] and r["error"]["kind"] == "no_json" and r["attempts"] == 3 for r in bad)
    p1 = [r for r in recs if r["pair_id"] == "p1"]
    assert all(r["ok"] for r in p1) and max(r["attempts"] for r in p1) == 2
    ok = [r for r in recs if r["ok"]]
    assert all(r["winner"] == "a" and r["scores"]["a"]["anatomical_precision"] == 5 and r["scores"]["b"]["visual_faithfulness"] == 2 for r in ok)
    assert all(r["shown"] == list(J.shown_order(r["pair_id"], r["seed"])) for r in recs)
    # the judge saw anonymised responses: no system name in any request
    assert not any("TAG\"" in json.dumps(q) or "Base" in json.dumps(q) for q in eval_server.requests)
    assert all(q["messages"][0]["role"] == "system" and "data:image/" in json.dumps(q) for q in eval_server.requests)
    agg = J.aggregate(recs, names={"a": "TAG", "b": "Base"})
    assert agg["n_pairs"] == 3 and agg["n_valid"] == 9 and agg["failures"] == {"no_json": 3}
    assert agg["preference_pct"] == {"a": 100.0, "b": 0.0, "tie": 0.0} and agg["majority_pairs"]["a"] == 3
    assert agg["mean_scores"]["a"]["anatomical_precision"] == 5 and agg["mean_scores"]["b"]["mean"] == 2
    first = sum(r["shown"][0] == "a" for r in ok)
    assert agg["order_effect"]["first_shown_wins_pct"] == pytest.approx(100 * first / 9)
    # resume: nothing left to ask
    eval_server.reset(_judge_prefers_tag())
    again = J.run_judge(pairs, be, out, repeats=3, seed=10, max_retries=2)
    assert len(again) == 12 and eval_server.calls == 0


def _user_text(req) -> str:
    user = next(m for m in req["messages"] if m["role"] == "user")
    return " ".join(part.get("text", "") for part in user["content"] if isinstance(part, dict)) if isinstance(user["content"], list) else user["content"]


def test_judge_sees_the_original_prompt_and_has_room_to_reason(tmp_path, eval_server, astronaut_path):
    """The paper's judge gets the original prompt, the image and both responses; its budget defaults to 1024 tokens."""
    from tagfer.models.prompts import tag_prompt

    eval_server.reset(lambda req, i: json.dumps(GOOD))
    be = make_backend(f"openai:{eval_server.url}", max_retries=0, timeout_s=5)
    pairs = _pairs(astronaut_path, 2)
    pairs[1].prompt = "Which emotion is this? Answer in one word."
    J.run_judge(pairs, be, tmp_path / "j.jsonl", repeats=1)
    by_pair = {re.search(r"\[TAG (p\d+)\]", _user_text(q)).group(1): q for q in eval_server.requests}
    system, user = tag_prompt()
    assert system in _user_text(by_pair["p0"]) and user in _user_text(by_pair["p0"])  # default: the unified TAG prompt
    assert "Which emotion is this?" in _user_text(by_pair["p1"]) and system not in _user_text(by_pair["p1"])
    assert all(q["max_tokens"] == J.JUDGE_MAX_NEW_TOKENS == 1024 for q in eval_server.requests)
    eval_server.reset(lambda req, i: json.dumps(GOOD))
    J.run_judge(pairs[:1], be, tmp_path / "k.jsonl", repeats=1, gen={"max_new_tokens": 300}, task_prompt="CUSTOM TASK")
    (q,) = eval_server.requests
    assert q["max_tokens"] == 300 and "CUSTOM TASK" in _user_text(q)
    assert J.Pair.from_json(pairs[1].to_json()).prompt == pairs[1].prompt


def test_order_biased_judge_shows_up_in_order_effect(tmp_path, eval_server, astronaut_path):
    eval_server.reset(lambda req, i: json.dumps(GOOD))  # always "A": the first shown wins
    be = make_backend(f"openai:{eval_server.url}", max_retries=0, timeout_s=5)
    recs = J.run_judge(_pairs(astronaut_path, 8), be, tmp_path / "j.jsonl", repeats=3, seed=0)
    agg = J.aggregate(recs)
    assert agg["order_effect"]["first_shown_wins_pct"] == 100.0 and agg["order_effect"]["second_shown_wins_pct"] == 0.0
    a_first = sum(r["shown"][0] == "a" for r in recs)
    assert 0 < a_first < 24
    assert agg["preference_pct"]["a"] == pytest.approx(sum(100 * sum(r["shown"][0] == "a" for r in recs if r["pair_id"] == p) / 3 for p in {r["pair_id"] for r in recs}) / 8)


def test_make_pairs_and_cli(tmp_path, eval_server, astronaut_path):
    from typer.testing import CliRunner

    from tagfer.cli import app

    def preds(path, name, text, err_ids=()):
        with open(path, "w") as f:
            for i in range(6):
                rid = f"rafdb/test_{i}"
                err = {"kind": "timeout", "message": ""} if rid in err_ids else None
                f.write(json.dumps({"id": rid, "source": "rafdb", "split": "test", "image": str(astronaut_path), "label": "happiness",
                                    "output": None if err else f"[{text} p{i}] x", "error": err, "model": name}) + "\n")
        return path

    a = preds(tmp_path / "a.jsonl", "TAG", "TAG")
    b = preds(tmp_path / "b.jsonl", "Base", "BASE", err_ids={"rafdb/test_2"})
    pairs = J.make_pairs(a, b, n=4, seed=1)
    assert len(pairs) == 4 and "rafdb/test_2" not in [p.id for p in pairs]
    assert pairs == J.make_pairs(a, b, n=4, seed=1) and pairs[0].a["name"] == "TAG" and pairs[0].b["name"] == "Base"
    J.write_pairs(pairs, tmp_path / "pairs.jsonl")
    assert J.read_pairs(tmp_path / "pairs.jsonl") == pairs

    eval_server.reset(_judge_prefers_tag())
    r = CliRunner().invoke(app, ["judge", "--judge", f"openai:{eval_server.url}", "--pairs", str(tmp_path / "pairs.jsonl"),
                                 "--out", str(tmp_path / "j.jsonl"), "--repeats", "2", "--no-progress"])
    assert r.exit_code == 0, r.output
    agg = json.loads((tmp_path / "j.summary.json").read_text())
    assert agg["n_pairs"] == 4 and agg["preference_pct"]["a"] == 100.0 and agg["systems"] == {"a": "TAG", "b": "Base"}
    assert "first shown wins" in r.output
    r = CliRunner().invoke(app, ["judge", "--judge", f"openai:{eval_server.url}", "--out", str(tmp_path / "x.jsonl")])
    assert r.exit_code == 2


def test_judge_cli_exit_code_says_judgments_failed(tmp_path, eval_server, astronaut_path):
    """As `eval` and `au` (issue 14 #8's sibling): failed judgments → exit 1, all valid → 0."""
    from typer.testing import CliRunner

    from tagfer.cli import app

    J.write_pairs(_pairs(astronaut_path), tmp_path / "pairs.jsonl")
    args = ["judge", "--judge", f"openai:{eval_server.url}", "--pairs", str(tmp_path / "pairs.jsonl"), "--max-retries", "0", "--no-progress"]
    eval_server.reset(_judge_prefers_tag(fail_always={"p2"}))
    r = CliRunner().invoke(app, args + ["--out", str(tmp_path / "bad.jsonl")])
    assert r.exit_code == 1 and "3 judgment(s) failed" in " ".join(r.output.split()), r.output
    eval_server.reset(_judge_prefers_tag())
    r = CliRunner().invoke(app, args + ["--out", str(tmp_path / "good.jsonl")])
    assert r.exit_code == 0, r.output


def test_eval_system_prompt_reaches_the_judge_through_study_pairs(tmp_path, eval_server, rafdb_root):
    """`tagfer eval --system-prompt X` → `tagfer study pairs` → `tagfer judge`: the judge's request holds X,
    the query the systems answered (the records store its key on every line and its text once per run)."""
    from typer.testing import CliRunner

    from fixtures_evaluate import tag_answer
    from tagfer.cli import app

    (tmp_path / "sys.txt").write_text("SYSTEM-X: look at the eyebrows first.")
    runner = CliRunner()
    eval_server.reset(lambda req, i: tag_answer("happiness"))
    for name, extra in (("a", ["--system-prompt", str(tmp_path / "sys.txt")]), ("b", ["--system-prompt", str(tmp_path / "sys.txt"), "--baseline"])):
        r = runner.invoke(app, ["eval", "--model", f"openai:{eval_server.url}", "--dataset", f"rafdb:{rafdb_root}", "--limit", "2",
                                "--out", str(tmp_path / f"{name}.jsonl"), "--no-progress", "--request-retries", "0", *extra])
        assert r.exit_code == 0, r.output
    assert all("SYSTEM-X" in json.dumps(q) for q in eval_server.requests)  # the models answered X
    recs = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert len({r["prompt"] for r in recs}) == 1 and [r["prompt_text"] is not None for r in recs] == [True, False]
    r = runner.invoke(app, ["study", "pairs", "--a", str(tmp_path / "a.jsonl"), "--b", str(tmp_path / "b.jsonl"),
                            "--out", str(tmp_path / "pairs.jsonl")])
    assert r.exit_code == 0, r.output
    pairs = J.read_pairs(tmp_path / "pairs.jsonl")
    assert len(pairs) == 2 and all(p.prompt.startswith("SYSTEM-X") for p in pairs)
    eval_server.reset(lambda req, i: json.dumps(GOOD))
    r = runner.invoke(app, ["judge", "--judge", f"openai:{eval_server.url}", "--pairs", str(tmp_path / "pairs.jsonl"),
                            "--out", str(tmp_path / "j.jsonl"), "--repeats", "1", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert len(eval_server.requests) == 2 and all("SYSTEM-X: look at the eyebrows first." in _user_text(q) for q in eval_server.requests)


def test_pairs_of_systems_that_answered_different_prompts_show_both(tmp_path, astronaut_path):
    def preds(path, system):
        rec = {"id": "r/1", "source": "rafdb", "split": "test", "image": str(astronaut_path), "label": "fear", "output": "x",
               "error": None, "model": path.stem, "prompt": f"k-{system}", "prompt_text": {"system": system, "user": "Which emotion?"}}
        path.write_text(json.dumps(rec) + "\n")
        return path

    (same,) = J.make_pairs(preds(tmp_path / "a.jsonl", "S1"), preds(tmp_path / "b.jsonl", "S1"))
    assert same.prompt == "S1\n\nWhich emotion?" and "prompt" not in same.a
    (diff,) = J.make_pairs(preds(tmp_path / "a.jsonl", "S1"), preds(tmp_path / "c.jsonl", "S2"))
    assert diff.prompt is None and diff.a["prompt"].startswith("S1") and diff.b["prompt"].startswith("S2")
    shown = J._render("$task_prompt", diff, ("b", "a"), "DEFAULT")
    assert shown.index("S2") < shown.index("S1") and "DEFAULT" not in shown  # in the order the responses are shown
