"""TRL's argument parser for tagfer's config classes: typed YAML values, errors that name the field.

:class:`TagParser` is :class:`~trl.TrlParser` (YAML keys as defaults, command-line flags win, unknown
keys are errors) plus: every YAML value is checked against its field's argparse action (type,
choices, list-ness) — argparse itself checks only command-line strings —, unknown names get a
"did you mean" (including the names of tagfer's earlier nested config), and argparse errors raise
:class:`~tagfer.train.presets.ConfigError` instead of exiting the process.
"""

from __future__ import annotations

import difflib
import enum
import re
import typing
from typing import Any, Mapping, Sequence

from trl import TrlParser

from tagfer.train.presets import ConfigError

__all__ = ["TagParser"]


#: usual short names and the names of tagfer's earlier nested config → the field to use.
_RENAMED = {
    "lr": "learning_rate", "epochs": "num_train_epochs", "batch_size": "per_device_train_batch_size",
    "grad_accum": "gradient_accumulation_steps", "warmup_ratio": "warmup_steps", "lr_scheduler": "lr_scheduler_type",
    "name_or_path": "model_name_or_path", "family": "model_family", "r": "lora_r", "alpha": "lora_alpha",
    "dropout": "lora_dropout", "targets": "lora_target_modules", "enabled": "use_peft", "train": "train_data",
    "val": "val_data", "jsonl": "log_jsonl", "progress": "disable_tqdm", "tensorboard": "report_to",
    "w_au": "reward_weights", "w_ans": "reward_weights", "w_fmt": "reward_weights", "matching": "au_matching",
    "dataloader_workers": "dataloader_num_workers", "epsilon_clip": "epsilon", "kl": "beta",
}


class TagParser(TrlParser):
    """:class:`~trl.TrlParser` for one tagfer config class; errors raise :class:`ConfigError` instead of exiting."""

    def __init__(self, cls: type, prog: str | None = None, others: Sequence[type] = ()):
        super().__init__(cls, prog=prog, allow_abbrev=False)  # `--lr` must not silently mean another field
        self.config_class = cls
        self.others = [c for c in others if c is not cls]  # the other stages' classes, for "wrong stage?" hints
        self.field_actions: dict[str, Any] = {}
        for a in self._actions:  # the first action of a dest (not the `--no_x` complement of a bool)
            if a.option_strings and a.dest != "help":
                self.field_actions.setdefault(a.dest, a)

    def error(self, message: str):  # argparse: never sys.exit from library code
        m = re.search(r"argument --([\w-]+)", message)
        raise ConfigError(m.group(1).replace("-", "_") if m else "", message)

    def _unknown(self, key: str) -> ConfigError:
        other = [c for c in self.others if key in c.__dataclass_fields__]
        if other:
            return ConfigError(key, f"is a field of {other[0].__name__}, not of {self.config_class.__name__} "
                                    "(wrong stage?)")
        near = [_RENAMED[key]] if key in _RENAMED else difflib.get_close_matches(key, sorted(self.field_actions), n=3)
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        return ConfigError(key, f"unknown field of {self.config_class.__name__}{hint}; "
                                "`tagfer train fields sft|grpo` lists them")

    def check_value(self, key: str, value: Any) -> Any:
        """A YAML value as argparse would accept it on the command line (converted), or :class:`ConfigError`."""
        action = self.field_actions.get(key)
        if action is None:
            raise self._unknown(key)
        if value is None:
            hint = typing.get_type_hints(self.config_class).get(key)
            if action.default is None or type(None) in typing.get_args(hint):
                return None
            raise ConfigError(key, "must not be null")
        if action.nargs == "+":
            if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
                raise ConfigError(key, f"expected a list, got {value!r} ({type(value).__name__})")
            return [self._scalar(f"{key}[{i}]", action, v) for i, v in enumerate(value)]
        return self._scalar(key, action, value)

    @staticmethod
    def _scalar(name: str, action, value: Any) -> Any:
        tp, choices = action.type, action.choices
        if choices is not None:
            if isinstance(value, bool) and all(isinstance(c, str) for c in choices):
                value = "true" if value else "false"  # YAML reads `use_vllm: true` as a bool
            if isinstance(value, str) and tp is not None and tp not in (str,):
                try:
                    value = tp(value)
                except (TypeError, ValueError):
                    pass
            ok = [c.value if isinstance(c, enum.Enum) else c for c in choices]
            v = value.value if isinstance(value, enum.Enum) else value
            if v not in ok:
                raise ConfigError(name, f"must be one of {', '.join(repr(c) for c in ok)}, got {value!r}")
            return value
        if getattr(tp, "__name__", "") == "string_to_bool":  # TRL and transformers each have one
            if isinstance(value, bool):
                return value
            raise ConfigError(name, f"expected true/false, got {value!r} ({type(value).__name__})")
        if tp is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            raise ConfigError(name, f"expected an integer, got {value!r} ({type(value).__name__})")
        if tp is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):  # PyYAML reads 1e-5 (no dot) as a string
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(name, f"expected a number, got {value!r} ({type(value).__name__})")
        if tp is str:
            if isinstance(value, str):
                return value
            raise ConfigError(name, f"expected a string, got {value!r} ({type(value).__name__})")
        if tp is dict:
            if isinstance(value, Mapping):
                return dict(value)
            raise ConfigError(name, f"expected a mapping, got {value!r}")
        return value

    def parse(self, defaults: Mapping[str, Any], args: Sequence[str] = ()) -> Any:
        """``defaults`` (YAML keys, checked) under command-line ``args`` (TRL's ``--key value``)."""
        checked = {k: self.check_value(k, v) for k, v in defaults.items()}
        left = self.set_defaults_with_config(**checked)
        if left:  # pragma: no cover - check_value already refused unknown keys
            raise self._unknown(left[0].lstrip("-"))
        args = list(args)
        if "--set" in args or any(a.startswith("--set=") for a in args):
            raise ConfigError("--set", "overrides are TRL-style flags now: --learning_rate 1e-5 --sources rafdb ferplus")
        *out, rest = self.parse_args_into_dataclasses(args=args, return_remaining_strings=True)
        if rest:
            flag = next((a for a in rest if a.startswith("--")), rest[0])
            raise self._unknown(flag.lstrip("-").split("=", 1)[0].replace("-", "_"))
        return out[0]
