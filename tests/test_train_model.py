"""LoRA placement and freezing on the tiny Qwen2.5-VL; clear errors for missing pieces."""

from __future__ import annotations

import math
import re

import pytest


def test_target_regex_anchored_on_language_model():
    from tagfer.train.model import LM_PROJECTIONS, lm_target_regex

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

    cfg = load_config("tiny_cpu", ["--model_name_or_path", str(train_tiny_dir), "--lora_r", "4"])
    model, processor, base = load_for_training(cfg)
    assert base == str(train_tiny_dir)
    peft_model = apply_lora(model, cfg)
    s = trainable_summary(peft_model)
    assert s["lora"] > 0 and s["projector"] > 0 and s["other"] == 0
    lora_modules = {n.rsplit(".lora_", 1)[0] for n, _ in peft_model.named_parameters() if ".lora_" in n}
    assert len(lora_modules) == 7 * 2  # 7 projections × 2 layers
    assert all("language_model" in n for n in lora_modules)
    cfg2 = load_config("tiny_cpu", ["--model_name_or_path", str(train_tiny_dir), "--train_projector", "false"])
    s2 = trainable_summary(apply_lora(load_for_training(cfg2)[0], cfg2))
    assert s2["projector"] == 0 and s2["lora"] > 0


def test_full_finetune_keeps_vision_frozen(train_tiny_dir):
    """Full fine-tuning: every vision-tower tensor frozen, every language-model tensor and the projector trained.
    The counts are checked against the model's own layout, so the test cannot pass by seeing no vision layer."""
    from tagfer.train.config import load_config
    from tagfer.train.model import load_for_training, model_family

    cfg = load_config("tiny_cpu", ["--model_name_or_path", str(train_tiny_dir), "--no_use_peft"])
    model = load_for_training(cfg)[0]
    fam = model_family(model)
    params = dict(model.named_parameters())
    vision = [n for n in params if fam.is_vision(n) and not fam.is_projector(n)]
    projector = [n for n in params if fam.is_projector(n)]
    language = [n for n in params if ".language_model." in f".{n}."]
    assert len(vision) >= 10 and projector and len(language) >= 10  # the tiny model has 2 vision blocks, 2 LM layers
    assert any(".blocks.0." in n for n in vision) and any(".layers.0." in n for n in language)
    assert [n for n in vision if params[n].requires_grad] == []
    assert [n for n in language if not params[n].requires_grad] == []
    assert all(params[n].requires_grad for n in projector)  # train_projector defaults to true in SFT
    frozen = load_for_training(load_config("tiny_cpu", ["--model_name_or_path", str(train_tiny_dir), "--no_use_peft",
                                                         "--train_projector", "false"]))[0]
    assert not any(p.requires_grad for n, p in frozen.named_parameters() if fam.is_projector(n))


def test_trainable_params_keep_fp32_masters_and_projector_trains_in_bf16(tmp_path, train_tiny_dir, train_samples):
    """A bf16 model: every trainable tensor is fp32 (LoRA by PEFT, the projector copy by keep_fp32_masters),
    the frozen model stays bf16, and a few small-lr steps change every projector tensor — in bf16 the
    ln_q weights (|w| ≈ 1, ulp 2^-7) would not move at lr 1e-4."""
    import torch

    from fixtures_train import tiny_train_config
    from tagfer.train.model import low_precision_trainable
    from tagfer.train.sft import run_sft

    seen = {}

    from transformers import TrainerCallback

    class Snapshot(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            seen["low"] = low_precision_trainable(model)
            seen["frozen_dtypes"] = {str(p.dtype) for p in model.parameters() if not p.requires_grad}
            seen["before"] = {n: p.detach().clone() for n, p in model.named_parameters()
                              if p.requires_grad and "merger" in n}

        def on_train_end(self, args, state, control, model=None, **kw):
            seen["after"] = {n: p.detach().clone() for n, p in model.named_parameters() if n in seen["before"]}
            seen["dtypes"] = {n: p.dtype for n, p in model.named_parameters() if n in seen["before"]}

    cfg = tiny_train_config(tmp_path, train_tiny_dir, train_samples, dtype="bfloat16", learning_rate=1e-4,
                            max_steps=3, per_device_train_batch_size=4, bf16=True, lora_r=4,
                            use_cpu=True)  # bf16 autocast on the CPU: a TRL field like any other
    res = run_sft(cfg, callbacks=[Snapshot()])
    assert seen["low"] == [], seen["low"]
    assert seen["frozen_dtypes"] == {"torch.bfloat16"}
    assert res.trainable["projector"] > 0 and seen["before"]
    assert any("ln_q" in n for n in seen["before"])
    for n, before in seen["before"].items():
        assert seen["dtypes"][n] == torch.float32, n
        changed = (seen["after"][n] != before).float().mean().item()
        assert changed > 0.9, (n, changed)
    assert all(math.isfinite(x) for x in res.train_loss)


def test_keep_fp32_masters_keeps_the_forward_in_the_model_dtype():
    import torch

    from tagfer.train.model import keep_fp32_masters, low_precision_trainable

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 4)).to(torch.bfloat16)
    net[2].requires_grad_(False)
    assert low_precision_trainable(net) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert keep_fp32_masters(net) == ["0", "1"] and keep_fp32_masters(net) == []  # idempotent
    assert low_precision_trainable(net) == [] and net[2].weight.dtype == torch.bfloat16
    y = net(torch.randn(2, 8, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and net[0](torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16
    y.float().sum().backward()
    assert net[0].weight.grad.dtype == torch.float32


def test_fp32_master_hooks_follow_an_engine_that_casts_back():
    """DeepSpeed bf16 casts the whole model back to bf16 (and keeps its own fp32 masters): the hooks must
    then feed bf16 inputs, not fp32, or the matmul would mix dtypes."""
    import torch

    from tagfer.train.model import keep_fp32_masters

    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)).to(torch.bfloat16)
    net[1].requires_grad_(False)
    keep_fp32_masters(net)
    net.to(torch.bfloat16)  # what an engine's bf16 wrapper does
    assert net(torch.randn(3, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16
