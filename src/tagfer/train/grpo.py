"""Stage 2: GRPO with TAG's verifiable reward (TRL ``GRPOTrainer``).

Reward (paper §3.3, Eq. 5): ``R = w_au·R_AU + w_ans·R_ans + w_fmt·R_fmt``, given to TRL as
three reward functions (:func:`tagfer.integrations.trl.make_reward_funcs`) with
``reward_weights``, so each component is logged (``rewards/r_au/mean`` …) and the weighted
sum is TRL's reward. Samples without AU boxes get ``R_AU = None``: TRL turns it into NaN,
sums with ``nansum`` (the sample's reward is ``R_ans + R_fmt``) and the logged ``r_au`` is
the mean over the scored samples only — no AU gradient, not a zero (see the tests).

Paper settings (:class:`~tagfer.train.config.TagferGRPOConfig`'s defaults; presets ``grpo_rafdb`` and
siblings): K = 8 rollouts, β = 0.04, ε = 0.2, ``loss_type="grpo"`` (TRL's defaults differ), AdamW 1e-6,
weight decay 0.01, grad clip 1.0, 2 epochs, LoRA, vision frozen, one run per dataset (``sources``).
The config *is* TRL's ``GRPOConfig`` and goes to ``GRPOTrainer`` as is.

Three readings of the paper are switchable (docs/train.md): ``adapter_mode`` — ``merge`` (default:
the SFT adapter is folded into the base, a new LoRA is trained, the merged SFT model is the KL
reference) or ``continue`` (the SFT adapter itself keeps training; TRL keeps a frozen copy of it,
``"ref"``, as the KL reference); ``importance_sampling_level`` — TRL's ``token`` (default) or
``sequence`` ratio of Eq. 2; ``au_f1_reference`` — what the F1 variant of R_AU scores against.

Rollouts: ``use_vllm`` (``auto`` in the GPU presets) uses TRL's vLLM generation when vLLM is
installed; otherwise TRL's transformers generation runs on LoRA weights merged into the base for
the rollout and restored exactly afterwards (:mod:`tagfer.train.rollout`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from tagfer.integrations.trl import TAGReward, make_reward_funcs, reward_weights
from tagfer.train.config import TagferGRPOConfig, with_overrides
from tagfer.train.sft import last_checkpoint, prepare_run, quiet_console

__all__ = ["LoggedTAGReward", "GRPOResult", "run_grpo", "tag_reward_funcs", "build_grpo_trainer"]


class LoggedTAGReward(TAGReward):
    """:class:`TAGReward` that also logs, for ``R_AU``, the share of completions it scored (``au/scored``)."""

    def __call__(self, prompts=None, completions=None, completion_ids=None, **kwargs):
        out = super().__call__(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
        log_metric = kwargs.get("log_metric")
        if self.component == "r_au" and callable(log_metric) and out:
            log_metric("au/scored", sum(v is not None for v in out) / len(out))
        return out


def tag_reward_funcs(cfg: TagferGRPOConfig) -> tuple[list[Callable], list[float]]:
    """``(reward_funcs, reward_weights)`` for the config's reward fields (R_AU, R_ans, R_fmt)."""
    funcs = [LoggedTAGReward(f.component, f.cfg, f.__name__, f.f1_reference)
             for f in make_reward_funcs(cfg.reward, cfg.au_f1_reference)]
    return funcs, reward_weights(cfg.reward)


@dataclass
class GRPOResult:
    output_dir: Path
    final_dir: Path
    log_path: Path
    log_history: list[dict[str, Any]] = field(default_factory=list)
    trainable: dict[str, int] = field(default_factory=dict)


def build_grpo_trainer(
    cfg: TagferGRPOConfig,
    reward_funcs: Sequence[Callable] | None = None,
    weights: Sequence[float] | None = None,
    callbacks: Sequence[Any] = (),
):
    """``(trainer, logger, info)`` — the configured ``GRPOTrainer`` before ``train()`` (also used by the benchmark)."""
    from tagfer.train.callbacks import JsonlLogCallback  # lazy (start-up time): torch, transformers
    from tagfer.train.trainers import TagferGRPOTrainer  # lazy (start-up time): torch, transformers, trl

    run = prepare_run(cfg, "grpo")
    out, model, processor, base, summary, train_ds = run.out, run.model, run.processor, run.base, run.trainable, run.train_ds
    if reward_funcs is None:
        reward_funcs, default_weights = tag_reward_funcs(cfg)
        weights = default_weights if weights is None else weights
    args = cfg if weights is None else with_overrides(cfg, reward_weights=[float(w) for w in weights])
    logger = JsonlLogCallback(out / cfg.log_jsonl, "grpo")
    trainer = TagferGRPOTrainer(
        model=model, reward_funcs=list(reward_funcs), args=args, train_dataset=train_ds, processing_class=processor,
        callbacks=[logger, *callbacks], merged_rollouts=cfg.merged_rollouts,
    )
    quiet_console(trainer, cfg)
    return trainer, logger, {"base_model": base, "trainable": summary, "processor": processor}


def run_grpo(
    cfg: TagferGRPOConfig,
    reward_funcs: Sequence[Callable] | None = None,
    weights: Sequence[float] | None = None,
    callbacks: Sequence[Any] = (),
) -> GRPOResult:
    """Run GRPO as configured (TAG rewards unless ``reward_funcs`` is given); returns the adapter folder and log."""
    from tagfer.train.callbacks import write_json  # lazy (start-up time): torch, transformers

    trainer, logger, info = build_grpo_trainer(cfg, reward_funcs, weights, callbacks)
    out = Path(cfg.output_dir)
    resume = cfg.resume_from_checkpoint or (last_checkpoint(out) if cfg.resume else None)
    trainer.train(resume_from_checkpoint=resume)
    final = out / "final"
    trainer.save_model(str(final))  # adapter + processor (gathers ZeRO-3 shards)
    if trainer.is_world_process_zero():
        write_json(out / "result.json", {"final_dir": str(final), "base_model": info["base_model"],
                                         "sft_adapter": cfg.adapter, "adapter_mode": cfg.adapter_mode,
                                         "importance_sampling_level": cfg.importance_sampling_level, "trainable": info["trainable"],
                                         "steps": trainer.state.global_step})
    return GRPOResult(out, final, out / cfg.log_jsonl, list(trainer.state.log_history), info["trainable"])
