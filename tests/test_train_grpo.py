"""GRPO on the tiny model: TAG rewards logged per component, R_AU masked without AU boxes, real learning."""

from __future__ import annotations

import json
import math

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
