"""Save adapter → merge → load: the standalone model gives the same logits."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.model  # imports torch at the top and trains the tiny model: not in the fast tier


def test_save_merge_load_identical_logits(tmp_path, train_tiny_dir, astronaut_path):
    from PIL import Image

    from tagfer.models.vlm import VLM, VLMConfig, load_vlm
    from tagfer.train.config import TagferSFTConfig
    from tagfer.train.merge import merge_adapter
    from tagfer.train.model import apply_lora
    from tagfer.train.sft import save_adapter

    vlm = load_vlm(VLMConfig(model=str(train_tiny_dir), device="cpu"))
    model = apply_lora(vlm.model, TagferSFTConfig(train_data="x", lora_r=4, lora_alpha=8, lora_dropout=0.0, bf16=False))
    torch.manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter: non-zero LoRA B and a changed projector copy
        for n, p in model.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    inputs = VLM(model, vlm.processor, vlm.config).prepare([Image.open(astronaut_path)], ["What expression?"], "sys")
    with torch.no_grad():
        want = model(**inputs).logits
        base_logits = model.get_base_model()  # noqa: F841 (keeps the wrapper alive)
    adapter = save_adapter(model, vlm.processor, tmp_path / "adapter")
    merged_dir = merge_adapter(adapter, tmp_path / "merged")
    assert not (merged_dir / "adapter_config.json").exists()
    merged = load_vlm(VLMConfig(model=str(merged_dir), device="cpu"))
    inputs2 = merged.prepare([Image.open(astronaut_path)], ["What expression?"], "sys")
    assert torch.equal(inputs2["input_ids"], inputs["input_ids"].cpu())
    with torch.no_grad():
        got = merged.model(**inputs2).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
    # and the adapter really changed the model (so the comparison is not vacuous)
    plain = load_vlm(VLMConfig(model=str(train_tiny_dir), device="cpu"))
    with torch.no_grad():
        orig = plain.model(**inputs2).logits
    assert (orig - want).abs().max() > 1e-3


def test_merge_rejects_non_adapter(tmp_path):
    from tagfer.train.merge import merge_adapter

    with pytest.raises(FileNotFoundError, match="adapter_config"):
        merge_adapter(tmp_path, tmp_path / "out")
