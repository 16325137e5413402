"""TrainConfig → TRL's ``SFTConfig`` / ``GRPOConfig`` keyword arguments, from one table.

Every TRL argument tagfer sets is derived in :data:`DERIVED` (TRL name → how to compute it
from the :class:`~tagfer.train.config.TrainConfig`); nothing else is mirrored. Any other TRL
argument passes through unchanged from the config's ``trl`` section (a preset's ``trl:``
mapping or ``--set trl.vllm_server_base_url=http://gpu1:8000``). A ``trl.*`` key that TRL
does not know, or that tagfer already derives from one of its own fields, is a
:class:`~tagfer.train.config.ConfigError` naming the key, raised before anything is written.

Note on warm-up: transformers 5 has no ``warmup_ratio``; its ``warmup_steps`` takes a float
below 1 as a fraction of the total steps, so ``optim.warmup_ratio`` (always < 1) maps to it.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any, Callable
import warnings

from tagfer.train.config import ConfigError, TrainConfig

__all__ = ["DERIVED", "trl_kwargs", "trl_config", "use_vllm_now", "deepspeed_config_path"]


def _bf16(setting: str) -> bool:
    import torch  # lazy (start-up time): torch

    if setting == "auto":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return setting == "true"


def _cuda(cfg: TrainConfig) -> bool:
    import torch  # lazy (start-up time): torch

    return torch.cuda.is_available()


def _report_to(cfg: TrainConfig) -> list[str]:
    if not cfg.log.tensorboard:
        return []
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        import warnings

        warnings.warn("log.tensorboard is on but tensorboard is not installed; JSONL log only", stacklevel=2)
        return []
    return ["tensorboard"]


def deepspeed_config_path(value: str | None) -> str | None:
    """``zero2`` / ``zero3`` → the packaged DeepSpeed JSON (``tagfer/train/deepspeed/``); paths pass through."""
    if value in ("zero2", "zero3"):
        return str(Path(__file__).parent / "deepspeed" / f"{value}.json")
    return value


def use_vllm_now(cfg: TrainConfig, warn: bool = True) -> bool:
    """Whether GRPO rollouts go through vLLM: ``grpo.use_vllm`` true/false, or ``auto`` = when vLLM
    imports and a GPU is present. ``true`` without vLLM raises; ``auto`` without it warns once and
    falls back to transformers generation from merged LoRA weights (:mod:`tagfer.train.rollout`)."""
    want = cfg.grpo.use_vllm
    if want is False:
        return False
    try:
        import vllm  # noqa: F401

        have = True
    except ImportError:
        have = False
    if want is True:
        if not have:
            raise RuntimeError(
                "grpo.use_vllm is true but vLLM is not installed (pip install vllm, on a CUDA machine); "
                "set grpo.use_vllm=auto to fall back to transformers rollouts, or false"
            )
        return True
    import torch  # lazy (start-up time): torch

    if have and torch.cuda.is_available():
        return True
    if warn:
        why = "vLLM is not installed" if not have else "no CUDA device"
        warnings.warn(
            f"grpo.use_vllm=auto: {why}, so GRPO rollouts use transformers generate from merged LoRA weights "
            "(several times slower than vLLM at 7B; see docs/train.md, 'GPU budget')",
            RuntimeWarning, stacklevel=2,
        )
    return False


_Getter = Callable[[TrainConfig], Any]

#: TRL argument → (the tagfer field it comes from, for error messages; how to compute it). Stage "both"/"sft"/"grpo".
DERIVED: dict[str, tuple[str, str, _Getter]] = {
    "output_dir": ("both", "output_dir", lambda c: str(c.output_dir)),
    "learning_rate": ("both", "optim.learning_rate", lambda c: c.optim.learning_rate),
    "weight_decay": ("both", "optim.weight_decay", lambda c: c.optim.weight_decay),
    "lr_scheduler_type": ("both", "optim.lr_scheduler", lambda c: c.optim.lr_scheduler),
    "warmup_steps": ("both", "optim.warmup_ratio", lambda c: c.optim.warmup_ratio),  # < 1: a fraction (see above)
    "max_grad_norm": ("both", "optim.max_grad_norm", lambda c: c.optim.max_grad_norm),
    "num_train_epochs": ("both", "optim.epochs", lambda c: c.optim.epochs),
    "max_steps": ("both", "optim.max_steps", lambda c: c.optim.max_steps),
    "per_device_train_batch_size": ("both", "optim.batch_size", lambda c: c.optim.batch_size),
    "gradient_accumulation_steps": ("both", "optim.grad_accum", lambda c: c.optim.grad_accum),
    "bf16": ("both", "optim.bf16", lambda c: _bf16(c.optim.bf16)),
    "activation_checkpointing": ("both", "optim.gradient_checkpointing", lambda c: c.optim.gradient_checkpointing),
    "seed": ("both", "optim.seed", lambda c: c.optim.seed),
    "data_seed": ("both", "optim.seed", lambda c: c.optim.seed),
    "save_steps": ("both", "optim.save_steps", lambda c: c.optim.save_steps),
    "save_total_limit": ("both", "optim.save_total_limit", lambda c: c.optim.save_total_limit),
    "dataloader_num_workers": ("both", "optim.dataloader_workers", lambda c: c.optim.dataloader_workers),
    "deepspeed": ("both", "optim.deepspeed", lambda c: deepspeed_config_path(c.optim.deepspeed)),
    "logging_steps": ("both", "log.logging_steps", lambda c: c.log.logging_steps),
    "report_to": ("both", "log.tensorboard", _report_to),
    "disable_tqdm": ("both", "log.progress", lambda c: not c.log.progress),
    # fixed by tagfer's data path (rows are built by tagfer.train.data.RowMaker)
    "save_strategy": ("both", "(fixed: steps)", lambda c: "steps"),
    "remove_unused_columns": ("both", "(fixed: rows carry label/au_boxes)", lambda c: False),
    "optim": ("both", "(fixed: adamw_torch)", lambda c: "adamw_torch"),
    "dataloader_pin_memory": ("both", "(fixed: on with CUDA)", _cuda),
    # SFT
    "max_length": ("sft", "sft.max_length", lambda c: c.sft.max_length),
    "completion_only_loss": ("sft", "sft.completion_only_loss", lambda c: c.sft.completion_only_loss),
    "dataset_kwargs": ("sft", "(fixed: rows are prepared by tagfer)", lambda c: {"skip_prepare_dataset": True}),
    "eval_strategy": ("sft", "sft.eval_steps (tagfer's own validation)", lambda c: "no"),
    # GRPO
    "num_generations": ("grpo", "grpo.num_generations", lambda c: c.grpo.num_generations),
    "beta": ("grpo", "grpo.beta", lambda c: c.grpo.beta),
    "epsilon": ("grpo", "grpo.epsilon", lambda c: c.grpo.epsilon),
    "loss_type": ("grpo", "grpo.loss_type", lambda c: c.grpo.loss_type),
    "scale_rewards": ("grpo", "grpo.scale_rewards", lambda c: c.grpo.scale_rewards),
    "max_completion_length": ("grpo", "grpo.max_completion_length", lambda c: c.grpo.max_completion_length),
    "temperature": ("grpo", "grpo.temperature", lambda c: c.grpo.temperature),
    "top_p": ("grpo", "grpo.top_p", lambda c: c.grpo.top_p),
    "use_vllm": ("grpo", "grpo.use_vllm", use_vllm_now),
    "vllm_mode": ("grpo", "grpo.vllm_mode", lambda c: c.grpo.vllm_mode),
    "vllm_gpu_memory_utilization": ("grpo", "grpo.vllm_gpu_memory_utilization",
                                    lambda c: c.grpo.vllm_gpu_memory_utilization),
    "generation_batch_size": ("grpo", "grpo.generation_batch_size", lambda c: c.grpo.generation_batch_size),
    "log_completions": ("grpo", "grpo.log_completions", lambda c: c.grpo.log_completions),
    "reward_weights": ("grpo", "reward.w_au / w_ans / w_fmt", lambda c: None),  # set by build_grpo_trainer
}


def _trl_class(stage: str):
    if stage == "sft":
        from trl import SFTConfig  # lazy (start-up time): trl

        return SFTConfig
    if stage == "grpo":
        from trl import GRPOConfig  # lazy (start-up time): trl

        return GRPOConfig
    raise ValueError(f"stage must be sft or grpo, got {stage!r}")


def trl_kwargs(cfg: TrainConfig, stage: str | None = None, **extra: Any) -> dict[str, Any]:
    """Keyword arguments for TRL's config of ``stage`` (default ``cfg.stage``): the :data:`DERIVED`
    values, then ``cfg.trl`` passed through, then ``extra`` (tagfer's own runtime values).

    Raises :class:`ConfigError` for a ``trl.*`` key TRL does not know or tagfer derives.
    """
    stage = stage or cfg.stage
    cls = _trl_class(stage)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    out = {name: get(cfg) for name, (where, _, get) in DERIVED.items() if where in ("both", stage)}
    for key, value in cfg.trl.items():
        if key in DERIVED and DERIVED[key][0] in ("both", stage):
            raise ConfigError(f"trl.{key}", f"is set by tagfer from {DERIVED[key][1]}; set that instead")
        if key not in known:
            near = difflib.get_close_matches(key, sorted(known), n=3)
            hint = f" (did you mean {', '.join(near)}?)" if near else ""
            raise ConfigError(f"trl.{key}", f"not an argument of TRL's {cls.__name__}{hint}")
        out[key] = value
    out.update(extra)
    missing = sorted(set(out) - known)
    if missing:  # pragma: no cover - a TRL upgrade renamed one of DERIVED's arguments
        raise ConfigError("", f"TRL's {cls.__name__} has no argument(s) {missing}; tagfer's DERIVED table needs updating")
    return out


def trl_config(cfg: TrainConfig, stage: str | None = None, **extra: Any):
    """TRL's ``SFTConfig`` / ``GRPOConfig`` for ``cfg`` (see :func:`trl_kwargs`)."""
    stage = stage or cfg.stage
    return _trl_class(stage)(**trl_kwargs(cfg, stage, **extra))
