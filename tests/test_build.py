"""Algorithm 1 end to end against the scripted OpenAI-compatible test server (tests/fakeserver.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from fakeserver import Reply
from fixtures_data import FakeAUDetector, fake_au_rows, make_build_dataset
from tagfer.core.jsonl import read_jsonl
from tagfer.core.labels import LABELS, find_labels
from tagfer.core.records import TAGSample
from tagfer.data.build import BuildConfig, feedback, output_paths, parse_shard, run_build, shard_of
from tagfer.traces.trace import parse_trace

TESTS = Path(__file__).parent


# --------------------------------------------------------------------------- scripted teacher
def prompt_of(req: dict) -> str:
    content = req["messages"][-1]["content"]
    return next(p["text"] for p in content if p.get("type") == "text")


def quality(ok: bool = True, reason: str = "clear face") -> str:
    return json.dumps({"suitable_for_training": ok, "reason": reason})


def trace(i: int, label: str, *, au=None, box=None, n_tags: int = 2, fence: bool = False) -> str:
    rows = fake_au_rows(i)[:3]
    parts = ["The face as a whole shows even lighting, a direct gaze and some tension around the mouth."]
    for k, (a, _, b) in enumerate(rows[:n_tags]):
        if k == 0 and au is not None:
            a = au
        if k == 0 and box is not None:
            b = box
        parts.append(f"Looking at this region the muscles seem engaged: <AU{a}> [{b[0]}, {b[1]}, {b[2]}, {b[3]}] shows visible change.")
    parts.append("Weighing these cues together gives the conclusion.")
    s = json.dumps({"CoT": " ".join(parts), "Answer": label})
    return f"```json\n{s}\n```" if fence else s


def noau_trace(label: str) -> str:
    return json.dumps({"CoT": "The whole face is visible. Brows, eyes and mouth were inspected region by region. Conclusion follows.", "Answer": label})


MALFORMED = '{"CoT": "The face looks ... <AU12> [1, 2, 3'  # truncated JSON


class Script:
    """Per-item reply queues keyed by the OpenAI ``user`` field (the item id)."""

    def __init__(self, plan: dict[str, list]):
        self.plan = {k: list(v) for k, v in plan.items()}
        self.prompts: dict[str, list[str]] = defaultdict(list)
        self.errors: list[str] = []

    def __call__(self, req: dict, index: int):
        item = str(req.get("user")).split("/")[-1]
        self.prompts[item].append(prompt_of(req))
        q = self.plan.get(item)
        if not q:
            self.errors.append(f"{item}: script exhausted")
            return Reply(status=400, text="exhausted")
        return q.pop(0)


def config_for(csv_path: Path, out: Path, url: str, client=None, **kw) -> BuildConfig:
    c = dict(endpoints=[url], model="fake-vlm", total_concurrency=8, per_endpoint_concurrency=8, timeout_s=1.0, max_retries=3,
             backoff_base_s=0.01, backoff_max_s=0.05)
    c.update(client or {})
    return BuildConfig.from_dict(dict(sources=[f"generic:{csv_path}"], out=str(out), au_workers=1, client=c, **kw))


def accepted(out: Path, shard=(0, 1)) -> dict[str, dict]:
    return {r["id"]: r for r in read_jsonl(output_paths(out, shard)["accepted"])}


def rejected(out: Path, shard=(0, 1)) -> dict[str, dict]:
    return {r["id"]: r for r in read_jsonl(output_paths(out, shard)["rejected"])}


# --------------------------------------------------------------------------- the main scripted run
TRUTH = ["happiness", "sadness", "anger", "fear", "disgust", "surprise", "neutral", "happiness", "sadness", "anger",
         "fear", "surprise", "neutral", "happiness", "anger", "fear", "sadness", "disgust", "surprise", "happiness"]


def wrong_labels(truth: str, k: int) -> list[str]:
    return [lab for lab in LABELS if lab != truth][:k]


@pytest.fixture(scope="module")
def scripted_run(tmp_path_factory, fake_openai):
    root = tmp_path_factory.mktemp("build")
    csv_path, table = make_build_dataset(root / "data", TRUTH)
    table.pop(str(root / "data" / "img" / "0017.png"))  # item17: no face
    table[str(root / "data" / "img" / "0016.png")] = []  # item16: a face without activated AU
    os.remove(root / "data" / "img" / "0019.png")  # item19: image file missing
    t = TRUTH
    plan: dict[str, list] = {
        "item0000": [quality(), trace(0, t[0])],
        "item0001": [quality(False, "too dark")],
        "item0002": ["I think it is fine.", "yes", "{}"],  # never a valid verdict → quality_invalid
        "item0003": [quality(), MALFORMED, trace(3, t[3], fence=True)],
        "item0004": [quality(), trace(4, t[4], au=17), trace(4, t[4], au=17), trace(4, t[4], au=17)],
        "item0005": [quality(), trace(5, t[5], box=(1, 2, 3, 4)), trace(5, t[5])],
        "item0006": [Reply(status=429, headers={"Retry-After": "0"}), quality(), Reply(status=500), trace(6, t[6])],
        "item0007": [quality(), Reply(hang=True), trace(7, t[7])],
        "item0008": [Reply(drop=True), quality(), trace(8, t[8])],
        "item0015": [quality(), trace(15, t[15], n_tags=3)],
        "item0016": [quality(), noau_trace(t[16])],
        "item0018": [quality()] + [trace(18, w) for w in wrong_labels(t[18], 2)] + [trace(18, t[18])] ,
    }
    # items 9..14: 1..6 eliminations, then the right label
    for k, i in enumerate(range(9, 15), start=1):
        plan[f"item{i:04d}"] = [quality()] + [trace(i, w) for w in wrong_labels(t[i], k)] + [trace(i, t[i])]
    # item18 also repeats an eliminated label once (a format retry, not an elimination)
    plan["item0018"].insert(3, trace(18, wrong_labels(t[18], 1)[0]))
    script = Script(plan)
    srv = fake_openai(script)
    out = root / "out"
    cfg = config_for(csv_path, out, srv.url)
    summary = run_build(cfg, detector=FakeAUDetector(table))
    return dict(out=out, script=script, summary=summary, srv=srv, csv=csv_path, table=table, cfg=cfg)


EXPECTED_ACCEPTED = {f"generic/item{i:04d}" for i in (0, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 18)}


def test_accepted_set_exactly(scripted_run):
    acc = accepted(scripted_run["out"])
    assert set(acc) == EXPECTED_ACCEPTED
    assert not scripted_run["script"].errors
    rej = {k: v["reason"] for k, v in rejected(scripted_run["out"]).items()}
    assert rej == {
        "generic/item0001": "quality",
        "generic/item0002": "quality_invalid",
        "generic/item0004": "format",
        "generic/item0017": "no_face",
        "generic/item0019": "not_found",
    }
    s = scripted_run["summary"]
    assert (s.metric("accepted"), s.metric("rejected"), s.processed, s.total) == (15, 5, 20, 20)


def test_accepted_samples_are_valid_tag_samples(scripted_run):
    for rid, rec in accepted(scripted_run["out"]).items():
        s = TAGSample.from_json(rec)
        i = int(rid[-4:])
        assert s.label == TRUTH[i] and s.teacher == "fake-vlm" and s.split == "train"
        p = parse_trace(s.completion)
        assert p.well_formed and p.label == TRUTH[i]
        assert Path(s.image).is_file()
        if i == 16:
            assert s.au_boxes == [] and s.aus == [] and p.boxes == () and s.meta["no_au_prompt"]
        else:
            rows = fake_au_rows(i)[:3]
            assert s.aus == [12, 6, 25]
            assert s.au_boxes == [list(b) for _, _, b in rows]
            # every box in the target is copied from the AU list
            assert all(c in {b for _, _, b in rows} for c in p.box_coords)
            assert "<AU" not in s.completion


def test_retries_and_eliminations_recorded(scripted_run):
    acc = accepted(scripted_run["out"])
    m = {int(k[-4:]): v["meta"] for k, v in acc.items()}
    assert m[0]["retries"] == 0 and m[0]["eliminations"] == 0 and m[0]["requests"] == 2
    assert m[3]["retries"] == 1 and m[5]["retries"] == 1
    for k, i in enumerate(range(9, 15), start=1):
        assert m[i]["eliminations"] == k
        assert m[i]["n_candidates"] == 7 - k
        assert m[i]["predictions"] == wrong_labels(TRUTH[i], k) + [TRUTH[i]]
    assert m[14]["candidates"] == [TRUTH[14]]  # six eliminations: the paper keeps asking until exhausted
    assert m[18]["eliminations"] == 2 and m[18]["retries"] == 1
    assert m[15]["aus_used"] == [12, 6, 25]
    # transport faults are absorbed by the client: no format retry, one request per stage
    assert m[6]["requests"] == 2 and m[7]["requests"] == 2 and m[8]["requests"] == 2
    rej = rejected(scripted_run["out"])
    # max_format_retries=2: three requests, two of them retries (the last failed reply is not a retry)
    assert rej["generic/item0004"]["retries"] == 2 and "AU17 is not in the AU list" in rej["generic/item0004"]["detail"]
    assert rej["generic/item0001"]["detail"] == "too dark"


def test_no_prompt_singles_out_the_truth(scripted_run):
    script = scripted_run["script"]
    assert len(script.prompts) >= 15
    for item, prompts in script.prompts.items():
        i = int(item[-4:])
        truth = TRUTH[i]
        eliminated: list[str] = []
        trace_prompts = [p for p in prompts if "suitable_for_training" not in p]
        for p in prompts:
            if "suitable_for_training" in p:
                assert find_labels(p) == []
        for p in trace_prompts:
            named = find_labels(p)
            # the only labels named are the candidate list, in canonical order
            assert named == [lab for lab in LABELS if lab in named]
            assert truth in named
            assert set(LABELS) - set(named) <= set(wrong_labels(truth, 6))
            if len(named) == 1:  # only after all six wrong labels were eliminated
                assert i == 14
        if i in range(9, 15):
            k = i - 8
            sizes = [len(find_labels(p)) for p in trace_prompts]
            assert sizes == [7 - j for j in range(k + 1)]


def test_resume_is_a_no_op(scripted_run, fake_openai):
    out, srv = scripted_run["out"], scripted_run["srv"]
    before = (output_paths(out)["accepted"].read_bytes(), output_paths(out)["rejected"].read_bytes())
    srv.reset(lambda req, i: Reply(status=400))
    s = run_build(scripted_run["cfg"], detector=FakeAUDetector(scripted_run["table"]))
    assert s.processed == 0 and s.skipped == 20 and srv.calls == 0
    assert (output_paths(out)["accepted"].read_bytes(), output_paths(out)["rejected"].read_bytes()) == before


def _recording_teacher(replies: dict[str, list[str]], log: list[tuple[str, str, float]]):
    def fn(req: dict, index: int):
        item = req["user"].split("/")[-1]
        log.append((item, prompt_of(req), req.get("temperature")))
        return replies[item].pop(0)

    return fn


@pytest.mark.parametrize("mode", ["repeat", "feedback"])
def test_format_retry_modes_and_retry_count(tmp_path, fake_openai, mode):
    """"repeat" (default, the paper) re-sends the same inputs; "feedback" appends the problems. Both
    sample the retry at retry_temperature. One allowed retry = two requests = retries 1 (issue 12's off-by-one)."""
    csv_path, table = make_build_dataset(tmp_path / "d", ["fear", "anger"])
    log: list[tuple[str, str, float]] = []
    replies = {
        "item0000": [MALFORMED, trace(0, "fear")],  # accepted after one retry
        "item0001": [trace(1, "anger", au=17), trace(1, "anger", au=17)],  # fails twice: rejected
    }
    srv = fake_openai(_recording_teacher(replies, log))
    kw = {} if mode == "repeat" else {"format_retry": "feedback"}
    cfg = config_for(csv_path, tmp_path / "o", srv.url, quality=False, max_format_retries=1, temperature=0.0, retry_temperature=0.7, **kw)
    assert BuildConfig().format_retry == "repeat"
    s = run_build(cfg, detector=FakeAUDetector(table))
    assert s.metric("accepted") == 1 and s.metric("requests") == 4 and s.metric("format_retries") == 2
    assert accepted(tmp_path / "o")["generic/item0000"]["meta"]["retries"] == 1
    rej = rejected(tmp_path / "o")["generic/item0001"]
    assert rej["requests"] == 2 and rej["retries"] == 1
    for item in ("item0000", "item0001"):
        (p0, _, t0), (p1, _, t1) = [(p, i, t) for i, p, t in log if i == item]
        if mode == "repeat":
            assert p1 == p0 and (t0, t1) == (0.0, 0.7)
        else:
            assert p1.startswith(p0) and "Your previous reply was not usable" in p1[len(p0):] and (t0, t1) == (0.0, 0.7)
    with pytest.raises(ValueError, match="format_retry"):
        BuildConfig(format_retry="louder")


def test_repeat_retry_is_sampled_so_a_greedy_teacher_can_change_its_answer(tmp_path, fake_openai):
    """Issue 20 #3: a greedy teacher is deterministic at temperature 0, so re-sending a malformed
    request there returns the same reply. Here the teacher is malformed whenever it decodes greedily
    and well-formed only when sampled: the "repeat" retry keeps the prompt, samples at
    retry_temperature, and the item is accepted (both the quality verdict and the trace)."""
    csv_path, table = make_build_dataset(tmp_path / "d", ["fear"])
    log: list[tuple[str, float]] = []

    def greedy_teacher(req: dict, index: int):
        p, t = prompt_of(req), req.get("temperature")
        log.append((p, t))
        if "suitable_for_training" in p:
            return "I think it is fine." if t == 0 else quality()
        return MALFORMED if t == 0 else trace(0, "fear")

    srv = fake_openai(greedy_teacher)
    cfg = config_for(csv_path, tmp_path / "o", srv.url, max_format_retries=1, retry_temperature=0.6)
    assert cfg.format_retry == "repeat" and cfg.temperature == 0.0
    s = run_build(cfg, detector=FakeAUDetector(table))
    assert s.metric("accepted") == 1 and s.metric("requests") == 4 and s.metric("format_retries") == 2
    (q0, tq0), (q1, tq1), (p0, tp0), (p1, tp1) = log
    assert (q1, p1) == (q0, p0)  # the same inputs
    assert (tq0, tq1, tp0, tp1) == (0.0, 0.6, 0.0, 0.6)  # greedy first, sampled retry
    assert accepted(tmp_path / "o")["generic/item0000"]["meta"]["retries"] == 2
    assert BuildConfig().retry_temperature == 0.7  # the documented default


def test_feedback_never_echoes_labels():
    text = feedback(["Answer 'happiness' is not among the candidates", "AU17 is not in the AU list", "Answer 'happy or sad' is not one label"])
    assert find_labels(text) == [] and "AU17" in text


# --------------------------------------------------------------------------- policies
def test_no_au_skip_and_last_candidate_stop(tmp_path, fake_openai):
    labels = ["fear", "anger", "sadness"]
    csv_path, table = make_build_dataset(tmp_path / "d", labels)
    table[str(tmp_path / "d" / "img" / "0000.png")] = []
    plan = {
        "item0001": [quality()] + [trace(1, w) for w in wrong_labels("anger", 6)],
        "item0002": [quality()] + [trace(2, w) for w in wrong_labels("sadness", 3)] + [trace(2, "sadness")],
    }
    script = Script(plan)
    srv = fake_openai(script)
    cfg = config_for(csv_path, tmp_path / "o", srv.url, no_au="skip", last_candidate="stop")
    run_build(cfg, detector=FakeAUDetector(table))
    rej = rejected(tmp_path / "o")
    assert rej["generic/item0000"]["reason"] == "no_au" and "item0000" not in script.prompts
    assert rej["generic/item0001"]["reason"] == "one_candidate_left" and rej["generic/item0001"]["eliminations"] == 6
    # item1's last prompt still listed two candidates: the single truth was never shown
    assert min(len(find_labels(p)) for p in script.prompts["item0001"][1:]) == 2
    assert accepted(tmp_path / "o")["generic/item0002"]["meta"]["eliminations"] == 3
    assert not script.errors


def test_max_eliminations_exhausted_and_budget(tmp_path, fake_openai):
    csv_path, table = make_build_dataset(tmp_path / "d", ["fear", "fear"])
    plan = {
        "item0000": [quality()] + [trace(0, w) for w in wrong_labels("fear", 2)],
        "item0001": [quality(), MALFORMED, MALFORMED, trace(1, "fear")],
    }
    srv = fake_openai(Script(plan))
    cfg = config_for(csv_path, tmp_path / "o", srv.url, max_eliminations=1, max_requests=3)
    run_build(cfg, detector=FakeAUDetector(table))
    rej = rejected(tmp_path / "o")
    assert rej["generic/item0000"]["reason"] == "exhausted" and rej["generic/item0000"]["predictions"] == wrong_labels("fear", 2)
    assert rej["generic/item0001"]["reason"] == "budget" and rej["generic/item0001"]["requests"] == 3


def test_duplicate_ids_in_the_stream_are_built_once(tmp_path, fake_openai):
    csv_path, table = make_build_dataset(tmp_path / "d", ["fear"])
    rows = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join(rows + [rows[1]]) + "\n")  # the same id twice
    srv = fake_openai(stateless_script({"item0000": "fear"}, {"item0000": 0}, set()))
    s = run_build(config_for(csv_path, tmp_path / "o", srv.url), detector=FakeAUDetector(table))
    assert s.processed == 1 and s.skipped == 1
    assert len(list(read_jsonl(output_paths(tmp_path / "o")["accepted"]))) == 1


