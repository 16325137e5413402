"""Presets and config files: loading, strict validation, overrides."""

from __future__ import annotations

import pytest

from tagfer.train.config import ConfigError, TrainConfig, dump_config, list_presets, load_config, load_raw

PAPER_PRESETS = ["sft_tag310k", "grpo_rafdb", "grpo_ferplus", "grpo_affectnet", "grpo_rlvr", "grpo_f1", "sft_nobbox", "tiny_cpu"]


@pytest.mark.model  # validates trl.* keys against TRL's config classes (imports TRL)
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
    # GPU presets: vLLM rollouts when available (else the merged-LoRA transformers fallback, with a warning)
    assert g.grpo.use_vllm == "auto" and g.grpo.vllm_mode == "colocate" and g.grpo.merged_rollouts


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


@pytest.mark.model  # imports TRL (its SFTConfig/GRPOConfig fields)
def test_trl_mapping_derives_every_trl_argument_from_one_table():
    """TRL's config is built from tagfer's fields through one table; warm-up is TRL's fractional warmup_steps."""
    from trl import GRPOConfig

    from tagfer.train.trl_args import DERIVED, trl_kwargs

    cfg = load_config("grpo_rafdb", ["optim.warmup_ratio=0.05", "grpo.use_vllm=false", "optim.bf16=false"])
    kw = trl_kwargs(cfg, "grpo")
    assert kw["warmup_steps"] == 0.05 and kw["num_generations"] == 8 and kw["beta"] == 0.04
    assert set(kw) == {k for k, (where, _, _) in DERIVED.items() if where in ("both", "grpo")}
    args = GRPOConfig(**kw)
    assert args.get_warmup_steps(200) == 10  # 5 % of 200 steps: a ratio, not 0.05 steps


@pytest.mark.model  # validates trl.* keys against TRL's config classes (imports TRL)
def test_trl_section_passes_any_trl_argument_through():
    from trl import GRPOConfig, SFTConfig

    from tagfer.train.trl_args import trl_config, trl_kwargs

    cfg = load_config("tiny_cpu", ["trl.max_prompt_length=77", "trl.torch_empty_cache_steps=3"], validate=False)
    assert cfg.trl == {"max_prompt_length": 77, "torch_empty_cache_steps": 3}
    with pytest.raises(ConfigError, match=r"trl\.max_prompt_length: not an argument of TRL's SFTConfig"):
        trl_kwargs(cfg, "sft")  # GRPO-only argument on an SFT run
    g = load_config("tiny_cpu_grpo", ["trl.vllm_server_base_url=http://gpu1:8000", "trl.mask_truncated_completions=true"])
    args = trl_config(g)
    assert isinstance(args, GRPOConfig)
    assert args.vllm_server_base_url == "http://gpu1:8000" and args.mask_truncated_completions is True
    s = load_config("tiny_cpu", ["trl.torch_empty_cache_steps=3"])
    assert isinstance(trl_config(s), SFTConfig) and trl_config(s).torch_empty_cache_steps == 3


@pytest.mark.parametrize(
    "override, message",
    [
        ("trl.no_such_argument=1", r"trl\.no_such_argument: not an argument of TRL's GRPOConfig"),
        ("trl.num_generaton=4", r"did you mean num_generations"),
        ("trl.learning_rate=1e-3", r"trl\.learning_rate: is set by tagfer from optim\.learning_rate"),
        ("trl.beta=0.1", r"trl\.beta: is set by tagfer from grpo\.beta"),
    ],
)
@pytest.mark.model  # validates trl.* keys against TRL's config classes (imports TRL)
def test_unknown_or_derived_trl_argument_is_a_clear_error(override, message):
    from tagfer.train.trl_args import trl_kwargs

    cfg = load_config("tiny_cpu_grpo", [override])
    with pytest.raises(ConfigError, match=message):
        trl_kwargs(cfg, "grpo")


def test_trl_section_must_be_a_mapping():
    with pytest.raises(ConfigError, match="trl: expected a mapping"):
        load_config("tiny_cpu", ["trl=[1, 2]"])


def test_use_vllm_auto_falls_back_with_a_warning(monkeypatch):
    import sys

    from tagfer.train.trl_args import use_vllm_now

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm → ImportError
    cfg = load_config("grpo_rafdb", ["grpo.use_vllm=auto"])
    with pytest.warns(RuntimeWarning, match="vLLM is not installed.*merged LoRA"):
        assert use_vllm_now(cfg) is False
    with pytest.raises(RuntimeError, match="vLLM is not installed"):
        use_vllm_now(load_config("grpo_rafdb", ["grpo.use_vllm=true"]))
    assert use_vllm_now(load_config("grpo_rafdb", ["grpo.use_vllm=false"])) is False


@pytest.mark.model  # builds TRL's GRPOConfig
def test_use_vllm_with_a_stand_in_vllm_module(monkeypatch):
    """vLLM importable (a stand-in module, as in test_backends) but no GPU here: ``auto`` still falls back
    (and says why), ``true`` selects TRL's vLLM path in the derived TRL arguments."""
    import sys
    import types

    import torch

    from tagfer.train.trl_args import trl_kwargs, use_vllm_now

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: auto would pick vLLM")
    import importlib.machinery

    stand_in = types.ModuleType("vllm")
    stand_in.__spec__ = importlib.machinery.ModuleSpec("vllm", None)  # find_spec("vllm") is asked on the way
    monkeypatch.setitem(sys.modules, "vllm", stand_in)
    with pytest.warns(RuntimeWarning, match="no CUDA device"):
        assert use_vllm_now(load_config("grpo_rafdb", ["grpo.use_vllm=auto"])) is False
    cfg = load_config("grpo_rafdb", ["grpo.use_vllm=true", "grpo.vllm_mode=server", "trl.vllm_server_base_url=http://gpu0:8000"])
    kw = trl_kwargs(cfg, "grpo")
    assert kw["use_vllm"] is True and kw["vllm_mode"] == "server" and kw["vllm_server_base_url"] == "http://gpu0:8000"
