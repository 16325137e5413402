"""What tagfer needs to know about each image-text-to-text model family, in one registry.

A :class:`Family` says how to recognise a checkpoint (its config's ``model_type``), which
processor and PIL image processor to build without torchvision, which modules are the vision
tower (frozen) and the projector (trained in full via PEFT ``modules_to_save``), where the
language model's decoder layers are (LoRA targets), how many image tokens an image becomes,
and the special tokens / chat template of the tiny random model of :mod:`tagfer.models.tiny`.

The same entry tells the configs written for other trainers (:mod:`tagfer.train.interop`) the
LLaMA-Factory template, the projector modules to train (``additional_target``) and the vision
modules verl keeps out of LoRA.

Families tested here (tiny random models, SFT + GRPO learning tests): ``qwen2_5_vl``
(the paper's backbone), ``qwen3_vl``, ``gemma3`` and ``llava_onevision``. Any other model is loaded by
``AutoModelForImageTextToText`` / ``AutoProcessor`` as usual; :func:`family_of` raises
:class:`UnknownFamily` only where training needs the module layout. :data:`FAMILIES` is a
:class:`tagfer.core.registry.Registry` (name → :class:`Family`, a family's ``model_types`` as
aliases); :func:`register_family` adds one.

This module imports nothing heavy (and nothing of tagfer's but the registry); transformers
classes are named, not imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import json
import math
from pathlib import Path
import re
from typing import Any, Iterable

from tagfer.core.registry import Registry

__all__ = ["Family", "FAMILIES", "DEFAULT_FAMILY", "UnknownFamily", "get_family", "family_of", "family_for",
           "register_family", "smart_resize"]


class UnknownFamily(ValueError):
    """A model type or family name tagfer has no entry for."""


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 16384 * 28 * 28) -> tuple[int, int]:
    """Qwen2-VL's processor rule (also qwen_vl_utils' ``fetch_image``): both sides rounded to a multiple
    of ``factor``, the area kept within ``[min_pixels, max_pixels]``. Returns ``(height, width)``."""
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


@dataclass(frozen=True)
class TinySpec:
    """The tiny random model's tokenizer: special tokens (first ids, in this order), roles and template.

    ``attrs``: named special tokens set on the tokenizer (e.g. Gemma 3's ``boi_token``), which
    the family's processor reads; ``config_ids``: config fields set to a special token's id.
    """

    special_tokens: tuple[str, ...]
    eos: str
    pad: str
    chat_template: str
    bos: str | None = None
    attrs: dict[str, str] = field(default_factory=dict)
    config_ids: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Family:
    """One model family.

    name              registry key (``model.family`` in training configs)
    model_types       ``config.json`` ``model_type`` values of the family
    processor         transformers processor class name
    image_processor   ``(module, class)`` of the PIL image processor (the fast ones need torchvision)
    video_processor   the processor also wants a video processor: built image-only here
    vision            module names of the vision tower (every parameter below them is frozen)
    projector         module names of the vision→text projector (``lora.train_projector``); a
                      ``ModuleList`` among them stands for its items (PEFT wraps modules, not lists)
    lm_layers         regex (no anchors) of the language model's decoder layer list
    tokens            how an image's token count is found: ``grid`` (Qwen: one token per
                      ``patch_factor``² px of the rounded image), ``fixed`` (Gemma 3: the config's
                      ``fixed_tokens_key``), ``processor`` (LLaVA-OneVision's any-resolution tiling:
                      the processor's own count)
    patch_factor      pixels per image token side (patch × merge) of grid families
    fixed_tokens_key  config field holding the image-token count of fixed-count families
    pixel_limits      the image processor takes ``min_pixels`` / ``max_pixels``
    min_pixels        the processor's lower pixel bound when none is set
    processor_args    processor init arguments that an image-only processor saves and reloads
    tiny              tokenizer spec of :mod:`tagfer.models.tiny`'s random model
    llamafactory_template  LLaMA-Factory's ``template`` for the family ("" if it has none)
    projector_in_vision    the projector modules lie inside the vision tower (Qwen's ``visual.merger``)
    list_sizes        ``(module, config key, default)`` for each ``ModuleList`` in ``projector``: where
                      the model config keeps its length (a list or a count) and the usual value
    """

    name: str
    model_types: tuple[str, ...]
    processor: str
    image_processor: tuple[str, str]
    video_processor: bool
    vision: tuple[str, ...]
    projector: tuple[str, ...]
    lm_layers: str
    tiny: TinySpec
    tokens: str = "grid"
    patch_factor: int = 0
    fixed_tokens_key: str = ""
    pixel_limits: bool = True
    min_pixels: int = 56 * 56
    processor_args: tuple[str, ...] = ()
    llamafactory_template: str = ""
    projector_in_vision: bool = False
    list_sizes: tuple[tuple[str, str, int], ...] = ()

    def projector_names(self, config: dict[str, Any] | None = None) -> list[str]:
        """Projector module names for ``modules_to_save`` / LLaMA-Factory's ``additional_target``
        without loading the model: ``ModuleList`` entries become their items, counted from the model's
        ``config.json`` dict when given, else the family's usual count."""
        out: list[str] = []
        sizes = {m: (key, default) for m, key, default in self.list_sizes}
        for p in self.projector:
            if p not in sizes:
                out.append(p)
                continue
            key, n = sizes[p]
            value: Any = config
            for part in key.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            n = len(value) if isinstance(value, (list, tuple)) else int(value) if isinstance(value, int) else n
            out += [f"{p}.{i}" for i in range(n)]
        return out

    def vision_exclude_regex(self) -> str:
        """A regex (full match, PEFT ``exclude_modules`` / verl) over every module of the vision tower
        and of the projector: what LoRA leaves alone."""
        names = list(self.vision) + ([] if self.projector_in_vision else list(self.projector))
        inner = names[0] if len(names) == 1 else "(?:" + "|".join(names) + ")"
        return f".*{inner}.*"

    def is_vision(self, param_name: str) -> bool:
        """Whether a parameter / module name lies inside the vision tower (projector included if under it)."""
        return any(f".{v}." in f".{param_name}." for v in self.vision)

    def is_projector(self, param_name: str) -> bool:
        """Whether a parameter / module name lies inside the projector."""
        return any(f".{p}." in f".{param_name}." for p in self.projector)

    def lora_target_regex(self, targets: Iterable[str]) -> str:
        """PEFT ``target_modules`` regex (full match): ``targets`` in the language model's attention / MLP only."""
        names = "|".join(re.escape(t) for t in targets)
        return rf".*{self.lm_layers}\.\d+\.(?:self_attn|mlp)\.(?:{names})"

    def projector_modules(self, model: Any) -> list[str]:
        """Names for PEFT ``modules_to_save``: the projector modules present in ``model`` (lists expanded)."""
        import torch  # lazy (start-up time): torch

        found: list[str] = []
        for n, mod in model.named_modules():
            for p in self.projector:
                if n == p or n.endswith(f".{p}"):
                    if isinstance(mod, torch.nn.ModuleList):
                        found += [f"{p}.{i}" for i in range(len(mod))]
                    elif p not in found:
                        found.append(p)
        return found

    def image_tokens(self, policy: Any, width: int, height: int, config: Any = None, processor: Any = None) -> int:
        """Image tokens an original ``width x height`` image becomes under ``policy`` (:class:`tagfer.models.vlm.ImagePolicy`).

        Grid families (Qwen): the resized image rounded to ``patch_factor`` within the policy's
        pixel bounds; fixed families (Gemma 3): the model ``config``'s count, whatever the image;
        ``processor`` families (LLaVA-OneVision): the loaded ``processor``'s count for the resized image.
        """
        w, h = policy.resized_size(width, height)
        if self.tokens == "fixed":
            value = getattr(config, self.fixed_tokens_key, None) if config is not None else None
            if value is None:
                raise ValueError(f"{self.name}: the image-token count is in the model config ({self.fixed_tokens_key})")
            return int(value)
        if self.tokens == "processor":
            if processor is None:
                raise ValueError(f"{self.name}: the image-token count depends on the processor's tiling; pass processor=")
            return int(processor._get_num_multimodal_tokens(image_sizes=[[h, w]])["num_image_tokens"][0])
        lo, hi = policy.bounds
        lo = lo if policy.min_pixels is not None else self.min_pixels
        hh, ww = smart_resize(h, w, self.patch_factor, lo, max(lo, hi))
        return (hh // self.patch_factor) * (ww // self.patch_factor)


#: Qwen's ChatML layout; an image part becomes vision_start + image_pad + vision_end.
_CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url') %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_QWEN_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
_QWEN_IDS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
             "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}
_QWEN_TINY = TinySpec(_QWEN_TOKENS, eos="<|im_end|>", pad="<|endoftext|>", chat_template=_CHATML, config_ids=_QWEN_IDS)

#: Gemma's turn layout (system text folded into the first user turn, as Gemma 3's own template
#: does); an image part becomes ``<start_of_image>``, which the processor expands.
_GEMMA_TEMPLATE = (
    "{{ bos_token }}{% set sys = namespace(text='') %}"
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{% if message['content'] is string %}{% set sys.text = message['content'] %}"
    "{% else %}{% set sys.text = message['content'][0]['text'] %}{% endif %}"
    "{% else %}<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if loop.index0 == 1 and sys.text %}{{ sys.text }}\n\n{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url') %}<start_of_image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
_GEMMA_TINY = TinySpec(
    ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
     "<image_soft_token>"),
    eos="<end_of_turn>", pad="<pad>", bos="<bos>", chat_template=_GEMMA_TEMPLATE,
    attrs={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
    config_ids={"boi_token_index": "<start_of_image>", "eoi_token_index": "<end_of_image>",
                "image_token_index": "<image_soft_token>"},
)

#: LLaVA-OneVision (Qwen2 language model): ChatML with an ``<image>`` placeholder the processor expands.
_LLAVA_OV_TINY = TinySpec(
    ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"), eos="<|im_end|>", pad="<|endoftext|>",
    chat_template=_CHATML.replace("<|vision_start|><|image_pad|><|vision_end|>", "<image>\n"),
    config_ids={"image_token_index": "<image>", "video_token_index": "<video>"},
)

_QWEN_LM = r"language_model\.(?:model\.)?layers"

#: The family registry: name → :class:`Family`; each family's ``model_types`` are aliases.
FAMILIES = Registry("model family", usage="FAMILY", options=False, error=UnknownFamily)


def register_family(family: Family) -> Family:
    """Add (or replace) a family: its ``name`` and ``model_types`` then resolve to it everywhere."""
    FAMILIES.register(family.name, family, aliases=tuple(t for t in family.model_types if t != family.name),
                      needs_target=False, usage=family.name, help=family.processor)
    return family


for _f in (
    Family(
        name="qwen2_5_vl", model_types=("qwen2_5_vl",), processor="Qwen2_5_VLProcessor",
        image_processor=("transformers.models.qwen2_vl", "Qwen2VLImageProcessorPil"), video_processor=True,
        vision=("visual",), projector=("merger",), lm_layers=_QWEN_LM, patch_factor=28, tiny=_QWEN_TINY,
        llamafactory_template="qwen2_vl", projector_in_vision=True,
    ),
    Family(
        name="qwen2_vl", model_types=("qwen2_vl",), processor="Qwen2VLProcessor",
        image_processor=("transformers.models.qwen2_vl", "Qwen2VLImageProcessorPil"), video_processor=True,
        vision=("visual",), projector=("merger",), lm_layers=_QWEN_LM, patch_factor=28, tiny=_QWEN_TINY,
        llamafactory_template="qwen2_vl", projector_in_vision=True,
    ),
    Family(  # 16 px patches merged 2x2; DeepStack adds one projector per tapped vision layer
        name="qwen3_vl", model_types=("qwen3_vl",), processor="Qwen3VLProcessor",
        image_processor=("transformers.models.qwen2_vl", "Qwen2VLImageProcessorPil"), video_processor=True,
        vision=("visual",), projector=("merger", "deepstack_merger_list"), lm_layers=_QWEN_LM, patch_factor=32,
        tiny=_QWEN_TINY, min_pixels=64 * 64, llamafactory_template="qwen3_vl", projector_in_vision=True,
        list_sizes=(("deepstack_merger_list", "vision_config.deepstack_visual_indexes", 3),),
    ),
    Family(  # SigLIP tower, pooled to a fixed number of soft tokens per image
        name="gemma3", model_types=("gemma3",), processor="Gemma3Processor",
        image_processor=("transformers.models.gemma3", "Gemma3ImageProcessorPil"), video_processor=False,
        vision=("vision_tower",), projector=("multi_modal_projector",), lm_layers=_QWEN_LM, tokens="fixed",
        fixed_tokens_key="mm_tokens_per_image", pixel_limits=False, tiny=_GEMMA_TINY, llamafactory_template="gemma3",
    ),
    Family(  # SigLIP tower on any-resolution tiles (base view + a grid of crops, newline tokens per row)
        name="llava_onevision", model_types=("llava_onevision",), processor="LlavaOnevisionProcessor",
        image_processor=("transformers.models.llava_onevision", "LlavaOnevisionImageProcessorPil"),
        video_processor=True, vision=("vision_tower",), projector=("multi_modal_projector",), lm_layers=_QWEN_LM,
        tokens="processor", pixel_limits=False, tiny=_LLAVA_OV_TINY,
        processor_args=("num_image_tokens", "vision_feature_select_strategy", "vision_aspect_ratio"),
    ),
):
    register_family(_f)

#: The paper's backbone.
DEFAULT_FAMILY = "qwen2_5_vl"


def get_family(name: str) -> Family:
    """The family called ``name`` (a registry key or a ``model_type``); :class:`UnknownFamily` lists the known ones."""
    return FAMILIES.get(name)


def family_of(obj: Any) -> Family:
    """The family of a model, a config, a ``config.json`` dict or a model folder path.

    PEFT wrappers are seen through (their ``config`` is the base model's)."""
    if isinstance(obj, (str, Path)):
        cfg = Path(obj) / "config.json"
        if not cfg.is_file():
            raise UnknownFamily(f"{obj}: no config.json to read the model type from")
        obj = json.loads(cfg.read_text())
    if isinstance(obj, dict):
        mt = obj.get("model_type")
    else:
        conf = getattr(obj, "config", obj)
        mt = getattr(conf, "model_type", None)
    if not mt:
        raise UnknownFamily(f"cannot tell the model type of {type(obj).__name__}")
    try:
        return get_family(str(mt))
    except UnknownFamily as e:
        raise UnknownFamily(f"{e} (model_type {mt!r}: set model.family to a family with the same module layout,"
                            " or add one with tagfer.models.families.register_family)") from None


def _squash(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def family_for(name_or_path: str, family: str = "auto") -> Family:
    """The family of a training config's model: ``family`` when it is not ``"auto"``; else the
    ``config.json`` of a local folder; else a hub id matched by name (``Qwen/Qwen2.5-VL-7B-Instruct``
    → ``qwen2_5_vl``: the longest family name or model type inside the id, punctuation ignored)."""
    if family and family != "auto":
        return get_family(family)
    if (Path(name_or_path) / "config.json").is_file():
        return family_of(name_or_path)
    squashed = _squash(Path(str(name_or_path)).name or str(name_or_path))
    best: tuple[int, Family] | None = None
    for kind in FAMILIES.list():
        fam = get_family(kind)
        for word in (fam.name, *fam.model_types):
            w = _squash(word)
            if w and w in squashed and (best is None or len(w) > best[0]):
                best = (len(w), fam)
    if best is None:
        raise UnknownFamily(f"cannot tell the model family of {name_or_path!r} (no local config.json, no family name"
                            f" in it); set model.family to one of: {', '.join(FAMILIES.list())}")
    return best[1]

