"""Session fixtures for the train tests (imported by conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def train_tiny_dir(tmp_path_factory) -> Path:
    """The tiny random Qwen2.5-VL prepared for training (embeddings scaled, see build_trainable_tiny)."""
    from tagfer.train.model import build_trainable_tiny

    return build_trainable_tiny(tmp_path_factory.mktemp("train_tiny") / "base", seed=0)


@pytest.fixture(scope="session")
def train_samples(tmp_path_factory) -> Path:
    """8 fixed TAGSamples (JSONL) on the sample faces: short traces, two labels, 2 without AU boxes."""
    from tagfer.train.data import builtin_tiny

    d = tmp_path_factory.mktemp("train_data")
    src = builtin_tiny(d / "builtin")
    out = d / "samples.jsonl"
    rows = [json.loads(line) for line in src.read_text().splitlines()]
    for r in rows:
        r["image"] = str((src.parent / r["image"]).resolve())
        b = r["au_boxes"][0] if r["au_boxes"] else [150, 300, 360, 420]
        lab = "happiness" if "astronaut" in r["id"] else "neutral"
        r["label"] = lab
        r["completion"] = f"<think>Mouth AU12 <bbox>[{b[0]}, {b[1]}, {b[2]}, {b[3]}]</bbox> shows it.</think><answer>{lab}</answer>"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def tiny_train_config(out_dir, model_dir, data, stage="sft", **overrides):
    """A TagferSFTConfig / TagferGRPOConfig on the tiny model, 1 thread-friendly; ``overrides`` are field names."""
    from tagfer.train.config import load_config

    base = {
        "stage": stage, "output_dir": str(out_dir), "resume": False,
        "model_name_or_path": str(model_dir),
        "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
        "train_data": str(data),
        "learning_rate": 2e-2, "lr_scheduler_type": "constant", "warmup_steps": 0.0, "weight_decay": 0.0,
        "max_steps": 10, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "bf16": False,
        "activation_checkpointing": False, "seed": 0, "save_steps": 1000, "logging_steps": 1, "disable_tqdm": True,
    }
    if stage == "sft":
        base.update({"max_length": 2048, "val_steps": 0, "val_samples": 0})
    else:
        base.update({"num_generations": 4, "max_completion_length": 16})
    return load_config({**base, **overrides})


#: Families beyond Qwen2.5-VL whose tiny models go through the whole training path (tests/test_families.py).
NEW_FAMILIES = ("qwen3_vl", "gemma3", "llava_onevision")


@pytest.fixture(scope="session", params=NEW_FAMILIES)
def family_tiny_dir(request, tmp_path_factory) -> Path:
    """A tiny random model of each new family, prepared for training (embeddings scaled)."""
    from tagfer.train.model import build_trainable_tiny

    return build_trainable_tiny(tmp_path_factory.mktemp(f"tiny_{request.param}") / "base", seed=0, family=request.param)


#: Short prompts for the family learning runs: a few text tokens instead of TAG's ~450 keep each step cheap.
SHORT_SYSTEM, SHORT_USER = "Explain the facial expression.", "Which expression?"


@pytest.fixture(scope="session")
def short_prompts(tmp_path_factory) -> dict[str, str]:
    """Config overrides pointing system_prompt / user_prompt at short prompt files."""
    d = tmp_path_factory.mktemp("short_prompts")
    (d / "system.txt").write_text(SHORT_SYSTEM)
    (d / "user.txt").write_text(SHORT_USER)
    return {"system_prompt": str(d / "system.txt"), "user_prompt": str(d / "user.txt")}
