"""Decompression bombs vs the decode budget (`tagfer.core.imageio`), measured side by side in one run.

    python benchmarks/bench_decode.py            # the bombs below and every image format
    python benchmarks/bench_decode.py --images   # only the per-format table (peak RSS vs decode cost)

Builds real bombs (every pixel row present, all zeros: a few hundred KB on disk) and, each in a
fresh process, loads them with ``load_image`` and reports: file size, outcome, wall time, peak
RSS above the process baseline (VmHWM) and RSS left after the call. Rows:

1. 16-bit grey PNG 20000×20000 (the reported 778 KB bomb, 800 MB decoded) → refused;
2. 8-bit grey PNG 20000×20000 (400 MB) → refused;
3. 8-bit grey PNG 16000×16000 (256 MB = the default budget, accepted) → decoded: peak / decode
   cost is the memory overhead ratio (target ≈ 1) and "after" shows the memory is given back;
4. the same with a 1 GB budget and the RGB-converting path of a 10000×10000 RGB PNG (400 MB).
Needs about 1 GB of free memory at most (row 4).

Image formats (:func:`image_formats`): one file per format and layout that Pillow decodes
differently (PNG 8/16-bit, JPEG baseline/progressive, WebP, GIF, BMP, TIFF raw / one Deflate
strip of 16-bit RGBA / many strips / small and large tiles / 8-bit grey, and sizes on both
sides of ``max_side``), each loaded in a fresh process: decode cost (``probe``), peak RSS
above the baseline, and ``peak - cost``, which the docs promise stays within ~30–60 MB.

    python benchmarks/bench_decode.py --video

``--quick`` (with any of the above): only the two refused bombs, the image formats at 3000×2000 /
3000² (the 6000×4000 and 8000² files are not built) and the video table — a smoke run in seconds.

Video frames (`tagfer.au.video_io.iter_frames`, the decoding of `tagfer au/analyze VIDEO`):
clips whose frames are larger than their header says, or deeper, decoded in a fresh process each
with a given budget; peak RSS above the baseline vs the per-frame decode cost and the budget.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

#: what every measuring child process starts with: tagfer's source on the path and the RSS reader
CHILD_PROLOGUE = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[3])
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
"""

