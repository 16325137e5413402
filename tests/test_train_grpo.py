"""GRPO on the tiny model: TAG rewards logged per component, R_AU masked without AU boxes, real learning."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fixtures_train import tiny_train_config

pytestmark = pytest.mark.model  # imports torch at the top and trains the tiny model: not in the fast tier


def _grpo_cfg(out, model_dir, data, **kw):
    base = dict(learning_rate=1e-3, max_steps=3, per_device_train_batch_size=4, num_generations=4,
                max_completion_length=16, train_projector=False)
    base.update(kw)
    return tiny_train_config(out, model_dir, data, stage="grpo", **base)


@pytest.fixture(scope="module")
def grpo_built(tmp_path_factory, train_tiny_dir, train_samples):
    from tagfer.train.grpo import build_grpo_trainer

    cfg = _grpo_cfg(tmp_path_factory.mktemp("grpo"), train_tiny_dir, train_samples)
    trainer, logger, info = build_grpo_trainer(cfg)
    return cfg, trainer


def test_reward_funcs_and_weights(grpo_built):
    cfg, trainer = grpo_built
    assert trainer.reward_func_names == ["r_au", "r_ans", "r_fmt"]
    assert trainer.reward_weights.tolist() == [cfg.reward.w_au, cfg.reward.w_ans, cfg.reward.w_fmt]
    assert trainer.beta == 0.04 and trainer.loss_type == "grpo"


def test_au_term_masked_without_boxes(grpo_built):
    """TRL 1.16: our None → NaN, excluded from the weighted sum (nansum) and from the r_au mean."""
    cfg, trainer = grpo_built
    ds = trainer.train_dataset
    rows = [ds[i] for i in range(len(ds))]
    with_boxes = next(r for r in rows if r["au_boxes"])
    without = next(r for r in rows if not r["au_boxes"])
    b = with_boxes["au_boxes"][0]
    good = f"<think>Look. AU12 <bbox>[{b[0]}, {b[1]}, {b[2]}, {b[3]}]</bbox> ok.</think><answer>{with_boxes['label']}</answer>"
    inputs = [with_boxes, without, with_boxes, without]
    texts = [good, good.replace(with_boxes["label"], without["label"]), "garbage", "<think>x</think><answer>anger</answer>"]
    completions = [[{"role": "assistant", "content": t}] for t in texts]
    prompts = [r["prompt"] for r in inputs]
    ids = [[1, 2, 3]] * 4
    per_func = trainer._calculate_rewards(inputs, prompts, completions, ids)
    r_au = per_func[:, 0]
    assert r_au[0].item() == pytest.approx(1.0)  # exact box → IoU 1
    assert math.isnan(r_au[1].item()) and math.isnan(r_au[3].item())  # skipped, not 0
    assert r_au[2].item() == 0.0  # boxes exist, none predicted → 0
    total = (per_func * trainer.reward_weights.unsqueeze(0)).nansum(dim=1)
    ans, fmt = per_func[:, 1], per_func[:, 2]
    assert total[1].item() == pytest.approx(ans[1].item() + fmt[1].item())
    assert total[1].item() == pytest.approx(1.0 + cfg.reward.fmt_bonus)
    assert torch.nanmean(r_au).item() == pytest.approx(0.5)  # mean over the scored rows only


def test_grpo_runs_and_logs_components(grpo_built):
    cfg, trainer = grpo_built
    base = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "base_layer" in n}
    trainer.train()
    # rollouts ran on merged LoRA weights (7 projections x 2 layers), KV cache on; the frozen base is bit-exact after
    assert trainer.rollout_merged_layers == 14 and trainer.generation_config.use_cache is True
    after = dict(trainer.model.named_parameters())
    assert base and all(torch.equal(after[n], w) for n, w in base.items())
    with open(f"{cfg.output_dir}/{cfg.log_jsonl}") as f:
        lines = [json.loads(x) for x in f.read().splitlines()]
    steps = [r for r in lines if r["event"] == "train" and "reward" in r]
    assert len(steps) == 3
    for r in steps:
        for key in ("r_ans", "r_fmt", "accuracy", "kl", "completion_length", "reward", "au_scored"):
            assert key in r, key
        assert "r_au" in r  # None when no sample of the step had AU boxes
        assert 0.0 <= r["au_scored"] <= 1.0
        assert r["completion_length"] <= cfg.max_completion_length


def test_grpo_model_card(grpo_built):
    """The card TRL's ``_save_checkpoint`` asks for is ours: the local base named, the quick start on ``final/``."""
    cfg, trainer = grpo_built
    trainer.create_model_card(model_name="grpo")
    text = (Path(cfg.output_dir) / "README.md").read_text()
    assert "huggingface.co/None" not in text and 'model="None"' not in text
    assert f"`{cfg.model_name_or_path}`" in text and f"--model {Path(cfg.output_dir) / 'final'}" in text
    assert "- grpo" in text and "- tagfer" in text and "huggingface.co/papers/2402.03300" in text


