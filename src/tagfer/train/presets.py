"""Training presets and config files as plain YAML mappings (no torch / TRL import).

A config file is a flat mapping of fields of :class:`tagfer.train.config.TagferSFTConfig` or
:class:`~tagfer.train.config.TagferGRPOConfig` (TRL's own fields and TAG's), plus three keys of
its own: ``stage`` (``sft`` | ``grpo``: which of the two classes), ``extends`` (start from another
preset or file, then override some keys) and TRL's ``env`` (environment variables to export).
A bare name (``tiny_cpu``) is a packaged preset, ``tagfer/train/presets/<name>.yaml``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

__all__ = ["ConfigError", "list_presets", "preset_path", "load_raw", "STAGES"]

#: The two trainers a config can be for.
STAGES = ("sft", "grpo")


class ConfigError(ValueError):
    """A config that cannot be used; ``field`` is the name at fault (may be empty)."""

    def __init__(self, field_name: str, message: str):
        self.field = field_name
        super().__init__(f"{field_name}: {message}" if field_name else message)


def list_presets() -> list[str]:
    """Names of the packaged presets."""
    root = resources.files("tagfer.train") / "presets"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def preset_path(name: str) -> Path:
    """Packaged preset file of ``name``; raises ``ConfigError`` listing the presets when unknown."""
    p = Path(str(resources.files("tagfer.train") / "presets" / f"{name}.yaml"))
    if not p.is_file():
        raise ConfigError("", f"no preset or config file {name!r}; presets: {', '.join(list_presets())}")
    return p


def _resolve(ref: str | Path, relative_to: Path | None = None) -> Path:
    p = Path(ref)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_absolute() and relative_to is not None and (relative_to / p).is_file():
            return relative_to / p
        if p.is_file():
            return p
        if not p.is_absolute() and len(p.parts) == 1:
            return preset_path(p.stem)
        raise ConfigError("", f"config file not found: {p}")
    return preset_path(str(ref))


def load_raw(ref: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The mapping of a preset name or YAML file, with its ``extends`` chain merged in (child keys win)."""
    path = _resolve(ref, _seen[-1].parent if _seen else None).resolve()
    if path in _seen:
        raise ConfigError("extends", f"circular extends: {' -> '.join(str(p) for p in (*_seen, path))}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError("", f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError("", f"{path}: a config must be a mapping, got {type(data).__name__}")
    bad = [k for k, v in data.items() if isinstance(v, dict) and k not in ("env", "lr_scheduler_kwargs",
                                                                          "model_init_kwargs", "dataset_kwargs")]
    if bad:
        raise ConfigError(bad[0], "a config is flat (TRL's field names): write `learning_rate: 1e-5`, not "
                                  "`optim: {learning_rate: ...}`; `tagfer train fields sft` lists every field")
    parent = data.pop("extends", None)
    if parent is not None:
        if not isinstance(parent, str):
            raise ConfigError("extends", f"must name a preset or YAML file, got {parent!r}")
        base = load_raw(parent, (*_seen, path))
        env = {**base.get("env", {}), **data.get("env", {})}
        data = {**base, **data}
        if env:
            data["env"] = env
    return data