def test_teacher_failure_is_retryable_on_the_next_run(tmp_path, fake_openai):
    csv_path, table = make_build_dataset(tmp_path / "d", ["fear", "anger"])
    srv = fake_openai(lambda req, i: Reply(status=503))
    cfg = config_for(csv_path, tmp_path / "o", srv.url, client={"max_retries": 1})
    s = run_build(cfg, detector=FakeAUDetector(table))
    assert s.metric("reasons") == {"teacher_error": 2} and s.failed == 2 and s.exit_code() == 1
    assert {k: sorted(v) for k, v in s.failed_items.items()} == {"teacher_error": ["generic/item0000", "generic/item0001"]}
    assert all(r["retryable"] and "http_503" in r["detail"] for r in rejected(tmp_path / "o").values())
    # without retry_failed the records stay, are not retried, and still count as failed
    kept = run_build(BuildConfig.from_dict({**cfg.to_json(), "retry_failed": False}), detector=FakeAUDetector(table))
    assert kept.processed == 0 and kept.failed_before == 2 and kept.exit_code() == 1
    srv.reset(Script({"item0000": [quality(), trace(0, "fear")], "item0001": [quality(), trace(1, "anger")]}))
    s = run_build(cfg, detector=FakeAUDetector(table))
    assert s.metric("retried_errors") == 2 and s.metric("accepted") == 2 and s.failed == 0 and s.exit_code() == 0
    assert set(accepted(tmp_path / "o")) == {"generic/item0000", "generic/item0001"}
    assert rejected(tmp_path / "o") == {}


