"""GPU check of tagfer's training path: a few SFT and GRPO steps at a real model size, random weights.

What it runs is tagfer's own code: ``run_sft`` with the ``sft_tag310k`` preset, then
``build_grpo_trainer`` + ``train()`` with the ``grpo_rafdb`` preset (vLLM when installed,
else the merged-LoRA transformers fallback), on synthetic TAG samples of realistic length.
The model is a weightless skeleton (:func:`tagfer.models.tiny.build_random_skeleton`) that
:func:`tagfer.models.vlm.load_vlm` initialises randomly, directly on the device — no download.

Printed per stage: seconds per optimiser step (median, warm-up steps excluded), samples/s,
rollout tokens/s (GRPO), peak memory, trainable tensors that changed / all (and any that
are stored in bf16/fp16: there should be none, see ``keep_fp32_masters``), and a side-by-side
decode probe: ms per decode step with the LoRA unmerged vs merged (``--no-probe`` skips it).

    python benchmarks/bench_gpu.py --size 7b                 # one GPU, <= 5 minutes (budget guard)
    OMP_NUM_THREADS=1 python benchmarks/bench_gpu.py --size tiny   # the same path on a CPU, seconds
    python benchmarks/bench_gpu.py --size 7b --dry-run       # CPU: build the configs of that size, train nothing

``--json PATH`` also writes the figures. A stage stops taking new steps when the budget
(``--budget-s``, whole run) would be exceeded; the figures then cover the steps done.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

T0 = time.time()

#: per size: trace tokens, SFT (warm-up, measured) steps, GRPO steps, K, completion length, per-device batch
DEFAULTS = {
    "tiny": dict(trace_tokens=48, sft_warmup=1, sft_steps=3, grpo_steps=4, k=4, completion=24, batch=4, accum=1, probe_tokens=32),
    "3b": dict(trace_tokens=400, sft_warmup=2, sft_steps=8, grpo_steps=3, k=8, completion=1024, batch=8, accum=8, probe_tokens=128),
    "7b": dict(trace_tokens=400, sft_warmup=2, sft_steps=8, grpo_steps=3, k=8, completion=1024, batch=8, accum=8, probe_tokens=128),
}


def say(msg: str) -> None:
    print(f"[bench_gpu +{time.time() - T0:6.1f}s] {msg}", flush=True)


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_gb() -> float:
    """Peak GPU memory allocated (GiB), or the process's peak RSS on a CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def synthetic_samples(out: Path, tok, n: int, trace_tokens: int) -> Path:
    """``n`` TAGSamples on 224 px noise images, each trace ~``trace_tokens`` tokens in TAG's grammar."""
    import numpy as np
    from PIL import Image

    from tagfer.core.labels import LABELS
    from tagfer.core.records import TAGSample
    from tagfer.traces.trace import format_box

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(out / f"f{i}.png")
        label = LABELS[i % len(LABELS)]
        steps, k = [], 0
        while True:
            x, y = 40 + (13 * k + i) % 300, 60 + (29 * k) % 300
            step = f" Region {k}: AU12 at <bbox>{format_box([x, y, x + 100, y + 60])}</bbox> points to {label}."
            text = "<think>The face, as a whole." + "".join(steps + [step]) + f"</think><answer>{label}</answer>"
            if len(tok(text)["input_ids"]) > trace_tokens or k > 400:
                break
            steps.append(step)
            k += 1
        trace = "<think>The face, as a whole." + "".join(steps) + f"</think><answer>{label}</answer>"
        lines.append(json.dumps(TAGSample(f"rafdb/{i}", "rafdb", f"f{i}.png", label, trace, [[150, 300, 360, 420]], [12],
                                          "synthetic", split="train").to_json()))
    path = out / "samples.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def probe_callback(stage: str, res: dict, deadline: float, warmup: int):
    """Step timer + snapshot of every trainable tensor (to the CPU) at the start; compared at the end."""
    from transformers import TrainerCallback

    from tagfer.train.model import low_precision_trainable

    class Probe(TrainerCallback):
        def __init__(self):
            self.times, self.t, self.before, self.with_grad = [], None, {}, set()

        def on_train_begin(self, args, state, control, model=None, **kw):
            self.before = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
            res["trainable_tensors"] = len(self.before)
            res["trainable_low_precision"] = low_precision_trainable(model)

        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            for n, p in model.named_parameters():
                if n in self.before and n not in self.with_grad and p.grad is not None and bool(p.grad.any()):
                    self.with_grad.add(n)

        def on_step_begin(self, args, state, control, **kw):
            sync()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync()
            self.times.append(time.perf_counter() - self.t)
            say(f"{stage} step {state.global_step}: {self.times[-1]:.2f} s")
            if time.time() + 1.3 * self.times[-1] > deadline:
                say(f"{stage}: budget reached, stopping after step {state.global_step}")
                res["stopped_early"] = True
                control.should_training_stop = True
            return control

        def on_train_end(self, args, state, control, model=None, **kw):
            now = {n: p.detach().to("cpu") for n, p in model.named_parameters() if n in self.before}
            same = [n for n, b in self.before.items() if torch_equal(now[n], b)]
            res["tensors_changed"] = len(self.before) - len(same)
            res["tensors_unchanged"] = same[:10]
            res["tensors_with_gradient"] = len(self.with_grad)
            measured = self.times[warmup:] or self.times
            res["steps"] = len(self.times)
            res["s_per_step"] = statistics.median(measured) if measured else None

    return Probe()


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def sft_config(args, skeleton: Path, data: Path, d: dict):
    """The ``sft_tag310k`` preset under the benchmark's TRL-style flags, then ``--set-sft``'s."""
    from tagfer.train.config import load_config

    over = ["--output_dir", f"{args.work}/sft", "--model_name_or_path", str(skeleton), "--train_data", str(data),
            "--val_size", "0", "--max_steps", str(d['sft_warmup'] + d['sft_steps']), "--gradient_accumulation_steps", "1",
            "--per_device_train_batch_size", str(d['batch']), "--save_steps", "100000", "--report_to", "none",
            "--disable_tqdm", "true", "--logging_steps", "1", "--resume", "false"]
    return load_config("sft_tag310k", over + [a for s in args.set_sft for a in s.split()])


