"""Model preparation for training: base resolution, loading (via :mod:`tagfer.models.vlm`), LoRA, freezing.

The module layout comes from the model's family (:mod:`tagfer.models.families`, detected from the
config's ``model_type`` or set by ``model_family``):

* LoRA goes on the language model only: the target pattern is anchored on the family's
  decoder layers (``language_model.layers.N.(self_attn|mlp).<proj>``) because vision blocks
  also hold ``gate_proj``/``up_proj``/``down_proj`` (Qwen) or ``q_proj``… (SigLIP).
* The vision encoder is frozen (``requires_grad=False``) in every mode.
* The projector (Qwen2.5-VL's ``visual.merger``, Qwen3-VL's merger + DeepStack mergers,
  Gemma 3's ``multi_modal_projector``) is trained in full when ``lora.train_projector``: it
  goes to PEFT's ``modules_to_save``, so a trainable copy is saved inside the adapter and merged later.
* Trainable parameters that are not LoRA (the projector copy, any ``modules_to_save``, the
  language model in full fine-tuning) keep fp32 master weights when the model is bf16/fp16
  (:func:`keep_fp32_masters`): an Adam step of lr 2e-5 is below half a bf16 ulp for most
  projector weights and would be rounded away every step. PEFT already keeps LoRA in fp32.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from tagfer.models.families import family_of, get_family
from tagfer.models.tiny import build_tiny

__all__ = [
    "LM_PROJECTIONS",
    "model_family",
    "lm_target_regex",
    "resolve_base",
    "load_for_training",
    "apply_lora",
    "adapter_mode",
    "trainable_summary",
    "vision_parameter_names",
    "save_processor",
    "build_trainable_tiny",
    "keep_fp32_masters",
    "low_precision_trainable",
]


#: LoRA targets of the paper: every attention and MLP projection of the language model.
LM_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def model_family(model, name: str = "auto"):
    """The :class:`~tagfer.models.families.Family` of ``model``: ``name`` when not ``"auto"``, else the one
    :func:`load_for_training` recorded, else detected from ``model.config.model_type``."""
    if name and name != "auto":
        return get_family(name)
    recorded = getattr(model, "_tagfer_family", None)
    return get_family(recorded) if recorded else family_of(model)


def lm_target_regex(targets: Sequence[str], family: str = "qwen2_5_vl") -> str:
    """PEFT ``target_modules`` regex (full match) for ``targets`` inside ``family``'s language-model layers."""
    from tagfer.models.families import get_family

    return get_family(family).lora_target_regex(targets)


def resolve_base(cfg, workdir: str | Path | None = None) -> str:
    """The base model path / hub id for ``cfg.model`` (``"tiny"`` builds or reuses the tiny model).

    With ``tiny`` and an adapter whose recorded base folder exists, that folder is used
    (GRPO continues on the exact model SFT trained).
    """
    name = cfg.model_name_or_path
    if name != "tiny":
        return name
    family = "qwen2_5_vl" if cfg.model_family == "auto" else cfg.model_family
    if cfg.adapter:
        acfg = Path(cfg.adapter) / "adapter_config.json"
        if acfg.is_file():
            base = json.loads(acfg.read_text()).get("base_model_name_or_path")
            if base and Path(base).is_dir():
                return base
    out = Path(workdir or cfg.output_dir) / "base_model"
    if not (out / "config.json").is_file() or _model_type(out) != family:
        build_trainable_tiny(out, seed=cfg.tiny_seed, family=family)
    return str(out.resolve())


#: Factor applied to the tiny model's (tied) token embeddings, see :func:`build_trainable_tiny`.
TINY_EMBED_SCALE = 8.0


def build_trainable_tiny(out_dir: str | Path, seed: int = 0, embed_scale: float = TINY_EMBED_SCALE,
                         family: str = "qwen2_5_vl") -> Path:
    """:func:`tagfer.models.tiny.build_tiny` of ``family`` with its tied embeddings scaled by ``embed_scale``
    so that LoRA can really lower the loss (see that function). Irrelevant for real checkpoints."""
    return build_tiny(out_dir, family, seed=seed, embed_scale=embed_scale)


def _model_type(folder: Path) -> str | None:
    return json.loads((folder / "config.json").read_text()).get("model_type")


def _device() -> str:
    import torch  # lazy (start-up time): torch

    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"


def vision_parameter_names(model) -> list[str]:
    """Names of the vision-encoder parameters (Qwen's projector included: it lives under ``visual``)."""
    fam = model_family(model)
    return [n for n, _ in model.named_parameters() if fam.is_vision(n)]


def adapter_mode(cfg) -> str:
    """What training does with ``cfg.adapter``: ``"merge"`` (fold it in, train a new LoRA) or ``"continue"``
    (keep training it); SFT configs always merge."""
    return getattr(cfg, "adapter_mode", "merge") if cfg.adapter else "merge"