# --------------------------------------------------------------------------- sharding + kill -9 resume
def stateless_script(truth: dict[str, str], n_wrong: dict[str, int], malformed_first: set[str]):
    """A reply that depends only on the request: resumable runs see the same teacher."""

    def fn(req: dict, index: int):
        item = req["user"].split("/")[-1]
        p = prompt_of(req)
        if "suitable_for_training" in p:
            return quality(not item.endswith("3"))
        i = int(item[-4:])
        if item in malformed_first and req.get("temperature") == 0:
            return MALFORMED
        cands = find_labels(p)
        eliminated = [lab for lab in LABELS if lab not in cands]
        wrong = [w for w in wrong_labels(truth[item], n_wrong[item]) if w not in eliminated]
        return trace(i, wrong[0] if wrong else truth[item])

    return fn


def _dataset(tmp_path, n):
    labels = [LABELS[i % 7] for i in range(n)]
    csv_path, table = make_build_dataset(tmp_path / "d", labels)
    truth = {f"item{i:04d}": labels[i] for i in range(n)}
    n_wrong = {f"item{i:04d}": i % 4 for i in range(n)}
    malformed = {f"item{i:04d}" for i in range(n) if i % 5 == 0}
    return csv_path, table, truth, n_wrong, malformed


@pytest.mark.slow
def test_shards_partition_the_data(tmp_path, fake_openai):
    csv_path, table, truth, n_wrong, malformed = _dataset(tmp_path, 30)
    srv = fake_openai(stateless_script(truth, n_wrong, malformed))
    full = run_build(config_for(csv_path, tmp_path / "full", srv.url), detector=FakeAUDetector(table))
    parts = []
    for i in range(3):
        run_build(config_for(csv_path, tmp_path / "sh", srv.url, shard=f"{i}/3"), detector=FakeAUDetector(table))
        parts.append(set(accepted(tmp_path / "sh", (i, 3))))
    assert sum(len(p) for p in parts) == len(set().union(*parts)) == full.metric("accepted")
    assert set().union(*parts) == set(accepted(tmp_path / "full"))
    assert all(shard_of(k, 3) == i for i, p in enumerate(parts) for k in p)
    assert parse_shard("2/8") == (2, 8)
    with pytest.raises(ValueError):
        BuildConfig(shard=(3, 3))
    with pytest.raises(ValueError):
        parse_shard("2-8")
    for bad in (dict(no_au="maybe"), dict(last_candidate="never"), dict(max_regions=4)):
        with pytest.raises(ValueError):
            BuildConfig(**bad)
    with pytest.raises(ValueError, match="teacher"):
        run_build(BuildConfig(sources=[], out=str(tmp_path / "bad"), teacher="claude"))


