"""Presets and config files as YAML mappings: names, extends chains, flat keys (no TRL import: fast tier)."""

from __future__ import annotations

import pytest

from tagfer.train.presets import ConfigError, list_presets, load_raw, preset_path

PRESETS = ["sft_tag310k", "grpo_rafdb", "grpo_ferplus", "grpo_affectnet", "grpo_rlvr", "grpo_f1", "sft_nobbox",
           "tiny_cpu", "tiny_cpu_grpo"]


def test_every_preset_is_listed_and_names_its_stage():
    assert sorted(PRESETS) == list_presets()
    for name in PRESETS:
        raw = load_raw(name)
        assert raw["stage"] == ("sft" if name.startswith(("sft", "tiny_cpu")) and not name.endswith("grpo") else "grpo")
        assert "extends" not in raw


def test_extends_merges_child_over_parent():
    parent, child = load_raw("grpo_rafdb"), load_raw("grpo_ferplus")
    assert child["sources"] == ["ferplus"] and parent["sources"] == ["rafdb"]
    assert child["beta"] == parent["beta"] == 0.04  # inherited
    assert load_raw("grpo_rlvr")["reward_weights"] == [0.0, 1.0, 1.0]


def test_extends_resolves_relative_files_and_env_blocks_merge(tmp_path):
    (tmp_path / "base.yaml").write_text("stage: grpo\nlr_scheduler_type: cosine\nenv: {A: '1', B: '2'}\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nenv: {B: '3'}\nbeta: 0.1\n")
    raw = load_raw(str(tmp_path / "child.yaml"))
    assert raw == {"stage": "grpo", "lr_scheduler_type": "cosine", "beta": 0.1, "env": {"A": "1", "B": "3"}}


def test_circular_extends(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_raw(str(tmp_path / "a.yaml"))


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="tiny_cpu"):
        preset_path("no_such_preset")
    with pytest.raises(ConfigError, match="config file not found"):
        load_raw("/nonexistent/x.yaml")


def test_old_nested_sections_are_refused_with_the_flat_spelling(tmp_path):
    p = tmp_path / "old.yaml"
    p.write_text("stage: sft\noptim:\n  learning_rate: 1.0e-5\n")
    with pytest.raises(ConfigError) as e:
        load_raw(str(p))
    assert e.value.field == "optim" and "learning_rate: 1e-5" in str(e.value)
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_raw(str(p))