def grpo_config(args, skeleton: Path, data: Path, adapter: str | None, d: dict):
    """The ``grpo_rafdb`` preset with the benchmark's fields (flat TRL / tagfer names), then ``--set-grpo``'s flags."""
    from tagfer.train.config import parse_config
    from tagfer.train.presets import load_raw

    over = {"output_dir": f"{args.work}/grpo", "model_name_or_path": str(skeleton), "train_data": str(data),
            "adapter": adapter, "max_steps": d['grpo_steps'], "per_device_train_batch_size": d['k'],
            "gradient_accumulation_steps": d['accum'], "num_generations": d['k'],
            "max_completion_length": d['completion'], "save_steps": 100000, "report_to": "none",
            "disable_tqdm": True, "resume": False}
    return parse_config({**load_raw("grpo_rafdb"), **over}, [a for s in args.set_grpo for a in s.split()])


#: fields printed by ``--dry-run``
SHOWN = ("model_name_or_path", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
         "lora_r", "lora_alpha", "bf16", "activation_checkpointing", "max_length", "num_generations",
         "max_completion_length", "beta", "use_vllm", "merged_rollouts", "adapter")


def run_sft_stage(args, skeleton: Path, data: Path, d: dict) -> tuple[dict, str | None]:
    from tagfer.train.sft import run_sft

    res: dict = {"stage": "sft"}
    cfg = sft_config(args, skeleton, data, d)
    reset_peak()
    probe = probe_callback("sft", res, T0 + args.budget_s * args.sft_share, d["sft_warmup"])
    out = run_sft(cfg, callbacks=[probe])
    res["samples_per_s"] = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps / res["s_per_step"] if res.get("s_per_step") else None
    res["peak_gb"] = peak_gb()
    res["loss_first_last"] = [out.train_loss[0], out.train_loss[-1]] if out.train_loss else None
    res["loss_finite"] = bool(out.train_loss) and all(math.isfinite(x) for x in out.train_loss)
    return res, str(out.best_dir)