KILL_CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from fixtures_data import FakeAUDetector
from tagfer.data.build import BuildConfig, run_build
cfg = BuildConfig.from_dict(json.loads(sys.argv[2]))
table = json.loads(open(sys.argv[3]).read())
run_build(cfg, detector=FakeAUDetector(table))
"""


@pytest.mark.slow
def test_kill9_midway_then_resume_gives_the_same_accepted_set(tmp_path, fake_openai):
    n = 60
    csv_path, table, truth, n_wrong, malformed = _dataset(tmp_path, n)
    script = stateless_script(truth, n_wrong, malformed)
    srv = fake_openai(script, latency_s=0.05)
    ref = run_build(config_for(csv_path, tmp_path / "ref", srv.url), detector=FakeAUDetector(table))
    ref_acc = accepted(tmp_path / "ref")
    assert ref.metric("accepted") == len(ref_acc) and 0 < ref.metric("accepted") < n

    out = tmp_path / "killed"
    cfg = config_for(csv_path, out, srv.url, client={"total_concurrency": 4, "per_endpoint_concurrency": 4})
    d = cfg.to_json()
    d["shard"] = list(d["shard"])
    (tmp_path / "table.json").write_text(json.dumps(table))
    proc = subprocess.Popen([sys.executable, "-c", KILL_CHILD, str(TESTS), json.dumps(d), str(tmp_path / "table.json")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    acc_path = output_paths(out)["accepted"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if acc_path.exists() and acc_path.read_bytes().count(b"\n") >= 8:
            break
        time.sleep(0.01)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = accepted(out)
    assert 8 <= len(partial) < ref.metric("accepted")
    s = run_build(cfg, detector=FakeAUDetector(table))
    assert s.skipped >= len(partial)
    final_lines = list(read_jsonl(acc_path))
    assert len(final_lines) == len({r["id"] for r in final_lines})  # no duplicates
    assert {r["id"]: (r["label"], r["completion"]) for r in final_lines} == {k: (v["label"], v["completion"]) for k, v in ref_acc.items()}
    assert set(rejected(out)) == set(rejected(tmp_path / "ref"))


def test_exception_injected_midway_then_resume(tmp_path, fake_openai):
    csv_path, table, truth, n_wrong, malformed = _dataset(tmp_path, 20)
    srv = fake_openai(stateless_script(truth, n_wrong, malformed))
    ref = run_build(config_for(csv_path, tmp_path / "ref", srv.url), detector=FakeAUDetector(table))
    seen = []

    def boom(kind, obj):
        seen.append(obj["id"])
        if len(seen) == 7:
            raise KeyboardInterrupt

    cfg = config_for(csv_path, tmp_path / "o", srv.url)
    with pytest.raises(KeyboardInterrupt):
        run_build(cfg, detector=FakeAUDetector(table), on_result=boom)
    run_build(cfg, detector=FakeAUDetector(table))
    assert set(accepted(tmp_path / "o")) == set(accepted(tmp_path / "ref"))
    assert len(list(read_jsonl(output_paths(tmp_path / "o")["accepted"]))) == ref.metric("accepted")


# --------------------------------------------------------------------------- other teachers
def test_facs_teacher_on_real_faces(rafdb_root, tmp_path):
    cfg = BuildConfig(sources=[f"rafdb:{rafdb_root}"], out=str(tmp_path / "o"), teacher="facs", au_workers=1)
    s = run_build(cfg)
    acc, rej = accepted(tmp_path / "o"), rejected(tmp_path / "o")
    assert s.processed == 8 and len(acc) + len(rej) == 8
    assert acc, rej  # the smiling astronaut labelled happiness is explained correctly
    for r in acc.values():
        smp = TAGSample.from_json(r)
        assert smp.teacher == "facs-rules" and parse_trace(smp.completion).well_formed and parse_trace(smp.completion).label == smp.label
        assert smp.au_boxes and smp.aus and Path(smp.image).is_file()
    assert {r["reason"] for r in rej.values()} <= {"facs_mismatch", "no_face", "no_au"}


def test_facs_teacher_writes_from_the_grounded_face(tmp_path):
    """`--teacher facs` calls the facs backend with each item's grounded face (no second detection:
    the synthetic images hold no face MediaPipe could find) and keeps facs_sample's behaviour: the
    same trace and meta when the engine's label is the truth, `facs_mismatch` otherwise."""
    from tagfer.au.facs import explain, facs_sample

    (face,) = FakeAUDetector({"k": fake_au_rows(0)}).detect(None, "k")
    label = explain(face).label
    wrong = next(lab for lab in LABELS if lab != label)
    csv_path, table = make_build_dataset(tmp_path / "d", [label, wrong])
    cfg = BuildConfig(sources=[f"generic:{csv_path}"], out=str(tmp_path / "o"), teacher="facs", au_workers=1)
    s = run_build(cfg, detector=FakeAUDetector(table))
    assert (s.metric("accepted"), s.metric("reasons"), s.metric("requests")) == (1, {"facs_mismatch": 1}, 0)
    (got,) = accepted(tmp_path / "o").values()
    (face0,) = FakeAUDetector(table).detect(None, str(tmp_path / "d" / "img" / "0000.png"))
    ref = facs_sample(face0, label=label, id=got["id"], source="generic", image=got["image"]).to_json()
    ref["teacher"] = "facs-rules"  # --teacher facs writes with the FACS rules (recorded as such), not the FER net
    ref["meta"].update({"top": [list(a[:2]) + [list(a[2])] for a in [(d.au, d.score, d.box) for d in face0.candidate_pool]],
                        "original_label": label})
    assert got == json.loads(json.dumps(ref))