CHILD = CHILD_PROLOGUE + r"""
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


def run_child(script: str, name: str, path: Path, budget: int, src: str) -> dict | None:
    """``script`` on ``path`` under ``budget`` in a fresh interpreter (its own peak RSS); its JSON
    line, or None after printing why it failed."""
    r = subprocess.run([sys.executable, "-c", script, str(path), str(budget), src], capture_output=True, text=True, timeout=600)
    if r.returncode:
        print(name, "failed:", r.stderr[-500:])
        return None
    return json.loads(r.stdout)


def main(quick: bool = False) -> None:
    src = str(Path(__file__).resolve().parents[1] / "src")
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        rows = [
            ("16-bit PNG 20000²", full_png(d / "g16.png", 20000, 20000, 16), 20000 * 20000 * 2, 256_000_000),
            ("8-bit PNG 20000²", full_png(d / "g8.png", 20000, 20000, 8), 20000 * 20000, 256_000_000),
            ("8-bit PNG 16000²", full_png(d / "g8b.png", 16000, 16000, 8), 16000 * 16000, 256_000_000),
            ("RGB PNG 10000², 1 GB budget", full_png(d / "rgb.png", 10000, 10000, 8, 2), 10000 * 10000 * 4, 1_000_000_000),
        ] if not quick else [
            ("16-bit PNG 20000²", full_png(d / "g16.png", 20000, 20000, 16), 20000 * 20000 * 2, 256_000_000),
            ("8-bit PNG 20000²", full_png(d / "g8.png", 20000, 20000, 8), 20000 * 20000, 256_000_000),
        ]
        print(f"{'case':30s} {'file':>8s} {'decode cost':>12s} {'outcome':>22s} {'time':>8s} {'peak RSS':>9s} {'peak/cost':>9s} {'RSS after':>9s}")
        for name, path, cost, budget in rows:
            if (m := run_child(CHILD, name, path, budget, src)) is None:
                continue
            print(f"{name:30s} {path.stat().st_size / 1e3:7.0f}K {cost / 1e6:10.0f}MB {m['outcome']:>22s} {m['s'] * 1e3:6.0f}ms "
                  f"{m['peak'] / 1e6:7.0f}MB {m['peak'] / cost:9.2f} {m['after'] / 1e6:7.0f}MB")


IMAGE_CHILD = CHILD.replace("from tagfer.core.imageio import ImageError, load_image",
                            "from tagfer.core.imageio import ImageError, load_image, probe\nimport PIL.Image; PIL.Image.init()")
IMAGE_CHILD = IMAGE_CHILD.replace("print(json.dumps({", "print(json.dumps({'cost': probe(sys.argv[1], budget=int(sys.argv[2])).decode_bytes, ")


def image_formats(budget: int = 2_000_000_000, quick: bool = False) -> None:
    """Peak RSS vs decode cost for each image format and layout (module docstring); ``quick``: the
    3000×2000 / 3000² files only."""
    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from fixtures_imageio import tiff_image  # the test suite's TIFF writer (strips, tiles, 16-bit RGBA)

    src = str(Path(__file__).resolve().parents[1] / "src")
    rng = np.random.default_rng(0)

    def photo(w: int, h: int) -> Image.Image:  # smooth gradients + noise: compresses like a photo
        y, x = np.mgrid[0:h, 0:w]
        base = ((x * 255 // max(1, w - 1))[..., None] + (y * 255 // max(1, h - 1))[..., None] + np.array([0, 60, 120])) % 256
        return Image.fromarray((base + rng.integers(0, 8, (h, w, 3))).astype(np.uint8))

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        big, mid = (None if quick else photo(6000, 4000)), photo(3000, 2000)
        rows: list[tuple[str, Path]] = []

        def save(name: str, im: Image.Image, fname: str, **kw) -> None:
            im.save(d / fname, **kw)
            rows.append((name, d / fname))

        if big is not None:
            save("PNG 8-bit RGB 6000×4000", big, "a.png", compress_level=1)
            save("PNG 16-bit grey 6000×4000", Image.fromarray((np.asarray(big.convert("L"), dtype=np.uint16) * 257)), "g16.png", compress_level=1)
            save("JPEG baseline 6000×4000", big, "a.jpg", quality=90)
            save("JPEG progressive 6000×4000", big, "p.jpg", quality=90, progressive=True)
        save("JPEG progressive 3000×2000", mid, "pm.jpg", quality=90, progressive=True)
        if big is not None:
            save("WebP 6000×4000", big, "a.webp", quality=80, method=0)
            save("GIF 6000×4000", big.convert("P"), "a.gif")
            save("BMP 24-bit 6000×4000", big, "a.bmp")
        save("PNG 8-bit RGB 3000×2000", mid, "m.png", compress_level=1)
        for name, kw in [
            ("TIFF raw 16-bit RGBA 6000×4000", dict(w=6000, h=4000, compression=1)),
            ("TIFF 1 strip 16-bit RGBA 6000×4000", dict(w=6000, h=4000)),
            ("TIFF 64-row strips 16-bit RGBA", dict(w=6000, h=4000, rows_per_strip=64)),
            ("TIFF 256² tiles 16-bit RGBA", dict(w=6000, h=4000, tile=256)),
            ("TIFF 4096² tiles 16-bit RGBA", dict(w=6000, h=4000, tile=4096)),
            ("TIFF 1 strip 8-bit grey 8000²", dict(w=8000, h=8000, bits=8, spp=1)),
            ("TIFF 1 strip 16-bit RGBA 3000²", dict(w=3000, h=3000)),
        ]:
            if quick and kw["w"] > 3000:
                continue
            p = d / (name.replace(" ", "_").replace("²", "") + ".tif")
            p.write_bytes(tiff_image(**kw))
            rows.append((name, p))
        del big, mid
        print(f"\n{'format':36s} {'file':>8s} {'decode cost':>11s} {'peak RSS':>9s} {'peak-cost':>9s} {'outcome':>22s}")
        worst = -1e18
        for name, path in rows:
            if (m := run_child(IMAGE_CHILD, name, path, budget, src)) is None:
                continue
            over = m["peak"] - m["cost"]
            worst = max(worst, over)
            print(f"{name:36s} {path.stat().st_size / 1e6:7.1f}M {m['cost'] / 1e6:9.0f}MB {m['peak'] / 1e6:7.0f}MB "
                  f"{over / 1e6:7.0f}MB {m['outcome']:>22s}")
        print(f"worst peak - cost: {worst / 1e6:.0f} MB (docs: ~30–60 MB whatever the size)")


VIDEO_CHILD = CHILD_PROLOGUE + r"""
os.environ["TAGFER_DECODE_BUDGET_MB"] = str(int(sys.argv[2]) / 1e6)
from tagfer.au.video_io import iter_frames
from tagfer.au.video_records import VideoConfig
from tagfer.core.errors import ItemError
import av, numpy, PIL.Image  # imported before the baseline
base = rss("VmRSS")
t = time.perf_counter()
kinds = {}
try:
    for fr in iter_frames(sys.argv[1], VideoConfig()):
        k = fr.error.kind if fr.error else f"{fr.image.rgb.shape[1]}x{fr.image.rgb.shape[0]}"
        kinds[k] = kinds.get(k, 0) + 1
    out = " ".join(f"{v}×{k}" for k, v in kinds.items())
