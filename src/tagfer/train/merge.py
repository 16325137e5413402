"""Merge a LoRA adapter into its base model and save a standalone folder.

The result holds the full weights (``config.json`` + safetensors) and the processor
(tokenizer + image processor), so :func:`tagfer.models.vlm.load_vlm` — and therefore evaluation,
``tagfer analyze`` and vLLM serving — load it like any checkpoint, without PEFT. Trained
``modules_to_save`` copies (the projector) replace the base modules in the merge.
"""

from __future__ import annotations

import json
from pathlib import Path

from tagfer.train.model import save_processor

__all__ = ["merge_adapter"]


def merge_adapter(adapter: str | Path, out_dir: str | Path, base: str | None = None, dtype: str = "auto") -> Path:
    """Merge ``adapter`` (a PEFT folder) into ``base`` (default: the base recorded in the adapter).

    Returns ``out_dir``. Raises ``FileNotFoundError`` when ``adapter`` is not an adapter
    folder and :class:`tagfer.models.vlm.ModelNotAvailable` when the base weights are missing.
    """
    from tagfer.models.vlm import VLMConfig, load_vlm  # lazy (start-up time): PIL

    adapter = Path(adapter)
    acfg = adapter / "adapter_config.json"
    if not acfg.is_file():
        raise FileNotFoundError(f"{adapter} is not a PEFT adapter folder (no adapter_config.json)")
    base = base or json.loads(acfg.read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{acfg} records no base model; pass base=")
    vlm = load_vlm(VLMConfig(model=str(base), adapter=str(adapter), dtype=dtype, device="cpu"))
    merged = vlm.model.merge_and_unload()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out))
    save_processor(vlm.processor, out)
    (out / "MERGED_FROM.json").write_text(json.dumps({"base": str(base), "adapter": str(adapter.resolve())}, indent=2))
    return out