def test_ferplus_bytes_images_are_written(ferplus_root, tmp_path):
    cfg = BuildConfig(sources=[f"ferplus:{ferplus_root}"], out=str(tmp_path / "o"), teacher="facs", au_workers=1, limit=3)
    s = run_build(cfg)
    assert s.processed == 3
    for r in accepted(tmp_path / "o").values():
        assert r["image"].startswith("images/ferplus/") and (tmp_path / "o" / r["image"]).is_file()


def test_tiny_random_vlm_garbage_is_rejected_cleanly(tiny_vlm, tmp_path):
    from tagfer.models.backends import TransformersBackend

    csv_path, table = make_build_dataset(tmp_path / "d", ["fear", "anger"])
    teacher = TransformersBackend(tiny_vlm)  # a Backend is the teacher, called directly
    cfg = BuildConfig(sources=[f"generic:{csv_path}"], out=str(tmp_path / "o"), max_format_retries=0, max_tokens=12)
    s = run_build(cfg, detector=FakeAUDetector(table), teacher=teacher)
    assert s.metric("accepted") == 0 and s.metric("reasons") == {"quality_invalid": 2}
    cfg2 = BuildConfig(sources=[f"generic:{csv_path}"], out=str(tmp_path / "o2"), quality=False, max_format_retries=1, max_tokens=12)
    s = run_build(cfg2, detector=FakeAUDetector(table), teacher=teacher)
    assert s.metric("accepted") == 0 and s.metric("reasons") == {"format": 2} and s.metric("requests") == 4


