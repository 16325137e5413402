"""Tiny random VLMs with a locally trained tokenizer, for tests and CPU smoke runs.

No weights can be downloaded on an offline machine, yet every model code path (loading,
chat template, image tokens, generation, LoRA, SFT, GRPO, merging) must run for real.
:func:`build_tiny` writes a folder of one family (:data:`TINY_FAMILIES`: Qwen2.5-VL — the
paper's backbone, :func:`build_tiny_qwen25vl` —, Qwen3-VL, Gemma 3, LLaVA-OneVision; see
:mod:`tagfer.models.families`)
that :func:`tagfer.models.vlm.load_vlm` loads like any hub checkpoint: ``config.json`` + weights built
from the family's transformers config, a byte-level BPE tokenizer wrapped as ``Qwen2Tokenizer``
(trained here on TAG-style text so traces encode compactly; the family's special and image
tokens take the first ids), a chat template in the family's turn layout written for TAG, and
the family's PIL image processor (the fast ones import torchvision).

Sizes (recipe in ``shared/notes/offline-stack.md``): text hidden 64, 2 layers, 4 heads
(2 KV), vision depth 2, hidden 32 — about 0.3 M parameters. A 224×224 image becomes 64
image tokens (Qwen2.5-VL: 14 px patches, 2×2 merge), 49 (Qwen3-VL: 16 px patches) or 16
(Gemma 3: 112 px SigLIP input, 8×8 patches pooled to 4×4) or 88 (LLaVA-OneVision: 56 px tiles
of 16 tokens, base view + 2×2 crops + 8 newlines). Outputs are garbage by design.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from tagfer.au.aus import AU_NAMES
from tagfer.core.labels import LABELS
from tagfer.models.families import DEFAULT_FAMILY, Family, get_family

#: Qwen2.5-VL's special tokens, in Qwen's order; they take the first ids of the tiny vocab.
SPECIAL_TOKENS = get_family("qwen2_5_vl").tiny.special_tokens

#: The tiny Qwen tokenizer's chat template (ChatML): ``content`` may be a string or a list
#: of parts; an image part becomes vision_start + image_pad + vision_end.
CHAT_TEMPLATE = get_family("qwen2_5_vl").tiny.chat_template

def _corpus() -> list[str]:
    """TAG-flavoured training text for the tiny BPE (prompts, labels, AU names, boxes)."""
    from tagfer.models.prompts import tag_prompt  # lazy (start-up time): importlib, tempfile

    system, user = tag_prompt()
    lines = [system, user, "<think>", "</think>", "<answer>", "</answer>", "<bbox>", "</bbox>"]
    lines += [f"AU{au} ({name})" for au, name in AU_NAMES.items()]
    lines += [f"<answer>{lab}</answer> The expression is {lab}." for lab in LABELS]
    lines += [f"<bbox>[{i}, {(i * 7) % 512}, {(i * 3) % 512}, {(i * 11) % 512}]</bbox>" for i in range(512)]
    lines += ["The global look shows a relaxed face with a raised mouth corner and narrowed eyes."] * 4
    return lines


def build_tokenizer(out_dir: str | Path | None = None, vocab_size: int = 1024, family: str = DEFAULT_FAMILY):
    """Train a byte-level BPE on :func:`_corpus` with ``family``'s special tokens (first ids) and
    chat template, wrapped as a ``Qwen2Tokenizer`` (the wrapper class does not matter to the models)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # lazy (start-up time): tokenizers
    from transformers import Qwen2Tokenizer  # lazy (start-up time): transformers, PIL

    spec = get_family(family).tiny
    specials = list(spec.special_tokens)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    named = {"eos_token": spec.eos, "pad_token": spec.pad}
    if spec.bos:
        named["bos_token"] = spec.bos
    if spec.attrs:
        named["extra_special_tokens"] = dict(spec.attrs)
    tok = Qwen2Tokenizer(vocab=state["vocab"], merges=merges, unk_token=None, **named)
    tok.add_special_tokens({"additional_special_tokens": [t for t in specials if t not in named.values()
                                                          and t not in spec.attrs.values()]})
    tok.chat_template = spec.chat_template
    for t in specials:
        assert tok.convert_tokens_to_ids(t) == specials.index(t), t
    if out_dir is not None:
        tok.save_pretrained(str(out_dir))
    return tok


def _ids(family: Family) -> dict[str, int]:
    """Config fields that hold special-token ids, set to the tiny tokenizer's ids."""
    index = {t: i for i, t in enumerate(family.tiny.special_tokens)}
    return {key: index[tok] for key, tok in family.tiny.config_ids.items()}


def _text_ids(family: Family) -> dict[str, int]:
    index = {t: i for i, t in enumerate(family.tiny.special_tokens)}
    return dict(bos_token_id=index[family.tiny.bos or family.tiny.pad], eos_token_id=index[family.tiny.eos],
                pad_token_id=index[family.tiny.pad])


