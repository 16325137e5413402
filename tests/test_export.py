"""Exports load in each framework's format (LLaMA-Factory ShareGPT, HF datasets/TRL, verl)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tagfer.core.jsonl import JsonlWriter
from tagfer.core.records import TAGSample
from tagfer.data.export import export, iter_samples
from tagfer.integrations.verl import compute_score, read_ground_truth
from tagfer.models.prompts import tag_prompt
from tagfer.traces.rewards import format_ok
from tagfer.traces.trace import parse_trace

COMPLETION = (
    "<think>\nThe face looks bright and relaxed overall. The mouth corners rise: AU12 <bbox>[150, 300, 330, 420]</bbox> lifted corners. "
    "Cheeks are raised: AU6 <bbox>[80, 200, 430, 300]</bbox> crow's feet.\n</think>\n<answer>{label}</answer>"
)


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory, face_crop_path, data_faces):
    d = tmp_path_factory.mktemp("built")
    (d / "images" / "ferplus").mkdir(parents=True)
    data_faces[1].convert("L").resize((48, 48)).save(d / "images" / "ferplus" / "fer0000001.png")
    samples = [
        TAGSample("rafdb/train_00001", "rafdb", str(face_crop_path), "happiness", COMPLETION.format(label="happiness"), [[150, 300, 330, 420], [80, 200, 430, 300]], [12, 6], "t"),
        TAGSample("rafdb/train_00002", "rafdb", str(face_crop_path), "sadness", COMPLETION.format(label="sadness"), [[150, 300, 330, 420]], [12], "t"),
        TAGSample("ferplus/fer0000001", "ferplus", "images/ferplus/fer0000001.png", "neutral",
                  "<think>\nCalm face, nothing moves.\n</think>\n<answer>neutral</answer>", [], [], "t"),
    ]
    with JsonlWriter(d / "accepted-00000-of-00002.jsonl") as w:
        for s in samples[:2]:
            w.write(s.to_json())
    with JsonlWriter(d / "accepted-00001-of-00002.jsonl") as w:
        w.write(samples[2].to_json())
        w.write(samples[0].to_json())  # a duplicate id is exported once
    return d


@pytest.fixture(scope="module")
def exported(build_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    summary = export(build_dir, out, ["all"])
    return out, summary


def test_iter_samples_dedupes_and_resolves(build_dir):
    ss = list(iter_samples(build_dir))
    assert [s.id for s in ss] == ["rafdb/train_00001", "rafdb/train_00002", "ferplus/fer0000001"]
    assert all(Path(s.image).is_absolute() and Path(s.image).is_file() for s in ss)


def test_llamafactory_sharegpt_rules(exported):
    out, summary = exported
    lf = out / "llamafactory"
    info = json.loads((lf / "dataset_info.json").read_text())
    assert set(info) == {"tag_sft", "tag_sft_nobbox", "tag_sft_rafdb", "tag_sft_ferplus"}
    system, user = tag_prompt()
    for name, entry in info.items():
        assert entry["formatting"] == "sharegpt"
        tags, cols = entry["tags"], entry["columns"]
        rows = json.loads((lf / entry["file_name"]).read_text())
        assert rows, name
        for row in rows:
            msgs = row[cols["messages"]]
            # LLaMA-Factory: user at even positions, assistant at odd positions, ending with the assistant
            for i, m in enumerate(msgs):
                assert m[tags["role_tag"]] == (tags["user_tag"] if i % 2 == 0 else tags["assistant_tag"])
            assert len(msgs) % 2 == 0
            n_tokens = sum(m[tags["content_tag"]].count("<image>") for m in msgs)
            assert n_tokens == len(row[cols["images"]]) == 1
            assert msgs[0]["content"] == "<image>" + user and row[cols["system"]] == system
            assert all(Path(p).is_file() for p in row["images"])
            p = parse_trace(msgs[1]["content"])
            if "nobbox" in name:  # the paper's reading: the coordinates go, empty <bbox></bbox> tags stay
                assert all(b.coords is None for b in p.boxes)
                assert msgs[1]["content"].count("<bbox></bbox>") == len(p.boxes) and format_ok(p, "paper")
            else:
                assert p.well_formed
    assert summary.metric("files")["llamafactory/tag_sft.json"] == 3 and summary.metric("by_source") == {"rafdb": 2, "ferplus": 1}
    assert (summary.total, summary.processed, summary.exit_code()) == (3, 3, 0)


def test_nobbox_text_only_mode_deletes_the_tags(build_dir, tmp_path):
    out = tmp_path / "e"
    export(build_dir, out, ["llamafactory", "hf"], nobbox_mode="text-only", per_source=False)
    rows = json.loads((out / "llamafactory" / "tag_sft_nobbox.json").read_text())
    for row in rows:
        p = parse_trace(row["messages"][1]["content"])
        assert "<bbox>" not in row["messages"][1]["content"] and p.boxes == () and p.well_formed
    with pytest.raises(ValueError, match="nobbox_mode"):
        export(build_dir, tmp_path / "x", ["hf"], nobbox_mode="tags")
    from typer.testing import CliRunner

    from tagfer.cli import app

    r = CliRunner().invoke(app, ["export", str(build_dir), "--out", str(tmp_path / "c"), "-f", "llamafactory", "--nobbox-mode", "text-only"])
    assert r.exit_code == 0, r.output
    def answers(folder):
        return " ".join(row["messages"][1]["content"] for row in json.loads((folder / "llamafactory" / "tag_sft_nobbox.json").read_text()))

    assert "<bbox>" not in answers(tmp_path / "c")
    r = CliRunner().invoke(app, ["export", str(build_dir), "--out", str(tmp_path / "d"), "-f", "llamafactory"])
    assert "<bbox></bbox>" in answers(tmp_path / "d")


def test_hf_dataset_and_parquet(exported):
    import datasets
    import pandas as pd

    out, _ = exported
    ds = datasets.load_from_disk(str(out / "hf" / "dataset"))
    assert len(ds) == 3
    assert {"prompt", "completion", "images", "label", "au_boxes", "aus", "source"} <= set(ds.column_names)
    r = ds[0]
    assert [m["role"] for m in r["prompt"]] == ["system", "user"]
    assert [p["type"] for p in r["prompt"][1]["content"]] == ["image", "text"]
    assert r["completion"][0]["role"] == "assistant"
    assert parse_trace(r["completion"][0]["content"][0]["text"]).label == r["label"] == "happiness"
    assert r["au_boxes"] == [[150, 300, 330, 420], [80, 200, 430, 300]] and r["aus"] == [12, 6]
    df = pd.read_parquet(out / "hf" / "tag_sft_nobbox.parquet")
    assert len(df) == 3 and sum(c[0]["content"][0]["text"].count("<bbox></bbox>") for c in df["completion"]) >= 2
    assert not any("[" in c[0]["content"][0]["text"] for c in df["completion"])
    by = {p.stem: len(pd.read_parquet(p)) for p in (out / "hf" / "by_source").glob("*.parquet")}
    assert by == {"rafdb": 2, "ferplus": 1}
    assert not (out / "hf" / ".cache").exists()


def test_verl_parquet_columns_and_reward(exported):
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    out, _ = exported
    t = pq.read_table(out / "verl" / "train.parquet")
    assert set(t.column_names) == {"data_source", "prompt", "images", "ability", "reward_model", "extra_info"}
    rows = t.to_pylist()
    assert [r["data_source"] for r in rows] == ["tag/rafdb", "tag/rafdb", "tag/ferplus"]
    for r in rows:
        assert r["prompt"][1]["content"].startswith("<image>") and r["prompt"][0]["role"] == "system"
        assert Image.open(io.BytesIO(r["images"][0]["bytes"])).size[0] > 0
        gt = read_ground_truth(r["reward_model"]["ground_truth"], r["extra_info"])
        assert gt["label"] == r["extra_info"]["label"]
        assert r["reward_model"]["style"] == "rule"
    gt0 = read_ground_truth(rows[0]["reward_model"]["ground_truth"])
    assert gt0["au_boxes"] == [[150, 300, 330, 420], [80, 200, 430, 300]] and gt0["aus"] == [12, 6]
    # the exported target itself earns the full reward under the verl integration
    score = compute_score("tag/rafdb", COMPLETION.format(label="happiness"), rows[0]["reward_model"]["ground_truth"], rows[0]["extra_info"])
    assert score["acc"] == 1.0 and score["au_scored"] == 1.0 and score["r_au"] == pytest.approx(1.0)
    assert read_ground_truth(rows[2]["reward_model"]["ground_truth"])["au_boxes"] == []
    assert len(pq.read_table(out / "verl" / "ferplus.parquet")) == 1


def test_export_single_format_and_errors(build_dir, tmp_path):
    s = export(build_dir, tmp_path / "v", ["verl"], embed_images=False, per_source=False)
    assert set(s.metric("files")) == {"verl/train.parquet"}
    import pyarrow.parquet as pq

    image = pq.read_table(tmp_path / "v" / "verl" / "train.parquet").to_pylist()[0]["images"][0]
    assert isinstance(image, str) and Path(image).is_file()  # a plain path verl opens, never {"bytes": None, ...}
    with pytest.raises(ValueError):
        export(build_dir, tmp_path / "x", ["csv"])
    with pytest.raises(FileNotFoundError):
        export(tmp_path / "empty", tmp_path / "y", ["hf"])


def test_export_error_midway_leaves_no_partial_files(build_dir, tmp_path):
    good = list(iter_samples(build_dir))
    bad = TAGSample("x/1", "x", str(tmp_path / "missing.png"), "fear", "<think>a</think><answer>fear</answer>")
    with pytest.raises(FileNotFoundError):
        export(build_dir, tmp_path / "z", ["all"], samples=good + [bad])  # verl embeds image bytes: the missing file fails
    left = [p for p in (tmp_path / "z").rglob("*") if p.is_file()]
    assert left == []


def test_trl_rows_render_with_the_qwen_chat_template(exported, tiny_vlm):
    """The HF/TRL rows go through a Qwen2.5-VL processor's chat template: one image slot, the target at the end."""
    import pyarrow.parquet as pq

    out, _ = exported
    row = pq.read_table(out / "hf" / "tag_sft.parquet").to_pylist()[0]
    text = tiny_vlm.processor.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
    system, user = tag_prompt()
    assert text.count("<|vision_start|>") == 1 and text.count("<|image_pad|>") == 1
    assert system in text and user in text
    assert text.rstrip().endswith(row["completion"][0]["content"][0]["text"] + "<|im_end|>")


