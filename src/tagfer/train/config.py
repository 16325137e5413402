"""Training configuration the TRL way: TRL's ``SFTConfig`` / ``GRPOConfig``, plus TAG's fields.

:class:`TagferSFTConfig` and :class:`TagferGRPOConfig` *are* TRL's configs (subclasses): every
TRL / ``TrainingArguments`` field keeps its name and meaning, and TAG adds only what TRL has
no field for — the model to load and its LoRA, the data, TAG's validation and reward — each
with ``metadata={"help": ...}`` (``tagfer train fields sft|grpo`` lists them all). Where the paper
gives a number and TRL's default differs, the paper's number is the default (App. C.1: β 0.04,
``loss_type="grpo"``, weight decay 0.01, LoRA r 128 / α 256 / dropout 0.05, 3 SFT / 2 GRPO
epochs, cosine SFT schedule with 3 % warm-up, SFT max length 2048).

Files are parsed by TRL's own parser (:class:`~trl.TrlParser`): YAML keys are defaults, command-line
flags win (``--learning_rate 1e-5``), unknown keys are errors. On top of TRL's parser tagfer adds
packaged presets (``--config tiny_cpu``), ``extends:`` and a check of every YAML value against the
field's type and choices (argparse checks only command-line strings). ``__post_init__`` raises
:class:`ConfigError` naming the field and saying how to fix it.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml
from transformers.trainer_utils import SchedulerType
from trl import GRPOConfig, SFTConfig

from tagfer.models.families import UnknownFamily, get_family
from tagfer.traces.rewards import RewardConfig
from tagfer.train.model import LM_PROJECTIONS
from tagfer.train.parser import TagParser
from tagfer.train.presets import STAGES, ConfigError, load_raw

__all__ = [
    "ConfigError",
    "TagArguments",
    "TagferSFTConfig",
    "TagferGRPOConfig",
    "TrainConfig",
    "CONFIG_CLASSES",
    "TagParser",
    "load_config",
    "parse_config",
    "dump_config",
    "config_dict",
    "deepspeed_config_path",
    "use_vllm_now",
]



def _f(default: Any = dataclasses.MISSING, help: str = "", factory: Any = dataclasses.MISSING, **meta: Any):
    """A dataclass field with its help text (the ``--help`` of ``tagfer train``)."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


def deepspeed_config_path(value: str | None) -> str | None:
    """``zero2`` / ``zero3`` → the packaged DeepSpeed JSON (``tagfer/train/deepspeed/``); paths pass through."""
    if value in ("zero2", "zero3"):
        return str(Path(__file__).parent / "deepspeed" / f"{value}.json")
    return value


def use_vllm_now(want: bool | str, warn: bool = True) -> bool:
    """Whether GRPO rollouts go through vLLM: ``true`` / ``false``, or ``auto`` = when vLLM imports and
    a GPU is present. ``true`` without vLLM raises; ``auto`` without it warns and falls back to
    transformers generation from merged LoRA weights (:mod:`tagfer.train.rollout`)."""
    want = {"true": True, "false": False}.get(want, want) if isinstance(want, str) else want
    if want is False:
        return False
    try:
        import vllm  # noqa: F401

        have = True
    except ImportError:
        have = False
    if want is True:
        if not have:
            raise ConfigError("use_vllm", "is true but vLLM is not installed (pip install vllm, on a CUDA machine); "
                                          "set use_vllm=auto to fall back to transformers rollouts, or false")
        return True
    import torch  # lazy (start-up time): torch

    if have and torch.cuda.is_available():
        return True
    if warn:
        why = "vLLM is not installed" if not have else "no CUDA device"
        warnings.warn(
            f"use_vllm=auto: {why}, so GRPO rollouts use transformers generate from merged LoRA weights "
            "(several times slower than vLLM at 7B; see docs/train.md, 'GPU budget')",
            RuntimeWarning, stacklevel=2,
        )
    return False


