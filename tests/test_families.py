"""tagfer.models.families: the registry, and each new family's tiny model through load, LoRA, SFT, GRPO, merge, eval, analyze."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fixtures_train import SHORT_SYSTEM, SHORT_USER, tiny_train_config
from tagfer.models.families import FAMILIES, UnknownFamily, family_of, get_family
from tagfer.models.vlm import ImagePolicy

pytestmark = pytest.mark.model  # every test here builds or trains a tiny model of a family

#: SFT steps of the family learning runs. Measured (seeds 0-2, short prompts): after 20 steps the loss is at most
#: 0.44x its first value (llava_onevision 0.43-0.44, qwen3_vl ≤ 0.33, gemma3 ≈ 0.13); 0.6 leaves a margin.
SFT_STEPS, SFT_MAX_RATIO = 20, 0.6
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

#: Real module names of each family (from the transformers modelling code): LM layer projections, vision
#: projections with the same leaf names, and projector modules.
NAMES = {
    "qwen2_5_vl": ("model.language_model.layers.3.mlp.gate_proj", "model.visual.blocks.0.mlp.gate_proj",
                   "model.visual.merger.mlp.0"),
    "qwen3_vl": ("model.language_model.layers.0.self_attn.q_proj", "model.visual.blocks.1.mlp.linear_fc1",
                 "model.visual.deepstack_merger_list.0.linear_fc1"),
    "gemma3": ("model.language_model.layers.1.mlp.down_proj",
               "model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj",
               "model.multi_modal_projector.mm_input_projection_weight"),
    "llava_onevision": ("model.language_model.layers.0.self_attn.o_proj",
                        "model.vision_tower.vision_model.encoder.layers.1.self_attn.v_proj",
                        "model.multi_modal_projector.linear_1"),
}


def test_lookup_by_name_and_model_type():
    assert get_family("qwen2_5_vl") is FAMILIES["qwen2_5_vl"]
    assert family_of({"model_type": "gemma3"}).name == "gemma3"
    assert family_of({"model_type": "qwen3_vl"}).projector == ("merger", "deepstack_merger_list")
    with pytest.raises(UnknownFamily, match="valid kinds: gemma3, llava_onevision, qwen2_5_vl"):
        get_family("llama4")
    with pytest.raises(UnknownFamily):
        family_of({})


def test_family_registry_register_and_resolve(tmp_path):
    """A new family is one call; its model types resolve to it; hub ids and folders find their family."""
    import dataclasses

    from tagfer.models.families import family_for, register_family

    mine = dataclasses.replace(get_family("gemma3"), name="mygemma", model_types=("mygemma", "mygemma_text"))
    try:
        assert register_family(mine) is mine
        assert get_family("mygemma_text") is mine and family_of({"model_type": "mygemma"}) is mine
        assert "mygemma" in FAMILIES.list() and "mygemma_text" not in FAMILIES.list()
    finally:
        FAMILIES.unregister("mygemma")
    with pytest.raises(UnknownFamily, match="did you mean 'qwen2_5_vl'"):
        get_family("qwen2_5vl")
    assert family_for("Qwen/Qwen2.5-VL-7B-Instruct").name == "qwen2_5_vl"
    assert family_for("Qwen/Qwen2-VL-2B-Instruct").name == "qwen2_vl"
    assert family_for("llava-hf/llava-onevision-qwen2-7b-ov-hf").name == "llava_onevision"
    assert family_for("anything", family="gemma3").name == "gemma3"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_vl"}))
    assert family_for(str(tmp_path)).name == "qwen3_vl"


def test_families_does_not_import_vlm():
    """families ↔ vlm was an import cycle: families now imports only the registry (vlm imports families)."""
    import ast
    import inspect

    import tagfer.models.families as fam_mod

    tree = ast.parse(inspect.getsource(fam_mod))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert {m for m in imported if m and m.startswith("tagfer")} == {"tagfer.core.registry"}


@pytest.mark.parametrize("name", sorted(NAMES))
def test_lora_regex_vision_and_projector_names(name):
    fam = get_family(name)
    lm, vision, projector = NAMES[name]
    rx = re.compile(fam.lora_target_regex(PROJ))
    assert rx.fullmatch(lm) and not rx.fullmatch(vision) and not rx.fullmatch(projector)
    assert not rx.fullmatch(lm + ".lora_A")
    assert fam.is_vision(vision) and not fam.is_vision(lm)
    assert fam.is_projector(projector) and not fam.is_projector(vision) and not fam.is_projector(lm)


@given(st.integers(16, 2000), st.integers(16, 2000), st.sampled_from([0, 112, 224, 448]))
def test_grid_image_tokens_follow_the_processor_rule(w, h, side):
    """One token per 28 px (Qwen2.5-VL) / 32 px (Qwen3-VL) cell of the resized image, rounded by smart_resize."""
    from tagfer.models.vlm import smart_resize

    pol = ImagePolicy(side)
    rw, rh = pol.resized_size(w, h)
    hh, ww = smart_resize(rh, rw, 28, 56 * 56, max(56 * 56, pol.bounds[1]))
    assert pol.image_tokens(w, h) == get_family("qwen2_5_vl").image_tokens(pol, w, h) == (hh // 28) * (ww // 28)
    hh, ww = smart_resize(rh, rw, 32, 64 * 64, max(64 * 64, pol.bounds[1]))
    assert get_family("qwen3_vl").image_tokens(pol, w, h) == (hh // 32) * (ww // 32)


def test_fixed_image_tokens_come_from_the_config():
    class Cfg:
        mm_tokens_per_image = 256

    fam = get_family("gemma3")
    assert fam.image_tokens(ImagePolicy(224), 100, 700, Cfg()) == 256
    with pytest.raises(ValueError, match="mm_tokens_per_image"):
        fam.image_tokens(ImagePolicy(224), 100, 100)
    with pytest.raises(ValueError, match="processor"):  # any-resolution tiling: only the processor knows
        get_family("llava_onevision").image_tokens(ImagePolicy(224), 100, 100)


# --- each new family's tiny model, end to end -----------------------------------------------------------


def _image_token_id(model) -> int:
    return int(getattr(model.config, "image_token_id"))


def test_tiny_loads_generates_and_counts_image_tokens(family_tiny_dir, astronaut_path, tmp_path):
    import torch
    from PIL import Image

    from tagfer.models.vlm import load_processor, load_vlm

    vlm = load_vlm(str(family_tiny_dir), device="cpu")
    fam = family_of(vlm.model)
    assert fam.name == json.loads((family_tiny_dir / "config.json").read_text())["model_type"]
    img = Image.open(astronaut_path).convert("RGB").crop((0, 0, 300, 180))  # not square
    inputs = vlm.prepare([img], ["Which expression?"], "sys")
    n = int((inputs["input_ids"] == _image_token_id(vlm.model)).sum())
    assert n == fam.image_tokens(ImagePolicy.of(vlm.config), *img.size, vlm.model.config, vlm.processor) > 0
    a = vlm.generate([img, None, img.rotate(90)], ["Which expression?"] * 3, "sys", max_new_tokens=6)
    b = vlm.generate([img, None, img.rotate(90)], ["Which expression?"] * 3, "sys", max_new_tokens=6)
    assert a == b and len(a) == 3  # greedy, a text-only request inside an image batch
    assert vlm.generate([img], ["Which expression?"], "sys", max_new_tokens=6) == a[:1]  # batching changes nothing
    vlm.processor.save_pretrained(str(tmp_path / "proc"))  # what adapters and merged models carry
    again = load_processor(str(tmp_path / "proc"), family=fam)
    chat = vlm.processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}],
                                              tokenize=False, add_generation_prompt=True)
    one = vlm.processor(text=[chat], images=[[img]], return_tensors="pt")
    two = again(text=[chat], images=[[img]], return_tensors="pt")
    assert torch.equal(one["input_ids"], two["input_ids"]) and torch.equal(one["pixel_values"], two["pixel_values"])


def test_lora_layout_and_freezing(family_tiny_dir):
    from tagfer.train.config import load_config
    from tagfer.train.model import apply_lora, load_for_training, trainable_summary

    cfg = load_config("tiny_cpu", [f"model.name_or_path={family_tiny_dir}", "lora.r=4"])
    model, _, _ = load_for_training(cfg)
    fam = family_of(model)
    peft_model = apply_lora(model, cfg.lora)
    lora = {n.rsplit(".lora_", 1)[0] for n, _ in peft_model.named_parameters() if ".lora_" in n}
    assert len(lora) == 7 * 2 and all("language_model.layers" in n for n in lora)  # 7 projections x 2 layers
    saved = {n for n, _ in peft_model.named_parameters() if "modules_to_save" in n}
    assert saved and all(fam.is_projector(n) for n in saved)
    if fam.name == "qwen3_vl":  # the DeepStack merger is a projector too
        assert any("deepstack_merger_list.0" in n for n in saved)
    for n, p in peft_model.named_parameters():
        if fam.is_vision(n) and not (fam.is_projector(n) and "modules_to_save" in n):
            assert not p.requires_grad, n
    s = trainable_summary(peft_model)
    assert s["lora"] > 0 and s["projector"] > 0 and s["other"] == 0


@pytest.fixture(scope="module")
def family_sft(family_tiny_dir, train_samples, short_prompts, tmp_path_factory):
    from tagfer.train.sft import run_sft

    out = tmp_path_factory.mktemp("family_sft")
    cfg = tiny_train_config(out, family_tiny_dir, train_samples, optim__max_steps=SFT_STEPS, data__val_size=0,
                            sft__eval_steps=0, sft__val_samples=0, **short_prompts)
    return cfg, run_sft(cfg)


def test_sft_loss_falls(family_sft):
    _, res = family_sft
    losses = res.train_loss
    assert len(losses) == SFT_STEPS and losses[0] > 1.0
    assert min(losses[-2:]) <= SFT_MAX_RATIO * losses[0], losses


@pytest.fixture(scope="module")
def family_merged(family_sft, tmp_path_factory):
    from tagfer.train.merge import merge_adapter

    return merge_adapter(family_sft[1].final_dir, tmp_path_factory.mktemp("family_merged") / "merged")


def test_sft_adapter_merges_and_loads(family_sft, family_merged, family_tiny_dir, astronaut_path):
    """The adapter folder and the merged model load with load_vlm and decode alike; the adapter changed the model."""
    import torch
    from PIL import Image

    from tagfer.models.vlm import load_vlm

    _, res = family_sft
    img = Image.open(astronaut_path)
    adapted = load_vlm(str(res.final_dir), device="cpu")
    merged = load_vlm(str(family_merged), device="cpu")
    base = load_vlm(str(family_tiny_dir), device="cpu")
    args = ([img], [SHORT_USER], SHORT_SYSTEM)
    with torch.no_grad():
        logits = [v.model(**v.prepare(*args)).logits[0, -1] for v in (adapted, merged, base)]
    assert torch.allclose(logits[0], logits[1], atol=1e-4), (logits[0] - logits[1]).abs().max()
    assert (logits[0] - logits[2]).abs().max() > 1e-2
    assert adapted.generate(*args, max_new_tokens=6) == merged.generate(*args, max_new_tokens=6)


def test_eval_runs_on_the_merged_model(family_merged, rafdb_root, tmp_path):
    """`tagfer eval`'s transformers path on the trained family model: every image gets a recorded prediction."""
    from tagfer.evaluation import eval as E
    from tagfer.models.backends import TransformersBackend

    out = tmp_path / "preds.jsonl"
    be = TransformersBackend(str(family_merged), batch_size=4, device="cpu")
    s = E.eval_source(f"rafdb:{rafdb_root}", be, out, model=f"hf:{family_merged}", gen=E.generation_defaults(max_new_tokens=8))
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    assert s.processed == 4 and s.failed == 0 and len(rows) == 4
    assert all(r["error"] is None and isinstance(r["output"], str) for r in rows)


