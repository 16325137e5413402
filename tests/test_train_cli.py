"""`tagfer train …` commands (the fast ones; sft/grpo runs are covered by test_train_sft/grpo)."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from tagfer.cli import app

runner = CliRunner()


def test_presets():
    r = runner.invoke(app, ["train", "presets"])
    assert r.exit_code == 0 and "grpo_rafdb" in r.output and "tiny_cpu" in r.output


@pytest.mark.model  # the config classes subclass TRL's
def test_show_with_trl_style_overrides():
    r = runner.invoke(app, ["train", "show", "-c", "grpo_ferplus", "--learning_rate", "2e-6", "--sources", "ferplus",
                            "rafdb", "--use_vllm", "false"])
    assert r.exit_code == 0, r.output
    shown = yaml.safe_load(r.stdout)  # warnings (e.g. tensorboard missing) go to stderr
    assert shown["learning_rate"] == 2e-6 and shown["sources"] == ["ferplus", "rafdb"] and shown["stage"] == "grpo"


@pytest.mark.model
def test_fields_lists_tag_and_trl_fields_with_help():
    r = runner.invoke(app, ["train", "fields", "grpo"])
    assert r.exit_code == 0
    for flag in ("--adapter_mode", "--au_f1_reference", "--importance_sampling_level", "--beta", "--lora_r"):
        assert flag in r.output
    assert "literal 'we keep LoRA adapters trainable'" in " ".join(r.output.split())


@pytest.mark.model  # validating the config imports TRL
def test_bad_override_exits_with_field_name():
    r = runner.invoke(app, ["train", "sft", "-c", "tiny_cpu", "--lr", "1"])
    assert r.exit_code == 2
    assert "lr: unknown field" in r.output and "learning_rate" in r.output
    r = runner.invoke(app, ["train", "sft", "-c", "tiny_cpu", "--lora_r", "many"])
    assert r.exit_code == 2 and "lora_r" in r.output


@pytest.mark.model
def test_stage_mismatch_is_refused():
    r = runner.invoke(app, ["train", "sft", "-c", "grpo_rafdb"])
    assert r.exit_code == 2 and "tagfer train grpo" in r.output


@pytest.mark.model
def test_exports(tmp_path):
    r = runner.invoke(app, ["train", "export-llamafactory", "-c", "sft_nobbox", "-o", str(tmp_path / "lf.yaml")])
    assert r.exit_code == 0, r.output
    lf = yaml.safe_load((tmp_path / "lf.yaml").read_text())
    assert lf["lora_rank"] == 128 and lf["dataset"] == "tag_sft_nobbox"
    r = runner.invoke(app, ["train", "export-verl", "-c", "grpo_rafdb", "-o", str(tmp_path / "verl.yaml")])
    assert r.exit_code == 0, r.output
    sh = (tmp_path / "verl.sh").read_text()
    assert sh.count("compute_score") == 1 and "data.train_files=tag_export/verl/rafdb.parquet" in sh


@pytest.mark.model
def test_missing_model_is_clear(tmp_path):
    r = runner.invoke(app, ["train", "sft", "-c", "tiny_cpu", "--model_name_or_path", "/nonexistent/model",
                            "--output_dir", str(tmp_path)])
    assert r.exit_code == 3
    assert "does not exist" in r.output


def test_plot_missing_log(tmp_path):
    r = runner.invoke(app, ["train", "plot", str(tmp_path / "none.jsonl")])
    assert r.exit_code == 2


@pytest.mark.model
def test_tiny_cpu_sft_then_grpo_end_to_end(tmp_path):
    """The done criterion: `train sft` then `train grpo` on the tiny_cpu presets (shortened), then merge."""
    import json

    sft_dir, grpo_dir = tmp_path / "sft", tmp_path / "grpo"
    r = runner.invoke(app, ["train", "sft", "-c", "tiny_cpu", "--output_dir", str(sft_dir),
                            "--max_steps", "3", "--val_steps", "2", "--save_steps", "2"])
    assert r.exit_code == 0, r.output
    assert (sft_dir / "best" / "adapter_config.json").is_file()
    assert (sft_dir / "checkpoint-2").is_dir()
    r = runner.invoke(app, ["train", "grpo", "-c", "tiny_cpu_grpo", "--output_dir", str(grpo_dir),
                            "--adapter", str(sft_dir / "best"), "--max_steps", "2"])
    assert r.exit_code == 0, r.output
    log = [json.loads(x) for x in (grpo_dir / "train_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log if x["event"] == "train" and "reward" in x] == [1, 2]
    # GRPO continued from the SFT run's tiny base model
    result = json.loads((grpo_dir / "result.json").read_text())
    assert result["base_model"] == str((sft_dir / "base_model").resolve())
    r = runner.invoke(app, ["train", "plot", str(grpo_dir / "train_log.jsonl")])
    assert r.exit_code == 0 and (grpo_dir / "training_dynamics.png").is_file()
    r = runner.invoke(app, ["train", "merge", str(grpo_dir / "final"), "-o", str(tmp_path / "merged")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "merged" / "config.json").is_file()
    # a rerun with more steps resumes from the last SFT checkpoint instead of starting over
    r = runner.invoke(app, ["train", "sft", "-c", "tiny_cpu", "--output_dir", str(sft_dir),
                            "--max_steps", "4", "--val_steps", "0", "--save_steps", "2"])
    assert r.exit_code == 0, r.output
    steps = [x["step"] for x in (json.loads(y) for y in (sft_dir / "train_log.jsonl").read_text().splitlines())
             if x["event"] == "train" and "loss" in x]
    assert (sft_dir / "checkpoint-3").is_dir()  # the trainer also saves at the last step
    assert steps == [1, 2, 3, 4]  # resumed from checkpoint-3: only step 4 was trained again (not 1..4)
