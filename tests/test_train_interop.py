"""LLaMA-Factory and verl configs from the presets; verl data rows; plots from a log."""

from __future__ import annotations

import json

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
    from tagfer.jsonl import JsonlWriter
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
