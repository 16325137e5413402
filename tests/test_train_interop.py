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
    assert lf["freeze_vision_tower"] is True and lf["freeze_multi_modal_projector"] is False
    assert (lf["learning_rate"], lf["lr_scheduler_type"], lf["warmup_ratio"]) == (2e-5, "cosine", 0.03)
    assert (lf["weight_decay"], lf["max_grad_norm"], lf["cutoff_len"]) == (0.01, 1.0, 2048)
    assert lf["image_max_pixels"] == 224 * 224 and lf["dataset"] == "tag_sft"
    p = write_yaml(lf, tmp_path / "lf.yaml", "# header")
    assert yaml.safe_load(p.read_text()) == lf


def test_verl_config_has_grpo_hparams_and_reward():
    import tagfer.integrations.verl as vr
    from tagfer.train.interop import verl_command, verl_config

    cfg = load_config("grpo_f1")
    v = verl_config(cfg, n_gpus=4)
    a = v["actor_rollout_ref"]
    assert v["algorithm"]["adv_estimator"] == "grpo"
    assert a["rollout"]["n"] == 8 and a["actor"]["kl_loss_coef"] == 0.04 and a["actor"]["clip_ratio"] == 0.2
    assert a["actor"]["optim"]["lr"] == 1e-6 and a["actor"]["grad_clip"] == 1.0 and v["trainer"]["total_epochs"] == 2
    crf = v["custom_reward_function"]
    assert crf["path"] == vr.__file__ and crf["name"] == "compute_score"
    assert crf["reward_kwargs"]["au_reward"] == "f1"
    cmd = verl_command(v)
    assert "custom_reward_function.name=compute_score" in cmd
    assert "+custom_reward_function.reward_kwargs.au_reward=f1" in cmd


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