def test_grpo_learns_a_token_preference(tmp_path, train_tiny_dir, train_samples):
    """A reward for emitting one token: its mean must rise (a learning signal, not just 'it ran')."""
    from tagfer.train.grpo import run_grpo

    target = {}

    def favour_token(prompts=None, completions=None, completion_ids=None, **kw):
        if "id" not in target:  # the policy's second most frequent token at the start: present, not dominant
            counts = torch.bincount(torch.tensor([t for ids in completion_ids for t in ids]))
            target["id"] = int(counts.argsort(descending=True)[1])
        return [sum(int(t == target["id"]) for t in ids) / max(1, len(ids)) for ids in completion_ids]

    favour_token.__name__ = "favour_token"
    steps = 12
    cfg = _grpo_cfg(tmp_path, train_tiny_dir, train_samples, max_steps=steps, learning_rate=1e-2, beta=0.0,
                    max_completion_length=12, num_generations=8, per_device_train_batch_size=8, seed=0)
    res = run_grpo(cfg, reward_funcs=[favour_token], weights=[1.0])
    rewards = [h["reward"] for h in res.log_history if "reward" in h]
    assert len(rewards) == steps
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > first + 0.1, rewards


def test_merged_lora_matches_unmerged_and_restores_the_base_exactly(train_tiny_dir):
    """bf16 model: outputs inside the block equal PEFT's unmerged forward (to bf16 rounding); afterwards every
    base tensor is bit-identical, where a plain merge + unmerge in bf16 leaves rounding drift."""
    from tagfer.train.config import load_config
    from tagfer.train.model import apply_lora, load_for_training
    from tagfer.train.rollout import lora_layers, merged_lora

    cfg = load_config("tiny_cpu", ["--model_name_or_path", str(train_tiny_dir), "--dtype", "bfloat16", "--lora_r", "4",
                                   "--train_projector", "false"])
    model = apply_lora(load_for_training(cfg)[0], cfg).eval()
    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    ids = torch.randint(10, 200, (2, 12))
    with torch.no_grad():
        ref = model(input_ids=ids).logits.float()
        with merged_lora(model) as n:
            assert n == 14 and not lora_layers(model)  # all merged
            merged = model(input_ids=ids).logits.float()
        assert len(lora_layers(model)) == 14  # unmerged again
        again = model(input_ids=ids).logits.float()
    assert torch.equal(again, ref)
    assert (merged - ref).abs().max().item() < 0.05 * ref.abs().max().item()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[k], w) for k, w in base.items())
    layer = lora_layers(model)[0]
    w0 = layer.get_base_layer().weight.detach().clone()
    layer.merge()
    layer.unmerge()  # the naive way drifts in bf16: the reason merged_lora keeps the original tensor
    assert not torch.equal(layer.get_base_layer().weight, w0)


# --- GRPO readings of the paper (issue 20 #6): adapter_mode and importance_sampling_level


@pytest.fixture(scope="module")
def sft_adapter(tmp_path_factory, train_tiny_dir):
    """A trained-looking SFT adapter on the tiny model: LoRA r 4 with non-zero B, saved with the processor."""
    from tagfer.models.vlm import VLMConfig, load_vlm
    from tagfer.train.config import TagferSFTConfig
    from tagfer.train.model import apply_lora
    from tagfer.train.sft import save_adapter

    vlm = load_vlm(VLMConfig(model=str(train_tiny_dir), device="cpu"))
    model = apply_lora(vlm.model, TagferSFTConfig(train_data="x", lora_r=4, lora_alpha=8, lora_dropout=0.0,
                                                  train_projector=False, bf16=False))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return save_adapter(model, vlm.processor, tmp_path_factory.mktemp("sft_adapter") / "best")


def _adapter_tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def _q_proj_base(model):
    return next(p for n, p in model.named_parameters() if "layers.0.self_attn.q_proj.base_layer.weight" in n)


def test_adapter_mode_merge_is_default_and_trains_a_new_lora_on_the_merged_model(tmp_path, train_tiny_dir,
                                                                                 train_samples, sft_adapter):
    from safetensors.torch import load_file

    from tagfer.train.grpo import build_grpo_trainer

    cfg = _grpo_cfg(tmp_path, train_tiny_dir, train_samples, adapter=str(sft_adapter), lora_r=8, max_steps=1)
    assert cfg.adapter_mode == "merge"
    trainer, _, _ = build_grpo_trainer(cfg)
    params = dict(trainer.model.named_parameters())
    new_b = [p for n, p in params.items() if "lora_B.default" in n]
    assert len(new_b) == 14 and all(p.requires_grad and not p.abs().any() for p in new_b)  # a fresh adapter, r 8
    assert all(p.shape[1] == 8 for p in new_b)
    base = load_file(str(next(train_tiny_dir.glob("*.safetensors"))))
    orig = next(w for k, w in base.items() if k.endswith("layers.0.self_attn.q_proj.weight"))
    assert not torch.equal(_q_proj_base(trainer.model), orig)  # the SFT adapter is folded into the base


