"""Configs for users who train elsewhere: LLaMA-Factory (SFT) and verl (GRPO), from our presets.

* :func:`llamafactory_config` — a LLaMA-Factory ``llamafactory-cli train`` YAML for the SFT
  stage (the paper used LLaMA-Factory). Its ``dataset`` names an entry of the
  ``dataset_info.json`` that ``tagfer export … --format llamafactory`` writes
  (``<export>/llamafactory/``: ``tag_sft``, ``tag_sft_nobbox``, ``tag_sft_<source>``).
* :func:`verl_config` — a verl ``main_ppo`` config (GRPO advantage estimator, K rollouts,
  KL loss β, clip ε, LoRA) whose ``reward.custom_reward_function`` is
  ``pkg://tagfer.integrations.verl`` / ``compute_score`` (portable: any machine where tagfer
  is installed); the data are the exporter's ``<export>/verl/<source>.parquet`` files. Every
  key exists in verl 0.9.1's ``ppo_trainer`` schema, so the YAML merges into verl's defaults
  (tested against a pinned copy of its keys). Reward settings that differ from the defaults
  (``grpo_f1``, ``grpo_rlvr``) are not schema keys: :func:`verl_reward_overrides` gives them
  as Hydra ``+reward.custom_reward_function.reward_kwargs.*`` overrides, which
  :func:`verl_command` appends to the launch line.

Both take the same :class:`~tagfer.train.config.TrainConfig`, so a preset is the single
source of the hyperparameters, and both carry the image policy
(:class:`tagfer.models.vlm.ImagePolicy`) the exports were written with. What depends on the
model family comes from its :class:`~tagfer.models.families.Family` entry (:func:`model_family`):
LLaMA-Factory's ``template``, the projector modules of ``additional_target`` and verl's
``exclude_modules`` (vision tower and projector kept out of LoRA). Checked against
LLaMA-Factory 0.9.5 and verl 0.9.1.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import yaml

from tagfer.models.families import Family, family_for
from tagfer.traces.rewards import RewardConfig
from tagfer.train.config import TrainConfig
from tagfer.train.sft import deepspeed_config_path

__all__ = ["llamafactory_config", "verl_config", "verl_command", "verl_reward_overrides", "default_export_names",
           "write_yaml", "write_verl_files", "model_family", "VERL_REWARD_PATH"]

#: verl's ``pkg://`` module path for TAG's reward (works wherever tagfer is importable).
VERL_REWARD_PATH = "pkg://tagfer.integrations.verl"


def model_family(cfg: TrainConfig) -> Family:
    """The family of ``cfg.model`` (``model.family``, else the local ``config.json``, else the hub id's name)."""
    return family_for(cfg.model.name_or_path, cfg.model.family)


def _model_config(cfg: TrainConfig) -> dict[str, Any] | None:
    p = Path(cfg.model.name_or_path) / "config.json"
    return json.loads(p.read_text()) if p.is_file() else None


def _bf16(cfg: TrainConfig) -> bool:
    return cfg.optim.bf16 != "false"


def default_export_names(cfg: TrainConfig, export_dir: str = "tag_export") -> dict[str, str]:
    """Names/paths of the data exporter's files matching ``cfg`` (``llamafactory_dataset``,
    ``llamafactory_dir``, ``verl_train``)."""
    sources = list(cfg.data.sources)
    name = "tag_sft_nobbox" if cfg.data.no_bbox else (f"tag_sft_{sources[0]}" if len(sources) == 1 else "tag_sft")
    verl = f"{export_dir}/verl/{sources[0]}.parquet" if len(sources) == 1 else f"{export_dir}/verl/train.parquet"
    return {"llamafactory_dataset": name, "llamafactory_dir": f"{export_dir}/llamafactory", "verl_train": verl}


def llamafactory_config(cfg: TrainConfig, dataset: str = "tag_sft", dataset_dir: str = "data/tag",
                        deepspeed: str | None = None) -> dict[str, Any]:
    """LLaMA-Factory SFT YAML (as a dict) equivalent to ``cfg`` (LoRA on the LM, vision frozen, projector trained).

    ``ValueError`` for a family LLaMA-Factory has no template for (its ``llamafactory_template`` is empty)."""
    from tagfer.models.vlm import ImagePolicy  # lazy (start-up time): PIL

    fam = model_family(cfg)
    if not fam.llamafactory_template:
        raise ValueError(f"LLaMA-Factory has no template for the {fam.name} family; train it with tagfer train sft")
    o, lo, s = cfg.optim, cfg.lora, cfg.sft
    min_px, max_px = ImagePolicy.of(cfg.model).bounds
    out: dict[str, Any] = {
        "model_name_or_path": cfg.model.name_or_path,
        # the export holds images already resized by the policy: these bounds leave them as they are
        "image_min_pixels": min_px,
        "image_max_pixels": max_px,
        "trust_remote_code": True,
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora" if lo.enabled else "full",
        "freeze_vision_tower": True,
        "freeze_multi_modal_projector": not lo.train_projector,
        "freeze_language_model": False,
        "dataset": dataset,
        "dataset_dir": dataset_dir,
        "template": fam.llamafactory_template,
        "cutoff_len": s.max_length,
        "overwrite_cache": True,
        "preprocessing_num_workers": 16,
        "output_dir": str(Path(cfg.output_dir) / "llamafactory"),
        "logging_steps": cfg.log.logging_steps,
        "save_steps": o.save_steps,
        "plot_loss": True,
        "per_device_train_batch_size": o.batch_size,
        "gradient_accumulation_steps": o.grad_accum,
        "learning_rate": o.learning_rate,
        "num_train_epochs": o.epochs,
        "lr_scheduler_type": o.lr_scheduler,
        "warmup_ratio": o.warmup_ratio,
        "weight_decay": o.weight_decay,
        "max_grad_norm": o.max_grad_norm,
        "bf16": _bf16(cfg),
        "ddp_timeout": 180000000,
        "seed": o.seed,
    }
    if lo.enabled:
        # LLaMA-Factory's "all" = every linear layer of the language model (the vision tower is frozen above).
        out.update({"lora_rank": lo.r, "lora_alpha": lo.alpha, "lora_dropout": lo.dropout, "lora_target": "all"})
        if lo.train_projector:  # with LoRA, LLaMA-Factory trains the projector only as an additional target
            out["additional_target"] = ",".join(fam.projector_names(_model_config(cfg)))
    if deepspeed or o.deepspeed:
        out["deepspeed"] = deepspeed_config_path(deepspeed or o.deepspeed)
    return out


def verl_config(cfg: TrainConfig, train_files: str = "data/tag/verl/train.parquet",
                val_files: str | None = None, n_gpus: int = 4, nnodes: int = 1) -> dict[str, Any]:
    """verl GRPO config (nested dict, Hydra keys) equivalent to ``cfg``, with TAG's reward."""
    o, g, lo = cfg.optim, cfg.grpo, cfg.lora
    prompts_per_step = max(1, (o.batch_size * o.grad_accum * n_gpus * nnodes) // g.num_generations)
    model_path = cfg.model.name_or_path
    if cfg.model.adapter:
        model_path = str(Path(cfg.model.adapter).parent / "merged")  # merge the SFT adapter first
    return {
        "algorithm": {"adv_estimator": "grpo", "use_kl_in_reward": False, "norm_adv_by_std_in_grpo": g.scale_rewards != "none"},
        "data": {
            "train_files": train_files,
            "val_files": val_files or train_files,
            "train_batch_size": prompts_per_step,
            "max_prompt_length": 1024,
            "max_response_length": g.max_completion_length,
            "image_key": "images",
            "filter_overlong_prompts": True,
            "truncation": "error",
            # image policy: the parquet's images are pre-resized and carry {min,max}_pixels per image
            # (data.mm_processor_kwargs is an empty struct node in verl's schema: no new keys allowed there)
        },
        "actor_rollout_ref": {
            "model": {
                "path": model_path,
                "lora_rank": lo.r if lo.enabled else 0,
                "lora_alpha": lo.alpha,
                "target_modules": "all-linear",
                "exclude_modules": model_family(cfg).vision_exclude_regex(),
                "enable_gradient_checkpointing": o.gradient_checkpointing,
                "use_remove_padding": True,
            },
            "actor": {
                "optim": {"lr": o.learning_rate, "weight_decay": o.weight_decay,
                          "lr_warmup_steps_ratio": o.warmup_ratio},
                "grad_clip": o.max_grad_norm,
                "clip_ratio": g.epsilon,
                "ppo_mini_batch_size": prompts_per_step,
                "ppo_micro_batch_size_per_gpu": max(1, o.batch_size // 2),
                "use_kl_loss": g.beta > 0,
                "kl_loss_coef": g.beta,
                "kl_loss_type": "low_var_kl",
                "loss_agg_mode": "seq-mean-token-mean" if g.loss_type == "grpo" else "token-mean",
                "entropy_coeff": 0,
                "fsdp_config": {"param_offload": False, "optimizer_offload": False},
            },
            "rollout": {
                "name": "vllm",
                "n": g.num_generations,
                "temperature": g.temperature,
                "top_p": g.top_p,
                "gpu_memory_utilization": 0.6,
                "tensor_model_parallel_size": 1,
                "enable_chunked_prefill": False,
                "enforce_eager": False,
                "free_cache_engine": True,
                "load_format": "safetensors",
                "log_prob_micro_batch_size_per_gpu": 8,
            },
            "ref": {"log_prob_micro_batch_size_per_gpu": 8, "fsdp_config": {"param_offload": True}},
        },
        "reward": {"custom_reward_function": {"path": VERL_REWARD_PATH, "name": "compute_score"}},
        "trainer": {
            "total_epochs": int(o.epochs) if o.epochs == int(o.epochs) else o.epochs,
            "n_gpus_per_node": n_gpus,
            "nnodes": nnodes,
            "project_name": "tagfer",
            "experiment_name": Path(cfg.output_dir).name,
            "default_local_dir": str(Path(cfg.output_dir) / "verl"),
            "save_freq": o.save_steps,
            "test_freq": -1,
            "logger": ["console"],
        },
    }


def verl_reward_overrides(cfg: TrainConfig) -> list[str]:
    """Hydra ``+key=value`` overrides for the :class:`~tagfer.traces.rewards.RewardConfig` fields where ``cfg``
    differs from the defaults (verl passes ``reward_kwargs`` to ``compute_score``)."""
    default = RewardConfig()
    out = []
    for f in dataclasses.fields(RewardConfig):
        v = getattr(cfg.reward, f.name)
        if v != getattr(default, f.name):
            out.append(f"+reward.custom_reward_function.reward_kwargs.{f.name}={_hydra_value(v)}")
    return out


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.extend(_flatten(v, key + "."))
        else:
            out.append((key, v))
    return out


def _hydra_value(v: Any) -> str:
    if isinstance(v, bool):
        return "True" if v else "False"
    if isinstance(v, list):
        return "[" + ",".join(f"'{x}'" if isinstance(x, str) else str(x) for x in v) + "]"
    if v is None:
        return "null"
    return str(v)


def verl_command(config: dict[str, Any], reward_overrides: Sequence[str] = ()) -> str:
    """``python3 -m verl.trainer.main_ppo key=value ...`` for a :func:`verl_config` dict, plus
    :func:`verl_reward_overrides` (new keys in verl's schema: Hydra's ``+`` prefix)."""
    parts = ["python3 -m verl.trainer.main_ppo"]
    for k, v in _flatten(config):
        parts.append(f"  {k}={_hydra_value(v)}")
    parts.extend(f"  {o}" for o in reward_overrides)
    return " \\\n".join(parts)


def write_yaml(obj: dict[str, Any], path: str | Path, header: str = "") -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(obj, sort_keys=False)
    p.write_text((header + "\n" if header else "") + text, encoding="utf-8")
    return p



def write_verl_files(cfg: TrainConfig, out: str | Path, train_files: str, val_files: str | None = None, n_gpus: int = 4,
                     nnodes: int = 1, name: str = "") -> tuple[Path, Path]:
    """Write ``out`` (the verl YAML, schema keys only) and ``out.sh`` (the launch line with the reward overrides)."""
    conf = verl_config(cfg, train_files, val_files, n_gpus, nnodes)
    extra = verl_reward_overrides(cfg)
    header = f"# verl GRPO config from tagfer preset {name}".rstrip()
    if extra:
        header += "\n# reward settings beyond verl's schema are in the .sh launcher: " + " ".join(extra)
    p = write_yaml(conf, out, header)
    sh = Path(out).with_suffix(".sh")
    sh.write_text("#!/usr/bin/env bash\nset -euo pipefail\n" + verl_command(conf, extra) + "\n", encoding="utf-8")
    sh.chmod(0o755)
    return p, sh