def run_grpo_stage(args, skeleton: Path, data: Path, adapter: str | None, d: dict) -> dict:
    from tagfer.train.grpo import build_grpo_trainer, tag_reward_funcs

    res: dict = {"stage": "grpo"}
    cfg = grpo_config(args, skeleton, data, adapter, d)
    reset_peak()
    probe = probe_callback("grpo", res, T0 + args.budget_s, 0)
    # TAG's rewards are all 0 on random weights (no valid trace), so every advantage would be 0 and nothing
    # would train; a reward with variance (share of distinct tokens) is added so the update path is exercised.
    funcs, weights = tag_reward_funcs(cfg)

    def distinct_tokens(prompts=None, completions=None, completion_ids=None, **kw):
        return [len(set(ids)) / max(1, len(ids)) for ids in completion_ids]

    trainer, _, _ = build_grpo_trainer(cfg, [*funcs, distinct_tokens], [*weights, 1.0], callbacks=[probe])
    res["rollouts"] = "vllm" if trainer.use_vllm else "transformers"
    gens: list[tuple[float, int]] = []
    inner = trainer._generate_single_turn

    def timed(*a, **k):
        sync()
        t = time.perf_counter()
        out = inner(*a, **k)
        sync()
        gens.append((time.perf_counter() - t, sum(len(c) for c in out[0])))
        return out

    trainer._generate_single_turn = timed
    trainer.train()
    if not args.no_probe:
        res["decode_probe"] = decode_probe(trainer, cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps, d["probe_tokens"])
    res["merged_rollouts"] = getattr(trainer, "rollout_merged_layers", 0) > 0
    res["completions_per_step"] = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    res["samples_per_s"] = res["completions_per_step"] / res["s_per_step"] if res.get("s_per_step") else None
    gen_s, gen_tok = sum(g[0] for g in gens), sum(g[1] for g in gens)
    res["rollout_s_per_step"] = gen_s / max(1, len(gens))
    res["rollout_tokens_per_s"] = gen_tok / gen_s if gen_s else None
    res["peak_gb"] = peak_gb()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    res["loss_finite"] = bool(losses) and all(math.isfinite(x) for x in losses)
    return res