except ItemError as e:
    out = e.kind
print(json.dumps({"outcome": out, "s": time.perf_counter() - t, "peak": rss("VmHWM") - base}))
"""


def _mux(path: Path, payloads, codec: str, header: tuple[int, int], pix_fmt: str, fmt: str) -> Path:
    import fractions

    import av

    c = av.open(str(path), "w", format=fmt)
    s = c.add_stream(codec, rate=10)
    s.width, s.height = header
    s.pix_fmt = pix_fmt
    for i, b in enumerate(payloads):
        p = av.Packet(b)
        p.stream, p.time_base, p.pts, p.dts = s, fractions.Fraction(1, 10), i, i
        c.mux(p)
    c.close()
    return path


def _jpeg(side: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side), (90, 90, 90)).save(buf, "JPEG", quality=30)
    return buf.getvalue()


def _png(side: int, pix_fmt: str) -> bytes:
    import fractions

    import av
    import numpy as np

    ch = {"rgb24": 3, "rgb48be": 3, "rgba64be": 4}[pix_fmt]
    arr = np.zeros((side, side, ch), np.uint8 if pix_fmt == "rgb24" else np.uint16)
    cc = av.CodecContext.create("png", "w")
    cc.width = cc.height = side
    cc.pix_fmt, cc.time_base = pix_fmt, fractions.Fraction(1, 10)
    f = av.VideoFrame.from_ndarray(arr, format={"rgb24": "rgb24", "rgb48be": "rgb48le", "rgba64be": "rgba64le"}[pix_fmt])
    f.pts = 0
    return b"".join(bytes(p) for p in [*cc.encode(f), *cc.encode(None)])


def video_main() -> None:
    """Video frames vs the decode budget (module docstring, ``--video``)."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        small = _jpeg(256)
        big = _jpeg(8000)
        grow = _mux(d / "grow.avi", [small, big, big, small], "mjpeg", (256, 256), "yuvj420p", "avi")
        deep = _mux(d / "deep.mov", [_png(6000, "rgb48be")] * 2, "png", (6000, 6000), "rgb48be", "mov")
        wide = _mux(d / "wide.mov", [_png(256, "rgb24"), _png(2800, "rgba64be"), _png(256, "rgb24")], "png", (256, 256), "rgb24", "mov")
        mb = 1_000_000
        rows = [  # name, clip, largest frame's decode cost, budget
            ("MJPEG hdr 256², 2 frames 8000²", grow, 8000 * 8000 * 3 // 2, 256 * mb),
            ("  the same, budget 50 MB", grow, 8000 * 8000 * 3 // 2, 50 * mb),
            ("16-bit RGB 6000² (header says so)", deep, 6000 * 6000 * 6, 50 * mb),
            ("hdr 256² rgb24, a 2800² 16-bit RGBA", wide, 2800 * 2800 * 8, 50 * mb),
            ("  the same, budget 256 MB", wide, 2800 * 2800 * 8, 256 * mb),
        ]
        print(f"{'video case':38s} {'file':>8s} {'frame cost':>11s} {'budget':>7s} {'outcome':>34s} {'time':>7s} {'peak RSS':>9s} {'peak/cost':>9s} {'peak/budget':>11s}")
        for name, path, cost, budget in rows:
            if (m := run_child(VIDEO_CHILD, name, path, budget, src)) is None:
                continue
            print(f"{name:38s} {path.stat().st_size / 1e3:7.0f}K {cost / 1e6:9.0f}MB {budget / 1e6:5.0f}MB {m['outcome']:>34s} "
                  f"{m['s'] * 1e3:5.0f}ms {m['peak'] / 1e6:7.0f}MB {m['peak'] / cost:9.2f} {m['peak'] / budget:11.2f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--video", action="store_true", help="only video frames vs the budget")
    ap.add_argument("--images", action="store_true", help="only the per-format image table")
    ap.add_argument("--quick", action="store_true", help="smoke run: the refused bombs, the 3000-px image files, the video table")
    args = ap.parse_args()
    if args.video:
        video_main()
    elif args.images:
        image_formats(quick=args.quick)
    else:
        main(quick=args.quick)
        image_formats(quick=args.quick)
        video_main()
