"""Training configuration: one dataclass tree, loaded from YAML with strict validation.

A config file (or a packaged preset, ``tagfer/train/presets/<name>.yaml``) is a nested
mapping whose sections mirror :class:`TrainConfig`::

    stage: sft                 # sft | grpo
    output_dir: runs/sft
    extends: sft_tag310k       # optional: start from another preset / file, then deep-merge
    model: {name_or_path: Qwen/Qwen2.5-VL-7B-Instruct, image_side: 224}
    lora:  {r: 128, alpha: 256, dropout: 0.05}
    data:  {train: data/tag/train.jsonl, val: data/tag/val.jsonl, sources: [rafdb]}
    optim: {learning_rate: 2.0e-5, lr_scheduler: cosine, warmup_ratio: 0.03, ...}
    sft:   {max_length: 2048, ...}
    grpo:  {num_generations: 8, beta: 0.04, epsilon: 0.2, loss_type: grpo, ...}
    reward: {fmt_bonus: 0.5, w_au: 1.0, matching: paper, au_reward: iou}   # tagfer.traces.rewards.RewardConfig
    log:   {logging_steps: 10, tensorboard: false}
    trl:   {torch_compile: false, ...}   # any other TRL SFTConfig/GRPOConfig argument, passed through
Every field can be overridden with a dotted ``key=value`` (``--set optim.learning_rate=1e-5``;
values are read as YAML, so ``[rafdb, ferplus]``, ``null``, ``true`` work). Unknown fields
and wrong types raise :class:`ConfigError` naming the dotted field.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from tagfer.models.families import UnknownFamily, get_family
from tagfer.traces.rewards import RewardConfig

__all__ = [
    "ConfigError",
    "ModelSection",
    "LoraSection",
    "DataSection",
    "OptimSection",
    "SFTSection",
    "GRPOSection",
    "LogSection",
    "TrainConfig",
    "PRESETS_PACKAGE",
    "list_presets",
    "preset_path",
    "load_config",
    "load_raw",
    "apply_overrides",
    "from_dict",
    "to_dict",
    "dump_config",
]

PRESETS_PACKAGE = "tagfer/train/presets"  # package data folder (pyproject: "train/presets/*.yaml")

#: LoRA targets of the paper: every attention and MLP projection of the language model.
LM_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ConfigError(ValueError):
    """A config that cannot be used; ``field`` is the dotted name at fault (may be empty)."""

    def __init__(self, field_name: str, message: str):
        self.field = field_name
        super().__init__(f"{field_name}: {message}" if field_name else message)


@dataclass
class ModelSection:
    """The base model.

    ``name_or_path``: hub id or local folder; ``"tiny"`` builds the tiny random
    Qwen2.5-VL (:func:`tagfer.models.tiny.build_tiny_qwen25vl`, seed ``tiny_seed``) under
    ``<output_dir>/base_model`` — for CPU smoke runs and tests only.
    ``adapter``: a LoRA adapter folder (e.g. the SFT result) merged into the base
    before a new adapter is trained (GRPO starts from the SFT model; the merged
    SFT model is then also GRPO's KL reference).
    ``image_side``: images are resized so the longer side is this many pixels,
    aspect preserved (paper: 224). ``min_pixels``/``max_pixels``: processor limits.
    ``family``: the model family (:mod:`tagfer.models.families`: ``qwen2_5_vl``, ``qwen3_vl``,
    ``gemma3``, ``llava_onevision``…) that says which modules are LoRA targets, vision tower and projector;
    ``auto`` reads ``model_type`` from the checkpoint's config. With ``name_or_path: tiny``
    it picks the tiny random model to build (``auto``: Qwen2.5-VL).
    """

    name_or_path: str = "Qwen/Qwen2.5-VL-7B-Instruct"
    adapter: str | None = None
    dtype: str = "auto"
    attn_implementation: str | None = None
    image_side: int = 224
    min_pixels: int | None = None
    max_pixels: int | None = None
    tiny_seed: int = 0
    family: str = "auto"


@dataclass
class LoraSection:
    """LoRA on the language model only (paper: r 128, alpha 256, dropout 0.05).

    ``targets``: projection names, matched only under ``language_model.layers.N.
    (self_attn|mlp)`` (the vision MLP has gate/up/down_proj too and stays frozen).
    ``train_projector``: the vision→text merger is trained in full (PEFT
    ``modules_to_save``, saved with the adapter). ``enabled: false`` = full
    fine-tuning of the language model (vision encoder still frozen).
    """

    enabled: bool = True
    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: list(LM_PROJECTIONS))
    train_projector: bool = True


@dataclass
class DataSection:
    """Where samples come from and how they are filtered.

    ``train`` / ``val``: a TAGSample JSONL file, a folder holding the data
    exporter's Hugging Face export (columns prompt/completion/images/label/
    au_boxes/aus/source; ``save_to_disk`` folder or JSONL/Parquet files), or
    ``builtin:tiny`` (a few generated samples on the shipped sample faces, for
    smoke runs). ``val: null`` with ``val_size > 0`` holds out that many training
    samples. ``sources``: keep only these ``source`` values (per-dataset GRPO).
    ``split``: keep only rows of this split (empty = all). ``no_bbox``: strip
    ``<bbox>`` elements from SFT targets (Table 3 ablation). ``image_root``:
    base for relative image paths (default: the data file's folder).
    """

    train: str = ""
    val: str | None = None
    val_size: int = 0
    sources: list[str] = field(default_factory=list)
    split: str = ""
    max_samples: int | None = None
    no_bbox: bool = False
    image_root: str | None = None
    system_prompt: str | None = None
    user_prompt: str | None = None


@dataclass
class OptimSection:
    """Optimiser and schedule (AdamW). ``bf16: auto`` = on when the device supports it.

    ``deepspeed``: ``zero2`` / ``zero3`` (the packaged JSON files) or a path to your own.
    """

    learning_rate: float = 2e-5
    weight_decay: float = 0.01
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    epochs: float = 3.0
    max_steps: int = -1
    batch_size: int = 8
    grad_accum: int = 8
    bf16: Literal["auto", "true", "false"] = "auto"
    gradient_checkpointing: bool = False
    seed: int = 42
    save_steps: int = 500
    save_total_limit: int | None = 3
    dataloader_workers: int = 0
    deepspeed: str | None = None


@dataclass
class SFTSection:
    """SFT specifics.

    ``eval_steps``: run validation (greedy decoding of ``val_samples`` samples,
    parsed by the reward module) every N optimiser steps (0 = only at the end).
    Best checkpoint: highest ``select_acc_weight * accuracy + (1 - select_acc_weight)
    * au_iou`` (default 0.5: the mean of the two; ties → the earlier step), saved
    to ``<output_dir>/best``.
    """

    max_length: int = 2048
    completion_only_loss: bool = True
    eval_steps: int = 500
    val_samples: int = 256
    val_max_new_tokens: int = 512
    val_batch_size: int = 8
    select_acc_weight: float = 0.5


@dataclass
class GRPOSection:
    """GRPO specifics (TRL ``GRPOConfig``; paper: K=8, beta=0.04, epsilon=0.2).

    ``max_completion_length``: traces average 389 tokens (max 1221) in the paper's
    data; 1024 keeps almost all. ``use_vllm``: vLLM rollouts (``vllm_mode`` colocate
    | server; server options such as ``vllm_server_base_url`` go in the ``trl`` section);
    ``auto`` = vLLM when it is installed and a GPU is present, else a warning and the
    transformers fallback. ``merged_rollouts``: the fallback generates from LoRA weights
    merged into the base (restored exactly afterwards, :mod:`tagfer.train.rollout`).
    """

    num_generations: int = 8
    beta: float = 0.04
    epsilon: float = 0.2
    loss_type: str = "grpo"
    scale_rewards: str = "group"
    max_completion_length: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    use_vllm: bool | Literal["auto"] = False
    merged_rollouts: bool = True
    vllm_mode: Literal["colocate", "server"] = "colocate"
    vllm_gpu_memory_utilization: float = 0.3
    generation_batch_size: int | None = None
    log_completions: bool = False


@dataclass
class LogSection:
    """Per-step log: ``<output_dir>/<jsonl>`` always; TensorBoard when ``tensorboard``."""

    logging_steps: int = 10
    jsonl: str = "train_log.jsonl"
    tensorboard: bool = False
    progress: bool = True


@dataclass
class TrainConfig:
    """The whole configuration of one training run (one stage)."""

    stage: Literal["sft", "grpo"] = "sft"
    output_dir: str = "runs/tag"
    resume: bool = True
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    sft: SFTSection = field(default_factory=SFTSection)
    grpo: GRPOSection = field(default_factory=GRPOSection)
    reward: RewardConfig = field(default_factory=RewardConfig)
    log: LogSection = field(default_factory=LogSection)
    #: Extra TRL ``SFTConfig`` / ``GRPOConfig`` arguments passed through unchanged (``--set trl.foo=...``);
    #: checked against TRL's own fields when the trainer is built (:func:`tagfer.train.trl_args.trl_kwargs`).
    trl: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> "TrainConfig":
        """Range checks that types alone do not catch; raises :class:`ConfigError`."""
        def pos(name: str, v: float, strict: bool = True) -> None:
            if not math.isfinite(v) or v < 0 or (strict and v == 0):
                raise ConfigError(name, f"must be {'> 0' if strict else '>= 0'}, got {v!r}")

        o, g, s, lo = self.optim, self.grpo, self.sft, self.lora
        pos("optim.learning_rate", o.learning_rate)
        pos("optim.weight_decay", o.weight_decay, strict=False)
        pos("optim.max_grad_norm", o.max_grad_norm, strict=False)
        pos("optim.batch_size", o.batch_size)
        pos("optim.grad_accum", o.grad_accum)
        if not 0 <= o.warmup_ratio < 1:
            raise ConfigError("optim.warmup_ratio", f"must be in [0, 1), got {o.warmup_ratio!r}")
        if o.max_steps <= 0 and o.epochs <= 0:
            raise ConfigError("optim.epochs", "set epochs > 0 or max_steps > 0")
        pos("lora.r", lo.r)
        pos("lora.alpha", lo.alpha)
        if not 0 <= lo.dropout < 1:
            raise ConfigError("lora.dropout", f"must be in [0, 1), got {lo.dropout!r}")
        if lo.enabled and not lo.targets:
            raise ConfigError("lora.targets", "needs at least one projection name")
        pos("model.image_side", self.model.image_side)
        if self.model.family != "auto":
            try:
                get_family(self.model.family)
            except UnknownFamily as e:
                raise ConfigError("model.family", str(e)) from None
        pos("sft.max_length", s.max_length)
        pos("sft.val_max_new_tokens", s.val_max_new_tokens)
        pos("sft.val_batch_size", s.val_batch_size)
        if not 0 <= s.select_acc_weight <= 1:
            raise ConfigError("sft.select_acc_weight", f"must be in [0, 1], got {s.select_acc_weight!r}")
        if g.num_generations < 2:
            raise ConfigError("grpo.num_generations", f"GRPO needs >= 2 generations per prompt, got {g.num_generations}")
        pos("grpo.beta", g.beta, strict=False)
        pos("grpo.epsilon", g.epsilon)
        pos("grpo.max_completion_length", g.max_completion_length)
        pos("grpo.temperature", g.temperature)
        if self.stage == "grpo":
            gen = g.generation_batch_size or o.batch_size * o.grad_accum
            if gen % g.num_generations:
                raise ConfigError(
                    "grpo.num_generations",
                    f"the generation batch ({gen} = optim.batch_size × optim.grad_accum, or grpo.generation_batch_size) "
                    f"must be a multiple of num_generations ({g.num_generations})",
                )
        if not self.data.train:
            raise ConfigError("data.train", "no training data given (a JSONL file, an HF export folder or builtin:tiny)")
        return self


# ---------------------------------------------------------------------------------------------
# strict dict → dataclass conversion


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        return f"list[{_type_name(arg)}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, name: str) -> Any:
    """``value`` checked (and minimally coerced: int → float, str ↔ Literal) against ``tp``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(name, f"must not be null (expected {_type_name(tp)})")
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, name)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(name, f"expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin is Literal:
        allowed = typing.get_args(tp)
        v = value
        if isinstance(v, bool) and all(isinstance(a, str) for a in allowed):
            v = "true" if v else "false"  # YAML reads `bf16: true` as a bool
        if v in allowed and type(v) is type(next(a for a in allowed if a == v)):
            return v
        raise ConfigError(name, f"must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")
    if origin is dict:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise ConfigError(name, f"expected a mapping of names to values, got {value!r} ({type(value).__name__})")
        return dict(value)
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(name, f"expected a list, got {value!r} ({type(value).__name__})")
        return [_convert(arg, v, f"{name}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, name)
    if tp is bool:
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
        if isinstance(value, str):  # PyYAML reads "1e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(name, f"expected a number, got {value!r} ({type(value).__name__})")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(name, f"expected a string, got {value!r} ({type(value).__name__})")
    raise ConfigError(name, f"unsupported field type {tp!r}")  # pragma: no cover


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, strictly: unknown keys and wrong types raise."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(prefix, f"expected a mapping of fields, got {data!r} ({type(data).__name__})")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"{where}{unknown[0]}", f"unknown field (known fields{' of ' + prefix if prefix else ''}: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else key
        kwargs[key] = _convert(hints[key], value, name)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # e.g. RewardConfig.__post_init__
        raise ConfigError(prefix, str(e)) from e


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain dicts/lists (YAML-safe)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------
# presets, files, overrides


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


def _deep_merge(base: dict, over: Mapping) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def load_raw(ref: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The raw mapping of a preset name or YAML file, with ``extends`` chains merged in."""
    path = _resolve(ref, _seen[-1].parent if _seen else None).resolve()
    if path in _seen:
        raise ConfigError("extends", f"circular extends: {' -> '.join(str(p) for p in (*_seen, path))}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError("", f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError("", f"{path}: a config must be a mapping, got {type(data).__name__}")
    parent = data.pop("extends", None)
    if parent is not None:
        if not isinstance(parent, str):
            raise ConfigError("extends", f"must name a preset or YAML file, got {parent!r}")
        data = _deep_merge(load_raw(parent, (*_seen, path)), data)
    return data


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str] | Mapping[str, Any] = ()) -> dict[str, Any]:
    """Apply ``"a.b=value"`` strings (values parsed as YAML) or a ``{dotted: value}`` mapping."""
    items: list[tuple[str, Any]] = []
    if isinstance(overrides, Mapping):
        items = list(overrides.items())
    else:
        for o in overrides:
            if "=" not in o:
                raise ConfigError(o, "an override must look like key.sub=value")
            key, text = o.split("=", 1)
            try:
                value = yaml.safe_load(text) if text.strip() else ""
            except yaml.YAMLError:
                value = text
            items.append((key.strip(), value))
    out = _deep_merge({}, raw)
    for key, value in items:
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(key, "empty component in dotted name")
        node = out
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(".".join(parts[: i + 1]), "is a value, not a section")
            node[part] = nxt = dict(nxt)
            node = nxt
        node[parts[-1]] = value
    return out


def load_config(
    ref: str | Path | Mapping[str, Any], overrides: Sequence[str] | Mapping[str, Any] = (), validate: bool = True
) -> TrainConfig:
    """A validated :class:`TrainConfig` from a preset name, a YAML path or a mapping, plus overrides."""
    if isinstance(ref, Mapping):
        raw = dict(ref)
        parent = raw.pop("extends", None)
        if parent is not None:
            raw = _deep_merge(load_raw(parent), raw)
    else:
        raw = load_raw(ref)
    raw = apply_overrides(raw, overrides)
    cfg = from_dict(TrainConfig, raw)
    return cfg.validate() if validate else cfg


def dump_config(cfg: TrainConfig, path: str | Path | None = None) -> str:
    """YAML text of ``cfg`` (loads back to an equal config); written to ``path`` if given."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text, encoding="utf-8")
    return text