def _bf16_auto() -> bool:
    import torch  # lazy (start-up time): torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


# ---------------------------------------------------------------------------------------------
# TAG's fields (shared by both stages)


@dataclass
class TagArguments:
    """TAG's fields that TRL has no equivalent for, shared by SFT and GRPO.

    Also changes TRL defaults that tagfer needs (``bf16`` auto, ``remove_unused_columns`` false)
    or the paper sets (weight decay 0.01, batch 8 × 8 accumulation).
    """

    # --- the model
    model_name_or_path: str = _f("Qwen/Qwen2.5-VL-7B-Instruct", "Base model: hub id or local folder. `tiny` builds "
                                 "a tiny random model under <output_dir>/base_model (CPU smoke runs and tests only).")
    model_family: str = _f("auto", "Model family (tagfer.models.families: qwen2_5_vl, qwen3_vl, gemma3, "
                           "llava_onevision…): which modules are LoRA targets, vision tower, projector. auto: read "
                           "model_type from the checkpoint (with `tiny`: which tiny model to build, auto = Qwen2.5-VL).")
    adapter: str | None = _f(None, "A LoRA adapter folder to start from (GRPO: the SFT result, e.g. "
                             "runs/sft_tag310k/best). What happens to it: adapter_mode (GRPO).")
    dtype: str = _f("auto", "Weights dtype: auto | bfloat16 | float16 | float32.")
    attn_implementation: str | None = _f(None, "transformers attention implementation (eager, sdpa, "
                                         "flash_attention_2); default: the model's.")
    image_side: int = _f(224, "Images are resized so the longer side is this many pixels, aspect kept (paper: 224).")
    min_pixels: int | None = _f(None, "Processor lower bound on image pixels (default: the image policy's).")
    max_pixels: int | None = _f(None, "Processor upper bound on image pixels (default: the image policy's).")
    tiny_seed: int = _f(0, "Seed of the tiny random model (model_name_or_path=tiny).")
    # --- LoRA (TRL ModelConfig's names)
    use_peft: bool = _f(True, "Train LoRA adapters on the language model; false = full fine-tuning of the "
                        "language model (the vision encoder stays frozen either way).")
    lora_r: int = _f(128, "LoRA rank (paper: 128).")
    lora_alpha: int = _f(256, "LoRA alpha (paper: 256).")
    lora_dropout: float = _f(0.05, "LoRA dropout (paper: 0.05).")
    lora_target_modules: list[str] = _f(help="Projection names that get LoRA, matched only inside the language "
                                        "model's decoder layers (the vision MLP has gate/up/down_proj too).",
                                        factory=lambda: list(LM_PROJECTIONS))
    # --- data
    train_data: str = _f("", "Training data: a TAGSample JSONL, the exporter's HF export (folder or "
                         "JSONL/Parquet file) or builtin:tiny (generated smoke samples).")
    val_data: str | None = _f(None, "Validation data (same kinds as train_data); none: see val_size.")
    val_size: int = _f(0, "Without val_data: hold out this many training samples for validation.")
    sources: list[str] = _f(help="Keep only samples of these `source` values (per-dataset GRPO: rafdb, "
                            "ferplus, affectnet); empty = all.", factory=list)
    split: str = _f("", "Keep only rows of this split (empty = all).")
    max_samples: int | None = _f(None, "Use at most this many training samples.")
    no_bbox: bool = _f(False, "Strip <bbox> elements from the SFT targets (Table 3 ablation).")
    image_root: str | None = _f(None, "Base folder of relative image paths (default: the data file's folder).")
    system_prompt: str | None = _f(None, "System prompt file (default: the unified TAG prompt).")
    user_prompt: str | None = _f(None, "User prompt file (default: the unified TAG prompt).")
    # --- how traces are scored (GRPO reward; SFT validation)
    fmt_bonus: float = _f(0.5, "R_fmt of a well-formed response (the paper's 'small positive bonus').")
    au_matching: Literal["paper", "one_to_one"] = _f("paper", "R_AU matching: paper (Eq. 3-4: each box takes "
                                                     "its best AU box) or one_to_one (distinct AU boxes).")
    au_count: Literal["aus", "boxes"] = _f("aus", "n of Eq. 4: activated AUs (paper) or distinct AU boxes.")
    format_rules: Literal["paper", "strict"] = _f("paper", "R_fmt rules: the paper's three conditions or "
                                                  "every parser rule.")
    canvas: int = _f(512, "Side of the virtual box canvas (coordinates 0..canvas-1).")
    max_boxes: int = _f(3, "Most boxes in a well-formed response (paper: 3).")
    # --- run
    resume: bool = _f(True, "Continue from the newest checkpoint-N in output_dir when there is one.")
    log_jsonl: str = _f("train_log.jsonl", "Per-step JSON Lines log, inside output_dir.")

    # --- TRL defaults changed for TAG
    output_dir: str | None = _f("runs/tag", "Where checkpoints, adapters, config.yaml and the log go.")
    weight_decay: float = _f(0.01, "AdamW weight decay (paper: 0.01).")
    per_device_train_batch_size: int = _f(8, "Batch size per device (paper: 8).")
    gradient_accumulation_steps: int = _f(8, "Gradient accumulation steps (paper: 8).")
    bf16: bool | None = _f(None, "bf16 mixed precision; unset = on when the GPU supports it (TRL's unset means "
                           "on, which fails on a CPU).")
    activation_checkpointing: bool | None = _f(True, "Recompute activations in the backward pass (saves memory).")
    gradient_checkpointing: bool | None = _f(None, "Deprecated alias of activation_checkpointing.")
    save_total_limit: int | None = _f(3, "Keep at most this many checkpoint-N folders.")
    remove_unused_columns: bool | None = _f(False, "Must stay false: tagfer's rows carry label/au_boxes/aus "
                                            "for the reward and are built by tagfer.train.data.RowMaker.")

    # ------------------------------------------------------------------------------------------
    @property
    def stage(self) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def reward(self) -> RewardConfig:
        """The :class:`~tagfer.traces.rewards.RewardConfig` these fields describe."""
        return RewardConfig(fmt_bonus=self.fmt_bonus, matching=self.au_matching, au_count=self.au_count,
                            format_rules=self.format_rules, canvas=self.canvas, max_boxes=self.max_boxes)

    def _check_tag_fields(self) -> None:
        """Range checks of TAG's fields (and TRL fields TAG depends on); raises :class:`ConfigError`."""

        def num(name: str, lo: float = 0.0, strict: bool = True, integer: bool = False, hi: float | None = None,
                hi_open: bool = False) -> None:
            v = getattr(self, name)
            kind = int if integer else (int, float)
            if isinstance(v, bool) or not isinstance(v, kind) or not math.isfinite(v):
                raise ConfigError(name, f"expected {'an integer' if integer else 'a number'}, got {v!r}")
            if v < lo or (strict and v == lo) or (hi is not None and (v > hi or (hi_open and v == hi))):
                rng = f"{'>' if strict else '>='} {lo}" + (f" and {'<' if hi_open else '<='} {hi}" if hi is not None else "")
                raise ConfigError(name, f"must be {rng}, got {v!r}")

        if not self.train_data:
            raise ConfigError("train_data", "no training data given: --train_data FILE (a TAGSample JSONL, an HF "
                                            "export folder or builtin:tiny)")
        num("learning_rate")
        num("weight_decay", strict=False)
        num("max_grad_norm", strict=False)
        num("per_device_train_batch_size", integer=True)
        num("gradient_accumulation_steps", integer=True)
        num("warmup_steps", strict=False)
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ConfigError("num_train_epochs", "set num_train_epochs > 0 or max_steps > 0")
        num("image_side", integer=True)
        num("val_size", strict=False, integer=True)
        num("lora_r", integer=True)
        num("lora_alpha", strict=False)
        num("lora_dropout", strict=False, hi=1.0, hi_open=True)
        if self.use_peft and not self.lora_target_modules:
            raise ConfigError("lora_target_modules", "needs at least one projection name (e.g. q_proj v_proj)")
        if self.model_family != "auto":
            try:
                get_family(self.model_family)
            except UnknownFamily as e:
                raise ConfigError("model_family", str(e)) from None
        if not self.remove_unused_columns is False:
            raise ConfigError("remove_unused_columns", "must be false: the reward and the row transform read "
                                                       "columns the model does not take (label, au_boxes, aus)")
        try:
            self.reward  # noqa: B018 - RewardConfig validates itself
        except ValueError as e:
            raise ConfigError(_reward_field(str(e)), str(e)) from None

    def _resolve_tag_defaults(self) -> None:
        """Resolve tagfer's 'auto' values before TRL's ``__post_init__`` reads them."""
        if self.bf16 is None:
            self.bf16 = False if self.fp16 else _bf16_auto()
        if isinstance(self.deepspeed, str):
            self.deepspeed = deepspeed_config_path(self.deepspeed)
        rep = self.report_to
        names = [rep] if isinstance(rep, str) else list(rep or [])
        if "tensorboard" in names:
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                warnings.warn("report_to includes tensorboard but tensorboard is not installed; JSONL log only "
                              "(pip install tensorboard)", stacklevel=3)
                names = [n for n in names if n != "tensorboard"]
                self.report_to = names or "none"


