"""Fast transformers rollouts: generate from LoRA weights merged into the base, KV cache on.

Measured on one H200 at 7B (docs/train.md, "GPU budget"): HF ``generate`` at batch 64 takes
~23 ms per decode step with the r128 LoRA merged into the weights and ~53 ms with PEFT's
unmerged LoRA (two extra matmuls per projection). GRPO's policy changes only between
optimiser steps, so each rollout can run on merged weights:

* :func:`merged_lora` merges every active LoRA adapter into a *new* weight tensor
  (PEFT's ``safe_merge``) and afterwards puts the original tensor back, so the frozen base
  is bit-for-bit unchanged (merging and unmerging in bf16 would drift the base by rounding
  every step). Cost: one extra copy of the LoRA-targeted base weights during the rollout
  (≈13 GB at 7B bf16); ``grpo.merged_rollouts=false`` turns it off.
* :class:`MergedRolloutGRPOTrainer` is TRL 1.16's ``GRPOTrainer`` with its transformers
  generation (``_generate_single_turn``) wrapped in :func:`merged_lora` and the KV cache
  forced on (TRL already disables gradient checkpointing while generating). vLLM rollouts
  (``use_vllm``) are untouched: TRL syncs merged weights to vLLM itself.

Merging is skipped (with a warning) when parameters are sharded (DeepSpeed ZeRO-3 / FSDP).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Iterator

from peft.tuners.lora import LoraLayer
from trl import GRPOTrainer

__all__ = ["lora_layers", "merged_lora", "MergedRolloutGRPOTrainer"]


def lora_layers(model) -> list:
    """PEFT LoRA layers of ``model`` that have an active adapter and are not merged yet."""
    return [m for m in model.modules() if isinstance(m, LoraLayer) and not m.merged and m.active_adapters]


def _sharded(model) -> bool:
    return any(hasattr(p, "ds_id") or type(p).__name__ == "DTensor" for p in model.parameters())


@contextmanager
def merged_lora(model, enabled: bool = True) -> Iterator[int]:
    """Inside the block, ``model``'s LoRA adapters are merged into (new) base weights; on exit the
    original base tensors are restored exactly. Yields the number of merged layers (0 = no-op)."""
    layers = lora_layers(model) if enabled else []
    if layers and _sharded(model):
        warnings.warn("merged LoRA rollouts skipped: parameters are sharded (ZeRO-3/FSDP)", RuntimeWarning, stacklevel=3)
        layers = []
    saved = []
    try:
        for m in layers:
            base = m.get_base_layer()
            saved.append((m, base.weight.data, base.bias.data if getattr(base, "bias", None) is not None else None))
            m.merge(safe_merge=True)  # builds a new tensor: the saved one stays untouched
        yield len(saved)
    finally:
        for m, weight, bias in saved:
            base = m.get_base_layer()
            base.weight.data = weight
            if bias is not None:
                base.bias.data = bias
            m.merged_adapters.clear()


class MergedRolloutGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose transformers rollouts run on merged LoRA weights with the KV cache on."""

    def __init__(self, *args, merged_rollouts: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.merged_rollouts = merged_rollouts
        self.rollout_merged_layers = 0  # layers merged in the last rollout (0: unmerged / vLLM)
        if not self.use_vllm:
            self.generation_config.use_cache = True
            self.generation_kwargs["use_cache"] = True

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if self.use_vllm or self.use_transformers_continuous_batching:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations, has_tool_images)
        model = self.accelerator.unwrap_model(self.model_wrapped)
        with merged_lora(model, self.merged_rollouts) as n:
            self.rollout_merged_layers = n
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations, has_tool_images)
