"""What tagfer needs to know about each image-text-to-text model family, in one registry.

A :class:`Family` says how to recognise a checkpoint (its config's ``model_type``), which
processor and PIL image processor to build without torchvision, which modules are the vision
tower (frozen) and the projector (trained in full via PEFT ``modules_to_save``), where the
language model's decoder layers are (LoRA targets), how many image tokens an image becomes,
and the special tokens / chat template of the tiny random model of :mod:`tagfer.models.tiny`.

Families tested here (tiny random models, SFT + GRPO learning tests): ``qwen2_5_vl``
(the paper's backbone), ``qwen3_vl``, ``gemma3`` and ``llava_onevision``. Any other model is loaded by
``AutoModelForImageTextToText`` / ``AutoProcessor`` as usual; :func:`family_of` raises
:class:`UnknownFamily` only where training needs the module layout.

This module imports nothing heavy; transformers classes are named, not imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import json
from pathlib import Path
import re
from typing import Any, Iterable

__all__ = ["Family", "FAMILIES", "DEFAULT_FAMILY", "UnknownFamily", "get_family", "family_of"]


class UnknownFamily(ValueError):
    """A model type or family name tagfer has no entry for."""


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
        from tagfer.models.vlm import smart_resize  # lazy (start-up time): PIL

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

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family(
        name="qwen2_5_vl", model_types=("qwen2_5_vl",), processor="Qwen2_5_VLProcessor",
        image_processor=("transformers.models.qwen2_vl", "Qwen2VLImageProcessorPil"), video_processor=True,
        vision=("visual",), projector=("merger",), lm_layers=_QWEN_LM, patch_factor=28, tiny=_QWEN_TINY,
    ),
    Family(
        name="qwen2_vl", model_types=("qwen2_vl",), processor="Qwen2VLProcessor",
        image_processor=("transformers.models.qwen2_vl", "Qwen2VLImageProcessorPil"), video_processor=True,
        vision=("visual",), projector=("merger",), lm_layers=_QWEN_LM, patch_factor=28, tiny=_QWEN_TINY,
    ),
    Family(  # 16 px patches merged 2x2; DeepStack adds one projector per tapped vision layer
        name="qwen3_vl", model_types=("qwen3_vl",), processor="Qwen3VLProcessor",
        image_processor=("transformers.models.qwen2_vl", "Qwen2VLImageProcessorPil"), video_processor=True,
        vision=("visual",), projector=("merger", "deepstack_merger_list"), lm_layers=_QWEN_LM, patch_factor=32,
        tiny=_QWEN_TINY, min_pixels=64 * 64,
    ),
    Family(  # SigLIP tower, pooled to a fixed number of soft tokens per image
        name="gemma3", model_types=("gemma3",), processor="Gemma3Processor",
        image_processor=("transformers.models.gemma3", "Gemma3ImageProcessorPil"), video_processor=False,
        vision=("vision_tower",), projector=("multi_modal_projector",), lm_layers=_QWEN_LM, tokens="fixed",
        fixed_tokens_key="mm_tokens_per_image", pixel_limits=False, tiny=_GEMMA_TINY,
    ),
    Family(  # SigLIP tower on any-resolution tiles (base view + a grid of crops, newline tokens per row)
        name="llava_onevision", model_types=("llava_onevision",), processor="LlavaOnevisionProcessor",
        image_processor=("transformers.models.llava_onevision", "LlavaOnevisionImageProcessorPil"),
        video_processor=True, vision=("vision_tower",), projector=("multi_modal_projector",), lm_layers=_QWEN_LM,
        tokens="processor", pixel_limits=False, tiny=_LLAVA_OV_TINY,
        processor_args=("num_image_tokens", "vision_feature_select_strategy", "vision_aspect_ratio"),
    ),
)}

#: The paper's backbone.
DEFAULT_FAMILY = "qwen2_5_vl"


def get_family(name: str) -> Family:
    """The family called ``name`` (a registry key or a ``model_type``)."""
    if name in FAMILIES:
        return FAMILIES[name]
    for f in FAMILIES.values():
        if name in f.model_types:
            return f
    raise UnknownFamily(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")


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
                            " or add an entry to tagfer.models.families.FAMILIES)") from None

