"""Throughput of the TAG reward: parse + R_AU + R_ans + R_fmt per rollout.

Run:  OMP_NUM_THREADS=1 python benchmarks/bench_rewards.py [--groups 2000] [--reps 5]

Builds GRPO-like batches (groups of 8 rollouts per prompt, ~2,000 characters of
reasoning, 3 boxes each, 3–6 AU boxes per sample, ~15% malformed rollouts) and
times, in the same run and on the same rollouts:

* ``batched``   — tagfer.traces.rewards.score_group, one call per group of 8;
* ``per step``  — tagfer.traces.rewards.score_batch, one call per 16 groups (128
                  rollouts), the way TRL scores a whole step at once;
* ``single``    — tagfer.traces.rewards.reward_breakdown, one call per rollout;
* ``reference`` — a straightforward re-implementation written below with plain
                  Python loops and regexes (no numpy, no tagfer parser).

All must give the same numbers (checked before timing). Rates are the best of
``--reps`` repetitions, interleaved across methods, on one core; a fixed
pure-Python loop is timed alongside because shared machines drift in speed.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

try:
    import tagfer  # noqa: F401
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tagfer.core.labels import LABELS, normalize_label  # noqa: E402
from tagfer.traces.rewards import RewardConfig, reward_breakdown, score_batch, score_group  # noqa: E402

CANVAS = 512
GROUP = 8

# ----------------------------------------------------------------------------------------
# Synthetic rollouts
# ----------------------------------------------------------------------------------------

GLOBAL = [
    "The face is seen from the front under even light, and the head is held upright.",
    "Overall the expression reads as tense rather than relaxed, with the features drawn together.",
    "The person looks straight at the camera; skin tone and shading are uniform across the face.",
    "At first glance the face carries a strong affective signal concentrated in the lower half.",
    "The gaze is steady and the head tilts slightly, which frames the central features clearly.",
]
LOCAL = [
    "Looking at the {region}, the tissue is {state}, which is typical of {au}.",
    "Around the {region} the skin {state}; this pattern matches {au}.",
    "The {region} shows that the muscles are {state}, pointing to {au}.",
]
REGIONS = ["inner brows", "outer brows", "upper eyelids", "cheeks", "nose bridge", "upper lip", "mouth corners", "chin"]
STATES = ["pulled upward", "pressed together", "drawn down and inward", "raised and wrinkled", "stretched sideways"]
FILLER = [
    "Small folds appear where the surface bunches, and the contour shifts compared with a neutral face.",
    "The change is symmetric on both sides, so it is unlikely to be a lighting artefact.",
    "This cue on its own is not decisive, but it fits with what the other regions show.",
    "The intensity is moderate; the movement is visible without being exaggerated.",
    "Shadows under the structure deepen, which confirms that the muscle is contracting.",
]
AUS = [1, 2, 4, 5, 6, 7, 9, 10, 12, 14, 15, 17, 20, 23, 25, 26]
ANSWER_FORMS = {
    "anger": ["anger", "Angry", " ANGRY "],
    "disgust": ["disgust", "Disgusted."],
    "fear": ["fear", "Fearful"],
    "happiness": ["happiness", "Happiness.", "happy"],
    "neutral": ["neutral", "calm"],
    "sadness": ["sadness", "sad"],
    "surprise": ["surprise", "Surprised"],
}


def _rand_box(rng: random.Random) -> list[int]:
    x1, y1 = rng.randint(0, 400), rng.randint(0, 400)
    return [x1, y1, min(511, x1 + rng.randint(30, 200)), min(511, y1 + rng.randint(30, 150))]


def _jitter(box: list[int], rng: random.Random) -> list[int]:
    b = [v + rng.randint(-25, 25) for v in box]
    b = [min(max(v, 0), 511) for v in b]
    if b[0] >= b[2]:
        b[2] = min(511, b[0] + 10)
    if b[1] >= b[3]:
        b[3] = min(511, b[1] + 10)
    return b


def _fmt(b: list[int]) -> str:
    return f"[{b[0]}, {b[1]}, {b[2]}, {b[3]}]"


def make_rollout(rng: random.Random, label: str, au_boxes: list[list[int]], malformed: str | None) -> str:
    parts = [rng.choice(GLOBAL)]
    boxes = [_jitter(rng.choice(au_boxes), rng) if rng.random() < 0.8 else _rand_box(rng) for _ in range(3)]
    if malformed == "too_many":
        boxes.append(_rand_box(rng))
    if malformed == "reversed":
        b = boxes[0]
        boxes[0] = [b[2], b[1], b[0], b[3]]
    if malformed == "out_of_canvas":
        boxes[1] = [boxes[1][0], boxes[1][1], 600, 700]
    for b in boxes:
        step = rng.choice(LOCAL).format(region=rng.choice(REGIONS), state=rng.choice(STATES), au=f"AU{rng.choice(AUS)}")
        parts.append(f"{step} <bbox>{_fmt(b)}</bbox>")
        parts.append(rng.choice(FILLER))
    while sum(len(p) + 1 for p in parts) < 1900:
        parts.insert(rng.randint(1, len(parts)), rng.choice(FILLER))
    parts.append("Taken together, these cues settle the expression.")
    think = " ".join(parts)
    guess = label if rng.random() < 0.6 else rng.choice(LABELS)
    answer = rng.choice(ANSWER_FORMS[guess])
    if malformed == "empty_answer":
        answer = ""
    if malformed == "two_labels":
        answer = "happiness or sadness"
    body = f"<think>{think}</think>\n<answer>{answer}</answer>"
    if malformed == "no_answer":
        body = f"<think>{think}</think>"
    if malformed == "answer_first":
        body = f"<answer>{answer}</answer>\n<think>{think}</think>"
    if malformed == "fence":
        body = f"```\n{body}\n```"
    if malformed == "upper_tags":
        body = body.replace("<think>", "<THINK>").replace("</think>", "</THINK>")
    return body


MALFORMED = ["too_many", "reversed", "out_of_canvas", "empty_answer", "two_labels", "no_answer", "answer_first", "fence", "upper_tags"]


def make_groups(n_groups: int, seed: int = 0) -> list[tuple[list[str], str, list[list[int]]]]:
    rng = random.Random(seed)
    groups = []
    for _ in range(n_groups):
        label = rng.choice(LABELS)
        au_boxes = [_rand_box(rng) for _ in range(rng.randint(3, 6))]
        texts = [
            make_rollout(rng, label, au_boxes, rng.choice(MALFORMED) if rng.random() < 0.15 else None)
            for _ in range(GROUP)
        ]
        groups.append((texts, label, au_boxes))
    return groups


# ----------------------------------------------------------------------------------------
# Reference: plain Python, one rollout at a time
# ----------------------------------------------------------------------------------------

_REF_TAG = re.compile(r"<\s*/?\s*(?:think|answer|bbox)\s*>", re.IGNORECASE)
_REF_BOX = re.compile(r"<\s*bbox\s*>(.*?)<\s*/\s*bbox\s*>", re.IGNORECASE | re.DOTALL)
_REF_ANSWER = re.compile(r"<\s*answer\s*>(.*?)<\s*/\s*answer\s*>", re.IGNORECASE | re.DOTALL)
_REF_INTS = re.compile(r"\s*\[\s*(-?[0-9]{1,9})\s*,\s*(-?[0-9]{1,9})\s*,\s*(-?[0-9]{1,9})\s*,\s*(-?[0-9]{1,9})\s*\]\s*")


def ref_boxes(text: str) -> list[tuple[int, int, int, int] | None]:
    out = []
    for content in _REF_BOX.findall(text):
        m = _REF_INTS.fullmatch(content)
        out.append(tuple(int(g) for g in m.groups()) if m else None)  # type: ignore[misc]
    return out


def ref_well_formed(text: str) -> bool:
    if any(tag.group(0) not in ("<think>", "</think>", "<answer>", "</answer>", "<bbox>", "</bbox>") for tag in _REF_TAG.finditer(text)):
        return False
    for tag in ("<think>", "</think>", "<answer>", "</answer>"):
        if text.count(tag) != 1:
            return False
    body = text.strip()
    if not (body.startswith("<think>") and body.endswith("</answer>")):
        return False
    think, rest = body[len("<think>") :].split("</think>", 1)
    if rest.strip()[: len("<answer>")] != "<answer>" or not think.strip():
        return False
    answer = rest.strip()[len("<answer>") : -len("</answer>")]
    if "<" in answer or normalize_label(answer.strip()) not in LABELS:
        return False
    if text.count("<bbox>") != think.count("<bbox>") or think.count("<bbox>") != think.count("</bbox>"):
        return False
    boxes = ref_boxes(think)
    if len(boxes) != think.count("<bbox>") or len(boxes) > 3:
        return False
    for b in boxes:
        if b is None or not (0 <= b[0] < b[2] <= CANVAS - 1 and 0 <= b[1] < b[3] <= CANVAS - 1):
            return False
    return True


def ref_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    area_a = max(a[2] - a[0], 0.0) * max(a[3] - a[1], 0.0)
    area_b = max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0)
    iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = iw * ih
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def ref_score(text: str, label: str, au_boxes: list[list[int]], fmt_bonus: float = 0.5) -> tuple[float | None, float, float, float]:
    answers = _REF_ANSWER.findall(text)
    r_ans = 1.0 if len(answers) == 1 and normalize_label(answers[0].strip()) == label else 0.0
    r_fmt = fmt_bonus if ref_well_formed(text) else 0.0
    r_au: float | None = None
    if au_boxes:
        hi = float(CANVAS - 1)
        truth = [tuple(min(max(float(v), 0.0), hi) for v in b) for b in au_boxes]
        best = []
        for box in ref_boxes(text):
            if box is None:
                best.append(0.0)
                continue
            p = tuple(min(max(float(v), 0.0), hi) for v in box)
            best.append(max(ref_iou(p, t) for t in truth))
        m = min(len(best), len(truth))
        r_au = sum(sorted(best, reverse=True)[:m]) / m if m else 0.0
    total = r_ans + r_fmt + (r_au or 0.0)
    return r_au, r_ans, r_fmt, total


# ----------------------------------------------------------------------------------------


def run_batched(groups, cfg):
    return [score_group(texts, label, au_boxes, cfg) for texts, label, au_boxes in groups]


def run_steps(groups, cfg, per_step: int = 16):
    """score_batch over a training step's worth of groups at once (TRL scores a whole step)."""
    out = []
    for s in range(0, len(groups), per_step):
        step = groups[s : s + per_step]
        texts = [t for g in step for t in g[0]]
        labels = [g[1] for g in step for _ in g[0]]
        boxes = [g[2] for g in step for _ in g[0]]
        res = score_batch(texts, labels, boxes, cfg)
        out.extend(res[i : i + GROUP] for i in range(0, len(res), GROUP))
    return out


