"""Tests for tagfer.core.jsonl.decode_json_at (JSON values inside free text: teacher and judge replies)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiers import examples

from tagfer.core.jsonl import MAX_JSON_DEPTH, decode_json_at
from tagfer.data.teacher import extract_json
from tagfer.evaluation.judge import JudgeParseError, parse_judgment

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
    max_leaves=10,
)
PIECES = st.sampled_from(['{', '}', '[', ']', '"', '\\', ':', ',', ' ', 'a', '1', '"k"', 'true', '\n'])


@settings(deadline=None, max_examples=examples(300))
@given(st.one_of(st.lists(PIECES, max_size=24).map("".join), JSON_VALUES.map(json.dumps)), st.text(max_size=5))
def test_decode_json_at_agrees_with_raw_decode(text, prefix):
    text = prefix + text
    dec = json.JSONDecoder()
    for i, ch in enumerate(text):
        if ch not in "{[":
            continue
        try:
            want = dec.raw_decode(text, i)[0]
        except (ValueError, RecursionError):
            want = ValueError
        try:
            got = decode_json_at(text, i)
        except ValueError:
            got = ValueError
        assert got == want or (got != got and want != want), (text, i)


@settings(deadline=None, max_examples=examples(100))
@given(st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=4))
def test_decode_json_at_reads_objects_inside_chatter(obj):
    text = f'Sure "quote {{ here: {json.dumps(obj)} trailing }} {{'
    start = text.index("{", text.index(":"))
    assert decode_json_at(text, start) == obj


@pytest.mark.parametrize(
    "text",
    ['{"a":' * 5000, "[" * 5000 + "{", "{" * 5000, '{"a":[' * 3000, '{"a":"x' * 3000, '{"a":[1,2,{"c":' * 2000,
     '{"cot": "' + '\\"' * 5000],
)
def test_deep_or_unclosed_json_is_refused_not_raised(text):
    # RecursionError escaped from extract_json / parse_judgment before
    assert extract_json(text, ("cot", "answer")) is None
    with pytest.raises(JudgeParseError):
        parse_judgment(text)
    with pytest.raises(ValueError):
        decode_json_at(text, 0)


def test_depth_limit_is_exact():
    ok = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert decode_json_at(ok, 0) == json.loads(ok)
    with pytest.raises(ValueError, match="deeper"):
        decode_json_at("[" + ok + "]", 0)
    with pytest.raises(ValueError, match="deeper"):
        decode_json_at("[1, " * (MAX_JSON_DEPTH + 1), 0)


# ----------------------------------------------------------------------------- one writer per file (issue 21 #9)
import subprocess
import sys
import textwrap
from pathlib import Path

from tagfer.core.jsonl import JsonlWriter, OutputLocked, drop_records, output_lock, read_jsonl, remove_output

SRC = str(Path(__file__).resolve().parents[1] / "src")
HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[2])
    from tagfer.core.jsonl import JsonlWriter
    w = JsonlWriter(sys.argv[1])
    w.write({"image": "first-run"})
    print("ready", flush=True)
    sys.stdin.readline()  # hold the file until the test says so
    w.write({"image": "first-run-2"})
    w.close()
""")


def _holder(out: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), SRC], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def test_a_second_process_cannot_append_to_a_file_being_written(tmp_path):
    out = tmp_path / "run.jsonl"
    holder = _holder(out)
    try:
        with pytest.raises(OutputLocked, match="being written by another run"):
            JsonlWriter(out)
        with pytest.raises(OutputLocked):
            drop_records(out, lambda r: True)  # a --retry-errors rewrite would lose the holder's records
        with pytest.raises(OutputLocked):
            remove_output(out)  # nor may a --no-resume run delete the file under it
        # a second CLI run on the same --out exits 2 with the message (no traceback)
        code = ("import sys; sys.path.insert(0, sys.argv[2]); import typer\n"
                "from tagfer.core.jsonl import JsonlWriter\n"
                "app = typer.Typer()\n"
                "@app.command()\n"
                "def run(out: str):\n    JsonlWriter(out).write({'image': 'second'})\n"
                "app(args=[sys.argv[1]])\n")
        r = subprocess.run([sys.executable, "-c", code, str(out), SRC], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "being written by another run" in r.stderr and "Traceback" not in r.stderr
    finally:
        holder.communicate("go\n", timeout=30)
    assert holder.returncode == 0
    assert [r["image"] for r in read_jsonl(out)] == ["first-run", "first-run-2"]  # nothing written twice or lost
    assert not (tmp_path / ".run.jsonl.lock").exists()  # the sidecar goes with the lock
    with JsonlWriter(out) as w:  # free again
        w.write({"image": "third"})
    assert len(list(read_jsonl(out))) == 3


def test_lock_of_a_killed_run_is_free_and_locks_are_reentrant_in_a_process(tmp_path):
    out = tmp_path / "run.jsonl"
    holder = _holder(out)
    holder.kill()
    holder.wait(timeout=30)
    with output_lock(out):  # the kernel dropped the dead run's lock (its sidecar file is still there)
        drop_records(out, lambda r: False)  # re-entrant: the holder may rewrite its own file
        with JsonlWriter(out) as w:
            w.write({"image": "x"})
    assert [r["image"] for r in read_jsonl(out)] == ["first-run", "x"]
    assert remove_output(out) and not out.exists() and not remove_output(out)
