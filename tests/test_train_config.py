"""TagferSFTConfig / TagferGRPOConfig: TRL's configs with TAG's fields, parsed by TRL's parser."""

from __future__ import annotations

import dataclasses
import sys

import pytest

pytestmark = pytest.mark.model  # the configs subclass TRL's (imports transformers): not in the fast tier

from trl import GRPOConfig, SFTConfig  # noqa: E402

from tagfer.train.config import (  # noqa: E402
    ConfigError, TagArguments, TagferGRPOConfig, TagferSFTConfig, dump_config, load_config, parse_config, use_vllm_now,
)
from tagfer.train.presets import list_presets  # noqa: E402


def test_presets_are_trl_configs_of_their_stage():
    for name in list_presets():
        cfg = load_config(name)
        cls = TagferGRPOConfig if "grpo" in name else TagferSFTConfig
        assert type(cfg) is cls and isinstance(cfg, GRPOConfig if "grpo" in name else SFTConfig)


def test_paper_numbers_are_the_defaults_where_trl_differs():
    """App. C.1 without any preset: TRL's own defaults differ on each of these."""
    s = TagferSFTConfig(train_data="x.jsonl")
    assert (s.lora_r, s.lora_alpha, s.lora_dropout, s.use_peft, s.train_projector) == (128, 256, 0.05, True, True)
    assert (s.learning_rate, s.lr_scheduler_type.value, s.weight_decay, s.warmup_steps) == (2e-5, "cosine", 0.01, 0.03)
    assert (s.max_grad_norm, s.max_length, s.num_train_epochs, s.completion_only_loss) == (1.0, 2048, 3.0, True)
    assert (s.per_device_train_batch_size, s.gradient_accumulation_steps) == (8, 8)
    g = TagferGRPOConfig(train_data="x.jsonl")
    assert (g.num_generations, g.beta, g.epsilon, g.loss_type) == (8, 0.04, 0.2, "grpo")
    assert (g.learning_rate, g.weight_decay, g.max_grad_norm, g.num_train_epochs) == (1e-6, 0.01, 1.0, 2.0)
    assert (g.lora_r, g.lora_alpha, g.lora_dropout, g.train_projector) == (128, 256, 0.05, False)
    trl = GRPOConfig(bf16=False)
    assert (trl.beta, trl.loss_type, trl.weight_decay, trl.num_train_epochs) != (0.04, "grpo", 0.01, 2.0)
    # TRL's unset bf16 means "on", which fails on a machine without bf16; tagfer's means "when supported"
    import torch

    assert s.bf16 == bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def test_every_tag_field_has_help():
    own = set(TagArguments.__annotations__) | set(TagferSFTConfig.__annotations__) | set(TagferGRPOConfig.__annotations__)
    for cls in (TagferSFTConfig, TagferGRPOConfig):
        for f in dataclasses.fields(cls):
            if f.name in own:
                assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"