def _qwen2_5_vl_config(vocab_size: int, family: Family):
    from transformers import Qwen2_5_VLConfig  # lazy (start-up time): transformers, PIL

    # head_dim = 64 / 4 = 16; mrope_section must sum to head_dim / 2 = 8.
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
            tie_word_embeddings=True, **_text_ids(family),
        ),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
        ),
        tie_word_embeddings=True, **_ids(family),
    )


def _qwen3_vl_config(vocab_size: int, family: Family):
    from transformers import Qwen3VLConfig  # lazy (start-up time): transformers, PIL

    # 16 px patches, 2x2 merge; one DeepStack tap (vision layer 0) feeds the first decoder layer.
    return Qwen3VLConfig(
        text_config=dict(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [2, 3, 3],
                             "mrope_interleaved": True},
            tie_word_embeddings=True, **_text_ids(family),
        ),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
            spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64, deepstack_visual_indexes=[0],
        ),
        tie_word_embeddings=True, **_ids(family),
    )


#: Gemma 3 tiny: SigLIP on 112 px images (8x8 patches of 14 px) pooled to 4x4 = 16 soft tokens.
GEMMA3_IMAGE_SIZE, GEMMA3_IMAGE_TOKENS = 112, 16


def _gemma3_config(vocab_size: int, family: Family):
    from transformers import Gemma3Config  # lazy (start-up time): transformers, PIL

    return Gemma3Config(
        text_config=dict(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
            max_position_embeddings=4096, sliding_window=512, layer_types=["sliding_attention", "full_attention"],
            tie_word_embeddings=True, **_text_ids(family),
        ),
        vision_config=dict(
            model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, image_size=GEMMA3_IMAGE_SIZE, patch_size=14,
        ),
        mm_tokens_per_image=GEMMA3_IMAGE_TOKENS, tie_word_embeddings=True, **_ids(family),
    )


#: LLaVA-OneVision tiny: SigLIP on 56 px tiles (4x4 patches of 14 px = 16 tokens per tile); a 2x2 grid of
#: tiles at most beside the base view, so a 224 px square face is 16 + 8x8 + 8 newlines = 88 tokens.
LLAVA_OV_TILE = 56
LLAVA_OV_PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112]]


def _llava_onevision_config(vocab_size: int, family: Family):
    from transformers import LlavaOnevisionConfig  # lazy (start-up time): transformers, PIL

    return LlavaOnevisionConfig(
        text_config=dict(
            model_type="qwen2", vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
            **_text_ids(family),
        ),
        vision_config=dict(
            model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, image_size=LLAVA_OV_TILE, patch_size=14,
        ),
        image_grid_pinpoints=LLAVA_OV_PINPOINTS, vision_feature_select_strategy="full", vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9", tie_word_embeddings=True, **_ids(family),
    )


_CONFIGS = {"qwen2_5_vl": _qwen2_5_vl_config, "qwen3_vl": _qwen3_vl_config, "gemma3": _gemma3_config,
            "llava_onevision": _llava_onevision_config}

