"""Stage 1: supervised fine-tuning on AU-grounded traces (TRL ``SFTTrainer`` + PEFT LoRA).

The config is TRL's ``SFTConfig`` (:class:`~tagfer.train.config.TagferSFTConfig`), passed to ``SFTTrainer``
as is. Paper recipe (§5.1, App. C.1; the config's defaults and preset ``sft_tag310k``): LoRA r 128 / alpha 256 / dropout 0.05
on the language model's attention + MLP projections, vision encoder frozen, projector
trained, AdamW 2e-5 cosine, weight decay 0.01, warm-up 3 %, grad clip 1.0, max length 2048,
bf16, completion-only loss (the prompt and image tokens carry no loss).

Outputs in ``output_dir``: ``config.yaml`` (the resolved config), ``checkpoint-N/`` (trainer
checkpoints; a rerun resumes from the last one when ``resume``), ``best/`` (adapter +
processor chosen by validation, see :class:`~tagfer.train.callbacks.ValidationCallback`),
``final/`` (the adapter after the last step), ``train_log.jsonl``, ``result.json``, ``README.md`` (the
model card, written with each checkpoint: :mod:`tagfer.train.card`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
import json
from pathlib import Path
from typing import Any, Sequence

from tagfer.models.prompts import tag_prompt
from tagfer.train.config import TagferSFTConfig, TrainConfig, deepspeed_config_path, dump_config
from tagfer.train.data import RowMaker, load_train_val
from tagfer.train.model import apply_lora, keep_fp32_masters, load_for_training, trainable_summary
from tagfer.train.model import save_processor

__all__ = ["SFTResult", "RunSetup", "prepare_run", "run_sft", "save_adapter", "last_checkpoint", "deepspeed_config_path"]


@dataclass
class SFTResult:
    output_dir: Path
    final_dir: Path
    best_dir: Path | None
    best: dict[str, Any] | None
    log_path: Path
    train_loss: list[float] = field(default_factory=list)
    trainable: dict[str, int] = field(default_factory=dict)


def quiet_console(trainer, cfg: TrainConfig) -> None:
    """Without progress bars, drop the trainer's print-every-log callback (the JSONL log has it all)."""
    if cfg.disable_tqdm:
        from transformers.trainer_callback import PrinterCallback  # lazy (start-up time): torch, transformers

        trainer.remove_callback(PrinterCallback)


def last_checkpoint(output_dir: str | Path) -> str | None:
    """The newest ``checkpoint-N`` folder in ``output_dir`` (``None`` when there is none)."""
    from transformers.trainer_utils import get_last_checkpoint  # lazy (start-up time): torch, transformers

    p = Path(output_dir)
    return get_last_checkpoint(str(p)) if p.is_dir() else None


def save_adapter(model, processor, out_dir: str | Path) -> Path:
    """Save the adapter (or full model) and the processor so :func:`tagfer.models.vlm.load_vlm` loads the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    save_processor(processor, out)
    return out


@dataclass
class RunSetup:
    """What both stages start from: output folder, LoRA-wrapped model, processor, prompts, data."""

    out: Path
    model: Any
    processor: Any
    base: str
    trainable: dict[str, int]
    system: str
    user: str
    train_raw: Any
    val_raw: Any
    train_ds: Any


def prepare_run(cfg: TrainConfig, stage: str) -> RunSetup:
    """The common start of SFT and GRPO (the config was validated when it was made): check the stage,
    write ``config.yaml``, seed, load the model with LoRA, read the data and attach the row transform."""
    from transformers import set_seed  # lazy (start-up time): transformers, PIL

    if cfg.stage != stage:
        raise ValueError(f"run_{stage} needs a Tagfer{stage.upper()}Config (got a {cfg.stage} config)")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    set_seed(cfg.seed)
    model, processor, base = load_for_training(cfg)
    model = apply_lora(model, cfg)
    keep_fp32_masters(model)  # projector / modules_to_save: fp32 master weights in a bf16 model
    system, user = tag_prompt(cfg.system_prompt, cfg.user_prompt)
    train_raw, val_raw = load_train_val(cfg)
    train_ds = train_raw.with_transform(RowMaker(stage, system, user, cfg.image_side))
    return RunSetup(out, model, processor, base, trainable_summary(model), system, user, train_raw, val_raw, train_ds)


def run_sft(cfg: TagferSFTConfig, callbacks: Sequence[Any] = ()) -> SFTResult:
    """Run SFT as configured (``cfg`` is TRL's ``SFTConfig`` itself); returns where the adapters and the log are."""
    # lazy (start-up time): torch, transformers, trl
    from tagfer.train.callbacks import JsonlLogCallback, ValidationCallback, write_json
    from tagfer.train.trainers import TagferSFTTrainer

    run = prepare_run(cfg, "sft")
    out, model, processor, base, summary = run.out, run.model, run.processor, run.base, run.trainable
    system, user, val_raw, train_ds = run.system, run.user, run.val_raw, run.train_ds

    logger = JsonlLogCallback(out / cfg.log_jsonl, "sft")
    cbs: list[Any] = [logger]
    best_dir = out / "best"

    holder: dict[str, Any] = {}

    def save_best(metrics: dict[str, Any], main_process: bool = True) -> None:
        holder["trainer"].save_model(str(best_dir))  # adapter + processor; gathers ZeRO-3 shards
        if main_process:
            write_json(best_dir / "best.json", metrics)

    validator = None
    if val_raw is not None and cfg.val_samples > 0:
        validator = ValidationCallback(val_raw, processor, cfg, system, user, logger, save_best)
        prev = best_dir / "best.json"
        if cfg.resume and last_checkpoint(out) and prev.is_file():  # a resumed run must beat the earlier best
            known = json.loads(prev.read_text())
            if isinstance(known.get("score"), (int, float)):
                validator.best = known
        cbs.append(validator)
    cbs.extend(callbacks)
    trainer = TagferSFTTrainer(model=model, args=cfg, train_dataset=train_ds, processing_class=processor, callbacks=cbs)
    holder["trainer"] = trainer
    quiet_console(trainer, cfg)
    resume = cfg.resume_from_checkpoint or (last_checkpoint(out) if cfg.resume else None)
    trainer.train(resume_from_checkpoint=resume)
    final = out / "final"
    trainer.save_model(str(final))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    best = validator.best if validator else None
    if validator is None:  # no validation data: the final adapter is the best we know
        trainer.save_model(str(best_dir))
        if trainer.is_world_process_zero():
            write_json(best_dir / "best.json", {"step": trainer.state.global_step, "note": "no validation data"})
    result = SFTResult(out, final, best_dir, best, out / cfg.log_jsonl, losses, summary)
    if trainer.is_world_process_zero():
        write_json(out / "result.json", {"final_dir": str(final), "best_dir": str(best_dir), "best": best,
                                     "base_model": base, "trainable": summary, "steps": trainer.state.global_step})
    return result