def decode_probe(trainer, batch: int, new_tokens: int, prompt_len: int = 350) -> dict:
    """ms per decode step of HF generate on the GRPO policy, side by side: LoRA unmerged (PEFT) vs merged
    (:func:`tagfer.train.rollout.merged_lora`); same random text prompts, greedy, EOS suppressed, cache on."""
    import torch

    from tagfer.train.rollout import merged_lora

    model = trainer.accelerator.unwrap_model(trainer.model)
    model.eval()
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(20, 1000, (batch, prompt_len), generator=g).to(dev)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
              pad_token_id=0, attention_mask=torch.ones_like(ids))

    def run() -> float:
        with torch.no_grad():
            model.generate(input_ids=ids, **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
            sync()
            t = time.perf_counter()
            model.generate(input_ids=ids, **kw)
            sync()
        return (time.perf_counter() - t) / new_tokens * 1000

    unmerged = run()
    with merged_lora(model) as n:
        merged = run() if n else None
    model.train()
    return {"batch": batch, "new_tokens": new_tokens, "ms_per_step_unmerged": unmerged, "ms_per_step_merged": merged,
            "speedup": unmerged / merged if merged else None}


def fmt(v, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=["tiny", "3b", "7b"], default="tiny")
    ap.add_argument("--samples", type=int, default=0, help="synthetic samples (default: enough for the steps)")
    ap.add_argument("--budget-s", type=float, default=300.0, help="whole run; stages stop taking steps past it")
    ap.add_argument("--sft-share", type=float, default=0.35, help="share of the budget SFT may use")
    ap.add_argument("--skip-grpo", action="store_true")
    ap.add_argument("--no-probe", action="store_true", help="skip the merged-vs-unmerged decode probe")
    ap.add_argument("--set-sft", action="append", default=[], help="extra TRL-style flags for the SFT config, e.g. '--lora_r 64' (repeatable)")
    ap.add_argument("--set-grpo", action="append", default=[], help="extra TRL-style flags for the GRPO config, e.g. '--beta 0' (repeatable)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--dry-run", action="store_true",
                    help="build the skeleton, the data and both configs (with the --set-* flags), print them, train nothing (CPU, seconds)")
    args = ap.parse_args(argv)
    d = DEFAULTS[args.size]
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="tagfer_bench_gpu_")
        args.work = Path(tmp.name)

    import torch

    from tagfer.models.tiny import build_random_skeleton

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    say(f"size {args.size} on {device}; torch {torch.__version__}")
    skeleton = build_random_skeleton(args.work / "skeleton", args.size)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(skeleton))
    n = args.samples or max(16, d["batch"] * (d["sft_warmup"] + d["sft_steps"]), d["k"] * d["accum"] * d["grpo_steps"] // d["k"])
    data = synthetic_samples(args.work / "data", tok, n, d["trace_tokens"])
    report: dict = {"size": args.size, "device": device, "samples": n}
    if args.dry_run:
        cfgs = {"sft": sft_config(args, skeleton, data, d), "grpo": grpo_config(args, skeleton, data, f"{args.work}/sft/best", d)}
        for stage, cfg in cfgs.items():
            print(f"{stage} config ({type(cfg).__name__}): " + ", ".join(f"{k}={getattr(cfg, k)!r}" for k in SHOWN if hasattr(cfg, k)))
            report[stage] = {"config": {k: getattr(cfg, k) for k in SHOWN if hasattr(cfg, k)}}
        print(f"dry run: size {args.size}, {n} samples, both configs built; nothing trained")
        if args.json:
            args.json.write_text(json.dumps(report, indent=2, default=str))
        if tmp is not None:
            tmp.cleanup()
        return report
    sft, adapter = run_sft_stage(args, skeleton, data, d)
    report["sft"] = sft
    say(f"sft: {sft}")
    if not args.skip_grpo:
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        report["grpo"] = run_grpo_stage(args, skeleton, data, adapter, d)
        say(f"grpo: {report['grpo']}")
    report["total_s"] = time.time() - T0

    print()
    print(f"tagfer bench_gpu — size {args.size}, {device}, {report['total_s']:.0f} s in all")
    print(f"{'stage':6} {'s/step':>8} {'samples/s':>10} {'rollout tok/s':>14} {'peak GB':>8} {'changed':>9} "
          f"{'had grad':>9} {'bf16/fp16':>9}")
    for key in ("sft", "grpo"):
        r = report.get(key)
        if not r:
            continue
        changed = f"{r.get('tensors_changed', 0)}/{r.get('trainable_tensors', 0)}"
        grads = f"{r.get('tensors_with_gradient', 0)}/{r.get('trainable_tensors', 0)}"
        print(f"{key:6} {fmt(r.get('s_per_step')):>8} {fmt(r.get('samples_per_s')):>10} "
              f"{fmt(r.get('rollout_tokens_per_s')):>14} {fmt(r.get('peak_gb')):>8} {changed:>9} {grads:>9} "
              f"{len(r.get('trainable_low_precision', [])):>9}")
    every = all(report[k].get("tensors_changed") == report[k].get("trainable_tensors") for k in ("sft", "grpo") if k in report)
    print(f"every trainable tensor changed: {every}; no trainable tensor in bf16/fp16: "
          f"{all(not report[k].get('trainable_low_precision') for k in ('sft', 'grpo') if k in report)}")
    for k in ("sft", "grpo"):
        left = report.get(k, {}).get("tensors_unchanged") or []
        if left and all(".lora_A." in n for n in left):
            print(f"{k}: only LoRA A tensors unchanged — B starts at 0, so A's gradient is ~0 until B has moved "
                  "(needs more steps at this lr); see 'had grad'")
    if "grpo" in report:
        g = report["grpo"]
        print(f"grpo rollouts: {g['rollouts']}, merged LoRA: {g['merged_rollouts']}, "
              f"{fmt(g.get('rollout_s_per_step'))} s of generation per step")
        p = g.get("decode_probe")
        if p:
            print(f"decode probe (batch {p['batch']}, {p['new_tokens']} new tokens, side by side): "
                  f"unmerged {fmt(p['ms_per_step_unmerged'])} ms/step, merged {fmt(p['ms_per_step_merged'])} ms/step, "
                  f"merged is {fmt(p['speedup'])}x faster")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    if tmp is not None:
        tmp.cleanup()
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
