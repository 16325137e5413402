"""LLaMA-Factory and verl configs from the presets; verl data rows; plots from a log."""

from __future__ import annotations

import json

import pytest
import yaml

from tagfer.train.config import load_config


def test_llamafactory_yaml_matches_preset(tmp_path):
    from tagfer.train.interop import llamafactory_config, write_yaml

    cfg = load_config("sft_tag310k")
    lf = llamafactory_config(cfg, dataset="tag_sft", dataset_dir="data/tag")
    assert lf["stage"] == "sft" and lf["finetuning_type"] == "lora"
    assert (lf["lora_rank"], lf["lora_alpha"], lf["lora_dropout"]) == (128, 256, 0.05)
    # with LoRA, LLaMA-Factory trains the projector only as an additional target (freeze_* applies to freeze/full)
    assert lf["additional_target"] == "merger" and lf["freeze_vision_tower"] is True
    assert (lf["learning_rate"], lf["lr_scheduler_type"], lf["warmup_ratio"]) == (2e-5, "cosine", 0.03)
    assert (lf["weight_decay"], lf["max_grad_norm"], lf["cutoff_len"]) == (0.01, 1.0, 2048)
    assert (lf["image_min_pixels"], lf["image_max_pixels"]) == (56 * 56, 224 * 224) and lf["dataset"] == "tag_sft"
    p = write_yaml(lf, tmp_path / "lf.yaml", "# header")
    assert yaml.safe_load(p.read_text()) == lf
    frozen = llamafactory_config(load_config("sft_tag310k", ["lora.train_projector=false"]))
    assert "additional_target" not in frozen


def _key_paths(d, prefix=""):
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        yield key
        if isinstance(v, dict):
            yield from _key_paths(v, key)


def test_verl_config_keys_exist_in_verl_schema():
    """Every key of the YAML is a key of verl 0.9.1's merged ppo_trainer defaults (struct mode would refuse others)."""
    from pathlib import Path

    from tagfer.train.interop import verl_config

    pinned = Path(__file__).parent / "pinned" / "verl-0.9.1-ppo_trainer.keys"
    schema = {line.strip() for line in pinned.read_text().splitlines() if line.strip() and not line.startswith("#")}
    assert "reward.custom_reward_function.path" in schema and "custom_reward_function.reward_kwargs" not in schema
    for preset in ("grpo_rafdb", "grpo_f1", "grpo_rlvr"):
        unknown = [k for k in _key_paths(verl_config(load_config(preset))) if k not in schema]
        assert unknown == [], (preset, unknown)


def test_verl_config_has_grpo_hparams_and_portable_reward(tmp_path):
    from tagfer.integrations.verl import compute_score
    from tagfer.train.interop import VERL_REWARD_PATH, verl_reward_overrides, write_verl_files

    cfg = load_config("grpo_f1")
    from tagfer.train.interop import verl_config

    v = verl_config(cfg, n_gpus=4)
    a = v["actor_rollout_ref"]
    assert v["algorithm"]["adv_estimator"] == "grpo"
    assert a["rollout"]["n"] == 8 and a["actor"]["kl_loss_coef"] == 0.04 and a["actor"]["clip_ratio"] == 0.2
    assert a["actor"]["optim"]["lr"] == 1e-6 and a["actor"]["grad_clip"] == 1.0 and v["trainer"]["total_epochs"] == 2
    crf = v["reward"]["custom_reward_function"]
    assert crf == {"path": "pkg://tagfer.integrations.verl", "name": "compute_score"} and VERL_REWARD_PATH == crf["path"]
    import importlib

    module = importlib.import_module(crf["path"][len("pkg://"):])  # what verl's load_extern_object does
    assert getattr(module, crf["name"]) is compute_score
    assert verl_reward_overrides(cfg) == ["+reward.custom_reward_function.reward_kwargs.au_reward=f1"]
    assert verl_reward_overrides(load_config("grpo_rafdb")) == []
    y, sh = write_verl_files(cfg, tmp_path / "verl.yaml", "data/verl/rafdb.parquet", name="grpo_f1")
    cmd = sh.read_text()
    assert "reward.custom_reward_function.name=compute_score" in cmd
    assert "+reward.custom_reward_function.reward_kwargs.au_reward=f1" in cmd
    assert "reward_kwargs" not in yaml.safe_load(y.read_text())["reward"]["custom_reward_function"]


def test_default_export_names():
    from tagfer.train.interop import default_export_names

    assert default_export_names(load_config("grpo_ferplus"))["verl_train"] == "tag_export/verl/ferplus.parquet"
    assert default_export_names(load_config("sft_tag310k"))["llamafactory_dataset"] == "tag_sft"
    assert default_export_names(load_config("sft_nobbox"))["llamafactory_dataset"] == "tag_sft_nobbox"


