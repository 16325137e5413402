"""tagfer's TRL trainers: TRL's own, plus tagfer's model card (:mod:`tagfer.train.card`).

``TagferSFTTrainer`` is ``SFTTrainer``; ``TagferGRPOTrainer`` is the GRPO trainer with merged-LoRA
rollouts (:class:`tagfer.train.rollout.MergedRolloutGRPOTrainer`). Both tag their cards ``tagfer``.
"""

from __future__ import annotations

from trl import SFTTrainer

from tagfer.train.card import ModelCardMixin
from tagfer.train.rollout import MergedRolloutGRPOTrainer

__all__ = ["TagferSFTTrainer", "TagferGRPOTrainer"]


class TagferSFTTrainer(ModelCardMixin, SFTTrainer):
    """``SFTTrainer`` whose card's quick start loads ``best/`` (the adapter chosen by validation)."""

    _tag_names = [*SFTTrainer._tag_names, "tagfer"]
    card_adapter = "best"


class TagferGRPOTrainer(ModelCardMixin, MergedRolloutGRPOTrainer):
    """``GRPOTrainer`` (merged-LoRA rollouts) whose card's quick start loads ``final/``."""

    _tag_names = [*MergedRolloutGRPOTrainer._tag_names, "tagfer"]
    card_adapter = "final"
