"""Tests for tagfer.core.jsonl.decode_json_at (JSON values inside free text: teacher and judge replies)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tagfer.core.jsonl import MAX_JSON_DEPTH, decode_json_at
from tagfer.data.teacher import extract_json
from tagfer.evaluation.judge import JudgeParseError, parse_judgment

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
    max_leaves=10,
)
PIECES = st.sampled_from(['{', '}', '[', ']', '"', '\\', ':', ',', ' ', 'a', '1', '"k"', 'true', '\n'])


@settings(deadline=None, max_examples=300)
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


@settings(deadline=None, max_examples=100)
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
