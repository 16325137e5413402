"""The one sample schema: JSONL ↔ TAGSample ↔ Arrow row ↔ TRL row round trips, old formats still load."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiers import examples

from tagfer.core.labels import LABELS
from tagfer.core.records import (
    BOX_DTYPE, SAMPLE_COLUMNS, TRL_COLUMNS, TAGSample, sample_schema, trl_prompt, trl_schema,
)

_json_scalar = st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.floats(allow_nan=False, allow_infinity=False) | st.text()
_json = st.recursive(_json_scalar, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids, max_size=3),
                     max_leaves=8)
_box = st.lists(st.integers(0, 511), min_size=4, max_size=4)


@st.composite
def samples(draw, with_bytes: bool = False) -> TAGSample:
    return TAGSample(
        id=draw(st.text(min_size=1)), source=draw(st.text()), image=draw(st.text()),
        label=draw(st.sampled_from(LABELS)), completion=draw(st.text()),
        au_boxes=draw(st.lists(_box, max_size=6)), aus=draw(st.lists(st.integers(1, 64), max_size=6)),
        teacher=draw(st.text()), split=draw(st.sampled_from(["train", "val", "test", ""])),
        meta=draw(st.dictionaries(st.text(max_size=8), _json, max_size=4)),
        image_bytes=draw(st.none() | st.binary(max_size=64)) if with_bytes else None,
    )


def _through_arrow(row, schema):
    import pyarrow as pa

    return pa.Table.from_pylist([row], schema=schema).to_pylist()[0]


@settings(max_examples=examples(100), deadline=None)
@given(samples())
def test_jsonl_round_trip(s):
    line = json.dumps(s.to_json(), ensure_ascii=False)
    assert TAGSample.from_json(json.loads(line)) == s
    assert set(json.loads(line)) == set(SAMPLE_COLUMNS) - {"image_bytes"}


@settings(max_examples=examples(100), deadline=None)
@given(samples(with_bytes=True))
def test_arrow_row_round_trip(s):
    row = _through_arrow(s.to_arrow_row(), sample_schema())
    assert tuple(row) == SAMPLE_COLUMNS
    assert TAGSample.from_arrow_row(row) == s


@settings(max_examples=examples(100), deadline=None)
@given(samples())
def test_jsonl_to_arrow_to_jsonl_keeps_the_line(s):
    line = json.dumps(s.to_json(), sort_keys=True)
    back = TAGSample.from_arrow_row(_through_arrow(TAGSample.from_json(json.loads(line)).to_arrow_row(), sample_schema()))
    assert json.dumps(back.to_json(), sort_keys=True) == line


@settings(max_examples=examples(100), deadline=None)
@given(samples(), st.text(), st.text())
def test_trl_row_round_trip(s, system, user):
    row = _through_arrow(s.to_trl_row(system, user), trl_schema())
    assert tuple(row) == TRL_COLUMNS and row["prompt"] == trl_prompt(system, user)
    assert TAGSample.from_trl_row(row) == s


def test_one_box_dtype_everywhere():
    import datasets
    import pyarrow as pa

    box = getattr(pa, BOX_DTYPE)()
    for schema in (sample_schema(), trl_schema()):
        assert schema.field("au_boxes").type == pa.list_(pa.list_(box)) and schema.field("aus").type == pa.list_(box)
    feats = datasets.Features.from_arrow_schema(sample_schema())
    assert feats["aus"].feature == datasets.Value(BOX_DTYPE)


# a line exactly as `tagfer build` has written accepted.jsonl since the first release
OLD_LINE = (
    '{"id": "rafdb/train_00001", "source": "rafdb", "image": "/data/RAF-DB/Image/aligned/train_00001_aligned.jpg", '
    '"label": "happiness", "completion": "<think>\\nBright face. AU12 <bbox>[150, 300, 330, 420]</bbox> corners up.\\n'
    '</think>\\n<answer>happiness</answer>", "au_boxes": [[150, 300, 330, 420], [80, 200, 430, 300]], "aus": [12, 6], '
    '"teacher": "Qwen/Qwen2.5-VL-32B-Instruct", "split": "train", "meta": {"retries": 0, "eliminations": 1, '
    '"predictions": ["neutral", "happiness"], "candidates": ["surprise", "fear"], "n_candidates": 6, "requests": 2, '
    '"aus_used": [12], "top": [[12, 0.91, [150, 300, 330, 420]]], "no_au_prompt": false, "quality_reason": null, '
    '"original_label": "4", "detector": "mediapipe"}}'
)


def test_old_jsonl_lines_load():
    s = TAGSample.from_json(json.loads(OLD_LINE))
    assert s.au_boxes == [[150, 300, 330, 420], [80, 200, 430, 300]] and s.aus == [12, 6]
    assert s.meta["predictions"] == ["neutral", "happiness"] and s.teacher.startswith("Qwen")
    assert json.loads(json.dumps(s.to_json())) == json.loads(OLD_LINE)
    # the fewest fields a line may have; unknown keys are ignored, numbers written as floats become ints
    minimal = TAGSample.from_json({"id": "g/1", "source": "generic", "image": "a.png", "label": "fear",
                                   "completion": "x", "au_boxes": [[1.0, 2.0, 3.0, 4.0]], "extra": 1})
    assert (minimal.au_boxes, minimal.aus, minimal.teacher, minimal.split, minimal.meta) == ([[1, 2, 3, 4]], [], "", "train", {})
    with pytest.raises(ValueError, match="completion, label"):
        TAGSample.from_json({"id": "g/1", "source": "generic", "image": "a.png"})
    with pytest.raises(ValueError, match="meta"):
        TAGSample.from_json({**json.loads(OLD_LINE), "meta": [1]})


def test_image_bytes_never_reach_jsonl():
    s = TAGSample("a/1", "a", "", "fear", "x", image_bytes=b"\x89PNG")
    with pytest.raises(ValueError, match="bytes"):
        s.to_json()


def test_old_parquet_export_loads(tmp_path):
    """An HF export written before the schema was unified (int64 boxes, no meta column) reads to the same samples."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tagfer.train.data import iter_records

    part = pa.struct([("type", pa.string()), ("text", pa.string())])
    msg = pa.struct([("role", pa.string()), ("content", pa.list_(part))])
    old = pa.schema([("id", pa.string()), ("prompt", pa.list_(msg)), ("completion", pa.list_(msg)),
                     ("images", pa.list_(pa.string())), ("label", pa.string()),
                     ("au_boxes", pa.list_(pa.list_(pa.int64()))), ("aus", pa.list_(pa.int64())),
                     ("source", pa.string()), ("split", pa.string()), ("teacher", pa.string())])
    s = TAGSample.from_json(json.loads(OLD_LINE))
    row = {"id": s.id, "prompt": [{"role": "system", "content": [{"type": "text", "text": "sys"}]}],
           "completion": [{"role": "assistant", "content": [{"type": "text", "text": s.completion}]}],
           "images": [s.image], "label": s.label, "au_boxes": s.au_boxes, "aus": s.aus, "source": s.source,
           "split": s.split, "teacher": s.teacher}
    pq.write_table(pa.Table.from_pylist([row], schema=old), tmp_path / "tag_sft.parquet")
    (rec,) = iter_records(str(tmp_path / "tag_sft.parquet"))
    assert TAGSample.from_arrow_row(rec) == TAGSample(**{**s.to_json(), "meta": {}})
