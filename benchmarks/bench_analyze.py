"""Benchmark of `tagfer analyze` with the default engine (FER net + AU evidence), figures side by side in one run.

    python benchmarks/bench_analyze.py [--n 100] [--cold 3]

Prints, on one core (OMP_NUM_THREADS=1):
1. warm per-face latency of the whole analysis (decode, landmarks, AU scores and boxes,
   face frame, global net, decision rule and trace, parse, rewards), median and p90 over
   ``--n`` runs on the sample faces, beside the bare MediaPipe landmarker call on the same
   decoded pixels (goal: ratio < 1.5, < 40 ms per face), the grounded engine alone (crop +
   net + rule + trace), the net alone and the rules engine alone;
2. the overlay PNG for one face (render + encode), reported separately;
3. cold start of the CLI: wall time of ``tagfer analyze IMAGE --json`` in a fresh
   process (median of ``--cold`` runs; goal: < 3 s), beside ``tagfer --help``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("GLOG_minloglevel", "2")


def _stats(xs: list[float]) -> tuple[float, float]:
    xs = sorted(xs)
    return statistics.median(xs) * 1e3, xs[min(len(xs) - 1, int(0.9 * len(xs)))] * 1e3


def _timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100, help="warm runs per measurement")
    ap.add_argument("--cold", type=int, default=3, help="fresh CLI processes")
    args = ap.parse_args()

    try:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core, inherited by subprocesses
        pinned = "pinned to one core"
    except (AttributeError, OSError):
        pinned = "not pinned"

    from tagfer.au.facs import explain
    from tagfer.au.impression import face_crop
    from tagfer.explainer.frames import crop_region as _crop
    from tagfer.core.imageio import load_image
    from tagfer.core.samples import sample_face_path
    from tagfer.explainer.analyze import Analyzer, png_data_url

    paths = [sample_face_path("astronaut"), sample_face_path("grace_hopper")]
    print(f"tagfer analyze benchmark ({pinned}, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, n={args.n})")
    with Analyzer() as an:
        imgs = [load_image(p) for p in paths]
        for p in paths:  # warm-up
            an.analyze_image(p)
        # Interleaved, so that load from other processes hits every measurement alike.
        full, bare, decode = [], [], []
        for k in range(args.n):
            p, im = paths[k % 2], imgs[k % 2]
            t0 = time.perf_counter()
            an.analyze_image(p)
            t1 = time.perf_counter()
            an.detector.landmarker.detect(im.rgb)
            t2 = time.perf_counter()
            load_image(p)
            t3 = time.perf_counter()
            full.append(t1 - t0)
            bare.append(t2 - t1)
            decode.append(t3 - t2)
        done = [an.analyze_image(p)[0] for p in paths]
        faces = [a.face_aus for a in done]
        pics = [_crop(im, a.frame_box) for im, a in zip(imgs, done)]
        grounded = an.backend.grounded
        i = iter(range(10**9))
        engine = _timed(lambda: explain(faces[next(i) % 2]), args.n)
        j = iter(range(10**9))
        g_engine = _timed(lambda: grounded.explain(pics[(k := next(j)) % 2], faces[k % 2]), args.n)
        crops = [face_crop(pc, grounded.face_box(pc, fa), grounded.margin) for pc, fa in zip(pics, faces)]
        m = iter(range(10**9))
        net = _timed(lambda: grounded.impression.probabilities(crops[next(m) % 2]), args.n)
        res = an.run(paths[0])

        def overlay():
            png_data_url(res.render_overlays()[0])

        ov = _timed(overlay, max(5, args.n // 5))

    rows = [
        ("analysis per face, end to end (decode → trace → rewards)", full),
        ("bare MediaPipe landmarker on decoded pixels", bare),
        ("image decode alone (tagfer.core.imageio.load_image)", decode),
        ("grounded engine alone (crop + fer net + rule + trace)", g_engine),
        ("fer net alone (gray, resize, tflite invoke)", net),
        ("rules engine alone (facs-rules: scores + trace)", engine),
        ("overlay as served (render + PNG level 1 + base64)", ov),
    ]
    for name, xs in rows:
        med, p90 = _stats(xs)
        print(f"  {name:<58} median {med:7.2f} ms   p90 {p90:7.2f} ms")
    med_full, _ = _stats(full)
    med_bare, _ = _stats(bare)
    med_dec, _ = _stats(decode)
    print(f"  overhead over the bare landmarker: {med_full - med_bare:.2f} ms, of which decoding {med_dec:.2f} ms; "
          f"goal < 40 ms per face: "
          f"{'met' if med_full < 40 else 'NOT met'}; ratio to the bare landmarker {med_full / med_bare:.2f} (goal < 1.5)")

    exe = shutil.which("tagfer", path=str(Path(sys.executable).parent)) or "tagfer"
    env = dict(os.environ)
    cold = _timed(lambda: subprocess.run([exe, "analyze", str(paths[0]), "--json"], env=env, check=True,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), args.cold)
    helpt = _timed(lambda: subprocess.run([exe, "--help"], env=env, check=True, stdout=subprocess.DEVNULL), args.cold)
    c_med, _ = _stats(cold)
    h_med, _ = _stats(helpt)
    print(f"  cold start `tagfer analyze astronaut.png --json` (fresh process)   median {c_med / 1e3:6.2f} s; "
          f"goal < 3 s: {'met' if c_med < 3000 else 'NOT met'}")
    print(f"  cold start `tagfer --help`                                         median {h_med / 1e3:6.2f} s")


if __name__ == "__main__":
    main()
