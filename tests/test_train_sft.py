"""SFT on the tiny model: it learns, and only LoRA + projector parameters move."""

from __future__ import annotations

import json

import pytest
import torch

from fixtures_train import tiny_train_config

pytestmark = pytest.mark.model  # imports torch at the top and trains the tiny model: not in the fast tier

STEPS = 40  # 40 steps at lr 2e-2: "<think>Mouth" reproduced for seeds 0, 1, 2 (30 steps: not for seed 1)


class _Capture:
    """Trainer callback keeping the trained model object."""

    def __init__(self):
        from transformers import TrainerCallback

        self.model = None
        outer = self

        class CB(TrainerCallback):
            def on_train_end(self, args, state, control, model=None, **kw):
                outer.model = model

        self.cb = CB()


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, train_tiny_dir, train_samples):
    from tagfer.train.sft import run_sft

    out = tmp_path_factory.mktemp("sft_run")
    cfg = tiny_train_config(out, train_tiny_dir, train_samples, max_steps=STEPS, val_size=0, val_steps=0,
                            val_samples=8, val_data=str(train_samples),  # validate on the training samples
                            save_steps=STEPS // 2)  # checkpoints: TRL writes the model card with each
    cap = _Capture()
    result = run_sft(cfg, callbacks=[cap.cb])
    return cfg, result, cap.model


def test_sft_loss_falls_by_half(sft_run):
    _, result, _ = sft_run
    losses = result.train_loss
    assert len(losses) == STEPS
    assert losses[0] > 1.0  # the completion is really supervised (not truncated away)
    assert min(losses[-3:]) <= 0.5 * losses[0], losses


def test_sft_greedy_reproduces_target_prefix(sft_run, train_samples):
    from PIL import Image

    from tagfer.models.vlm import VLM, VLMConfig

    cfg, _, model = sft_run
    from tagfer.models.vlm import load_processor

    proc = load_processor(cfg.model_name_or_path)
    rec = json.loads(train_samples.read_text().splitlines()[0])
    vlm = VLM(model, proc, VLMConfig(model=cfg.model_name_or_path))
    from tagfer.models.prompts import tag_prompt

    system, user = tag_prompt()
    model.eval()
    image = Image.open(rec["image"])
    out = vlm.generate([image], [user], system=system, max_new_tokens=12)[0]
    target = rec["completion"]
    prefix = "<think>Mouth"  # the first two tokens of every target
    assert target.startswith(prefix)
    assert out.startswith(prefix), (out, target)
    # the untrained model does not produce it
    from tagfer.models.vlm import load_vlm

    before = load_vlm(VLMConfig(model=cfg.model_name_or_path, device="cpu")).generate([image], [user], system=system,
                                                                                       max_new_tokens=12)[0]
    assert not before.startswith(prefix), before


def test_sft_only_lora_and_projector_change(sft_run, train_tiny_dir):
    from transformers import AutoModelForImageTextToText

    _, _, model = sft_run
    base = AutoModelForImageTextToText.from_pretrained(str(train_tiny_dir), dtype=torch.float32)
    base_params = dict(base.named_parameters())
    changed_lora = changed_proj = 0
    checked_vision = 0
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.requires_grad
            changed_lora += int(name.endswith("lora_B.default.weight") and bool(p.abs().sum() > 0))
            assert "visual" not in name, name
            continue
        if "modules_to_save" in name:
            assert "merger" in name, name
            orig = base_params[name.replace("base_model.model.", "").replace(".modules_to_save.default", "")]
            changed_proj += int(not torch.equal(p.detach(), orig))
            continue
        key = name.replace("base_model.model.", "").replace(".base_layer", "").replace(".original_module", "")
        assert not p.requires_grad, name
        assert torch.equal(p.detach(), base_params[key]), f"{name} changed"
        checked_vision += int("visual" in key)
    assert changed_lora >= 14  # 7 projections × 2 layers
    assert changed_proj >= 1
    assert checked_vision >= len([n for n in base_params if "visual" in n and "merger" not in n])


def test_sft_outputs_and_log(sft_run):
    cfg, result, _ = sft_run
    assert (result.best_dir / "adapter_config.json").is_file()
    assert (result.best_dir / "best.json").is_file()
    assert (result.final_dir / "adapter_model.safetensors").is_file()
    lines = [json.loads(x) for x in result.log_path.read_text().splitlines()]
    train = [r for r in lines if r["event"] == "train" and "loss" in r]
    val = [r for r in lines if r["event"] == "validation"]
    assert len(train) == STEPS and all(r["stage"] == "sft" for r in train)
    assert val and {"accuracy", "au_iou", "fmt_rate", "score"} <= set(val[-1])
    best = json.loads((result.best_dir / "best.json").read_text())
    assert best["score"] == max(v["score"] for v in val)


def test_model_card_is_written_right_at_each_checkpoint(sft_run):
    """TRL writes the card from ``_save_checkpoint``; ours names the local base model (no
    ``huggingface.co/None`` link) and its quick start loads ``best/``, not a model-less folder."""
    cfg, result, _ = sft_run
    assert (result.output_dir / f"checkpoint-{cfg.save_steps}").is_dir()  # a checkpoint wrote the card
    text = (result.output_dir / "README.md").read_text()
    assert "huggingface.co/None" not in text and 'model="None"' not in text
    assert f"`{cfg.model_name_or_path}`" in text and f"huggingface.co/{cfg.model_name_or_path}" not in text
    assert f"--model {result.best_dir}" in text and (result.best_dir / "adapter_config.json").is_file()
    assert "- tagfer" in text and "- sft" in text
