"""Decompression bombs vs the decode budget (`tagfer.core.imageio`), measured side by side in one run.

    python benchmarks/bench_decode.py

Builds real bombs (every pixel row present, all zeros: a few hundred KB on disk) and, each in a
fresh process, loads them with ``load_image`` and reports: file size, outcome, wall time, peak
RSS above the process baseline (VmHWM) and RSS left after the call. Rows:

1. 16-bit grey PNG 20000×20000 (the reported 778 KB bomb, 800 MB decoded) → refused;
2. 8-bit grey PNG 20000×20000 (400 MB) → refused;
3. 8-bit grey PNG 16000×16000 (256 MB = the default budget, accepted) → decoded: peak / decode
   cost is the memory overhead ratio (target ≈ 1) and "after" shows the memory is given back;
4. the same with a 1 GB budget and the RGB-converting path of a 10000×10000 RGB PNG (400 MB).
Needs about 1 GB of free memory at most (row 4).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

CHILD = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[3])
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
from tagfer.core.imageio import ImageError, load_image
import numpy, PIL.Image  # imported before the baseline
base = rss("VmRSS")
t = time.perf_counter()
try:
    img = load_image(sys.argv[1], budget=int(sys.argv[2]))
    out = f"decoded to {img.rgb.shape[1]}x{img.rgb.shape[0]}"
    del img
except ImageError as e:
    out = e.kind
dt = time.perf_counter() - t
print(json.dumps({"outcome": out, "s": dt, "peak": rss("VmHWM") - base, "after": rss("VmRSS") - base}))
"""


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def full_png(path: Path, w: int, h: int, bit_depth: int, color_type: int = 0) -> Path:
    """A complete PNG of zeros, compressed in streaming fashion (never holds the raw pixels)."""
    ch = {0: 1, 2: 3}[color_type]
    row = b"\x00" + bytes(w * ch * bit_depth // 8)
    z = zlib.compressobj(9)
    parts = [z.compress(row) for _ in range(h)] + [z.flush()]
    idat = b"".join(parts)
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))
    return path


def main() -> None:
    src = str(Path(__file__).resolve().parents[1] / "src")
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        rows = [
            ("16-bit PNG 20000²", full_png(d / "g16.png", 20000, 20000, 16), 20000 * 20000 * 2, 256_000_000),
            ("8-bit PNG 20000²", full_png(d / "g8.png", 20000, 20000, 8), 20000 * 20000, 256_000_000),
            ("8-bit PNG 16000²", full_png(d / "g8b.png", 16000, 16000, 8), 16000 * 16000, 256_000_000),
            ("RGB PNG 10000², 1 GB budget", full_png(d / "rgb.png", 10000, 10000, 8, 2), 10000 * 10000 * 4, 1_000_000_000),
        ]
        print(f"{'case':30s} {'file':>8s} {'decode cost':>12s} {'outcome':>22s} {'time':>8s} {'peak RSS':>9s} {'peak/cost':>9s} {'RSS after':>9s}")
        for name, path, cost, budget in rows:
            t = time.perf_counter()
            r = subprocess.run([sys.executable, "-c", CHILD, str(path), str(budget), src], capture_output=True, text=True, timeout=600)
            if r.returncode:
                print(name, "failed:", r.stderr[-500:])
                continue
            m = json.loads(r.stdout)
            print(f"{name:30s} {path.stat().st_size / 1e3:7.0f}K {cost / 1e6:10.0f}MB {m['outcome']:>22s} {m['s'] * 1e3:6.0f}ms "
                  f"{m['peak'] / 1e6:7.0f}MB {m['peak'] / cost:9.2f} {m['after'] / 1e6:7.0f}MB")
            del t


if __name__ == "__main__":
    main()