def test_grpo_reward_rises(family_tiny_dir, train_samples, short_prompts, tmp_path):
    """A reward for emitting one token: its mean rises over 8 GRPO steps."""
    import torch

    from tagfer.train.grpo import run_grpo

    target: dict[str, int] = {}

    def favour_token(prompts=None, completions=None, completion_ids=None, **kw):
        if "id" not in target:  # the policy's second most frequent token at the start
            counts = torch.bincount(torch.tensor([t for ids in completion_ids for t in ids]))
            target["id"] = int(counts.argsort(descending=True)[1])
        return [sum(int(t == target["id"]) for t in ids) / max(1, len(ids)) for ids in completion_ids]

    steps = 8
    cfg = tiny_train_config(tmp_path, family_tiny_dir, train_samples, stage="grpo", optim__max_steps=steps,
                            optim__learning_rate=1e-2, optim__batch_size=8, grpo__num_generations=8, grpo__beta=0.0,
                            grpo__max_completion_length=12, lora__train_projector=False, **short_prompts)
    res = run_grpo(cfg, reward_funcs=[favour_token], weights=[1.0])
    rewards = [h["reward"] for h in res.log_history if "reward" in h]
    assert len(rewards) == steps
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.1, rewards


def test_analyze_cli_runs_the_family_model(family_tiny_dir, astronaut_path):
    """`tagfer analyze --model` on the family's tiny model: its (random, hence malformed) trace is parsed and reported."""
    from typer.testing import CliRunner

    from tagfer.cli import app
    from tagfer.explainer.analyze import EXIT_MALFORMED

    r = CliRunner().invoke(app, ["analyze", str(astronaut_path), "--model", str(family_tiny_dir), "--json",
                                 "--max-new-tokens", "12", "--device", "cpu"])
    assert r.exit_code == EXIT_MALFORMED, r.output
    (rec,) = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    (a,) = rec["analyses"]
    assert a["engine"] == str(family_tiny_dir) and not a["well_formed"] and a["r_fmt"] == 0