_REWARD_FIELDS = {"matching": "au_matching", "au_reward": "au_reward", "au_count": "au_count",
                  "format_rules": "format_rules", "canvas": "canvas", "max_boxes": "max_boxes", "fmt_bonus": "fmt_bonus",
                  "w_au": "reward_weights", "w_ans": "reward_weights", "w_fmt": "reward_weights"}


def _reward_field(message: str) -> str:
    name = message.split(" ", 1)[0]
    return _REWARD_FIELDS.get(name, "")


# ---------------------------------------------------------------------------------------------
# the two trainers' configs


@dataclass
class TagferSFTConfig(TagArguments, SFTConfig):
    """TRL's ``SFTConfig`` for TAG's stage 1 (paper §5.1, App. C.1).

    Paper defaults: AdamW 2e-5 cosine, warm-up 3 %, weight decay 0.01, grad clip 1.0, max length
    2048, 3 epochs, LoRA r 128 / α 256 / dropout 0.05 on the LM, vision frozen, projector trained,
    completion-only loss. tagfer's own validation (greedy decoding scored by the reward parser,
    best checkpoint to ``<output_dir>/best``) replaces TRL's evaluation loop (``eval_strategy`` no).
    """

    train_projector: bool = _f(True, "Train the vision→text projector in full (PEFT modules_to_save; paper: yes).")
    val_steps: int = _f(500, "Validate every N optimiser steps (0 = only at the end).")
    val_samples: int = _f(256, "Validation samples decoded per round (0 = no validation).")
    val_max_new_tokens: int = _f(512, "Most tokens decoded per validation sample.")
    val_batch_size: int = _f(8, "Validation decoding batch size.")
    select_acc_weight: float = _f(0.5, "Best checkpoint: highest w·accuracy + (1-w)·AU IoU (paper: 'by "
                                  "validation accuracy and AU IoU', no rule given; 0.5 = their mean).")
    # TRL fields with the paper's values
    lr_scheduler_type: SchedulerType | str = _f("cosine", "Learning-rate schedule (paper: cosine).")
    warmup_steps: float = _f(0.03, "Warm-up: steps, or below 1 a fraction of the total steps (paper: 3 %).")
    num_train_epochs: float = _f(3.0, "Epochs (paper: up to 3).")
    max_length: int | None = _f(2048, "Longest tokenised sample, image tokens included (paper: 2048).")
    completion_only_loss: bool | None = _f(True, "Loss on the trace only (prompt and image tokens masked).")

    @property
    def stage(self) -> str:
        return "sft"

    def __post_init__(self) -> None:
        self._given = _given(self)
        self._check_tag_fields()
        for name in ("val_steps", "val_samples"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(name, f"must be an integer >= 0, got {getattr(self, name)!r}")
        for name in ("val_max_new_tokens", "val_batch_size", "max_length"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(name, f"must be an integer > 0, got {v!r}")
        if not 0 <= self.select_acc_weight <= 1:
            raise ConfigError("select_acc_weight", f"must be in [0, 1], got {self.select_acc_weight!r}")
        self._resolve_tag_defaults()
        # rows are prepared by tagfer.train.data.RowMaker; validation is tagfer's own
        self.dataset_kwargs = {**(self.dataset_kwargs or {}), "skip_prepare_dataset": True}
        _trl_post_init(super().__post_init__)


@dataclass
class TagferGRPOConfig(TagArguments, GRPOConfig):
    """TRL's ``GRPOConfig`` for TAG's stage 2 (paper §3.3, Eq. 2, App. C.1).

    Paper defaults: K = 8 rollouts, β (KL) 0.04, ε (clip) 0.2, ``loss_type="grpo"`` (TRL's default
    is ``dapo``), AdamW 1e-6, weight decay 0.01, grad clip 1.0, 2 epochs, LoRA trainable, vision
    frozen. The reward is ``reward_weights · [R_AU, R_ans, R_fmt]`` (Eq. 5). Three readings of the
    paper are switchable (docs/train.md, "GRPO: three readings of the paper"): ``adapter_mode``,
    ``importance_sampling_level`` and ``au_f1_reference``.
    """

    adapter_mode: Literal["merge", "continue"] = _f(
        "merge", "What GRPO does with `adapter` (the SFT LoRA): merge = fold it into the base and train a new "
        "LoRA on the merged model (default; the merged SFT model is the frozen KL reference); continue = keep "
        "training the SFT adapter itself (the literal 'we keep LoRA adapters trainable'; TRL keeps a frozen "
        "copy of it as the KL reference; the lora_* fields are then the adapter's own).")
    train_projector: bool = _f(False, "Train the projector too (paper: only the LoRA adapters in GRPO).")
    merged_rollouts: bool = _f(True, "transformers rollouts generate from LoRA weights merged into the base "
                               "(restored exactly afterwards): ~2.3x faster decoding at 7B.")
    au_reward: Literal["iou", "f1"] = _f("iou", "R_AU: iou (Eq. 3-4, boxes) or f1 (Table 4 ablation: AU names).")
    au_f1_reference: Literal["activated", "trace"] = _f(
        "activated", "With au_reward=f1, the AUs the response's AU names are scored against: activated = every "
        "AU the detector activated for the image (the paper's 'annotated AUs'; default), trace = only the AUs "
        "the teacher's trace names (at most 3).")
    # TRL fields with the paper's values / a TAG reading
    use_vllm: str = _f("false", "vLLM rollouts: true | false | auto (auto = when vLLM is installed and a GPU "
                       "is present, else transformers rollouts with a warning).", choices=["auto", "true", "false"])
    beta: float = _f(0.04, "KL coefficient β (paper: 0.04; TRL's default is 0).")
    loss_type: str = _f("grpo", "TRL loss: grpo = the paper's per-sequence length-normalised loss (TRL's default "
                        "is dapo).")
    importance_sampling_level: str = _f(
        "token", "Importance ratio of Eq. 2: token = one ratio per token (verl's and TRL's GRPO; default), "
        "sequence = one ratio per trajectory (the paper's notation; TRL takes the length-normalised geometric "
        "mean, as GSPO). The two give the same gradient while the batch is on-policy (docs/train.md).",
        choices=["token", "sequence"])
    max_completion_length: int | None = _f(1024, "Most tokens per rollout (paper's traces: mean 389, max 1221).")
    lr_scheduler_type: SchedulerType | str = _f("constant", "Learning-rate schedule (paper: not stated; constant).")
    warmup_steps: float = _f(0.0, "Warm-up steps (or fraction below 1).")
    learning_rate: float = _f(1e-6, "AdamW learning rate (paper: 1e-6).")
    num_train_epochs: float = _f(2.0, "Epochs (paper: 2).")
    reward_weights: list[float] | None = _f(None, "Weights of [R_AU, R_ans, R_fmt] in the reward (Eq. 5); unset = "
                                            "[1, 1, 1]; [0, 1, 1] is the RLVR ablation.")

    @property
    def stage(self) -> str:
        return "grpo"

    @property
    def reward(self) -> RewardConfig:
        w = self.reward_weights or [1.0, 1.0, 1.0]
        return RewardConfig(fmt_bonus=self.fmt_bonus, matching=self.au_matching, au_count=self.au_count,
                            format_rules=self.format_rules, canvas=self.canvas, max_boxes=self.max_boxes,
                            au_reward=self.au_reward, w_au=float(w[0]), w_ans=float(w[1]), w_fmt=float(w[2]))

    def __post_init__(self) -> None:
        self._given = _given(self)
        if self.reward_weights is not None and len(self.reward_weights) != 3:
            raise ConfigError("reward_weights", f"needs one weight per TAG reward, [R_AU, R_ans, R_fmt]; got "
                                                f"{self.reward_weights!r} (custom reward functions: pass their "
                                                "weights to run_grpo(reward_funcs=..., weights=...))")
        self._check_tag_fields()
        if isinstance(self.num_generations, bool) or not isinstance(self.num_generations, int) or self.num_generations < 2:
            raise ConfigError("num_generations", f"GRPO needs >= 2 generations per prompt, got {self.num_generations!r}")
        num_pos = {"beta": False, "epsilon": True, "max_completion_length": True, "temperature": True}
        for name, strict in num_pos.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (strict and v == 0):
                raise ConfigError(name, f"must be {'> 0' if strict else '>= 0'}, got {v!r}")
        gen = self.generation_batch_size or self.per_device_train_batch_size * self.gradient_accumulation_steps
        if gen % self.num_generations:
            raise ConfigError(
                "num_generations",
                f"the generation batch ({gen} = per_device_train_batch_size × gradient_accumulation_steps, or "
                f"generation_batch_size) must be a multiple of num_generations ({self.num_generations})")
        if self.adapter_mode == "continue" and not self.adapter:
            raise ConfigError("adapter_mode", "continue needs the adapter to continue: --adapter runs/sft/best "
                                              "(or adapter_mode=merge)")
        if self.adapter_mode not in ("merge", "continue"):
            raise ConfigError("adapter_mode", f"must be merge or continue, got {self.adapter_mode!r}")
        if self.au_f1_reference not in ("activated", "trace"):
            raise ConfigError("au_f1_reference", f"must be activated or trace, got {self.au_f1_reference!r}")
        if self.importance_sampling_level not in ("token", "sequence"):
            raise ConfigError("importance_sampling_level", f"must be token or sequence, got "
                                                           f"{self.importance_sampling_level!r}")
        if self.use_vllm not in (True, False, "auto", "true", "false"):
            raise ConfigError("use_vllm", f"must be true, false or auto, got {self.use_vllm!r}")
        self.use_vllm = use_vllm_now(self.use_vllm)
        self._resolve_tag_defaults()
        if self.reward_weights is None:
            self.reward_weights = [1.0, 1.0, 1.0]
        _trl_post_init(super().__post_init__)


def _trl_post_init(fn) -> None:
    """TRL's / transformers' own checks, their ValueError as a :class:`ConfigError`."""
    try:
        fn()
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError("", str(e)) from e


#: Either stage's config.
TrainConfig = TagferSFTConfig | TagferGRPOConfig
CONFIG_CLASSES: dict[str, type] = {"sft": TagferSFTConfig, "grpo": TagferGRPOConfig}


# ---------------------------------------------------------------------------------------------
# parsing: TRL's parser (tagfer.train.parser) + presets and extends


def _raw(ref: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(ref, Mapping):
        raw = dict(ref)
        parent = raw.pop("extends", None)
        return {**load_raw(parent), **raw} if parent is not None else raw
    return load_raw(ref)


def _stage_of(raw: Mapping[str, Any], where: str = "") -> str:
    stage = raw.get("stage", "sft")
    if stage not in STAGES:
        raise ConfigError("stage", f"must be one of {', '.join(map(repr, STAGES))}, got {stage!r}{where}")
    return stage


def parse_config(ref: str | Path | Mapping[str, Any], args: Sequence[str] = (), stage: str | None = None,
                 prog: str | None = None) -> TrainConfig:
    """The config of a preset name / YAML file / mapping under TRL-style command-line ``args``.

    ``stage``: the trainer that will run it; a config written for the other one is refused.
    """
    raw = _raw(ref)
    for k, v in dict(raw.pop("env", None) or {}).items():  # TRL's `env:` block
        os.environ[str(k)] = str(v)
    found = _stage_of(raw)
    raw.pop("stage", None)
    if stage is not None and found != stage:
        name = ref if not isinstance(ref, Mapping) else "this config"
        raise ConfigError("stage", f"{name!r} is a {found} config; use `tagfer train {found}`")
    return TagParser(CONFIG_CLASSES[found], prog=prog, others=CONFIG_CLASSES.values()).parse(raw, args)


def load_config(ref: str | Path | Mapping[str, Any], overrides: Sequence[str] | Mapping[str, Any] = ()) -> TrainConfig:
    """Python API: a validated config from a preset / YAML path / mapping plus ``overrides`` — either a
    ``{field: value}`` mapping (typed like YAML values) or TRL-style flags (``["--lora_r", "64"]``)."""
    if isinstance(overrides, Mapping):
        raw = _raw(ref)
        return parse_config({**raw, **overrides})
    return parse_config(ref, list(overrides))


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    """``stage`` plus the fields given to ``cfg`` that differ from the class defaults, as they were given
    (``use_vllm: auto`` stays ``auto``; values TRL derives, like ``steps_per_generation``, are left out)."""
    return {"stage": cfg.stage, **{k: _plain(v) for k, v in getattr(cfg, "_given", {}).items()}}


def _given(cfg: Any) -> dict[str, Any]:
    """The init fields of ``cfg`` whose value differs from the declared default (before any resolution)."""
    out = {}
    for f in dataclasses.fields(cfg):
        if not f.init:
            continue
        v, d = getattr(cfg, f.name), _default_of(f)
        if d is dataclasses.MISSING or _plain(v) != _plain(d):
            out[f.name] = copy.deepcopy(v)
    return out


def _plain(v: Any) -> Any:
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def dump_config(cfg: TrainConfig, path: str | Path | None = None) -> str:
    """YAML of :func:`config_dict` (loads back to an equal config); written to ``path`` if given."""
    text = yaml.safe_dump(config_dict(cfg), sort_keys=False)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text, encoding="utf-8")
    return text


def with_overrides(cfg: TrainConfig, **changes: Any) -> TrainConfig:
    """A shallow copy of ``cfg`` with some attributes set, without re-running validation (runtime values)."""
    out = copy.copy(cfg)
    for k, v in changes.items():
        setattr(out, k, v)
    return out
