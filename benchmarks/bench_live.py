"""Live camera speed of ``tagfer serve`` (issue 24), server side, at 640×480 on one core.

    python benchmarks/bench_live.py [--rounds 3] [--core N]

Frames: the webcam-like 640×480 JPEGs of the browser test (tests/fixtures_live.py: Grace Hopper
2 s, then the smiling astronaut sliding across the frame 4 s, 10 frames/s → 60 frames), made of
the two real sample faces. Pinned to one core (``sched_setaffinity``; ``OMP_NUM_THREADS=1``).
Rows, each the best of ``--rounds`` interleaved rounds:

1. **bare landmarker**: MediaPipe's FaceLandmarker in VIDEO mode (``detect_for_video``) on the
   frames' decoded pixels — the floor;
2. **live step**: :meth:`tagfer.explainer.live.LiveSessions.frame` on the JPEG bytes — decode
   (within the decode budget), landmarks, AU scores and boxes, tracker, the grounded engine (FER
   net on the face crop + AU evidence), EMA smoothing, the JSON answer's dict;
3. **live over HTTP**: ``POST /live/{id}/frame`` through the ASGI app (Starlette's TestClient,
   no network): the body read, the checks, the JSON encoding.

Printed: frames/s, per-frame latency (median and 95th percentile, ms) and the ratio of each
row's frames/s to the bare landmarker's. The issue's target: ≥ 15 frames/s for rows 2 and 3.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("GLOG_minloglevel", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the browser test's camera frames (fixtures_live.py)


def frames() -> tuple[list[bytes], list]:
    import numpy as np
    from PIL import Image

    from fixtures_live import cam_frames, jpeg
    from tagfer.core.samples import sample_face_path

    a = np.asarray(Image.open(sample_face_path("astronaut")).convert("RGB"))
    g = np.asarray(Image.open(sample_face_path("grace_hopper")).convert("RGB"))
    rgb = [f for f, _, _ in cam_frames(a, g)]
    return [jpeg(f) for f in rgb], rgb


def bare(rgb: list) -> list[float]:
    import mediapipe as mp

    from tagfer.au.faces import FaceLandmarker

    out = []
    with FaceLandmarker(running_mode="video") as fl:
        ts = 0
        for f in rgb:
            t = time.perf_counter()
            fl._lm.detect_for_video(mp.Image(image_format=mp.ImageFormat.SRGB, data=f), ts)
            out.append(time.perf_counter() - t)
            ts += 100
    return out


def live_step(data: list[bytes]) -> tuple[list[float], dict]:
    from tagfer.explainer.live import LiveConfig, LiveSessions

    ss = LiveSessions(LiveConfig(max_sessions=1, max_fps=1000))
    s = ss.open()
    out, labels = [], {}
    try:
        for b in data:
            t = time.perf_counter()
            ans = ss.frame(s.id, s.token, b)
            out.append(time.perf_counter() - t)
            for f in ans["faces"]:
                labels[f["label"]] = labels.get(f["label"], 0) + 1
    finally:
        ss.close_all()
    return out, labels


def live_http(data: list[bytes], client) -> list[float]:
    s = client.post("/live").json()
    h = {"X-Live-Token": s["token"], "Content-Type": "image/jpeg"}
    out = []
    for b in data:
        t = time.perf_counter()
        r = client.post(s["frame_url"], content=b, headers=h)
        out.append(time.perf_counter() - t)
        assert r.status_code == 200, r.text
    client.post(s["close_url"], headers={"X-Live-Token": s["token"]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--core", type=int, default=None, help="core to pin to (default: the first one allowed)")
    args = ap.parse_args()
    pinned = "not pinned"
    if hasattr(os, "sched_setaffinity"):
        core = args.core if args.core is not None else sorted(os.sched_getaffinity(0))[0]
        os.sched_setaffinity(0, {core})
        pinned = f"pinned to core {core}"
    data, rgb = frames()
    from fastapi.testclient import TestClient

    from tagfer.explainer.live import LiveConfig
    from tagfer.explainer.serve import create_app

    app = create_app(pool_size=1, live=LiveConfig(max_sessions=1, max_fps=1000))
    best: dict[str, list[float]] = {}
    labels: dict = {}
    with TestClient(app, base_url="http://127.0.0.1") as client:
        bare(rgb[:5]), live_step(data[:5]), live_http(data[:5], client)  # warm caches and lazy imports
        for _ in range(args.rounds):
            runs = {"bare landmarker (VIDEO mode)": bare(rgb)}
            runs["live step (LiveSessions.frame)"], labels = live_step(data)
            runs["live over HTTP (POST /live/{id}/frame)"] = live_http(data, client)
            for k, v in runs.items():
                if k not in best or sum(v) < sum(best[k]):
                    best[k] = v
    print(f"live camera benchmark: {len(data)} frames 640×480 JPEG, {pinned}, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, "
          f"best of {args.rounds} interleaved rounds")
    floor = len(best["bare landmarker (VIDEO mode)"]) / sum(best["bare landmarker (VIDEO mode)"])
    print(f"{'path':40s} {'frames/s':>9s} {'median ms':>10s} {'p95 ms':>8s} {'vs bare':>8s}")
    for k, v in best.items():
        fps = len(v) / sum(v)
        p95 = sorted(v)[int(0.95 * (len(v) - 1))]
        print(f"{k:40s} {fps:9.1f} {statistics.median(v) * 1e3:10.1f} {p95 * 1e3:8.1f} {fps / floor:8.2f}")
    ok = all(len(v) / sum(v) >= 15 for k, v in best.items() if k.startswith("live"))
    print(f"labels of the live step (frames): {labels}")
    print(f"target ≥ 15 frames/s on one core: {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
