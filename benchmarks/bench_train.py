"""Benchmark: SFT and GRPO steps on the tiny Qwen2.5-VL (CPU, 1 thread by default).

Measures per optimiser step: wall time (median over the measured steps, first step
excluded as warm-up), the process's peak RSS, and — for GRPO — the share of the step
spent outside model compute: reward functions (TAG parsing + IoU), the dataset transform
(image load + resize + chat rows). Goal: < 10 %.

    OMP_NUM_THREADS=1 python benchmarks/bench_train.py [--steps 6] [--generations 8] [--completion 64] [--json out.json]

The tiny model makes model compute small, so the outside share here is an upper bound of
what a 7B model sees (its compute is ~10^4 × larger per token; rewards/data cost the same).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Timer:
    """Accumulates wall time of wrapped callables."""

    def __init__(self):
        self.total = 0.0
        self.calls = 0

    def wrap(self, fn):
        def inner(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.total += time.perf_counter() - t
                self.calls += 1

        inner.__name__ = getattr(fn, "__name__", "fn")
        return inner


def _step_callback(times: list[float]):
    from transformers import TrainerCallback

    class CB(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    return CB()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--completion", type=int, default=64, help="max completion tokens in GRPO")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from tagfer.train.config import load_config
    from tagfer.train.data import RowMaker
    from tagfer.train.grpo import build_grpo_trainer, tag_reward_funcs
    from tagfer.train.sft import run_sft

    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    rss0 = _rss_mb()
    # ---- SFT
    sft_times: list[float] = []
    cfg = load_config("tiny_cpu", {"output_dir": f"{work}/sft", "max_steps": args.steps + 1, "val_steps": 0,
                                   "save_steps": 100000, "resume": False})
    t = time.perf_counter()
    run_sft(cfg, callbacks=[_step_callback(sft_times)])
    sft_total = time.perf_counter() - t
    rss_sft = _rss_mb()

    # ---- GRPO with the TAG rewards, timing rewards and the data transform
    grpo_times: list[float] = []
    gcfg = load_config("tiny_cpu_grpo", {
        "output_dir": f"{work}/grpo", "adapter": f"{work}/sft/best", "max_steps": args.steps + 1,
        "num_generations": args.generations, "per_device_train_batch_size": args.generations,
        "max_completion_length": args.completion, "save_steps": 100000, "resume": False,
    })
    reward_timer, data_timer = Timer(), Timer()
    funcs, weights = tag_reward_funcs(gcfg)
    trainer, _, _ = build_grpo_trainer(gcfg, [reward_timer.wrap(f) for f in funcs], weights,
                                       callbacks=[_step_callback(grpo_times)])
    ds = trainer.train_dataset
    maker: RowMaker = ds._format_kwargs.get("transform") if hasattr(ds, "_format_kwargs") else None
    if maker is not None:
        ds.set_transform(data_timer.wrap(maker))
    t = time.perf_counter()
    trainer.train()
    grpo_total = time.perf_counter() - t
    rss_grpo = _rss_mb()

    def med(xs):
        return statistics.median(xs[1:] if len(xs) > 1 else xs)

    grpo_step = sum(grpo_times[1:]) if len(grpo_times) > 1 else sum(grpo_times)
    # rewards/data of the warm-up step are included in the totals: scale to the measured steps
    frac = (len(grpo_times) - 1) / len(grpo_times) if len(grpo_times) > 1 else 1.0
    outside = (reward_timer.total + data_timer.total) * frac
    res = {
        "threads": torch.get_num_threads(),
        "sft_step_s_median": round(med(sft_times), 4),
        "sft_steps": len(sft_times),
        "sft_total_s": round(sft_total, 2),
        "grpo_step_s_median": round(med(grpo_times), 4),
        "grpo_steps": len(grpo_times),
        "grpo_total_s": round(grpo_total, 2),
        "grpo_generations": args.generations,
        "grpo_max_completion": args.completion,
        "grpo_reward_s_per_step": round(reward_timer.total / max(1, len(grpo_times)), 5),
        "grpo_data_s_per_step": round(data_timer.total / max(1, len(grpo_times)), 5),
        "grpo_outside_model_share": round(outside / grpo_step, 4) if grpo_step else None,
        "peak_rss_mb_start": round(rss0, 1),
        "peak_rss_mb_after_sft": round(rss_sft, 1),
        "peak_rss_mb_after_grpo": round(rss_grpo, 1),
    }
    for k, v in res.items():
        print(f"{k:28s} {v}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
