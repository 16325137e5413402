"""tagfer.train.card: the model card a training run writes (base model named right, a quick start that loads)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tagfer.train.card import ModelCardMixin, is_hub_id, model_card


def test_local_base_is_named_not_linked(tmp_path):
    base = tmp_path / "base_model"
    base.mkdir()
    card = model_card(base_model=str(base), model_name="sft", model_ref=str(tmp_path / "best"), trainer_name="SFT",
                      tags=["trl", "sft", "tagfer"])
    text = str(card)
    assert "huggingface.co/None" not in text and "None" not in text
    assert f"`{base}`" in text and f"huggingface.co/{base}" not in text
    assert "base_model" not in card.data.to_dict()  # hub metadata only for a hub id
    assert f"--model {tmp_path / 'best'}" in text and f'load_vlm("{tmp_path / "best"}")' in text
    assert card.data.tags == ["generated_from_trainer", "trl", "sft", "tagfer"]


def test_hub_base_is_linked_and_in_the_metadata():
    paper = {"title": "A Method", "id": "2402.03300", "citation": "@article{x, title={A Method}}"}
    card = model_card(base_model="Qwen/Qwen2.5-VL-7B-Instruct", model_name="grpo", model_ref="me/tag-7b",
                      trainer_name="GRPO", tags=["trl", "grpo", "trl"], paper=paper)
    text = str(card)
    assert "[Qwen/Qwen2.5-VL-7B-Instruct](https://huggingface.co/Qwen/Qwen2.5-VL-7B-Instruct)" in text
    assert card.data.base_model == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert "[A Method](https://huggingface.co/papers/2402.03300)" in text and "@article{x" in text
    assert card.data.tags == ["generated_from_trainer", "trl", "grpo"]  # duplicates dropped, order kept


@pytest.mark.parametrize("name, hub", [("Qwen/Qwen2.5-VL-7B-Instruct", True), ("runs/sft/final", False),
                                      ("/abs/model", False), ("tiny", False), ("", False), (None, False)])
def test_is_hub_id(name, hub):
    assert is_hub_id(name) is hub


def test_is_hub_id_refuses_an_existing_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "base").mkdir(parents=True)
    assert not is_hub_id("runs/base")


class _Base:
    """The parts of a TRL trainer the mixin reads."""

    _name = "SFT"
    _tag_names = ["trl", "sft"]
    _paper: dict = {}

    def __init__(self, out, base, rank0=True, hub_model_id=None):
        self.args = SimpleNamespace(output_dir=str(out))
        self.model = SimpleNamespace(config=SimpleNamespace(_name_or_path=base))
        self.hub_model_id = hub_model_id
        self._rank0 = rank0

    def is_world_process_zero(self):
        return self._rank0

    def create_model_card(self, *a, **kw):  # TRL's: must not be reached
        raise AssertionError("TRL's card was written")


class _Trainer(ModelCardMixin, _Base):
    card_adapter = "best"


def test_mixin_writes_the_card_where_trl_does(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    _Trainer(out, str(tmp_path)).create_model_card(model_name="run", tags="extra")
    text = (out / "README.md").read_text()
    assert "# Model Card for run" in text and f"`{tmp_path}`" in text and "None" not in text
    assert f"--model {out / 'best'}" in text and "- extra" in text and "- sft" in text
    _Trainer(out, "Qwen/Qwen2.5-VL-3B-Instruct", hub_model_id="me/tag").create_model_card()
    text = (out / "README.md").read_text()
    assert "--model me/tag" in text and "# Model Card for run" in text  # name defaults to the folder's
    assert "(https://huggingface.co/Qwen/Qwen2.5-VL-3B-Instruct)" in text


def test_mixin_writes_nothing_off_rank_zero(tmp_path):
    _Trainer(tmp_path, "x/y", rank0=False).create_model_card(model_name="run")
    assert not (tmp_path / "README.md").exists()