# ------------------------------------------------------------------------------ one image policy for every exporter


def test_export_image_side_and_format_options_and_the_policy_check(build_dir, tmp_path):
    """`tagfer export --image-side 112 --image-format png`: 112 px PNGs, recorded; a training config of
    another side is refused by check_export_policy; the same side passes."""
    from typer.testing import CliRunner
    from PIL import Image

    from tagfer.cli import app
    from tagfer.data.export import check_export_policy, export_policy
    from tagfer.models.vlm import ImagePolicy

    out = tmp_path / "x"
    r = CliRunner().invoke(app, ["export", str(build_dir), "--out", str(out), "-f", "verl", "--image-side", "112", "--image-format", "png"])
    assert r.exit_code == 0, r.output
    images = sorted((out / "images").iterdir())
    assert images and all(p.suffix == ".png" for p in images)
    for p in images:
        with Image.open(p) as im:
            assert im.format == "PNG" and max(im.size) == 112
    assert export_policy(out) == {"side": 112, "min_pixels": 56 * 56, "max_pixels": 112 * 112, "format": "png"}
    assert check_export_policy(out, ImagePolicy(112))["side"] == 112
    with pytest.raises(ValueError, match=r"image side 112 .* image side 448.*--image-side 448"):
        check_export_policy(out, ImagePolicy(448))
    with pytest.raises(ValueError, match="max_pixels"):
        check_export_policy(out, ImagePolicy(112, max_pixels=448 * 448))
    assert check_export_policy(tmp_path / "nothing_here", ImagePolicy(448)) is None  # no export yet: nothing to compare
    r = CliRunner().invoke(app, ["export", str(build_dir), "--out", str(tmp_path / "y"), "--image-format", "webp"])
    assert r.exit_code == 2 and "image_format" in r.output


