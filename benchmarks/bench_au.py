"""Benchmark of the AU grounding job (`tagfer au`), all figures measured side by side in one run.

    python benchmarks/bench_au.py [--n 200] [--mem-small 100] [--mem-large 1000]

Prints:
1. images/s of the end-to-end job (decode, landmarks, AU scores, boxes, JSONL)
   on one worker vs the bare MediaPipe FaceLandmarker call (decode + detect)
   on the same images → ratio (target ≥ 0.85);
2. images/s with 2 workers vs 1 worker → speed-up (target ≥ 1.7× on 2 cores);
3. peak RSS of the job over 100 vs 1,000 images (fresh process each) → ratio
   (target: flat, ≈ 1.0).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("GLOG_minloglevel", "2")


def make_images(d: Path, n: int) -> list[Path]:
    """n distinct face images (224×224 JPEG crops of the two sample faces, varied)."""
    import numpy as np
    from PIL import Image, ImageEnhance

    from tagfer.core.samples import sample_face_path

    astro = Image.open(sample_face_path("astronaut")).convert("RGB").crop((150, 40, 300, 200))
    grace = Image.open(sample_face_path("grace_hopper")).convert("RGB").crop((120, 90, 405, 375))
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        im = (astro, grace)[i % 2]
        if i % 4 >= 2:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        im = ImageEnhance.Brightness(im).enhance(float(rng.uniform(0.8, 1.2)))
        p = d / f"img_{i:05d}.jpg"
        im.resize((224, 224)).save(p, quality=90)
        paths.append(p)
    return paths


def bare_landmarker(paths: list[Path]) -> float:
    import mediapipe as mp

    from tagfer.au.faces import FaceLandmarker

    with FaceLandmarker() as fl:
        fl._lm.detect(mp.Image.create_from_file(str(paths[0])))  # warm-up
        t = time.perf_counter()
        for p in paths:
            fl._lm.detect(mp.Image.create_from_file(str(p)))
        return time.perf_counter() - t


def job(paths: list[Path], out: Path, workers: int) -> float:
    from tagfer.au.detectors import DetectorSpec
    from tagfer.au.grounding import run_grounding

    if out.exists():
        out.unlink()
    t = time.perf_counter()
    s = run_grounding([str(p) for p in paths], out, DetectorSpec(), workers=workers)
    dt = time.perf_counter() - t
    assert s.processed == len(paths) and s.failed == 0, s
    return dt


def job_warm(paths: list[Path], out: Path) -> float:
    """One worker, excluding the one-off model load (as the bare call excludes it)."""
    from tagfer.au.detectors import DetectorSpec
    from tagfer.au.grounding import GroundingConfig, ground_image
    from tagfer.core.jsonl import JsonlWriter

    det = DetectorSpec().build()
    try:
        ground_image(det, str(paths[0]))
        if out.exists():
            out.unlink()
        t = time.perf_counter()
        with JsonlWriter(out) as w:
            for p in paths:
                rec = ground_image(det, str(p), GroundingConfig())
                assert rec["error"] is None, rec
                w.write(rec)
        return time.perf_counter() - t
    finally:
        det.close()


def peak_rss_of_job(image_dir: Path, n: int, out: Path) -> int:
    code = f"""
import resource, sys
from tagfer.au.grounding import run_grounding
from tagfer.au.detectors import DetectorSpec
import glob
files = sorted(glob.glob({str(image_dir)!r} + '/*.jpg'))[:{n}]
s = run_grounding(files, {str(out)!r}, DetectorSpec(), resume=False)
assert s.processed == {n}
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(r.stdout.strip().splitlines()[-1])  # KiB


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--mem-small", type=int, default=100)
    ap.add_argument("--mem-large", type=int, default=1000)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tagfer_bench_au_"))
    try:
        paths = make_images(tmp / "imgs", max(args.n, args.mem_large))
        sub = paths[: args.n]
        t_bare = bare_landmarker(sub)
        t_warm = job_warm(sub, tmp / "warm.jsonl")
        t1 = job(sub, tmp / "w1.jsonl", 1)
        t2 = job(sub, tmp / "w2.jsonl", 2)
        rss_small = peak_rss_of_job(tmp / "imgs", args.mem_small, tmp / "m1.jsonl")
        rss_large = peak_rss_of_job(tmp / "imgs", args.mem_large, tmp / "m2.jsonl")
        n = len(sub)
        res = {
            "images": n,
            "bare_landmarker_img_s": n / t_bare,
            "tagfer_au_1worker_img_s": n / t1,
            "tagfer_au_1worker_warm_img_s": n / t_warm,
            "tagfer_au_2workers_img_s": n / t2,
            "ratio_e2e_vs_bare_incl_model_load": t_bare / t1,
            "ratio_e2e_vs_bare_warm": t_bare / t_warm,
            "speedup_2_vs_1_workers": t1 / t2,
            "peak_rss_mib_small": rss_small / 1024,
            "peak_rss_mib_large": rss_large / 1024,
            "peak_rss_ratio_large_vs_small": rss_large / rss_small,
            "cpu_count": os.cpu_count(),
        }
        print(f"images per run: {n}   (cores: {os.cpu_count()})")
        print(f"bare FaceLandmarker (decode + detect): {res['bare_landmarker_img_s']:8.1f} img/s")
        print(f"tagfer au, 1 worker, warm:             {res['tagfer_au_1worker_warm_img_s']:8.1f} img/s   ratio {res['ratio_e2e_vs_bare_warm']:.2f}  (target ≥ 0.85)")
        print(f"tagfer au, 1 worker, incl. model load: {res['tagfer_au_1worker_img_s']:8.1f} img/s   ratio {res['ratio_e2e_vs_bare_incl_model_load']:.2f}")
        print(f"tagfer au, 2 workers:                  {res['tagfer_au_2workers_img_s']:8.1f} img/s   speed-up {res['speedup_2_vs_1_workers']:.2f}×  (target ≥ 1.7×)")
        print(f"peak RSS {args.mem_small} vs {args.mem_large} images: {res['peak_rss_mib_small']:.0f} MiB vs {res['peak_rss_mib_large']:.0f} MiB   ratio {res['peak_rss_ratio_large_vs_small']:.2f}  (target ≈ 1.0)")
        print(json.dumps(res))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
