"""Benchmark of the data builder (`tagfer build`) against the fake OpenAI-compatible server.

    python benchmarks/bench_build.py [--latency 1.0] [--conc 64,512] [--items 3000]
                                     [--mem-latency 0.05] [--mem-small 1000] [--mem-large 20000]

The server (tests/fakeserver.py) runs in its own process with a fixed latency L and
answers every request with one valid AU-grounded trace; the builder runs with Stage I
off (one request per item), a constant stand-in AU detector and in-memory records
(48×48 PNG bytes), so the figures measure the builder + client, not a model.

Prints:
1. requests/s at concurrency C vs the limit C/L → ratio (goal ≥ 0.9 at C = 512);
2. client CPU (user + sys of the builder process) per request;
3. peak RSS of a whole build over 1k vs 20k items (fresh process each) → ratio (goal: flat).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = [(12, 0.9, (150, 300, 330, 420)), (6, 0.7, (80, 200, 430, 300)), (25, 0.5, (200, 380, 320, 450))]
LABEL = "happiness"


def reply_text() -> str:
    cot = "The whole face looks relaxed and bright, with an even gaze. " + " ".join(
        f"This region shows change: <AU{a}> [{b[0]}, {b[1]}, {b[2]}, {b[3]}] clearly visible." for a, _, b in ROWS
    ) + " Together the cues give the conclusion."
    return json.dumps({"CoT": cot, "Answer": LABEL})


class ConstantDetector:
    name = "constant"

    def detect(self, image, key=None):
        from tagfer.au.aus import AUDetection, FaceAUs

        return [FaceAUs(None, [AUDetection(a, s, True, b) for a, s, b in ROWS], (0, 0, 511, 511), top_k=3, detector="constant")]

    def close(self):
        pass


def records(n: int):
    import io

    from PIL import Image

    from tagfer.data.sources import SourceRecord

    buf = io.BytesIO()
    Image.new("RGB", (48, 48), (120, 90, 60)).save(buf, format="PNG")
    data = buf.getvalue()
    for i in range(n):
        yield SourceRecord(f"bench/{i:07d}", "bench", "train", LABEL, LABEL, None, data)


def start_server(latency: float):
    p = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fakeserver.py"), "--latency", str(latency), "--text", reply_text()],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    url = p.stdout.readline().strip()
    return p, url


def stop_server(p) -> None:
    try:
        p.stdin.write("stop\n")
        p.stdin.flush()
        p.wait(timeout=10)
    except Exception:
        p.kill()


def run_once(url: str, n: int, conc: int, out: str) -> dict:
    """One build in this process; returns requests, wall time, CPU time. ``url``: comma-separated endpoints."""
    from tagfer.data.build import run_build
    from tagfer.data.build_config import BuildConfig

    eps = url.split(",")
    cfg = BuildConfig.from_dict(dict(out=out, quality=False, tag_requests=False, au_workers=1, client=dict(
        endpoints=eps, model="fake-vlm", total_concurrency=conc, per_endpoint_concurrency=-(-conc // len(eps)), timeout_s=60, max_retries=2)))
    def cpu_now() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    # steady state: the window between the 10% and the 90% completion marks (start-up and tail excluded)
    lo, hi = int(0.1 * n), int(0.9 * n)
    marks: dict[int, tuple[float, float]] = {}
    done = [0]

    def on_result(kind: str, obj: dict) -> None:
        done[0] += 1
        if done[0] in (lo, hi):
            marks[done[0]] = (time.perf_counter(), cpu_now())

    c0 = cpu_now()
    t0 = time.perf_counter()
    s = run_build(cfg, records=records(n), detector=ConstantDetector(), on_result=on_result)
    wall = time.perf_counter() - t0
    cpu = cpu_now() - c0
    (ta, ca), (tb, cb) = marks[lo], marks[hi]
    return {"items": n, "accepted": s.metric("accepted"), "requests": s.metric("requests"), "wall_s": wall, "cpu_s": cpu,
            "steady_rate": (hi - lo) / (tb - ta), "steady_cpu_ms": 1000 * (cb - ca) / (hi - lo),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def child(argv: list[str]) -> None:
    url, n, conc = argv[0], int(argv[1]), int(argv[2])
    with tempfile.TemporaryDirectory() as d:
        print(json.dumps(run_once(url, n, conc, d)), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latency", type=float, default=1.0)
    ap.add_argument("--conc", default="64,512")
    ap.add_argument("--items", type=int, default=3000)
    ap.add_argument("--mem-latency", type=float, default=0.05)
    ap.add_argument("--mem-small", type=int, default=1000)
    ap.add_argument("--mem-large", type=int, default=20000)
    ap.add_argument("--skip-mem", action="store_true")
    ap.add_argument("--servers", type=int, default=4, help="fake server processes = endpoints (paper: 4 GPU servers, 128 each)")
    a = ap.parse_args()

    servers = [start_server(a.latency) for _ in range(a.servers)]
    url = ",".join(u for _, u in servers)
    try:
        print(f"1+2. throughput vs C/L (L = {a.latency} s, {a.servers} endpoints, >= {a.items} items, one request per item)")
        for c in [int(x) for x in a.conc.split(",")]:
            n = max(a.items, 4 * c)
            with tempfile.TemporaryDirectory() as d:
                r = subprocess.run([sys.executable, __file__, "--child", url, str(n), str(c)], capture_output=True, text=True, check=True)
            res = json.loads(r.stdout.strip().splitlines()[-1])
            rate = res["requests"] / res["wall_s"]
            limit = c / a.latency
            print(f"   C={c:4d}: limit C/L = {limit:7.1f} req/s; steady state {res['steady_rate']:7.1f} req/s, ratio {res['steady_rate'] / limit:.3f}, "
                  f"client CPU {res['steady_cpu_ms']:.2f} ms/request; whole run incl. start-up {res['requests']} requests in {res['wall_s']:.1f} s "
                  f"= {rate:.1f} req/s (ratio {rate / limit:.3f}, {1000 * res['cpu_s'] / res['requests']:.2f} ms CPU/request); accepted {res['accepted']}/{res['items']}")
    finally:
        for p, _ in servers:
            stop_server(p)
    if a.skip_mem:
        return
    srv, url = start_server(a.mem_latency)
    try:
        print(f"3. peak RSS of a whole build (fresh process each, L = {a.mem_latency} s, C = 512)")
        rss = {}
        for n in (a.mem_small, a.mem_large):
            r = subprocess.run([sys.executable, __file__, "--child", url, str(n), "512"], capture_output=True, text=True, check=True)
            res = json.loads(r.stdout.strip().splitlines()[-1])
            rss[n] = res["peak_rss_mb"]
            print(f"   {n:6d} items: peak RSS {res['peak_rss_mb']:.1f} MB, {res['requests'] / res['wall_s']:.1f} req/s, "
                  f"client CPU {1000 * res['cpu_s'] / res['requests']:.2f} ms/request")
        print(f"   ratio {a.mem_large} / {a.mem_small} items: {rss[a.mem_large] / rss[a.mem_small]:.3f}")
    finally:
        stop_server(srv)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
    else:
        main()
