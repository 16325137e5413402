"""TAG training: SFT with LoRA and GRPO with the AU-grounded reward (transformers + PEFT + TRL).

Modules: :mod:`.config` (TrainConfig, presets, overrides), :mod:`.data` (samples → TRL rows),
:mod:`.model` (loading, LoRA, freezing), :mod:`.sft`, :mod:`.grpo`, :mod:`.callbacks`
(JSONL step log), :mod:`.merge`, :mod:`.interop` (LLaMA-Factory / verl), :mod:`.plots`.
Heavy libraries are imported lazily by the submodules that need them.
"""

from tagfer.train.config import ConfigError, TrainConfig, dump_config, list_presets, load_config

__all__ = ["ConfigError", "TrainConfig", "dump_config", "list_presets", "load_config"]