def test_verl_image_bytes_are_the_exported_files_format(build_dir, tmp_path):
    """The docstring says JPEG by default, PNG with image_format="png": the embedded bytes say the same."""
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    for fmt, magic in (("jpeg", "JPEG"), ("png", "PNG")):
        export(build_dir, tmp_path / fmt, ["verl"], per_source=False, image_format=fmt)
        for row in pq.read_table(tmp_path / fmt / "verl" / "train.parquet").to_pylist():
            with Image.open(io.BytesIO(row["images"][0]["bytes"])) as im:
                assert im.format == magic and max(im.size) == 224


@pytest.mark.model  # the training config classes subclass TRL's
def test_interop_configs_refuse_an_image_side_the_export_does_not_have(build_dir, tmp_path):
    """`export-llamafactory --image_side 448` against a 224 px export: exit 2, no YAML with 448² bounds; verl the same."""
    import yaml
    from typer.testing import CliRunner

    from tagfer.cli import app

    ex = tmp_path / "tag_export"
    export(build_dir, ex, ["llamafactory", "verl"], per_source=True)
    run = CliRunner().invoke
    r = run(app, ["train", "export-llamafactory", "-c", "sft_tag310k", "--export-dir", str(ex), "-o", str(tmp_path / "lf.yaml"), "--image_side", "448"])
    assert r.exit_code == 2 and "--image-side 448" in r.output and not (tmp_path / "lf.yaml").exists()
    r = run(app, ["train", "export-verl", "-c", "grpo_rafdb", "--export-dir", str(ex), "-o", str(tmp_path / "v.yaml"), "--image_side", "448"])
    assert r.exit_code == 2 and not (tmp_path / "v.yaml").exists()
    r = run(app, ["train", "export-verl", "-c", "grpo_rafdb", "--train-files", str(ex / "verl" / "rafdb.parquet"), "-o", str(tmp_path / "v.yaml"),
                  "--image_side", "448"])
    assert r.exit_code == 2  # an explicit parquet of that export is checked too
    r = run(app, ["train", "export-llamafactory", "-c", "sft_tag310k", "--export-dir", str(ex), "-o", str(tmp_path / "lf.yaml")])
    assert r.exit_code == 0, r.output
    lf = yaml.safe_load((tmp_path / "lf.yaml").read_text())
    assert (lf["image_min_pixels"], lf["image_max_pixels"]) == (56 * 56, 224 * 224)