def test_precedence_cli_over_yaml_over_defaults(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("stage: grpo\ntrain_data: builtin:tiny\nlearning_rate: 3.0e-6\nlora_r: 32\nsources: [rafdb]\n")
    cfg = parse_config(str(p), ["--lora_r", "64", "--sources", "ferplus", "affectnet"])
    assert cfg.lora_r == 64  # CLI beats YAML
    assert cfg.sources == ["ferplus", "affectnet"]
    assert cfg.learning_rate == 3e-6  # YAML beats the default (1e-6)
    assert cfg.beta == 0.04 and cfg.lora_alpha == 256  # defaults where neither says anything
    assert parse_config(str(p)).lora_r == 32


def test_overrides_every_type():
    cfg = load_config("grpo_rafdb", ["--learning_rate", "3e-6", "--sources", "rafdb", "ferplus", "--use_vllm", "false",
                                     "--au_matching", "one_to_one", "--bf16", "false", "--lora_r", "64",
                                     "--no_use_peft", "--importance_sampling_level", "sequence"])
    assert cfg.learning_rate == 3e-6 and cfg.sources == ["rafdb", "ferplus"] and cfg.use_vllm is False
    assert cfg.reward.matching == "one_to_one" and cfg.bf16 is False and cfg.lora_r == 64 and cfg.use_peft is False
    assert cfg.importance_sampling_level == "sequence"
    m = load_config("grpo_rafdb", {"adapter": None, "reward_weights": [0, 1, 1], "use_vllm": False})
    assert m.adapter is None and m.reward.w_au == 0.0 and m.use_vllm is False


@pytest.mark.parametrize(
    "args, field",
    [
        (["--lr", "1e-5"], "lr"),
        (["--learnin_rate", "1e-5"], "learnin_rate"),
        (["--per_device_train_batch_size", "2.5"], "per_device_train_batch_size"),
        (["--use_vllm", "maybe"], "use_vllm"),
        (["--au_matching", "greedy"], "au_matching"),
        (["--learning_rate", "-1"], "learning_rate"),
        (["--num_generations", "1"], "num_generations"),
        (["--importance_sampling_level", "trajectory"], "importance_sampling_level"),
        (["--au_f1_reference", "all"], "au_f1_reference"),
        (["--val_steps", "10"], "val_steps"),  # an SFT field on a GRPO config
    ],
)
def test_bad_cli_value_names_the_field(args, field):
    with pytest.raises(ConfigError) as e:
        load_config("grpo_rafdb", args)
    assert e.value.field == field and field in str(e.value)


@pytest.mark.parametrize(
    "yaml_value, field, message",
    [
        ({"lora_r": "many"}, "lora_r", "expected an integer"),
        ({"lora_r": 2.5}, "lora_r", "expected an integer"),
        ({"sources": "rafdb"}, "sources", "expected a list"),
        ({"sources": [1, 2]}, "sources[0]", "expected a string"),
        ({"au_matching": "greedy"}, "au_matching", "must be one of"),
        ({"use_peft": "yes"}, "use_peft", "expected true/false"),
        ({"learnin_rate": 1e-5}, "learnin_rate", "did you mean learning_rate"),
        ({"val_steps": 3}, "val_steps", "is a field of TagferSFTConfig"),
        ({"beta": None}, "beta", "must not be null"),
        ({"reward_weights": [1.0, 1.0]}, "reward_weights", "one weight per TAG reward"),
        ({"adapter": None, "adapter_mode": "continue"}, "adapter_mode", "continue needs the adapter"),
        ({"remove_unused_columns": True}, "remove_unused_columns", "must be false"),
        ({"model_family": "llama9"}, "model_family", "llama9"),
    ],
)
def test_bad_yaml_value_names_the_field(yaml_value, field, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config("grpo_rafdb", yaml_value)
    assert e.value.field == field


def test_yaml_strings_that_argparse_would_convert_are_converted(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("stage: sft\ntrain_data: x.jsonl\nlearning_rate: 1e-5\nlr_scheduler_type: linear\nuse_peft: false\n")
    cfg = parse_config(str(p))  # PyYAML reads 1e-5 (no dot) as a string
    assert cfg.learning_rate == 1e-5 and cfg.lr_scheduler_type.value == "linear" and cfg.use_peft is False


def test_stage_and_old_override_syntax_are_explained(tmp_path):
    with pytest.raises(ConfigError, match="use `tagfer train grpo`"):
        parse_config("grpo_rafdb", stage="sft")
    with pytest.raises(ConfigError, match="TRL-style flags"):
        load_config("tiny_cpu", ["--set", "optim.learning_rate=1e-5"])
    with pytest.raises(ConfigError, match="train_data"):
        load_config({"stage": "sft"})


def test_generation_batch_must_divide():
    with pytest.raises(ConfigError, match="multiple of num_generations"):
        load_config("grpo_rafdb", ["--per_device_train_batch_size", "3", "--gradient_accumulation_steps", "1"])


def test_dump_roundtrip_keeps_what_was_given(tmp_path):
    cfg = load_config("grpo_f1", ["--seed", "7", "--use_vllm", "auto", "--au_f1_reference", "trace"])
    path = tmp_path / "c.yaml"
    text = dump_config(cfg, path)
    assert "use_vllm: auto" in text and "steps_per_generation" not in text  # as given; TRL's derived values left out
    again = load_config(str(path))
    assert again == cfg and again.au_f1_reference == "trace" and again.seed == 7


def test_any_trl_field_passes_through_and_warmup_is_a_fraction():
    g = load_config("tiny_cpu_grpo", ["--vllm_server_base_url", "http://gpu1:8000", "--mask_truncated_completions",
                                      "true", "--warmup_steps", "0.05"])
    assert g.vllm_server_base_url == "http://gpu1:8000" and g.mask_truncated_completions is True
    assert g.get_warmup_steps(200) == 10  # 5 % of 200 steps: a ratio, not 0.05 steps
    s = load_config("tiny_cpu", ["--torch_empty_cache_steps", "3"])
    assert s.torch_empty_cache_steps == 3
    with pytest.raises(ConfigError, match="is a field of TagferGRPOConfig"):
        load_config("tiny_cpu", ["--mask_truncated_completions", "true"])  # a GRPO-only field on an SFT run


def test_reward_fields_build_the_reward_config():
    r = load_config("grpo_rlvr").reward
    assert (r.w_au, r.w_ans, r.w_fmt, r.au_reward) == (0.0, 1.0, 1.0, "iou")
    f = load_config("grpo_f1")
    assert f.reward.au_reward == "f1" and f.au_f1_reference == "activated"
    assert load_config("tiny_cpu", ["--format_rules", "strict"]).reward.format_rules == "strict"


def test_use_vllm_auto_falls_back_with_a_warning(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm → ImportError
    with pytest.warns(RuntimeWarning, match="vLLM is not installed.*merged LoRA"):
        cfg = load_config("grpo_rafdb", ["--use_vllm", "auto"])
    assert cfg.use_vllm is False
    with pytest.raises(ConfigError, match="vLLM is not installed"):
        load_config("grpo_rafdb", ["--use_vllm", "true"])
    assert load_config("grpo_rafdb", ["--use_vllm", "false"]).use_vllm is False


def test_use_vllm_with_a_stand_in_vllm_module(monkeypatch):
    """vLLM importable (a stand-in module) but no GPU here: ``auto`` still falls back (and says why),
    ``true`` selects TRL's vLLM path."""
    import importlib.machinery
    import types

    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: auto would pick vLLM")
    stand_in = types.ModuleType("vllm")
    stand_in.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    monkeypatch.setitem(sys.modules, "vllm", stand_in)
    with pytest.warns(RuntimeWarning, match="no CUDA device"):
        assert use_vllm_now("auto") is False
    assert use_vllm_now("true") is True and use_vllm_now(True) is True