def test_plot_from_log(tmp_path):
    from tagfer.core.jsonl import JsonlWriter
    from tagfer.train.plots import plot_training, read_log

    log = tmp_path / "train_log.jsonl"
    with JsonlWriter(log) as w:
        for step in range(1, 6):
            w.write({"event": "train", "step": step, "reward": step / 5, "r_au": None, "r_ans": 0.5, "r_fmt": 0.5,
                     "kl": 0.01 * step, "completion_length": 100 + step})
        w.write({"event": "train", "step": 5, "reward": 9.0})  # resumed run: the last record wins
        w.write({"event": "validation", "step": 5, "accuracy": 0.4, "au_iou": 0.3})
    data = read_log(log)
    assert data["train"]["reward"][-1] == (5, 9.0)
    assert "r_au" not in data["train"]  # None values are skipped
    out = plot_training(log, tmp_path / "fig.png")
    assert out.stat().st_size > 1000


# ------------------------------------------------------------------------------------------ one image policy


def _lf_preprocess(image, image_max_pixels, image_min_pixels):
    """LLaMA-Factory 0.9.5's ``Qwen2VLPlugin._preprocess_image`` (data/mm_plugin.py; llamafactory needs
    torchvision, which this project never installs, so its documented rule is mirrored here)."""
    import math

    if image.width * image.height > image_max_pixels:
        f = math.sqrt(image_max_pixels / (image.width * image.height))
        image = image.resize((int(image.width * f), int(image.height * f)))
    if image.width * image.height < image_min_pixels:
        f = math.sqrt(image_min_pixels / (image.width * image.height))
        image = image.resize((int(image.width * f), int(image.height * f)))
    image = image.convert("RGB")
    if min(image.width, image.height) < 28:
        image = image.resize((max(image.width, 28), max(image.height, 28)))
    return image


def _verl_fetch_image(entry):
    """verl 0.9.1 ``RLHFDataset._build_messages`` + qwen_vl_utils ``fetch_image``: open the bytes (or path),
    smart-resize within the row's ``min_pixels``/``max_pixels`` (qwen_vl_utils' defaults for a plain path)."""
    import io

    from PIL import Image

    from tagfer.models.vlm import smart_resize

    if isinstance(entry, str):
        image, lo, hi = Image.open(entry), 4 * 28 * 28, 16384 * 28 * 28
    else:
        assert entry["bytes"] is not None
        image, lo, hi = Image.open(io.BytesIO(entry["bytes"])), entry["min_pixels"], entry["max_pixels"]
    image = image.convert("RGB")
    h, w = smart_resize(image.height, image.width, 28, lo, hi)
    return image.resize((w, h))


def test_one_sample_gives_the_same_image_tokens_in_every_trainer(tmp_path, train_tiny_dir):
    """A 100x100 RAF-DB-like face, a 48x48 FERPlus-like face and a 120x90 crop: tagfer's rows through TRL's
    collator, the TRL/HF export through TRL's collator, the LLaMA-Factory export through its preprocessing with
    the exported YAML's keys, and the verl parquet through verl's image path all give the policy's count."""
    import json

    import pyarrow.parquet as pq
    from PIL import Image
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from tagfer.core.records import TAGSample
    from tagfer.data.export import export
    from tagfer.models.prompts import tag_prompt
    from tagfer.models.vlm import ImagePolicy, load_processor
    from tagfer.train.data import RowMaker, record_from_sample
    from tagfer.train.interop import llamafactory_config

    processor = load_processor(str(train_tiny_dir))
    pad_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    collator = DataCollatorForVisionLanguageModeling(processor)
    cfg = load_config("sft_tag310k")
    policy = ImagePolicy.of(cfg.model)
    sizes = [(100, 100), (48, 48), (120, 90)]
    samples = []
    for i, (w, h) in enumerate(sizes):
        p = tmp_path / f"face{i}.png"
        Image.new("L" if i == 1 else "RGB", (w, h), 90 + 40 * i).save(p)
        samples.append(TAGSample(f"rafdb/{i}", "rafdb", str(p), "happiness",
                                 "<think>AU12 <bbox>[150, 300, 360, 420]</bbox>.</think><answer>happiness</answer>",
                                 [[150, 300, 360, 420]], [12], "t", split="train"))
    out = tmp_path / "export"
    export(tmp_path, out, samples=samples, nobbox=False, per_source=False)
    system, user = tag_prompt()

    def n_tokens(batch):
        return [int((row == pad_id).sum()) for row in batch["input_ids"]]

    expected = [policy.image_tokens(w, h) for w, h in sizes]
    assert expected[0] == 64 and expected[1] == 64  # 224 x 224 after the policy's resize
    # the bug this guards against: the original pixels give 100x100 -> 16 tokens, 48x48 -> 4
    assert n_tokens(processor(images=[Image.open(samples[0].image).convert("RGB")], text=["<|vision_start|><|image_pad|><|vision_end|>"], return_tensors="pt", padding=True))[0] == 16

    maker = RowMaker("sft", system, user, cfg.model.image_side)
    recs = [record_from_sample(s) for s in samples]
    rows = maker({k: [r[k] for r in recs] for k in recs[0]})
    tagfer = n_tokens(collator([{k: rows[k][i] for k in rows} for i in range(len(samples))]))

    table = pq.read_table(out / "hf" / "tag_sft.parquet").to_pylist()
    trl_rows = [{"prompt": r["prompt"], "completion": r["completion"], "images": [Image.open(r["images"][0])]} for r in table]
    trl_export = n_tokens(collator(trl_rows))

    lf_yaml = llamafactory_config(cfg)
    lf_rows = json.loads((out / "llamafactory" / "tag_sft.json").read_text())
    lf_images = [_lf_preprocess(Image.open(r["images"][0]), lf_yaml["image_max_pixels"], lf_yaml["image_min_pixels"])
                 for r in lf_rows]
    llamafactory = n_tokens(processor(images=lf_images, text=["<|vision_start|><|image_pad|><|vision_end|>"] * 3, return_tensors="pt", padding=True))

    verl_rows = pq.read_table(out / "verl" / "train.parquet").to_pylist()
    verl_images = [_verl_fetch_image(r["images"][0]) for r in verl_rows]
    verl = n_tokens(processor(images=verl_images, text=["<|vision_start|><|image_pad|><|vision_end|>"] * 3, return_tensors="pt", padding=True))
    export(tmp_path, tmp_path / "paths", ["verl"], embed_images=False, per_source=False, samples=samples)
    verl_paths = [_verl_fetch_image(r["images"][0]) for r in pq.read_table(tmp_path / "paths" / "verl" / "train.parquet").to_pylist()]
    verl_plain = n_tokens(processor(images=verl_paths, text=["<|vision_start|><|image_pad|><|vision_end|>"] * 3, return_tensors="pt", padding=True))

    assert tagfer == trl_export == llamafactory == verl == verl_plain == expected, (tagfer, trl_export, llamafactory, verl, verl_plain)
    summary = json.loads((out / "export_summary.json").read_text())
    assert summary["image_policy"] == {"side": 224, "min_pixels": 56 * 56, "max_pixels": 224 * 224, "format": "jpeg"}