#: Per family: the tiny PIL image processor's arguments and extra processor init arguments. 224 px
#: images → 8x8 (Qwen2.5-VL, 28 px per token) or 7x7 (Qwen3-VL, 32 px) image tokens; Gemma 3: 16.
_PROCESSORS: dict[str, tuple[dict, dict]] = {
    "qwen2_5_vl": (dict(min_pixels=56 * 56, max_pixels=224 * 224, patch_size=14, merge_size=2), {}),
    "qwen3_vl": (dict(min_pixels=64 * 64, max_pixels=224 * 224, patch_size=16, merge_size=2), {}),
    "gemma3": (dict(size={"height": GEMMA3_IMAGE_SIZE, "width": GEMMA3_IMAGE_SIZE}),
               {"image_seq_length": GEMMA3_IMAGE_TOKENS}),
    "llava_onevision": (dict(size={"height": LLAVA_OV_TILE, "width": LLAVA_OV_TILE},
                             crop_size={"height": LLAVA_OV_TILE, "width": LLAVA_OV_TILE},
                             image_grid_pinpoints=LLAVA_OV_PINPOINTS),
                        {"num_image_tokens": (LLAVA_OV_TILE // 14) ** 2, "vision_feature_select_strategy": "full",
                         "vision_aspect_ratio": "anyres_max_9"}),
}

#: Families :func:`build_tiny` can build.
TINY_FAMILIES = tuple(_CONFIGS)


def tiny_config(vocab_size: int, family: str = DEFAULT_FAMILY):
    """The tiny transformers config of ``family`` (special-token ids follow the family's tiny tokens)."""
    fam = get_family(family)
    if fam.name not in _CONFIGS:
        raise ValueError(f"no tiny recipe for family {fam.name!r}; choose from {', '.join(_CONFIGS)}")
    return _CONFIGS[fam.name](vocab_size, fam)


def _save_processor_files(out: Path, family: Family) -> None:
    """The tiny PIL image processor (and processor init arguments, e.g. Gemma 3's image sequence length)."""
    cls = getattr(importlib.import_module(family.image_processor[0]), family.image_processor[1])
    image_kw, processor_kw = _PROCESSORS[family.name]
    cls(**image_kw).save_pretrained(str(out))
    if processor_kw:
        (out / "processor_config.json").write_text(json.dumps({"processor_class": family.processor, **processor_kw}, indent=2))


def build_tiny(out_dir: str | Path, family: str = DEFAULT_FAMILY, seed: int = 0, embed_scale: float = 1.0) -> Path:
    """Write a tiny random model of ``family`` (:data:`TINY_FAMILIES`: model, tokenizer, image processor).

    The folder loads with :func:`tagfer.models.vlm.load_vlm` and with
    ``AutoModelForImageTextToText.from_pretrained``. Deterministic for a given ``seed``.

    ``embed_scale`` multiplies the (tied) token embeddings. At init (std 0.02, hidden 64,
    a final RMSNorm) every logit stays within about ±1.3, so an adapter that leaves the
    embeddings frozen (LoRA, as in the paper) cannot push the loss far below ln(vocab);
    training smoke runs use ×8 (:func:`tagfer.train.model.build_trainable_tiny`).
    """
    import torch  # lazy (start-up time): torch
    from transformers import AutoModelForImageTextToText  # lazy (start-up time): transformers, PIL

    fam = get_family(family)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out, family=fam.name)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(tiny_config(len(tok), fam.name))
    if embed_scale != 1.0:
        with torch.no_grad():
            model.get_input_embeddings().weight.mul_(embed_scale)
    model.eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(out))
    _save_processor_files(out, fam)
    (out / "TINY_MODEL.md").write_text(
        f"Tiny random {fam.name} written by tagfer.models.tiny.build_tiny (seed {seed}, embeddings x{embed_scale})"
        " — random weights, for tests and smoke runs only.\n"
    )
    return out


def build_tiny_qwen25vl(out_dir: str | Path, seed: int = 0, embed_scale: float = 1.0) -> Path:
    """:func:`build_tiny` for Qwen2.5-VL (the paper's backbone)."""
    return build_tiny(out_dir, "qwen2_5_vl", seed=seed, embed_scale=embed_scale)


#: Model sizes :func:`build_random_skeleton` knows: text / vision dimensions of the real checkpoints.
SIZES = {
    "tiny": {"text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, mrope_section=[2, 3, 3]),
             "vision": dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, window_size=56,
                            fullatt_block_indexes=[1])},
    # Qwen/Qwen2.5-VL-3B-Instruct and -7B-Instruct config.json (the vocabulary is the skeleton tokenizer's)
    "3b": {"text": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                        num_key_value_heads=2, mrope_section=[16, 24, 24]),
           "vision": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, window_size=112,
                          fullatt_block_indexes=[7, 15, 23, 31])},
    "7b": {"text": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                        num_key_value_heads=4, mrope_section=[16, 24, 24]),
           "vision": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, window_size=112,
                          fullatt_block_indexes=[7, 15, 23, 31])},
}


def build_random_skeleton(out_dir: str | Path, size: str = "tiny", seed: int = 0, vocab_size: int = 152064) -> Path:
    """A weightless Qwen2.5-VL folder of ``size`` (:data:`SIZES`): config, tokenizer, image processor and
    the :data:`tagfer.models.vlm.RANDOM_INIT_MARKER` file, so :func:`tagfer.models.vlm.load_vlm` (and training) builds
    the model with random weights directly on the device. ``vocab_size`` = embedding rows (7B: 152064;
    the tokenizer's ids are the first rows). For GPU benchmarks of real sizes; outputs are garbage."""
    from transformers import GenerationConfig, Qwen2_5_VLConfig  # lazy (start-up time): transformers, PIL
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil  # lazy (start-up time): transformers, PIL

    from tagfer.models.vlm import RANDOM_INIT_MARKER  # lazy (start-up time): PIL

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out)
    ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    text = dict(SIZES[size]["text"])
    mrope = text.pop("mrope_section")
    vocab = len(tok) if size == "tiny" else max(vocab_size, len(tok))
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab, max_position_embeddings=32768, rms_norm_eps=1e-6, hidden_act="silu",
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=size == "tiny", **text),
        vision_config=dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, hidden_act="silu",
                           out_hidden_size=text["hidden_size"], **SIZES[size]["vision"]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=size == "tiny",
    )
    cfg.save_pretrained(str(out))
    GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                     bos_token_id=tok.pad_token_id).save_pretrained(str(out))
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=224 * 224, patch_size=14, merge_size=2).save_pretrained(str(out))
    (out / RANDOM_INIT_MARKER).write_text(json.dumps({"seed": seed, "size": size}))
    return out
