"""Training data: TAGSample JSONL and HF exports → flat records → TRL rows."""

from __future__ import annotations

import json

import pytest

from tagfer.train.data import RowMaker, builtin_tiny, filter_records, iter_records, record_from_export, trace_aus


def test_builtin_tiny_is_deterministic_and_well_formed(tmp_path):
    from tagfer.traces.trace import parse_trace

    a = builtin_tiny(tmp_path / "a").read_text()
    b = builtin_tiny(tmp_path / "b").read_text()
    assert a == b
    rows = [json.loads(x) for x in a.splitlines()]
    assert len(rows) == 8
    assert sum(1 for r in rows if not r["au_boxes"]) == 2
    for r in rows:
        p = parse_trace(r["completion"])
        assert p.well_formed, (r["completion"], p.violations)
        assert p.label == r["label"]
        assert (tmp_path / "a" / r["image"]).is_file()


def test_tagsample_jsonl_relative_images(tmp_path):
    src = builtin_tiny(tmp_path / "d")
    recs = list(iter_records(str(src)))
    assert len(recs) == 8
    assert all(r["image"].startswith(str(src.parent)) for r in recs)
    assert recs[0]["au_boxes"] and isinstance(recs[0]["au_boxes"][0][0], int)


def _export_rows(src):
    rows = []
    for r in (json.loads(x) for x in src.read_text().splitlines()):
        rows.append({
            "prompt": [{"role": "user", "content": "<image>What expression?"}],
            "completion": [{"role": "assistant", "content": r["completion"]}],
            "images": [r["image"]], "label": r["label"], "au_boxes": r["au_boxes"], "aus": r["aus"],
            "source": r["source"],
        })
    return rows


def test_hf_export_save_to_disk_and_jsonl(tmp_path):
    import datasets

    src = builtin_tiny(tmp_path / "d")
    rows = _export_rows(src)
    disk = tmp_path / "export"
    datasets.Dataset.from_list(rows).save_to_disk(str(disk))
    (src.parent / "x").mkdir()
    recs = list(iter_records(str(disk), image_root=src.parent))
    assert len(recs) == 8
    assert recs[0]["completion"] == rows[0]["completion"][0]["content"]
    assert recs[0]["image"] == str(src.parent / rows[0]["images"][0])
    jl = tmp_path / "export.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recs2 = list(iter_records(str(jl), image_root=src.parent))
    assert [r["completion"] for r in recs2] == [r["completion"] for r in recs]
    assert [r["au_boxes"] for r in recs2] == [r["au_boxes"] for r in recs]


def test_export_with_embedded_images(tmp_path, astronaut_path):
    from PIL import Image

    rec = record_from_export({"completion": "x", "label": "happiness", "images": [Image.open(astronaut_path)]})
    assert rec["image_bytes"] and rec["image"] == ""
    row = RowMaker("grpo", "sys", "user")({k: [v] for k, v in rec.items()})
    assert max(row["images"][0][0].size) == 224


def test_filters_and_no_bbox(tmp_path):
    recs = list(iter_records(str(builtin_tiny(tmp_path / "d"))))
    only = list(filter_records(recs, sources=["builtin2"]))
    assert only and all(r["source"] == "builtin2" for r in only)
    assert len(list(filter_records(recs, max_samples=3))) == 3
    stripped = list(filter_records(recs, no_bbox=True))
    assert all("<bbox></bbox>" in r["completion"] and "</bbox>" not in r["completion"].replace("<bbox></bbox>", "") for r in stripped)  # the paper's reading: empty tags stay
    assert all("<bbox>" in r["completion"] for r in recs)


def test_rowmaker_sft_and_grpo(tmp_path):
    from tagfer.models.prompts import tag_prompt
    from tagfer.models.vlm import build_chat

    recs = list(iter_records(str(builtin_tiny(tmp_path / "d"))))
    batch = {k: [r[k] for r in recs[:2]] for k in recs[0]}
    system, user = tag_prompt()
    sft = RowMaker("sft", system, user)(batch)
    assert sft["prompt"][0] == build_chat(user, system, with_image=True)
    assert sft["completion"][0][0]["content"][0]["text"] == recs[0]["completion"]
    w, h = sft["images"][0][0].size
    assert max(w, h) == 224
    grpo = RowMaker("grpo", system, user)(batch)
    assert grpo["label"] == batch["label"] and grpo["au_boxes"] == batch["au_boxes"]
    assert "completion" not in grpo
    # the two F1 reference sets: every activated AU, and the AUs the sample's trace names
    assert grpo["aus"] == batch["aus"]
    assert grpo["trace_aus"] == [trace_aus(c) for c in batch["completion"]]


