"""LoRA placement and freezing on the tiny Qwen2.5-VL; clear errors for missing pieces."""

from __future__ import annotations

import re

import pytest


def test_target_regex_anchored_on_language_model():
    from tagfer.train.config import LM_PROJECTIONS
    from tagfer.train.model import lm_target_regex

    rx = re.compile(lm_target_regex(LM_PROJECTIONS))
    for name in ("model.language_model.layers.0.self_attn.q_proj", "model.language_model.layers.27.mlp.down_proj",
                 "model.language_model.model.layers.3.mlp.gate_proj"):
        assert rx.fullmatch(name), name
    for name in ("model.visual.blocks.0.mlp.gate_proj", "model.visual.blocks.0.attn.qkv", "model.visual.merger.mlp.0",
                 "lm_head", "model.language_model.layers.0.self_attn.q_proj.lora_A"):
        assert not rx.fullmatch(name), name


def test_apply_lora_on_tiny(train_tiny_dir):
    from tagfer.train.config import load_config
    from tagfer.train.model import apply_lora, load_for_training, trainable_summary

    cfg = load_config("tiny_cpu", [f"model.name_or_path={train_tiny_dir}", "lora.r=4"])
    model, processor, base = load_for_training(cfg)
    assert base == str(train_tiny_dir)
    peft_model = apply_lora(model, cfg.lora)
    s = trainable_summary(peft_model)
    assert s["lora"] > 0 and s["projector"] > 0 and s["other"] == 0
    lora_modules = {n.rsplit(".lora_", 1)[0] for n, _ in peft_model.named_parameters() if ".lora_" in n}
    assert len(lora_modules) == 7 * 2  # 7 projections × 2 layers
    assert all("language_model" in n for n in lora_modules)
    cfg2 = load_config("tiny_cpu", [f"model.name_or_path={train_tiny_dir}", "lora.train_projector=false"])
    s2 = trainable_summary(apply_lora(load_for_training(cfg2)[0], cfg2.lora))
    assert s2["projector"] == 0 and s2["lora"] > 0


def test_full_finetune_keeps_vision_frozen(train_tiny_dir):
    from tagfer.train.config import load_config
    from tagfer.train.model import load_for_training

    cfg = load_config("tiny_cpu", [f"model.name_or_path={train_tiny_dir}", "lora.enabled=false"])
    model = load_for_training(cfg)[0]
    for n, p in model.named_parameters():
        if "visual" in n and "merger" not in n:
            assert not p.requires_grad, n
        elif "language_model" in n:
            assert p.requires_grad, n
