"""tagfer.core.jobs: the one resume set-up and the ordered, bounded parallel map."""

from __future__ import annotations

import json
import os
import threading

import pytest
from tiers import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from tagfer.core.jobs import Resume, ordered_map, resume_from
from tagfer.core.jsonl import read_jsonl


def _write(path, records, torn: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + torn, encoding="utf-8")


def test_resume_reads_last_status_per_key(tmp_path):
    out = tmp_path / "o.jsonl"
    _write(out, [{"image": "a", "error": {"kind": "corrupt"}}, {"image": "b", "error": None}, {"image": "a", "error": None},
                 {"image": "c", "error": {"kind": "no_face"}}, {"other": 1}], torn='{"image": "d"')
    r = resume_from(out)
    assert r.status == {"a": "ok", "b": "ok", "c": "failed"}  # the torn last line is not a record; "a" was retried OK
    assert "a" in r and "d" not in r and r.failed == {"c"} and r.retried == 0
    assert r.count(["a", "c", "c", "zz"]) == 1  # distinct requested keys that failed before
    assert len(list(read_jsonl(out))) == 5  # reading never rewrites


def test_retry_errors_drops_error_records_and_no_resume_starts_over(tmp_path):
    out = tmp_path / "o.jsonl"
    _write(out, [{"id": "a", "error": {"kind": "timeout"}}, {"id": "b", "error": None}, {"id": "c", "error": {"kind": "x"}}])
    r = resume_from(out, "id", retry_errors=True)
    assert r.retried == 2 and r.done == {"b"} and r.failed == set()
    assert [x["id"] for x in read_jsonl(out)] == ["b"]
    r = resume_from(out, "id", resume=False)
    assert r.done == set() and not out.exists()
    assert resume_from(tmp_path / "missing.jsonl").done == set()


def test_resume_over_several_files_with_custom_error_and_status(tmp_path):
    acc, rej = tmp_path / "accepted.jsonl", tmp_path / "rejected.jsonl"
    _write(acc, [{"id": "1"}, {"id": "2"}])
    _write(rej, [{"id": "3", "retryable": True}, {"id": "4", "retryable": False}])
    retryable = lambda r: bool(r.get("retryable"))  # noqa: E731
    r = resume_from([acc, rej], "id", is_error=retryable)
    assert r.done == {"1", "2", "3", "4"} and r.failed == {"3"}
    r = resume_from([acc, rej], "id", retry_errors=True, is_error=retryable)
    assert r.retried == 1 and r.done == {"1", "2", "4"}
    r = resume_from(acc, "id", status=lambda rec: "odd" if int(rec["id"]) % 2 else "even")
    assert r.status == {"1": "odd", "2": "even"} and isinstance(r, Resume)


@settings(max_examples=examples(25), deadline=None)
@given(st.lists(st.integers(0, 1000), max_size=40), st.integers(0, 4), st.integers(1, 6))
def test_thread_map_keeps_order_and_bounds_the_look_ahead(items, workers, window):
    pulled = [0]
    lock = threading.Lock()
    worst = [0]

    def source():
        for x in items:
            with lock:
                pulled[0] += 1
            yield x

    got = []
    for y in ordered_map(lambda x: x * 2, source(), workers=workers, window=window):
        got.append(y)
        with lock:
            worst[0] = max(worst[0], pulled[0] - len(got))
    assert got == [x * 2 for x in items]
    assert worst[0] <= window  # never more than `window` items read ahead of the consumer (constant memory)


def test_thread_map_raises_the_item_error_in_order():
    def fn(x):
        if x == 3:
            raise ValueError("bad item 3")
        return x

    got = []
    with pytest.raises(ValueError, match="bad item 3"):
        for y in ordered_map(fn, range(6), workers=2):
            got.append(y)
    assert got == [0, 1, 2]


def _die_on_boom(x: str) -> str:
    if x == "boom":
        os._exit(3)  # a worker killed mid-item (native crash, OOM killer)
    return x.upper()