def test_model_family_setting_picks_the_tiny_model_and_is_checked(tmp_path):
    """`--set model.family=gemma3` on the tiny preset builds a tiny Gemma 3; an unknown family is a config error."""
    from tagfer.train.config import ConfigError, load_config
    from tagfer.train.model import resolve_base

    cfg = load_config("tiny_cpu", [f"output_dir={tmp_path}", "model.family=gemma3"])
    assert family_of(resolve_base(cfg)).name == "gemma3"
    cfg = load_config("tiny_cpu", [f"output_dir={tmp_path}", "model.family=qwen3_vl"])
    assert family_of(resolve_base(cfg)).name == "qwen3_vl"  # the folder of another family is rebuilt
    with pytest.raises(ConfigError, match="model.family"):
        load_config("tiny_cpu", ["model.family=llama9"])


def test_full_finetune_trains_lm_and_projector_not_vision(family_tiny_dir):
    from tagfer.train.config import load_config
    from tagfer.train.model import load_for_training

    cfg = load_config("tiny_cpu", [f"model.name_or_path={family_tiny_dir}", "lora.enabled=false"])
    model = load_for_training(cfg)[0]
    fam = family_of(model)
    kinds = {"vision": set(), "projector": set(), "lm": set()}
    for n, p in model.named_parameters():
        kind = "projector" if fam.is_projector(n) else "vision" if fam.is_vision(n) else "lm" if "language_model" in n else None
        if kind:
            kinds[kind].add(p.requires_grad)
    assert kinds == {"vision": {False}, "projector": {True}, "lm": {True}}