# --------------------------------------------------------------------------- CLI end to end
def echo_teacher(req: dict, index: int):
    """Copies the first AU lines of the prompt into tags and answers the first candidate (elimination does the rest)."""
    from tagfer.traces.trace import parse_au_list

    p = prompt_of(req)
    if "suitable_for_training" in p:
        return quality()
    lines = [ln for ln in p.splitlines() if ln.startswith("AU") and "[" in ln]
    items = parse_au_list("\n".join(lines)) if lines else []
    cot = "The face overall looks composed with a steady gaze and balanced features."
    for it in items[:3]:
        b = it.box
        cot += f" This area changes: <AU{it.au}> [{b[0]}, {b[1]}, {b[2]}, {b[3]}] is visible."
    cot += " All cues considered, a conclusion follows."
    return json.dumps({"CoT": cot, "Answer": find_labels(p)[0]})


@pytest.mark.slow
def test_cli_build_export_stats_end_to_end(rafdb_root, tmp_path, fake_openai):
    import datasets
    from typer.testing import CliRunner

    from tagfer.cli import app

    srv = fake_openai(echo_teacher)
    out = tmp_path / "built"
    runner = CliRunner()
    args = ["build", "--dataset", f"rafdb:{rafdb_root}", "--endpoint", srv.url, "--out", str(out), "--concurrency", "4",
            "--au-workers", "1", "--timeout", "5", "--no-progress"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    acc = accepted(out)
    assert len(acc) == 8 and "accepted 8" in r.output  # the echo teacher always ends on the true label
    assert any(v["meta"]["eliminations"] > 0 for v in acc.values())
    for v in acc.values():
        s = TAGSample.from_json(v)
        p = parse_trace(s.completion)
        assert p.well_formed and p.label == s.label
        assert set(p.box_coords) <= {tuple(b) for b in s.au_boxes}  # grounded in the detector's boxes
    r2 = runner.invoke(app, args)
    assert r2.exit_code == 0 and "8 already done" in r2.output
    r = runner.invoke(app, ["export", str(out), "--out", str(tmp_path / "exp")])
    assert r.exit_code == 0, r.output
    assert len(datasets.load_from_disk(str(tmp_path / "exp" / "hf" / "dataset"))) == 8
    assert json.loads((tmp_path / "exp" / "llamafactory" / "dataset_info.json").read_text())["tag_sft"]["formatting"] == "sharegpt"
    r = runner.invoke(app, ["stats", str(out), "--no-plots"])
    assert r.exit_code == 0, r.output
    st = json.loads((out / "stats" / "stats.json").read_text())
    assert st["accepted"] == 8 and st["by_class"]["happiness"] == 2
    r = runner.invoke(app, ["build", "--dataset", f"rafdb:{rafdb_root}", "--out", str(out), "--shard", "5/2"])
    assert r.exit_code == 2 and "shard" in r.output
    # an unreachable teacher without --model fails fast with a clear message, and nothing is written
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    r = runner.invoke(app, ["build", "--dataset", f"rafdb:{rafdb_root}", "--out", str(tmp_path / "down"), "--endpoint", f"http://127.0.0.1:{port}/v1",
                            "--request-retries", "0", "--no-progress"])
    assert r.exit_code == 2 and "cannot discover the model name" in r.output
    assert not accepted(tmp_path / "down") and not rejected(tmp_path / "down")


def test_cli_build_paper_options_reach_the_config(rafdb_root, tmp_path, fake_openai):
    from typer.testing import CliRunner

    from tagfer.cli import app

    srv = fake_openai(echo_teacher)
    runner = CliRunner()
    base = ["build", "--dataset", f"rafdb:{rafdb_root}", "--endpoint", srv.url, "--au-workers", "1", "--no-progress", "--limit", "1"]
    r = runner.invoke(app, base + ["--out", str(tmp_path / "d")])
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "d" / "build_config.json").read_text())
    default = BuildConfig()
    assert (cfg["format_retry"], cfg["min_tags"], cfg["au_threshold"], cfg["au_candidate_threshold"]) == (
        default.format_retry, default.min_tags, None, None) == ("repeat", 0, None, None)
    r = runner.invoke(app, base + ["--out", str(tmp_path / "o"), "--format-retry", "feedback", "--min-tags", "2",
                                   "--au-threshold", "0.2", "--candidate-threshold", "0.6"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "o" / "build_config.json").read_text())
    assert (cfg["format_retry"], cfg["min_tags"], cfg["au_threshold"], cfg["au_candidate_threshold"]) == ("feedback", 2, 0.2, 0.6)
    r = runner.invoke(app, base + ["--out", str(tmp_path / "x"), "--format-retry", "louder"])
    assert r.exit_code == 2 and "format_retry" in r.output


