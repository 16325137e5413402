"""Evaluation throughput: predictions/s against a server of fixed latency, and scoring time.

Run:  OMP_NUM_THREADS=1 python benchmarks/bench_eval.py [--latency 0.2] [--concurrency 8 32 64] [--n-score 10000]

1. ``tagfer.evaluation.eval.run_eval`` through ``OpenAIBackend`` against the scripted server
   (``tests/fakeserver.py``, started as a separate process so its CPU is not counted in
   ours) answering a TAG trace after ``--latency`` seconds. With concurrency C and latency
   L the ceiling is C/L predictions/s; the goal is ≥ 0.9 of it. Each run predicts
   ``--per-slot`` × C images (a 224×224 JPEG loaded, resized and base64-encoded per request,
   as in a real run) and writes the predictions JSONL.
2. ``tagfer.evaluation.scoring.score_predictions`` on ``--n-score`` synthetic predictions (3 boxes each,
   3–6 AU boxes per image, 7 classes, 10% malformed): parsing excluded (records are already
   parsed, as ``tagfer score`` reads them), AU IoU and cross-detector AU IoU included,
   1,000 bootstrap resamples. Goal < 2 s. Parsing 10,000 responses is timed separately.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from tagfer.core.labels import LABELS  # noqa: E402

ANSWER = (
    "<think>The face is relaxed with a broad smile. Mouth: AU12 (Lip Corner Puller) <bbox>[150, 300, 360, 420]</bbox> "
    "corners pulled up. Eyes: AU6 <bbox>[120, 180, 390, 250]</bbox> cheeks raised. Brows: <bbox>[130, 110, 380, 170]</bbox> "
    "relaxed. Together this is a genuine smile.</think>\n<answer>happiness</answer>"
)


@dataclass
class Rec:
    id: str
    image_path: str
    label: str = "happiness"
    source: str = "bench"
    split: str = "test"
    excluded: bool = False


def start_server(latency: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "fakeserver.py"), "--latency", str(latency), "--text", ANSWER],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    url = proc.stdout.readline().strip()
    if not url.startswith("http"):
        proc.kill()
        raise RuntimeError("fake server did not start")
    return proc, url


def bench_throughput(latency: float, concurrencies: list[int], per_slot: int, tmp: Path, image_format: str = "jpeg") -> list[dict]:
    from PIL import Image

    from tagfer.core.samples import sample_face_path
    from tagfer.evaluation.eval import run_eval
    from tagfer.models.backends import make_backend

    img = tmp / "face.jpg"
    Image.open(sample_face_path("astronaut")).convert("RGB").resize((224, 224)).save(img, quality=90)
    proc, url = start_server(latency)
    rows = []
    try:
        # warm-up (connection pool, imports)
        with make_backend(f"openai:{url}", concurrency=4) as be:
            run_eval([Rec(f"w{i}", str(img)) for i in range(8)], be, tmp / "warm.jsonl")
        for c in concurrencies:
            n = per_slot * c
            out = tmp / f"preds_{image_format}_c{c}.jsonl"
            with make_backend(f"openai:{url}", concurrency=c, per_endpoint_concurrency=c, image_format=image_format) as be:
                t0, c0 = time.perf_counter(), time.process_time()
                s = run_eval([Rec(f"r{i}", str(img)) for i in range(n)], be, out, model="bench")
                dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            assert s.processed == n and s.failed == 0 and s.metric("correct") == n, s
            rate = n / dt
            ceiling = c / latency
            rows.append({"image_format": image_format, "concurrency": c, "latency_s": latency, "n": n, "seconds": round(dt, 3), "pred_per_s": round(rate, 1),
                         "ceiling": round(ceiling, 1), "efficiency": round(rate / ceiling, 3),
                         "client_cpu_ms_per_pred": round(1000 * cpu / n, 2)})
    finally:
        proc.stdin.write("stop\n")
        proc.stdin.flush()
        proc.wait(10)
    return rows


def synthetic_predictions(n: int, seed: int = 0) -> tuple[list[dict], dict, dict]:
    rng = random.Random(seed)
    preds, au, cross = [], {}, {}

    def box():
        x, y = rng.randrange(0, 400), rng.randrange(0, 400)
        return [x, y, x + rng.randrange(20, 110), y + rng.randrange(20, 110)]

    for i in range(n):
        truth = rng.choice(LABELS)
        ok = rng.random() > 0.1
        pred = truth if rng.random() < 0.7 else rng.choice(LABELS)
        preds.append({"id": f"b/{i}", "source": "rafdb", "split": "test", "image": f"/d/{i}.jpg", "label": truth,
                      "pred": pred if ok else None, "boxes": [box() for _ in range(3)], "well_formed": ok,
                      "violations": [] if ok else ["no_answer"], "error": None, "model": "bench"})
        au[f"b/{i}"] = [box() for _ in range(rng.randrange(3, 7))] if rng.random() > 0.2 else []
        cross[f"b/{i}"] = [box() for _ in range(rng.randrange(3, 7))]
    return preds, au, cross


def bench_scoring(n: int, reps: int) -> dict:
    from tagfer.evaluation.predictions import Prediction, parse_prediction
    from tagfer.evaluation.scoring import score_predictions
    from tagfer.evaluation.metrics import Bootstrap

    preds, au, cross = synthetic_predictions(n)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        s = score_predictions(preds, au=au, cross_au=cross, bootstrap=Bootstrap(n_boot=1000))
        best = min(best, time.perf_counter() - t0)
    assert s["n"] == n
    texts = [ANSWER.replace("happiness", rng_label) for rng_label in (LABELS * (n // len(LABELS) + 1))[:n]]
    t0 = time.perf_counter()
    for i, t in enumerate(texts):
        parse_prediction(Prediction(f"{i}", "x", "test", None, "happiness"), t)
    parse_s = time.perf_counter() - t0
    return {"n": n, "score_seconds": round(best, 3), "parse_seconds": round(parse_s, 3), "accuracy": s["accuracy"]["value"],
            "au_iou": s["au_iou"]["value"]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[8, 32, 64])
    ap.add_argument("--per-slot", type=int, default=8, help="images per concurrency slot in each run")
    ap.add_argument("--n-score", type=int, default=10000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-server", action="store_true")
    ap.add_argument("--image-format", nargs="+", default=["jpeg", "png"], help="request image encoding(s) to compare")
    a = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as d:
        if not a.skip_server:
            for fmt in a.image_format:
                for row in bench_throughput(a.latency, a.concurrency, a.per_slot, Path(d), fmt):
                    print(json.dumps(row), flush=True)
    print(json.dumps(bench_scoring(a.n_score, a.reps)), flush=True)


if __name__ == "__main__":
    main()
