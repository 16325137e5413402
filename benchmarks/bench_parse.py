"""Time and memory of the trace parser and the reward path on adversarial model output.

Run:  OMP_NUM_THREADS=1 python benchmarks/bench_parse.py [--max-mb 10] [--siblings]

For each input shape (the canonical well-formed trace first, then shapes that
used to be quadratic or to raise: "<" followed by spaces, nested tags, tag
floods, look-alike tag names, invisible reasoning, trailing special tokens)
and each size from 10 KB up to ``--max-mb`` MB (x10 steps), in one run:

* ``parse``  — :func:`tagfer.traces.trace.parse_trace`;
* ``reward`` — the verl reward :func:`tagfer.integrations.verl.compute_score`
  (special-token strip + parse + R_AU + R_ans + R_fmt);
* ``peak``   — tracemalloc peak of one reward call (a separate run, since
  tracing slows Python down), in MB and in bytes per input byte.

Times are the best of several runs (more at small sizes). Linear growth shows
as ``x prev`` (time per byte at this size / time per byte at the previous size)
staying near 1 (a quadratic parser gives ~10 per x10 step) and ``x 10K`` (the
same against the smallest size) staying far below the size ratio (1000 at
10 MB), and as a flat ``B/byte``; ``x canon`` is the time per byte over
that of the canonical trace of the same size. ``--siblings`` adds the other
parsers of model output (strip_bboxes, limit_boxes, the box automaton, validate_teacher_tags,
find_au_mentions, extract_json, parse_judgment) on their worst shapes;
``--trl`` times one GRPO step of the three TRL reward functions with the
content-keyed parse cache against parsing the batch in each function.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")

try:
    import tagfer  # noqa: F401
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tagfer.data.teacher import extract_json  # noqa: E402
from tagfer.evaluation.judge import JudgeParseError, parse_judgment  # noqa: E402
from tagfer.integrations import trl as tag_trl  # noqa: E402
from tagfer.integrations.verl import compute_score  # noqa: E402
from tagfer.traces.boxtags import advance, limit_boxes  # noqa: E402
from tagfer.traces.trace import find_au_mentions, parse_trace, strip_bboxes, validate_teacher_tags  # noqa: E402

GROUND_TRUTH = {"label": "happiness", "au_boxes": [[191, 300, 330, 420], [93, 306, 445, 417]]}
SENTENCE = "The mouth corners are pulled up and back while the cheeks rise, AU12 and AU6 together. "
BOXES = "AU12 <bbox>[191, 300, 330, 420]</bbox> AU6 <bbox>[93, 306, 445, 417]</bbox> "


def _fill(unit: str, n: int) -> str:
    return unit * max(1, n // len(unit))


def _trace(think: str) -> str:
    return f"<think>{think}</think>\n<answer>happiness</answer>"


def _nested(opens: str, closes: str, n: int) -> str:
    k = max(1, n // (len(opens) + len(closes)))
    return opens * k + closes * k


# name -> make(n): a string of about n characters
SHAPES: dict[str, Callable[[int], str]] = {
    "canonical": lambda n: _trace(_fill(SENTENCE, n - 150) + BOXES),
    "lt_spaces": lambda n: "<" + " " * (n - 1),
    "lt_newlines": lambda n: "<" + "\n" * (n - 1),
    "lt_in_think": lambda n: _trace("look <" + " " * (n - 60) + BOXES),
    "nested_answer": lambda n: _nested("<answer>", "</answer>", n),
    "nested_mix": lambda n: _nested("<think><answer><bbox>", "</bbox></answer></think>", n),
    "open_boxes": lambda n: _fill("<bbox>", n),
    "close_tags": lambda n: _fill("</answer>", n),
    "many_boxes": lambda n: _trace(_fill("<bbox>[1, 2, 30, 40]</bbox>", n - 50)),
    "box_spaces": lambda n: "<think><bbox>" + " " * (n - 60) + "[1, 2, 3, 4]</bbox></think><answer>happy</answer>",
    "lookalike_tags": lambda n: _fill("<th\u0131nk>x</th\u0131nk><an\u017fwer>happy</an\u017fwer>", n),
    "zero_width_think": lambda n: _trace(_fill("\u200b\u200d\u2060", (n - 120) // 3) + BOXES),  # 3 UTF-8 bytes each
    "special_tokens": lambda n: _trace(SENTENCE + BOXES) + _fill("<|im_end|>", n - 200),
}


def _judge(text: str) -> None:
    try:
        parse_judgment(text)
    except JudgeParseError:
        pass


# name -> (function, make(n)) for the other parsers of model output
SIBLINGS: dict[str, tuple[Callable[[str], object], Callable[[int], str]]] = {
    "strip_bboxes open": (strip_bboxes, lambda n: _fill("<bbox>", n)),
    "strip_bboxes spaces": (strip_bboxes, lambda n: " " * n),
    "strip_bboxes canonical": (strip_bboxes, SHAPES["canonical"]),
    "limit_boxes open": (lambda t: limit_boxes(t, 3), lambda n: _fill("<bbox>", n)),
    "limit_boxes elements": (lambda t: limit_boxes(t, 3), lambda n: _fill("x <bbox>[1, 2, 30, 40]</bbox>", n)),
    "limit_boxes lt_spaces": (lambda t: limit_boxes(t, 3), lambda n: "<" + " " * (n - 1)),
    "box automaton pieces": (lambda t: advance(0, t), lambda n: _fill("< b", n)),
    "teacher_tags lt_spaces": (lambda t: validate_teacher_tags(t, []), lambda n: "<" + " " * (n - 1)),
    "au_mentions zeros": (find_au_mentions, lambda n: "AU" + "0" * (n - 2)),
    "extract_json braces": (lambda t: extract_json(t, ("cot", "answer")), lambda n: "{" * n),
    "extract_json deep": (lambda t: extract_json(t, ("cot", "answer")), lambda n: _fill('{"a":', n)),
    "extract_json canonical": (
        lambda t: extract_json(t, ("cot", "answer")),
        lambda n: 'Here: {"CoT": "' + _fill(SENTENCE, n - 60) + '", "Answer": "happiness"}',
    ),
    "judge braces": (_judge, lambda n: _fill('{"A":[', n)),
}


def _best(fn: Callable[[], object], n: int) -> float:
    reps = max(1, min(20, 2_000_000 // max(n, 1)))
    best = float("inf")
    for _ in range(reps):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _peak(fn: Callable[[], object]) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _ratio(t: float, n: int, prev: tuple[float, int] | None) -> str:
    if prev is None or prev[0] <= 0:
        return "    -"
    return f"{(t / n) / (prev[0] / prev[1]):5.2f}"


def bench_trl() -> None:
    """One step (128 rollouts of ~2 KB) of make_reward_funcs(): content-keyed cache vs no cache."""
    comps = [_trace(SENTENCE * 22 + f"step {i} " + BOXES) for i in range(128)]
    cols = {"label": ["happiness"] * 128, "au_boxes": [GROUND_TRUTH["au_boxes"]] * 128}
    funcs = tag_trl.make_reward_funcs()

    def step(batches: list[list[str]]) -> None:
        tag_trl._LAST_PARSE = ((0, 0), [], [])
        for f, batch in zip(funcs, batches):
            f(completions=batch, **cols)

    same = _best(lambda: step([comps] * 3), 1)
    copies = [comps] + [[c.encode().decode() for c in comps] for _ in range(2)]  # equal text, new objects
    equal = _best(lambda: step(copies), 1)
    cached = tag_trl._parse_completions
    tag_trl._parse_completions = lambda c, cfg: [parse_trace(tag_trl.completion_text(x), cfg.canvas, cfg.max_boxes) for x in c]
    try:
        uncached = _best(lambda: step([comps] * 3), 1)
    finally:
        tag_trl._parse_completions = cached
    print(f"\nTRL step, 3 reward functions x 128 rollouts: cache hit on the same list {same * 1e3:.2f} ms, "
          f"on equal copies {equal * 1e3:.2f} ms, no cache {uncached * 1e3:.2f} ms ({uncached / same:.1f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-mb", type=float, default=10.0, help="largest input size in MB (default 10)")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated shape names")
    ap.add_argument("--siblings", action="store_true", help="also time the other parsers of model output")
    ap.add_argument("--trl", action="store_true", help="also time the TRL parse cache")
    args = ap.parse_args()
    sizes = [n for n in (10_000, 100_000, 1_000_000, 10_000_000) if n <= args.max_mb * 1_000_000]
    names = [s for s in args.shapes.split(",") if s]
    unknown = set(names) - set(SHAPES)
    if unknown:
        ap.error(f"unknown shape(s): {', '.join(sorted(unknown))}")
    if "canonical" not in names:
        names.insert(0, "canonical")

    print(f"parse_trace and compute_score, sizes {', '.join(f'{n // 1000} KB' for n in sizes)}; best-of runs, one core")
    print(f"{'shape':17s} {'size':>8s} {'parse s':>9s} {'ns/B':>7s} {'x prev':>6s} {'x canon':>7s} "
          f"{'x 10K':>6s} {'reward s':>9s} {'x prev':>6s} {'peak MB':>8s} {'B/byte':>6s}")
    canon: dict[int, float] = {}
    for name in names:
        prev_p = prev_r = first = None
        for n in sizes:
            text = SHAPES[name](n)
            size = len(text.encode("utf-8"))
            tp = _best(lambda: parse_trace(text), n)
            tr = _best(lambda: compute_score("bench", text, GROUND_TRUTH), n)
            peak = _peak(lambda: compute_score("bench", text, GROUND_TRUTH))
            if name == "canonical":
                canon[n] = tp / size
            xc = (tp / size) / canon[n] if canon.get(n) else float("nan")
            first = first or (tp, size)
            print(f"{name:17s} {size / 1e6:7.2f}M {tp:9.4f} {tp / size * 1e9:7.1f} {_ratio(tp, size, prev_p)} {xc:7.1f} "
                  f"{_ratio(tp, size, first if first[1] != size else None)} "
                  f"{tr:9.4f} {_ratio(tr, size, prev_r)} {peak / 1e6:8.1f} {peak / size:6.1f}", flush=True)
            prev_p, prev_r = (tp, size), (tr, size)
            del text

    if args.siblings:
        print("\nother parsers of model output (same columns; x prev near 1 = linear)")
        for name, (fn, make) in SIBLINGS.items():
            prev = None
            for n in [s for s in sizes if s <= 1_000_000]:
                text = make(n)
                size = len(text.encode("utf-8"))
                t = _best(lambda: fn(text), n)
                peak = _peak(lambda: fn(text))
                print(f"{name:24s} {size / 1e6:7.2f}M {t:9.4f} {t / size * 1e9:7.1f} {_ratio(t, size, prev)} "
                      f"{peak / 1e6:8.1f} {peak / size:6.1f}", flush=True)
                prev = (t, size)
    if args.trl:
        bench_trl()


if __name__ == "__main__":
    main()