def test_bf16_training_keeps_fp32_projector_masters(family_tiny_dir, train_samples, short_prompts, tmp_path):
    """A bf16 model of each family: no bf16 trainable tensor, and 3 small-lr steps move every projector tensor."""
    import math

    import torch
    from transformers import TrainerCallback

    from tagfer.train.model import low_precision_trainable
    from tagfer.train.sft import run_sft

    seen: dict = {}

    class Snapshot(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            fam = family_of(model)
            seen["low"] = low_precision_trainable(model)
            seen["before"] = {n: p.detach().clone() for n, p in model.named_parameters()
                              if p.requires_grad and fam.is_projector(n)}

        def on_train_end(self, args, state, control, model=None, **kw):
            seen["after"] = {n: p.detach().clone() for n, p in model.named_parameters() if n in seen["before"]}

    cfg = tiny_train_config(tmp_path, family_tiny_dir, train_samples, model__dtype="bfloat16", optim__learning_rate=1e-4,
                            optim__max_steps=3, optim__batch_size=4, optim__bf16="true", lora__r=4, trl__use_cpu=True,
                            **short_prompts)
    res = run_sft(cfg, callbacks=[Snapshot()])
    assert seen["low"] == [] and seen["before"], seen
    for n, before in seen["before"].items():
        assert seen["after"][n].dtype == torch.float32, n
        assert (seen["after"][n] != before).float().mean().item() > 0.9, n
    assert all(math.isfinite(x) for x in res.train_loss)