def test_process_map_survives_a_crashing_item():
    items = ["a", "b", "boom", "c", "d", "e"]
    got = list(ordered_map(_die_on_boom, items, workers=2, window=3, processes=True, on_crash=lambda x: f"crashed:{x}"))
    assert got == ["A", "B", "crashed:boom", "C", "D", "E"]  # input order; only the poisonous item is lost


def test_process_map_without_on_crash_raises():
    from concurrent.futures.process import BrokenProcessPool

    with pytest.raises(BrokenProcessPool):
        list(ordered_map(_die_on_boom, ["boom"], workers=1, processes=True))


# --------------------------------------------------------------------------- JobResult, folded from events
from tagfer.core.jobs import (EXIT_FAILED, EXIT_MALFORMED, EXIT_OK, MAX_LISTED, Done, JobRecorder, JobResult, Progress,  # noqa: E402
                              Skipped, Started)

_event = st.one_of(
    st.builds(Progress, st.text("abc", min_size=1, max_size=3), st.sampled_from([None, "no_face", "corrupt"]),
              st.sampled_from(["ok", "malformed"])),
    st.builds(Skipped, st.text("abc", min_size=1, max_size=3), st.sampled_from(["ok", "failed", "malformed"])),
)


@settings(max_examples=examples(60), deadline=None)
@given(st.lists(_event, max_size=60))
def test_job_result_is_the_fold_of_its_events(events):
    seen = []
    rec = JobRecorder("t", on_event=seen.append)
    rec.start(len(events))
    for e in events:
        rec.emit(e)
    r = rec.finish()
    assert seen[0] == Started(len(events)) and seen[-1] == Done(r) and seen[1:-1] == events  # the observer saw the same events
    prog = [e for e in events if isinstance(e, Progress)]
    skip = [e for e in events if isinstance(e, Skipped)]
    failed = [e for e in prog if e.error]
    assert (r.processed, r.failed, r.skipped) == (len(prog), len(failed), len(skip))
    assert r.malformed == sum(e.status == "malformed" and not e.error for e in prog)
    assert r.failed_before == sum(e.status == "failed" for e in skip)
    assert sum(r.errors.values()) == r.failed and all(len(v) <= MAX_LISTED for v in r.failed_items.values())
    for kind, keys in r.failed_items.items():
        assert keys == [e.key for e in failed if e.error == kind][:MAX_LISTED]
    want = EXIT_FAILED if r.failed or r.failed_before else EXIT_MALFORMED if r.malformed or r.malformed_before else EXIT_OK
    assert r.exit_code() == want and r.to_json()["exit_code"] == want


def test_job_result_json_save_and_text(tmp_path):
    rec = JobRecorder("au")
    rec.start(3)
    rec.item("a.jpg")
    rec.item("b.jpg", "no_face")
    rec.skip("c.jpg", "failed")
    rec.result.set_metric("repaired_bytes", 7)
    r = rec.finish()
    d = json.loads(r.save(tmp_path / "s.json").read_text())
    assert d["failed_items"] == {"no_face": ["b.jpg"]} and d["metrics"] == {"au/repaired_bytes": 7} and d["total"] == 3
    assert (d["processed"], d["failed"], d["skipped"], d["failed_before"], d["exit_code"]) == (2, 1, 1, 1, 1)
    text = r.render("out.jsonl", noun="image")
    assert text.startswith("2 image(s) processed (1 failed), 1 already done") and "→ out.jsonl" in text
    assert "  no_face (1): b.jpg" in text and "1 requested image(s) still have an error record" in text
    assert r.metric("repaired_bytes") == 7 and r.metric("missing") == 0 and "{" not in text  # no reprs


def test_job_result_lists_a_bounded_number_of_failed_items():
    r = JobResult("x")
    for i in range(MAX_LISTED + 5):
        r.apply(Progress(f"i{i}", "corrupt"))
    assert r.errors == {"corrupt": MAX_LISTED + 5} and len(r.failed_items["corrupt"]) == MAX_LISTED
    assert "and 5 more" in r.render()