def test_trace_aus_are_the_aus_the_trace_names_once_each_in_order():
    text = ("<think>Global look. AU12 (Lip Corner Puller) <bbox>[1, 2, 30, 40]</bbox> then AU6, and AU12 again; "
            "AU25.</think><answer>happiness</answer>")
    assert trace_aus(text) == [12, 6, 25]
    assert trace_aus("<think>No units named.</think><answer>neutral</answer>") == []
    assert trace_aus("AU4 outside any think block") == []  # only the think block counts, like the F1 reward


def test_bad_image_names_sample(tmp_path):
    from tagfer.core.imageio import ImageError

    (tmp_path / "bad.png").write_text("not an image")
    batch = {"id": ["s/1"], "image": [str(tmp_path / "bad.png")], "image_bytes": [None], "label": ["anger"],
             "completion": ["x"], "au_boxes": [[]], "aus": [[]], "source": ["s"], "split": [""]}
    with pytest.raises(ImageError, match="s/1"):
        RowMaker("sft", "a", "b")(batch)


def test_missing_data_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="training data not found"):
        list(iter_records(str(tmp_path / "nope.jsonl")))
    with pytest.raises(ValueError, match="builtin:tiny"):
        list(iter_records("builtin:huge"))


def test_export_with_image_feature_not_decoded(tmp_path):
    """A parquet export with an Image column: existing paths are used, embedded bytes kept as bytes."""
    import datasets

    src = builtin_tiny(tmp_path / "d")
    rows = _export_rows(src)
    for r in rows:
        r["images"] = [str(src.parent / r["images"][0])]
    feats = datasets.Features({
        "prompt": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
        "completion": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
        "images": datasets.List(datasets.Image()), "label": datasets.Value("string"),
        "au_boxes": datasets.List(datasets.List(datasets.Value("int32"))), "aus": datasets.List(datasets.Value("int32")),
        "source": datasets.Value("string"),
    })
    ds = datasets.Dataset.from_list(rows, features=feats)
    ds.to_parquet(str(tmp_path / "tag_sft.parquet"))
    recs = list(iter_records(str(tmp_path / "tag_sft.parquet")))
    assert len(recs) == 8
    assert all(r["image"] and r["image_bytes"] is None for r in recs) or all(r["image_bytes"] for r in recs)
    row = RowMaker("sft", "s", "u")({k: [v] for k, v in recs[0].items()})
    assert max(row["images"][0][0].size) == 224


def test_build_export_train_gives_the_build_records(tmp_path):
    """accepted.jsonl → tagfer export → the train data loader: the same records (Arrow dataset included) as
    loading the build directly; with the default image policy only ``image`` differs (the resized copy)."""
    import shutil

    from tagfer.data.export import export
    from tagfer.models.vlm import ImagePolicy
    from tagfer.train.data import build_record_dataset

    build = tmp_path / "build"
    shutil.copytree(builtin_tiny(tmp_path / "d").parent, build)
    (build / "samples.jsonl").rename(build / "accepted.jsonl")
    direct = list(iter_records(str(build / "accepted.jsonl")))
    assert direct[0]["meta"] and direct[0]["teacher"] == "template"  # every field travels, not only the trainer's
    export(build, tmp_path / "same", ["hf"], image_policy=ImagePolicy(side=0))
    for ref in ("hf/tag_sft.parquet", "hf/dataset", "hf/by_source"):
        assert sorted(iter_records(str(tmp_path / "same" / ref)), key=lambda r: r["id"]) == sorted(direct, key=lambda r: r["id"]), ref
    ds = {name: build_record_dataset(lambda ref=ref: iter_records(ref), tmp_path / "cache" / name, name)
          for name, ref in (("direct", str(build / "accepted.jsonl")), ("export", str(tmp_path / "same" / "hf" / "dataset")))}
    assert ds["direct"].to_list() == ds["export"].to_list() == direct
    export(build, tmp_path / "resized", ["hf"])
    resized = list(iter_records(str(tmp_path / "resized" / "hf" / "tag_sft.parquet")))
    assert [{**r, "image": ""} for r in resized] == [{**r, "image": ""} for r in direct]
    assert all(r["image"].startswith(str(tmp_path / "resized" / "images")) for r in resized)
