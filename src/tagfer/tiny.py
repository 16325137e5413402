"""A tiny random Qwen2.5-VL with a locally trained tokenizer, for tests and CPU smoke runs.

No weights can be downloaded on an offline machine, yet every model code path (loading,
chat template, image tokens, generation, LoRA, SFT, GRPO, merging) must run for real.
:func:`build_tiny_qwen25vl` writes a folder that :func:`tagfer.vlm.load_vlm` loads like
any hub checkpoint: ``config.json`` + weights, a byte-level BPE tokenizer wrapped as
``Qwen2Tokenizer`` (trained here on TAG-style text so traces encode compactly), a chat
template written for TAG, and a PIL image processor (``Qwen2VLImageProcessorPil``; the
default one imports torchvision).

Sizes (recipe in ``shared/notes/offline-stack.md``): text hidden 64, 2 layers, 4 heads
(2 KV), vision depth 2, hidden 32, patch 14, merge 2 — about 0.3 M parameters; a
224×224 image becomes 64 image tokens. Outputs of the random model are garbage by design.
"""

from __future__ import annotations

import json
from pathlib import Path

#: Qwen2.5-VL's special tokens, in Qwen's order; they take the first ids of the tiny vocab.
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)

#: A chat template for the tiny tokenizer (Qwen's ChatML layout): ``content`` may be a
#: string or a list of parts; an image part becomes vision_start + image_pad + vision_end.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url') %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _corpus() -> list[str]:
    """TAG-flavoured training text for the tiny BPE (prompts, labels, AU names, boxes)."""
    from tagfer.aus import AU_NAMES
    from tagfer.labels import LABELS
    from tagfer.prompts import tag_prompt

    system, user = tag_prompt()
    lines = [system, user, "<think>", "</think>", "<answer>", "</answer>", "<bbox>", "</bbox>"]
    lines += [f"AU{au} ({name})" for au, name in AU_NAMES.items()]
    lines += [f"<answer>{lab}</answer> The expression is {lab}." for lab in LABELS]
    lines += [f"<bbox>[{i}, {(i * 7) % 512}, {(i * 3) % 512}, {(i * 11) % 512}]</bbox>" for i in range(512)]
    lines += ["The global look shows a relaxed face with a raised mouth corner and narrowed eyes."] * 4
    return lines


def build_tokenizer(out_dir: str | Path | None = None, vocab_size: int = 1024):
    """Train a byte-level BPE on :func:`_corpus` and wrap it as a ``Qwen2Tokenizer``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    tok = Qwen2Tokenizer(
        vocab=state["vocab"], merges=merges, unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
    )
    tok.add_special_tokens({"additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in ("<|im_end|>", "<|endoftext|>")]})
    tok.chat_template = CHAT_TEMPLATE
    for t in SPECIAL_TOKENS:
        assert tok.convert_tokens_to_ids(t) == SPECIAL_TOKENS.index(t), t
    if out_dir is not None:
        tok.save_pretrained(str(out_dir))
    return tok


def tiny_config(vocab_size: int):
    """The tiny ``Qwen2_5_VLConfig`` (ids of the vision tokens follow :data:`SPECIAL_TOKENS`)."""
    from transformers import Qwen2_5_VLConfig

    ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    # head_dim = 64 / 4 = 16; mrope_section must sum to head_dim / 2 = 8.
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=True,
        ),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def build_tiny_qwen25vl(out_dir: str | Path, seed: int = 0, embed_scale: float = 1.0) -> Path:
    """Write a tiny random Qwen2.5-VL (model, tokenizer, image processor) into ``out_dir``.

    The folder loads with :func:`tagfer.vlm.load_vlm` and with
    ``AutoModelForImageTextToText.from_pretrained``. Deterministic for a given ``seed``.

    ``embed_scale`` multiplies the (tied) token embeddings. At init (std 0.02, hidden 64,
    a final RMSNorm) every logit stays within about ±1.3, so an adapter that leaves the
    embeddings frozen (LoRA, as in the paper) cannot push the loss far below ln(vocab);
    training smoke runs use ×8 (:func:`tagfer.train.model.build_trainable_tiny`).
    """
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_config(len(tok)))
    if embed_scale != 1.0:
        with torch.no_grad():
            model.get_input_embeddings().weight.mul_(embed_scale)
    model.eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(out))
    # 224 px images → 16×16 patches of 14 px → 8×8 = 64 merged image tokens.
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=224 * 224, patch_size=14, merge_size=2).save_pretrained(str(out))
    (out / "TINY_MODEL.md").write_text(
        f"Tiny random Qwen2.5-VL written by tagfer.tiny.build_tiny_qwen25vl (seed {seed}, embeddings x{embed_scale})"
        " — random weights, for tests and smoke runs only.\n"
    )
    return out


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
    the :data:`tagfer.vlm.RANDOM_INIT_MARKER` file, so :func:`tagfer.vlm.load_vlm` (and training) builds
    the model with random weights directly on the device. ``vocab_size`` = embedding rows (7B: 152064;
    the tokenizer's ids are the first rows). For GPU benchmarks of real sizes; outputs are garbage."""
    from transformers import GenerationConfig, Qwen2_5_VLConfig
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    from tagfer.vlm import RANDOM_INIT_MARKER

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