def test_adapter_mode_continue_trains_the_sft_adapter_against_a_frozen_copy(tmp_path, train_tiny_dir, train_samples,
                                                                            sft_adapter):
    from safetensors.torch import load_file

    from tagfer.train.grpo import build_grpo_trainer

    cfg = _grpo_cfg(tmp_path, train_tiny_dir, train_samples, adapter=str(sft_adapter), adapter_mode="continue",
                    max_steps=1, learning_rate=1e-2)
    trainer, _, _ = build_grpo_trainer(cfg, [_token_reward()], [1.0])  # a reward with variance: non-zero gradients
    saved = _adapter_tensors(sft_adapter)
    params = dict(trainer.model.named_parameters())
    trained = {n: p for n, p in params.items() if "lora_" in n and ".default." in n}
    refs = {n: p for n, p in params.items() if "lora_" in n and ".ref." in n}
    assert len(trained) == len(refs) == 28 and all(p.requires_grad for p in trained.values())
    assert not any(p.requires_grad for p in refs.values())  # TRL's frozen copy: the KL reference is the SFT model
    key = next(n for n in trained if "layers.0.self_attn.q_proj.lora_B" in n)
    want = next(w for k, w in saved.items() if k.endswith("layers.0.self_attn.q_proj.lora_B.weight"))
    assert torch.equal(trained[key].detach().cpu(), want) and want.abs().any()  # it is the SFT adapter itself
    assert [n for n, p in params.items() if p.requires_grad and ".default." not in n] == []
    base = load_file(str(next(train_tiny_dir.glob("*.safetensors"))))
    orig = next(w for k, w in base.items() if k.endswith("layers.0.self_attn.q_proj.weight"))
    assert torch.equal(_q_proj_base(trainer.model).detach().cpu(), orig)  # not merged
    before = {n: p.detach().clone() for n, p in trained.items()}
    ref_before = {n: p.detach().clone() for n, p in refs.items()}
    trainer.train()
    assert any(not torch.equal(p, before[n]) for n, p in trained.items())
    assert all(torch.equal(p, ref_before[n]) for n, p in refs.items())


def _token_reward():
    """A reward with variance inside each group (so advantages and gradients are non-zero on the tiny model)."""
    def short_ids(prompts=None, completions=None, completion_ids=None, **kw):
        return [sum(int(t % 3 == 0) for t in ids) / max(1, len(ids)) for ids in completion_ids]

    short_ids.__name__ = "short_ids"
    return short_ids


def _lora_after_each_step(cfg):
    from transformers import TrainerCallback

    from tagfer.train.grpo import run_grpo

    snaps = []

    class Snap(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            snaps.append({n: p.detach().clone() for n, p in model.named_parameters() if "lora_B.default" in n})

    run_grpo(cfg, reward_funcs=[_token_reward()], weights=[1.0], callbacks=[Snap()])
    return snaps


def test_importance_sampling_level_token_default_and_sequence_agree_on_policy_differ_off_policy(
        tmp_path, train_tiny_dir, train_samples):
    """Eq. 2's ratio per token (default, TRL's / verl's GRPO) or per trajectory (`sequence`). Step 1 is on-policy
    (ratio 1): both give the same update. Step 2 reuses the batch (num_iterations 2): the policy has moved, the
    ratios differ from 1 and the two readings give different updates."""
    common = dict(max_steps=2, num_iterations=2, beta=0.0, learning_rate=0.5, optim="sgd", max_completion_length=12,
                  seed=3)
    token_cfg = _grpo_cfg(tmp_path / "token", train_tiny_dir, train_samples, **common)
    assert token_cfg.importance_sampling_level == "token"
    seq_cfg = _grpo_cfg(tmp_path / "seq", train_tiny_dir, train_samples, importance_sampling_level="sequence", **common)
    token, seq = _lora_after_each_step(token_cfg), _lora_after_each_step(seq_cfg)
    assert len(token) == len(seq) == 2
    moved = max(p.abs().max().item() for p in token[0].values())
    assert moved > 1e-4  # step 1 really updated the adapter (B starts at 0)
    for n in token[0]:
        assert torch.allclose(token[0][n], seq[0][n], atol=1e-6, rtol=1e-4), n
    diff = max((token[1][n] - seq[1][n]).abs().max().item() for n in token[1])
    assert diff > 1e-6, diff