def test_cli_build_honours_the_config_file(rafdb_root, tmp_path, fake_openai):
    """Issue 14 #5: every field of --config reaches the build (endpoint, model, quality, top_k, max_tokens, limit, concurrency)."""
    from typer.testing import CliRunner

    from tagfer.cli import app

    seen: list[dict] = []

    def recording(req: dict, index: int):
        seen.append(req)
        return echo_teacher(req, index)

    srv = fake_openai(recording)
    out = tmp_path / "cfg_built"
    cfg = {"sources": [f"rafdb:{rafdb_root}"], "out": str(out), "quality": False, "top_k": 2, "max_tokens": 77, "limit": 3,
           "au_workers": 1, "client": {"endpoints": [srv.url], "model": "fake", "total_concurrency": 64, "timeout_s": 5}}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    r = CliRunner().invoke(app, ["build", "--config", str(tmp_path / "cfg.json"), "--no-progress"])
    assert r.exit_code == 0, r.output
    written = json.loads(output_paths(out)["config"].read_text())
    assert (written["quality"], written["top_k"], written["max_tokens"], written["limit"]) == (False, 2, 77, 3)
    assert written["client"]["total_concurrency"] == 64 and written["client"]["endpoints"] == [srv.url]
    assert written["client"]["model"] == "fake"
    assert len(accepted(out)) + len(rejected(out)) == 3  # limit
    assert seen and all(q["model"] == "fake" and q["max_tokens"] == 77 for q in seen)
    assert not any("suitable_for_training" in prompt_of(q) for q in seen)  # no Stage I
    au_lines = [[ln for ln in prompt_of(q).splitlines() if ln.startswith("AU") and "[" in ln] for q in seen]
    assert max(len(x) for x in au_lines) == 2  # top_k from the file


def _cli_build(rafdb_root, out: Path, url: str, *extra: str):
    from typer.testing import CliRunner

    from tagfer.cli import app

    args = ["build", "--dataset", f"rafdb:{rafdb_root}", "--out", str(out), "--endpoint", url, "--served-model", "fake-vlm", "--limit", "2",
            "--au-workers", "1", "--timeout", "2", "--request-retries", "0", "--no-quality", "--no-progress", *extra]
    return CliRunner().invoke(app, args)


