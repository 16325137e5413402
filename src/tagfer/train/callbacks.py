"""Training callbacks: the per-step JSONL log and SFT validation with best-checkpoint selection.

JSONL log (``<output_dir>/train_log.jsonl``), one object per logging step::

    {"event": "train", "stage": "grpo", "step": 12, "epoch": 0.4, "time": 31.2,
     "loss": ..., "learning_rate": ..., "grad_norm": ...,
     "reward": 1.7, "r_au": 0.41, "r_ans": 0.75, "r_fmt": 0.5, "accuracy": 0.75, "au_iou": 0.41,
     "au_scored": 0.8, "kl": 0.002, "completion_length": 212.0, ...every raw trainer key...}

``r_au`` / ``au_iou`` are means over the completions whose sample has AU boxes (skipped ones
are excluded, not counted as 0); ``au_scored`` is the share that had them. SFT validation adds
``{"event": "validation", "step", "accuracy", "au_iou", "fmt_rate", "score", "n", "best"}``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from PIL import Image
from transformers import TrainerCallback

from tagfer.core.jsonl import JsonlWriter
from tagfer.models.vlm import VLM, VLMConfig
from tagfer.traces.rewards import reward_breakdown

__all__ = ["JsonlLogCallback", "ValidationCallback", "derived_metrics", "validate_model"]

# trainer key → our name (TRL GRPO logs rewards/<func name>/mean).
_ALIASES = {
    "reward": "reward",
    "rewards/r_au/mean": "r_au",
    "rewards/r_au_f1/mean": "r_au_f1",
    "rewards/r_ans/mean": "r_ans",
    "rewards/r_fmt/mean": "r_fmt",
    "kl": "kl",
    "completions/mean_length": "completion_length",
    "au/scored": "au_scored",
    "au/iou": "au_iou",
}


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def derived_metrics(logs: dict[str, Any]) -> dict[str, Any]:
    """Our names for TRL's keys, plus ``accuracy`` (= mean R_ans) and ``au_iou`` (= mean IoU-form R_AU)."""
    out: dict[str, Any] = {}
    for k, name in _ALIASES.items():
        if k in logs:
            out[name] = _clean(logs[k])
    if "r_ans" in out:
        out["accuracy"] = out["r_ans"]
    if "au_iou" not in out and "r_au" in out:
        out["au_iou"] = out["r_au"]
    return out


class JsonlLogCallback(TrainerCallback):
    """Append every trainer log (plus :func:`derived_metrics`) to a JSONL file (main process only)."""

    def __init__(self, path: str | Path, stage: str):
        self.path = Path(path)
        self.stage = stage
        self.t0 = time.time()
        self._writer: JsonlWriter | None = None

    def write(self, record: dict[str, Any]) -> None:
        if self._writer is None:
            self._writer = JsonlWriter(self.path)
        self._writer.write({k: _clean(v) for k, v in record.items()})

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        rec = {"event": "train", "stage": self.stage, "step": state.global_step, "epoch": state.epoch,
               "time": round(time.time() - self.t0, 3)}
        rec.update({k: v for k, v in logs.items() if isinstance(v, (int, float, str, bool)) or v is None})
        rec.update(derived_metrics(logs))
        self.write(rec)

    def on_train_end(self, args, state, control, **kwargs):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def validate_model(model, processor, samples, cfg, system: str, user: str) -> dict[str, Any]:
    """Greedy-decode ``samples`` (flat records, in batches of ``val_batch_size``, from merged LoRA
    weights) and score them with the reward module's parser.

    accuracy = mean ``R_ans``; au_iou = mean IoU-form ``R_AU`` over samples with AU boxes
    (``None`` when none has any); fmt_rate = share of well-formed outputs.
    """
    from tagfer.core.imageio import load_image  # lazy (start-up time): PIL

    reward_cfg = cfg.reward.replace(au_reward="iou")
    vlm = VLM(model, processor, VLMConfig(model=str(cfg.model_name_or_path), image_side=cfg.image_side))
    images = [Image.fromarray(load_image(s["image_bytes"] or s["image"]).rgb) for s in samples]
    from tagfer.train.rollout import merged_lora  # lazy (start-up time): transformers, trl

    was_training = model.training
    model.eval()
    try:  # batched greedy decoding from merged LoRA weights, KV cache on (restored exactly afterwards)
        with merged_lora(model):
            texts = vlm.generate(images, [user] * len(images), system=system, max_new_tokens=cfg.val_max_new_tokens,
                                 temperature=0.0, batch_size=cfg.val_batch_size)
    finally:
        if was_training:
            model.train()
    acc, ious, fmt = [], [], []
    for s, text in zip(samples, texts):
        b = reward_breakdown(text, s["label"], s["au_boxes"], reward_cfg)
        acc.append(b.r_ans)
        fmt.append(1.0 if b.r_fmt > 0 else 0.0)
        if b.r_au is not None:
            ious.append(b.r_au)
    n = len(samples)
    return {
        "n": n,
        "accuracy": sum(acc) / n if n else 0.0,
        "au_iou": sum(ious) / len(ious) if ious else None,
        "fmt_rate": sum(fmt) / n if n else 0.0,
        "examples": texts[:2],
    }


class ValidationCallback(TrainerCallback):
    """Every ``val_steps`` steps (and at the end): validate, log, keep the best adapter.

    Selection score = ``w * accuracy + (1 - w) * au_iou`` with ``w = select_acc_weight``
    (au_iou counts as 0 when no validation sample has AU boxes). The best model is saved to
    ``<output_dir>/best`` (adapter + processor) with ``best.json``; a tie goes to the later
    step (more training at equal validation quality).
    """

    def __init__(self, val_raw, processor, cfg, system: str, user: str, logger: JsonlLogCallback, save_fn):
        n = min(len(val_raw), cfg.val_samples)
        self.samples = [val_raw[i] for i in range(n)]
        self.processor, self.cfg, self.system, self.user = processor, cfg, system, user
        self.logger, self.save_fn = logger, save_fn
        self.best: dict[str, Any] | None = None
        self.last_step = -1
        self.history: list[dict[str, Any]] = []

    def score(self, m: dict[str, Any]) -> float:
        w = self.cfg.select_acc_weight
        return w * m["accuracy"] + (1 - w) * (m["au_iou"] or 0.0)

    def run(self, model, state) -> dict[str, Any]:
        m = validate_model(model, self.processor, self.samples, self.cfg, self.system, self.user)
        m["score"] = self.score(m)
        m["step"] = state.global_step
        is_best = self.best is None or m["score"] >= self.best["score"]
        m["best"] = is_best
        self.last_step = state.global_step
        self.history.append(m)
        if state.is_world_process_zero:
            self.logger.write({"event": "validation", "stage": "sft", **{k: v for k, v in m.items() if k != "examples"},
                               "example": (m["examples"] or [""])[0][:500]})
        if is_best:  # every rank: saving may need all ranks (DeepSpeed ZeRO-3 gathers the weights)
            self.best = {k: v for k, v in m.items() if k not in ("examples", "best")}
            self.save_fn(self.best, state.is_world_process_zero)
        return m

    def on_step_end(self, args, state, control, model=None, **kwargs):
        every = self.cfg.val_steps
        if self.samples and every > 0 and state.global_step % every == 0:
            self.run(model, state)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.samples and self.last_step != state.global_step:
            self.run(model, state)


def write_json(path: str | Path, obj: Any) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2), encoding="utf-8")
    tmp.replace(p)