def run_single(groups, cfg):
    return [[reward_breakdown(t, label, au_boxes, cfg) for t in texts] for texts, label, au_boxes in groups]


def run_reference(groups, cfg):
    return [[ref_score(t, label, au_boxes, cfg.fmt_bonus) for t in texts] for texts, label, au_boxes in groups]


def _close(a: float | None, b: float | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and abs(a - b) <= 1e-12)


def check(groups, cfg) -> None:
    batched, steps, single = run_batched(groups, cfg), run_steps(groups, cfg), run_single(groups, cfg)
    ref = run_reference(groups, cfg)
    for gb, gt, gs, gr in zip(batched, steps, single, ref):
        for b, t, s, r in zip(gb, gt, gs, gr):
            assert b == s == t, (b, t, s)
            assert all(_close(x, y) for x, y in zip((b.r_au, b.r_ans, b.r_fmt, b.total), r)), (b, r)


def calibration_loop() -> None:
    """A fixed pure-Python workload, timed next to the methods to show machine speed."""
    total = 0
    for i in range(200_000):
        total += i & 7


def measure(methods: dict, groups, cfg, reps: int) -> dict[str, float]:
    """Best-of-``reps`` rollouts/s per method; repetitions are interleaved across methods so
    that drifts in machine speed hit every method alike."""
    n = sum(len(g[0]) for g in groups)
    best = {name: float("inf") for name in methods}
    for _ in range(reps):
        for name, fn in methods.items():
            gc.collect()
            t0 = time.perf_counter()
            fn(groups, cfg)
            best[name] = min(best[name], time.perf_counter() - t0)
        best["calibration"] = min(best.get("calibration", float("inf")), _timed(calibration_loop))
    return {name: (n / t if name != "calibration" else t) for name, t in best.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    groups = make_groups(args.groups, args.seed)
    texts = [t for g in groups for t in g[0]]
    cfg = RewardConfig(format_rules="strict")  # the reference below implements the strict format rules
    check(groups, cfg)
    ok = sum(reward_breakdown(t, g[1], g[2], cfg).r_fmt > 0 for g in groups for t in g[0])
    print(
        f"{len(texts)} rollouts in {len(groups)} groups of {GROUP}; "
        f"mean {sum(map(len, texts)) / len(texts):.0f} chars; {len(texts) - ok} malformed; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
    )
    print("results agree (score_group == score_batch == reward_breakdown == reference)")
    methods = {
        "batched (score_group per group)": run_batched,
        "per step (score_batch, 16 groups)": run_steps,
        "single (reward_breakdown)": run_single,
        "reference (plain Python)": run_reference,
    }
    rates = measure(methods, groups, cfg, args.reps)
    calib = rates.pop("calibration")
    for name, rate in rates.items():
        print(f"  {name:36s} {rate:10,.0f} rollouts/s")
    ours, ref = rates["batched (score_group per group)"], rates["reference (plain Python)"]
    print(f"  score_group / reference = {ours / ref:.2f}x; goal: >= 50,000 rollouts/s on one core")
    print(f"  machine speed: fixed pure-Python loop {calib * 1e3:.1f} ms, best of the same reps (lower is faster)")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
