"""TAG training: SFT with LoRA and GRPO with the AU-grounded reward (transformers + PEFT + TRL).

Modules: :mod:`.presets` (YAML presets, no heavy import), :mod:`.config` (TRL's SFTConfig /
GRPOConfig with TAG's fields, parsed by TRL's parser), :mod:`.data` (samples → TRL rows),
:mod:`.model` (loading, LoRA, freezing), :mod:`.sft`, :mod:`.grpo`, :mod:`.callbacks`
(JSONL step log), :mod:`.merge`, :mod:`.interop` (LLaMA-Factory / verl), :mod:`.plots`.
Heavy libraries are imported by the submodules that need them, so importing this package is light.
"""

from tagfer.train.presets import ConfigError, list_presets, load_raw

__all__ = ["ConfigError", "list_presets", "load_raw"]