def test_cli_build_exit_code_says_items_could_not_be_processed(rafdb_root, tmp_path, fake_openai):
    """Issue 14 #8: 500s, garbage bodies and a dead endpoint → exit 1 (retryable); validation rejections → exit 0."""
    import socket

    for name, script in (("http500", lambda req, i: Reply(status=500, text="boom")),
                         ("garbage", lambda req, i: Reply(body=b"<html>not a completion</html>"))):
        srv = fake_openai(script)
        r = _cli_build(rafdb_root, tmp_path / name, srv.url)
        assert r.exit_code == 1, (name, r.output)
        rej = rejected(tmp_path / name)
        assert len(rej) == 2 and all(v["reason"] == "teacher_error" and v["retryable"] for v in rej.values())
        assert "could not be processed" in " ".join(r.output.split())
        summary = json.loads(output_paths(tmp_path / name)["summary"].read_text())
        assert summary["failed"] == 2
    with socket.socket() as sock:  # nothing listening (with --model, so the build starts)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    r = _cli_build(rafdb_root, tmp_path / "down", f"http://127.0.0.1:{port}/v1")
    assert r.exit_code == 1, r.output
    assert {v["reason"] for v in rejected(tmp_path / "down").values()} == {"teacher_error"}
    # a teacher that answers, but never validly: rejected by validation, which is a normal outcome → 0
    srv = fake_openai(lambda req, i: "I cannot comply with the format.")
    r = _cli_build(rafdb_root, tmp_path / "invalid", srv.url, "--max-format-retries", "0")
    assert r.exit_code == 0, r.output
    assert {v["reason"] for v in rejected(tmp_path / "invalid").values()} == {"format"}
    # the failed items are retried on a re-run; once they succeed the exit code is 0 again
    srv = fake_openai(echo_teacher)
    r = _cli_build(rafdb_root, tmp_path / "http500", srv.url)
    assert r.exit_code == 0, r.output
    assert len(accepted(tmp_path / "http500")) == 2 and not rejected(tmp_path / "http500")


def test_build_config_holds_the_one_client_config():
    from tagfer.models.openai_client import ClientConfig

    d = BuildConfig()
    assert isinstance(d.client, ClientConfig) and d.client.image_format == "jpeg"
    # every other client default is ClientConfig's own (declared once)
    base = ClientConfig(api_key="")
    assert all(getattr(d.client, f) == getattr(base, f) for f in ("total_concurrency", "per_endpoint_concurrency", "timeout_s", "max_retries", "endpoints"))
    c = BuildConfig.from_dict({"client": {"total_concurrency": 9, "max_retries": 4, "timeout_s": 7.0, "api_key": "sk-x",
                                          "extra_headers": {"Authorization": "Bearer y"}}})
    assert (c.client.total_concurrency, c.client.max_retries, c.client.timeout_s) == (9, 4, 7.0)
    assert c.in_flight == 18
    j = c.to_json()
    assert "api_key" not in j["client"] and "extra_headers" not in j["client"] and "sk-x" not in json.dumps(j)
    assert BuildConfig.from_dict(j).client.total_concurrency == 9
    with pytest.raises(ValueError, match="'retries'.*known keys"):
        BuildConfig.from_dict({"retries": 3})
    # client settings live once, under "client": a flat one is an unknown key that says where it goes
    with pytest.raises(ValueError, match=r"'concurrency'.*go in \"client\".*total_concurrency"):
        BuildConfig.from_dict({"concurrency": 3})
    with pytest.raises(ValueError, match="client.max_retries must be an integer"):
        BuildConfig.from_dict({"client": {"max_retries": "2"}})
    with pytest.raises(ValueError, match="client must be a JSON object"):
        BuildConfig.from_dict({"client": "http://h:1/v1"})
    assert not hasattr(BuildConfig, "concurrency") and not hasattr(d, "request_retries")


def test_teacher_comes_from_the_model_registry(monkeypatch, tmp_path):
    import sys

    from tagfer.data.build import teacher_backend
    from tagfer.models.backends import FACSBackend, OpenAIBackend

    from tagfer.au.facs import TRAINING_CONFIG

    cfg = BuildConfig.from_dict({"client": {"endpoints": ["http://h0:1/v1", "http://h1:1/v1"], "model": "teach", "per_endpoint_concurrency": 7}})
    b = teacher_backend(cfg)
    assert isinstance(b, OpenAIBackend) and b.client_config == cfg.client and b.tag_requests  # one ClientConfig, not a copy
    b = teacher_backend(BuildConfig.from_dict({"teacher": "openai:http://other:2/v1", "client": {"model": "teach"}, "tag_requests": False}))
    assert b.client_config.endpoints == ["http://other:2/v1"] and b.client_config.model == "teach" and not b.tag_requests
    b = teacher_backend(BuildConfig(teacher="facs"))
    assert isinstance(b, FACSBackend) and b.config == TRAINING_CONFIG  # training traces quote no detector numbers
    monkeypatch.setitem(sys.modules, "vllm", None)  # not installed: a clear usage error, no traceback
    with pytest.raises(ValueError, match="teacher 'vllm:/m'.*pip install vllm"):
        run_build(BuildConfig(sources=[], out=str(tmp_path / "v"), teacher="vllm:/m"))
