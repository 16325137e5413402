"""Presets and config files: loading, strict validation, overrides."""

from __future__ import annotations

import pytest

from tagfer.train.config import ConfigError, TrainConfig, dump_config, list_presets, load_config, load_raw

PAPER_PRESETS = ["sft_tag310k", "grpo_rafdb", "grpo_ferplus", "grpo_affectnet", "grpo_rlvr", "grpo_f1", "sft_nobbox", "tiny_cpu"]


def test_all_presets_present_and_valid():
    names = list_presets()
    for p in PAPER_PRESETS + ["tiny_cpu_grpo"]:
        assert p in names
        cfg = load_config(p)
        assert isinstance(cfg, TrainConfig)


def test_paper_numbers_in_presets():
    sft = load_config("sft_tag310k")
    assert (sft.lora.r, sft.lora.alpha, sft.lora.dropout) == (128, 256, 0.05)
    assert sft.lora.train_projector and sft.sft.completion_only_loss
    assert (sft.optim.learning_rate, sft.optim.lr_scheduler, sft.optim.weight_decay) == (2e-5, "cosine", 0.01)
    assert (sft.optim.warmup_ratio, sft.optim.max_grad_norm, sft.sft.max_length) == (0.03, 1.0, 2048)
    g = load_config("grpo_rafdb")
    assert (g.grpo.num_generations, g.grpo.beta, g.grpo.epsilon, g.grpo.loss_type) == (8, 0.04, 0.2, "grpo")
    assert (g.optim.learning_rate, g.optim.weight_decay, g.optim.max_grad_norm, g.optim.epochs) == (1e-6, 0.01, 1.0, 2.0)
    assert g.data.sources == ["rafdb"]
    assert load_config("grpo_ferplus").data.sources == ["ferplus"]
    assert load_config("grpo_affectnet").data.sources == ["affectnet"]
    assert load_config("grpo_rlvr").reward.w_au == 0.0
    assert load_config("grpo_f1").reward.au_reward == "f1"
    assert load_config("sft_nobbox").data.no_bbox is True
    # extends keeps the parent's other fields
    assert load_config("grpo_affectnet").grpo.beta == 0.04


def test_overrides_every_type():
    cfg = load_config("grpo_rafdb", ["optim.learning_rate=3e-6", "data.sources=[rafdb, ferplus]", "grpo.use_vllm=true",
                                     "model.adapter=null", "reward.matching=one_to_one", "optim.bf16=false", "lora.r=64"])
    assert cfg.optim.learning_rate == 3e-6 and cfg.data.sources == ["rafdb", "ferplus"]
    assert cfg.grpo.use_vllm is True and cfg.model.adapter is None and cfg.reward.matching == "one_to_one"
    assert cfg.optim.bf16 == "false" and cfg.lora.r == 64


@pytest.mark.parametrize(
    "override, field",
    [
        ("optim.lr=1e-5", "optim.lr"),
        ("optim.batch_size=2.5", "optim.batch_size"),
        ("grpo.use_vllm=maybe", "grpo.use_vllm"),
        ("reward.matching=greedy", "reward.matching"),
        ("lora.targets=q_proj", "lora.targets"),
        ("data.sources=[1, 2]", "data.sources[0]"),
        ("nonsense=1", "nonsense"),
        ("optim.learning_rate=-1", "optim.learning_rate"),
        ("grpo.num_generations=1", "grpo.num_generations"),
    ],
)
def test_bad_override_names_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_config("grpo_rafdb", [override])
    assert e.value.field == field
    assert field in str(e.value)


def test_bad_preset_file_names_field(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("extends: sft_tag310k\noptim:\n  learning_rat: 1.0e-5\n")
    with pytest.raises(ConfigError, match=r"optim\.learning_rat: unknown field"):
        load_config(str(p))
    p.write_text("stage: sft\nlora:\n  r: many\ndata: {train: x.jsonl}\n")
    with pytest.raises(ConfigError, match=r"lora\.r: expected an integer"):
        load_config(str(p))
    p.write_text("stage: rl\ndata: {train: x.jsonl}\n")
    with pytest.raises(ConfigError, match=r"stage: must be one of"):
        load_config(str(p))


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="tiny_cpu"):
        load_config("no_such_preset")


def test_generation_batch_must_divide():
    with pytest.raises(ConfigError, match="num_generations"):
        load_config("grpo_rafdb", ["optim.batch_size=3", "optim.grad_accum=1"])


def test_dump_roundtrip(tmp_path):
    cfg = load_config("grpo_f1", ["optim.seed=7"])
    path = tmp_path / "c.yaml"
    dump_config(cfg, path)
    assert load_config(str(path)) == cfg


def test_circular_extends(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_raw(str(tmp_path / "a.yaml"))