@pytest.mark.model  # imports transformers
def test_smart_resize_matches_transformers():
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    from tagfer.models.vlm import smart_resize

    @settings(max_examples=200, deadline=None)
    @given(st.integers(28, 3000), st.integers(28, 3000), st.sampled_from([(3136, 50176), (3136, 12845056), (784, 1003520)]))
    def check(h, w, bounds):
        if max(h, w) / min(h, w) > 200:
            return
        assert smart_resize(h, w, 28, *bounds) == tuple(hf_smart_resize(h, w, 28, *bounds))

    check()


def test_interop_reads_the_family_registry(tmp_path):
    """Template, additional_target and verl's exclusion come from the model's family, not from Qwen defaults."""
    from tagfer.train.interop import llamafactory_config, model_family, verl_config

    qwen = load_config("sft_tag310k")  # Qwen/Qwen2.5-VL-7B-Instruct: family told by the hub id
    assert model_family(qwen).name == "qwen2_5_vl"
    lf = llamafactory_config(qwen)
    assert (lf["template"], lf["additional_target"]) == ("qwen2_vl", "merger")
    assert verl_config(load_config("grpo_rafdb"))["actor_rollout_ref"]["model"]["exclude_modules"] == ".*visual.*"

    gemma = load_config("sft_tag310k", ["model.name_or_path=google/gemma-3-4b-it"])
    lf = llamafactory_config(gemma)
    assert (lf["template"], lf["additional_target"]) == ("gemma3", "multi_modal_projector")
    ex = verl_config(load_config("grpo_rafdb", ["model.family=gemma3"]))["actor_rollout_ref"]["model"]["exclude_modules"]
    import re

    rx = re.compile(ex)
    assert rx.fullmatch("model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj")
    assert rx.fullmatch("model.multi_modal_projector.mm_input_projection_weight")
    assert not rx.fullmatch("model.language_model.layers.1.mlp.down_proj")

    # A local Qwen3-VL folder: the family and the number of DeepStack projectors come from its config.json.
    d = tmp_path / "qwen3vl"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "qwen3_vl", "vision_config": {"deepstack_visual_indexes": [3, 6]}}))
    lf = llamafactory_config(load_config("sft_tag310k", [f"model.name_or_path={d}"]))
    assert lf["template"] == "qwen3_vl"
    assert lf["additional_target"] == "merger,deepstack_merger_list.0,deepstack_merger_list.1"

    ov = load_config("sft_tag310k", ["model.family=llava_onevision"])
    with pytest.raises(ValueError, match="no template for the llava_onevision family"):
        llamafactory_config(ov)


def test_unknown_model_family_is_a_clear_error():
    from tagfer.models.families import UnknownFamily
    from tagfer.train.interop import verl_config

    with pytest.raises(UnknownFamily, match="cannot tell the model family of 'org/mystery-vlm'.*model.family"):
        verl_config(load_config("grpo_rafdb", ["model.name_or_path=org/mystery-vlm"]))