def load_for_training(cfg, workdir: str | Path | None = None):
    """``(model, processor, base_path)`` ready for LoRA: vision frozen; ``cfg.adapter`` merged into the base
    (``adapter_mode`` merge) or loaded as the trainable adapter itself (``continue``).

    Raises :class:`tagfer.models.vlm.ModelNotAvailable` when the weights are missing.
    """
    from tagfer.models.vlm import VLMConfig, load_vlm  # lazy (start-up time): PIL

    base = resolve_base(cfg, workdir)
    vcfg = VLMConfig(
        model=base, adapter=cfg.adapter, dtype=cfg.dtype, device=_device(),
        image_side=cfg.image_side, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels,
        attn_implementation=cfg.attn_implementation,
    )
    vlm = load_vlm(vcfg)
    model = vlm.model
    mode = adapter_mode(cfg)
    if cfg.adapter and mode == "merge":  # SFT → GRPO: fold the SFT adapter in; the result is also the KL reference
        model = model.merge_and_unload()
    fam = model_family(model, cfg.model_family)
    model._tagfer_family = fam.name
    model.train()
    if mode == "continue":  # the SFT adapter itself is trained (PEFT's is_trainable=True); TRL keeps a frozen copy
        for pcfg in model.peft_config.values():
            pcfg.inference_mode = False
        for n, p in model.named_parameters():
            if ".modules_to_save." in n:
                p.requires_grad_(cfg.train_projector and ".default." in n)
            else:
                p.requires_grad_("lora_" in n and ".default." in n)
    for n, p in model.named_parameters():  # the vision encoder stays frozen (a continued projector copy may train)
        if fam.is_vision(n) and not (p.requires_grad and mode == "continue" and ".modules_to_save." in n):
            p.requires_grad_(False)
    if not cfg.use_peft:  # full fine-tuning of the language model (+ projector if asked)
        for n, p in model.named_parameters():
            if fam.is_projector(n):
                p.requires_grad_(cfg.train_projector)
            elif not fam.is_vision(n):
                p.requires_grad_(True)
    return model, vlm.processor, base


def apply_lora(model, cfg):
    """Wrap ``model`` in a PEFT LoRA model per ``cfg``'s ``lora_*`` fields (no-op without ``use_peft``, and
    when ``model`` already carries the adapter to train: ``adapter_mode: continue``)."""
    if not cfg.use_peft or adapter_mode(cfg) == "continue":
        return model
    from peft import LoraConfig, get_peft_model  # lazy (start-up time): torch, transformers

    fam = model_family(model)
    modules_to_save = fam.projector_modules(model) if cfg.train_projector else None
    pcfg = LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=fam.lora_target_regex(cfg.lora_target_modules), modules_to_save=modules_to_save or None,
        task_type="CAUSAL_LM", bias="none",
    )
    peft_model = get_peft_model(model, pcfg)
    bad = [n for n, p in peft_model.named_parameters()
           if p.requires_grad and "lora_" in n and fam.is_vision(n)]
    if bad:  # pragma: no cover - guarded by the anchored regex
        raise RuntimeError(f"LoRA reached the vision encoder: {bad[:3]}")
    return peft_model


_LOW = ("torch.bfloat16", "torch.float16")


def low_precision_trainable(model) -> list[str]:
    """Names of trainable parameters stored in bf16/fp16 (should be none after :func:`keep_fp32_masters`)."""
    return [n for n, p in model.named_parameters() if p.requires_grad and str(p.dtype) in _LOW]


def _cast_floats(obj, dtype):
    import torch  # lazy (start-up time): torch

    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() and obj.dtype != dtype else obj
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_cast_floats(o, dtype) for o in obj)
    if isinstance(obj, list):
        return [_cast_floats(o, dtype) for o in obj]
    if type(obj) is dict:
        return {k: _cast_floats(v, dtype) for k, v in obj.items()}
    return obj


def keep_fp32_masters(model) -> list[str]:
    """Upcast every trainable bf16/fp16 parameter to fp32; returns the names of the modules changed.

    Each module that directly owns such a parameter gets hooks: floating inputs are cast to
    fp32 and floating outputs back to the parameter's original dtype, so what flows between
    modules keeps the model's dtype (under the trainer's bf16 autocast the matmuls still run
    in bf16) while the optimiser updates fp32 weights. Idempotent; frozen parameters untouched.
    Under DeepSpeed bf16 (which casts the model to bf16 and keeps its own fp32 master copy) the
    hooks follow the parameter's dtype at call time, so they never mix dtypes.
    """
    import torch  # lazy (start-up time): torch

    changed = []
    for name, mod in model.named_modules():
        own = [p for p in mod.parameters(recurse=False) if p.requires_grad and str(p.dtype) in _LOW]
        if not own or getattr(mod, "_tagfer_fp32_master", None) is not None:
            continue
        low = own[0].dtype
        for p in own:
            p.data = p.data.float()
        mod._tagfer_fp32_master = low

        def pre(_m, args, kwargs, ref=own[0]):
            # the parameter's dtype at call time: fp32, unless an engine (DeepSpeed bf16) cast it back,
            # in which case that engine keeps the fp32 master copy and inputs must follow the weights
            return _cast_floats(args, ref.dtype), _cast_floats(kwargs, ref.dtype)

        def post(_m, _args, out, low=low):
            return _cast_floats(out, low)

        mod.register_forward_pre_hook(pre, with_kwargs=True)
        mod.register_forward_hook(post)
        changed.append(name)
    return changed


def trainable_summary(model) -> dict[str, Any]:
    """Counts of trainable parameters by kind (lora / projector / other) and the total."""
    out = {"lora": 0, "projector": 0, "other": 0, "total": 0, "trainable": 0}
    fam = model_family(model)
    for n, p in model.named_parameters():
        out["total"] += p.numel()
        if not p.requires_grad:
            continue
        out["trainable"] += p.numel()
        if "lora_" in n:
            out["lora"] += p.numel()
        elif fam.is_projector(n):
            out["projector"] += p.numel()
        else:
            out["other"] += p.numel()
    return out


def save_processor(processor, out: str | Path) -> None:
    """Save a processor so :func:`tagfer.models.vlm.load_processor` reloads it (the image-only
    processors of :mod:`tagfer.models.vlm` save their tokenizer, image processor and init arguments)."""
    processor.save_pretrained(str(out))
