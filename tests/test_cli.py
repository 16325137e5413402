import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from typer.testing import CliRunner

from tagfer.cli import app

runner = CliRunner()


def test_au_cli_exit_codes_and_resume(tmp_path, astronaut_path, bad_inputs):
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(astronaut_path, d / "face.png")
    out = tmp_path / "au.jsonl"
    r = runner.invoke(app, ["au", str(d), "--out", str(out), "--no-progress", "--top-k", "2"])
    assert r.exit_code == 0, r.output
    (rec,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rec["faces"][0]["top"]) == 2 and len(rec["faces"][0]["au_list"].splitlines()) == 2
    shutil.copy(bad_inputs["not_an_image"], d / "zz_bad.jpg")
    r = runner.invoke(app, ["au", str(d), "--out", str(out), "--no-progress", "--overlays", str(tmp_path / "ov")])
    assert r.exit_code == 1
    assert "1 image(s) processed (1 failed), 1 already done" in r.output
    assert f"not_an_image (1): {d / 'zz_bad.jpg'}" in r.output  # which image failed, by kind, on one line
    assert len(out.read_text().splitlines()) == 2
    assert not (tmp_path / "ov").exists() or not any((tmp_path / "ov").iterdir())  # no overlay for a failed image


def test_au_cli_candidate_threshold_is_separate_from_activation(tmp_path, astronaut_path):
    out = tmp_path / "au.jsonl"
    r = runner.invoke(app, ["au", str(astronaut_path), "--out", str(out), "--no-progress", "--candidate-threshold", "0.99"])
    assert r.exit_code == 0, r.output
    (face,) = json.loads(out.read_text())["faces"]
    assert len(face["au_boxes"]) == len(face["active"])  # every activated AU keeps its box (B_AU)
    confident = [a["au"] for a in face["aus"] if a["active"] and a["score"] >= 0.99][:3]
    assert face["top"] == confident and len(face["active"]) > len(confident)  # only confident ones are candidates


def test_au_cli_show_and_bad_detector(tmp_path, face_crop_path):
    out = tmp_path / "au.jsonl"
    r = runner.invoke(app, ["au", str(face_crop_path), "--out", str(out), "--no-progress", "--show"])
    assert r.exit_code == 0
    assert "AU_LIST for the teacher prompt" in r.output and "AU12" in r.output
    r = runner.invoke(app, ["au", str(face_crop_path), "--out", str(out), "--detector", "openface:/nonexistent.csv"])
    assert r.exit_code == 2 and "error" in r.output


def test_demo_writes_overlay(tmp_path):
    r = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo")])
    assert r.exit_code == 0, r.output
    assert "AU12" in r.output and list((tmp_path / "demo").glob("*.png"))
    assert "<answer>happiness</answer>" in r.output and (tmp_path / "demo" / "analyze_astronaut.png").is_file()


def test_rerun_exits_1_while_failed_records_remain(tmp_path, face_crop_path, bad_inputs):
    bad, good = str(bad_inputs["not_an_image"]), str(face_crop_path)
    out = tmp_path / "au.jsonl"
    assert runner.invoke(app, ["au", bad, good, "--out", str(out), "--no-progress"]).exit_code == 1
    r = runner.invoke(app, ["au", bad, good, "--out", str(out), "--no-progress"])  # all skipped now
    text = " ".join(r.output.split())
    assert r.exit_code == 1 and "0 image(s) processed" in text and "1 requested image(s) still have an error record" in text
    assert runner.invoke(app, ["au", good, "--out", str(out), "--no-progress"]).exit_code == 0  # the failure is not requested
    aout = tmp_path / "analyze.jsonl"
    assert runner.invoke(app, ["analyze", bad, good, "--out", str(aout), "--no-progress"]).exit_code == 1
    r = runner.invoke(app, ["analyze", bad, good, "--out", str(aout), "--no-progress"])
    text = " ".join(r.output.split())
    assert r.exit_code == 1 and "0 image(s) processed" in text and "1 requested image(s) still have an error record" in text
    assert len(aout.read_text().splitlines()) == 2  # nothing analysed twice
    assert runner.invoke(app, ["analyze", good, "--out", str(aout), "--no-progress"]).exit_code == 0


@pytest.mark.timeout(60)
def test_output_that_is_not_a_regular_file_is_a_usage_error(tmp_path, face_crop_path):
    import os

    fifo = tmp_path / "out.jsonl"
    os.mkfifo(fifo)  # resuming reads --out first: a FIFO would block
    for cmd in (["au", str(face_crop_path), "--out", str(fifo)], ["analyze", str(face_crop_path), "--out", str(fifo)],
                ["au", str(face_crop_path), "--out", "/dev/null"]):
        r = runner.invoke(app, cmd + ["--no-progress"])
        assert r.exit_code == 2 and "not a regular file" in " ".join(r.output.split()), r.output


# --------------------------------------------------------------------------- real processes
MEDIAPIPE_NOISE = ("Logging before InitGoogle", "face_landmarker_graph.cc", "inference_feedback_manager.cc", "W0000")


def _cli(*args, timeout=180, **kw):
    """Run ``python -m tagfer ARGS`` in a fresh process (no inherited log settings)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import tagfer

    env = {k: v for k, v in os.environ.items() if k not in ("GLOG_minloglevel", "TAGFER_VERBOSE")}
    env["PYTHONPATH"] = str(Path(tagfer.__file__).resolve().parents[1])
    return subprocess.run([sys.executable, "-m", "tagfer", *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env, **kw)


@pytest.mark.slow  # three fresh `python -m tagfer` processes load MediaPipe (~11 s); FIFOs in-process: test_grounding, test_detectors
def test_fifo_is_recorded_and_mediapipe_logs_stay_hidden(tmp_path, face_crop_path):
    """`tagfer au` / `tagfer analyze` on a FIFO (argument and inside a walked folder) next to good images:
    the FIFO is recorded unreadable, the batch finishes, and stderr carries none of MediaPipe's C++ lines."""
    import os

    d = tmp_path / "walk"
    d.mkdir()
    os.mkfifo(d / "a_fifo.jpg")
    shutil.copy(face_crop_path, d / "b_good.jpg")
    os.mkfifo(tmp_path / "arg.jpg")
    out = tmp_path / "au.jsonl"
    r = _cli("au", tmp_path / "arg.jpg", d, "sample:astronaut", "--out", out, "--workers", "2", "--no-progress")
    assert r.returncode == 1, r.stderr
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(x["error"] or {}).get("kind") for x in recs] == ["unreadable", "unreadable", None, None]
    assert not [line for line in r.stderr.splitlines() if any(n in line for n in MEDIAPIPE_NOISE)], r.stderr
    aout = tmp_path / "analyze.jsonl"
    r = _cli("analyze", tmp_path / "arg.jpg", d, "sample:astronaut", "--out", aout, "--workers", "2", "--no-progress")
    assert r.returncode == 1, r.stderr
    recs = [json.loads(line) for line in aout.read_text().splitlines()]
    assert [(x["error"] or {}).get("kind") for x in recs] == ["unreadable", "unreadable", None, None]
    assert recs[3]["analyses"][0]["label"] == "happiness"
    assert not [line for line in r.stderr.splitlines() if any(n in line for n in MEDIAPIPE_NOISE)], r.stderr
    r = _cli("analyze", "sample:astronaut", "--json", "--verbose")  # --verbose lets them through
    assert r.returncode == 0 and any(n in r.stderr for n in MEDIAPIPE_NOISE), r.stderr
    assert json.loads(r.stdout)["analyses"][0]["label"] == "happiness"


def _children(pid: int) -> set[int]:
    import glob

    kids: set[int] = set()
    for f in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            kids |= {int(x) for x in open(f).read().split()}
        except OSError:
            pass
    return kids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkill_of_au_leaves_no_worker_behind(tmp_path, astronaut_path):
    import os
    import signal
    import subprocess
    import time

    import tagfer

    d = tmp_path / "many"
    d.mkdir()
    for i in range(300):
        os.link(astronaut_path, d / f"{i:03d}.png")
    out = tmp_path / "au.jsonl"
    env = {**os.environ, "PYTHONPATH": str(Path(tagfer.__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "tagfer", "au", str(d), "--out", str(out), "--workers", "2", "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (out.exists() and out.stat().st_size > 0):  # workers are up and working
            time.sleep(0.05)
        workers = {c for c in _children(proc.pid) if _alive(c)}
        assert len(workers) == 2 and proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [w for w in workers if _alive(w)], "workers outlived the killed parent"
    finally:
        proc.kill()
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)


# --------------------------------------------------------------------------- `--config` precedence (tagfer build)
def flat(r) -> str:
    """CLI output with rich's line wrapping undone."""
    return " ".join(r.output.split())


def _empty_build(tmp_path, *flags: str, config: dict | None = None):
    """`tagfer build` over a dataset with no rows: resolves and writes build_config.json without contacting a server."""
    csv = tmp_path / "empty.csv"
    tmp_path.mkdir(parents=True, exist_ok=True)
    csv.write_text("path,label\n")
    args = ["build", "--no-progress", *flags]
    if config is not None:
        cfg_file = tmp_path / "cfg.json"
        body = {"sources": [f"generic:{csv}"], "out": str(tmp_path / "o"), **config}
        if isinstance(body.get("client", {}), dict):
            body["client"] = {"model": "m", **body.get("client", {})}
        cfg_file.write_text(json.dumps(body))
        args += ["--config", str(cfg_file)]
    else:
        args += ["--dataset", f"generic:{csv}", "--out", str(tmp_path / "o"), "--served-model", "m"]
    r = runner.invoke(app, args)
    written = tmp_path / "o" / "build_config.json"
    return r, (json.loads(written.read_text()) if written.is_file() else None)


def test_build_config_file_values_are_kept(tmp_path):
    from tagfer.data.build import BuildConfig

    file = {"quality": False, "top_k": 2, "max_tokens": 77, "limit": 3, "max_eliminations": 4, "no_au": "skip",
            "client": {"endpoints": ["http://10.0.0.9:9000/v1"], "total_concurrency": 64, "per_endpoint_concurrency": 16,
                       "max_retries": 1, "timeout_s": 9.5}}
    r, got = _empty_build(tmp_path, config=file)
    assert r.exit_code == 0, r.output
    assert (got["quality"], got["top_k"], got["max_tokens"], got["limit"], got["max_eliminations"], got["no_au"]) == (False, 2, 77, 3, 4, "skip")
    c = got["client"]
    assert c["endpoints"] == ["http://10.0.0.9:9000/v1"] and c["model"] == "m"
    assert (c["total_concurrency"], c["per_endpoint_concurrency"], c["max_retries"], c["timeout_s"]) == (64, 16, 1, 9.5)
    # every key in neither the file nor a flag has the dataclass default
    default = BuildConfig().to_json()
    for k in set(default) - set(file) - {"sources", "out", "client"}:
        assert got[k] == default[k], k
    for k in ("backoff_base_s", "image_side", "image_format", "connect_timeout_s"):
        assert c[k] == default["client"][k], k


def test_build_explicit_flag_beats_file_beats_default(tmp_path):
    from tagfer.data.build import BuildConfig

    file = {"quality": False, "client": {"total_concurrency": 64}, "max_tokens": 77, "top_k": 2}
    r, got = _empty_build(tmp_path, "--concurrency", "8", "--quality", "--top-k", "1", config=file)
    assert r.exit_code == 0, r.output
    assert got["client"]["total_concurrency"] == 8 and got["quality"] is True and got["top_k"] == 1  # flags
    assert got["max_tokens"] == 77  # file
    d = BuildConfig()
    assert got["client"]["per_endpoint_concurrency"] == d.client.per_endpoint_concurrency  # neither: default
    assert got["client"]["timeout_s"] == d.client.timeout_s and got["max_format_retries"] == d.max_format_retries
    # without any file, an absent flag is the dataclass default too (no second default in the CLI)
    r, got = _empty_build(tmp_path / "noflags")
    assert r.exit_code == 0, r.output
    assert got["quality"] is d.quality and got["top_k"] == d.top_k and got["max_tokens"] == d.max_tokens
    assert got["client"]["total_concurrency"] == d.client.total_concurrency and got["client"]["endpoints"] == d.client.endpoints


def test_build_config_nested_client_keys_and_client_flags(tmp_path):
    r, got = _empty_build(tmp_path, "--per-endpoint", "5", config={"client": {"max_retries": 0, "per_endpoint_concurrency": 99}})
    assert r.exit_code == 0, r.output
    assert got["client"]["max_retries"] == 0 and got["client"]["per_endpoint_concurrency"] == 5  # a flag wins over the file
    # the client settings live once, under "client": a flat one in a file is refused with where it goes
    r2, none = _empty_build(tmp_path / "flat", config={"concurrency": 64})
    assert r2.exit_code == 2 and "'concurrency'" in flat(r2) and 'go in "client"' in flat(r2) and none is None
    # a build_config.json is itself a valid --config (round trip)
    from tagfer.data.build import BuildConfig

    assert BuildConfig.from_dict(got).to_json() == got


def test_build_bad_config_is_a_usage_error(tmp_path):
    r, got = _empty_build(tmp_path, config={"qualty": False, "concurrency": 3})
    assert r.exit_code == 2 and "qualty" in flat(r) and got is None
    r, _ = _empty_build(tmp_path, config={"client": {"retries": 1}})
    assert r.exit_code == 2 and "retries" in flat(r)
    r, _ = _empty_build(tmp_path, config={"shard": "5/2"})
    assert r.exit_code == 2 and "shard" in flat(r)
    r, _ = _empty_build(tmp_path, config={"quality": "false"})  # a string is not a boolean (it would be truthy)
    assert r.exit_code == 2 and "quality must be true or false" in flat(r)
    r, _ = _empty_build(tmp_path, config={"client": {"total_concurrency": "64"}})
    assert r.exit_code == 2 and "client.total_concurrency must be an integer" in flat(r)
    r, _ = _empty_build(tmp_path, config={"client": "http://h:1/v1"})
    assert r.exit_code == 2 and "client must be a JSON object" in flat(r)
    bad = tmp_path / "bad.json"
    for text, words in (("{not json", "not valid JSON"), ("[1, 2]", "JSON object")):
        bad.write_text(text)
        r = runner.invoke(app, ["build", "--config", str(bad), "--dataset", "generic:x.csv", "--out", str(tmp_path / "b")])
        assert r.exit_code == 2 and words in flat(r), r.output
    r = runner.invoke(app, ["build", "--config", str(tmp_path / "missing.json"), "--out", str(tmp_path / "b")])
    assert r.exit_code == 2 and "missing.json" in "".join(r.output.split())  # a long tmp path may be folded mid-word
    r = runner.invoke(app, ["build", "--out", str(tmp_path / "b")])
    assert r.exit_code == 2 and "--dataset" in flat(r)


def test_build_help_states_the_dataclass_defaults():
    """The build options have no defaults of their own; where their help names one, it is BuildConfig's."""
    import re

    import typer

    from tagfer.cli.data import CLIENT_FLAGS
    from tagfer.data.build import BuildConfig

    cfg = BuildConfig()
    rename = {"source": "sources"}
    cmd = typer.main.get_command(app).commands["build"]
    checked = 0
    for p in cmd.params:
        if p.name in ("progress", "config_file", "prompt_dir"):
            continue
        assert p.default is None, f"--{p.name} declares its own default {p.default!r}"
        m = re.search(r"\(default:? ([^,;)]+)", p.help or "")
        if not m:
            continue
        value = getattr(cfg.client, CLIENT_FLAGS[p.name]) if p.name in CLIENT_FLAGS else getattr(cfg, rename.get(p.name, p.name))
        shown = m.group(1).split()[0]
        if value is None:  # described in words ("the server's first model")
            continue
        value = value[0] if isinstance(value, list) else "/".join(map(str, value)) if isinstance(value, tuple) else value
        expected = {True: "on", False: "off"}.get(value, str(value)) if isinstance(value, bool) else str(value)
        assert shown in (expected, f"{value:g}" if isinstance(value, float) else expected), (p.name, shown, value)
        checked += 1
    assert checked >= 8


# --------------------------------------------------------------------------- conventions (issue 22)
def _commands():
    import typer

    def walk(cmd, path):
        if hasattr(cmd, "commands"):
            yield path, cmd
            for name, sub in cmd.commands.items():
                yield from walk(sub, path + [name])
        else:
            yield path, cmd

    return list(walk(typer.main.get_command(app), []))


def test_version_and_verbose_are_global():
    import tagfer

    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout.strip() == f"tagfer {tagfer.__version__}"
    r = runner.invoke(app, ["--verbose", "train", "presets"])
    assert r.exit_code == 0 and "tiny_cpu" in r.stdout


def test_help_is_readable_at_80_columns_and_piped():
    """Every command's help, piped (CliRunner is not a terminal) at COLUMNS=80: no line over 80
    characters, every option name written out in full, no description squeezed into a column
    of single words, no rich panel."""
    checked = 0
    for path, cmd in _commands():
        r = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "80"})
        assert r.exit_code == 0, (path, r.output)
        lines = r.stdout.splitlines()
        assert all(len(line) <= 80 for line in lines), (path, max(lines, key=len))
        assert not re.search(r"--[\w-]+(…|\.\.\.)", r.stdout) and "╭" not in r.stdout, path  # no cut option name, no panel
        assert not [ln for ln in lines if ln.rstrip().endswith("...") and not ln.startswith("Usage:")], (path, "a short help is cut")
        for p in getattr(cmd, "params", []):
            for opt in getattr(p, "opts", []):
                if opt.startswith("--"):
                    assert re.search(rf"(^|[\s,/]){re.escape(opt)}([\s,=/]|$)", r.stdout, re.M), (path, opt)
        # descriptions get at least 40 of the 80 columns (rich's help gave them one word per line)
        assert all(len(ln) - len(ln.lstrip()) <= 40 for ln in lines if ln.strip()), path
        checked += 1
    assert checked >= 25


def test_o_is_always_the_output_and_one_name_per_concept():
    """`-o` is `--out` in every command that has it; options meaning one thing share one name."""
    seen: dict[str, set[str]] = {}
    for path, cmd in _commands():
        for p in getattr(cmd, "params", []):
            opts = set(getattr(p, "opts", []))
            if "-o" in opts:
                assert "--out" in opts, (path, opts)
            for long in (o for o in opts if o.startswith("--")):
                seen.setdefault(long, set()).add(" ".join(path))
    retired = {"--overlay", "--to", "--source", "--threshold", "--max-tokens", "--au-candidate-threshold", "--pool", "--set"}
    assert not retired & set(seen), retired & set(seen)
    assert {"au", "analyze", "build", "score"} <= seen["--au-threshold"] and {"eval", "judge", "build"} <= seen["--served-model"]
    assert {"eval", "judge"} <= seen["--api-key-env"] and {"eval", "build"} <= seen["--request-retries"]


def test_analyze_o_writes_json_lines(tmp_path, face_crop_path):
    out = tmp_path / "x.jsonl"
    r = runner.invoke(app, ["analyze", str(face_crop_path), "-o", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    (rec,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert rec["image"] == str(face_crop_path) and rec["analyses"] and out.is_file()
    r = runner.invoke(app, ["analyze", str(face_crop_path), "-o", str(out), "--no-progress"])  # all done: nothing loaded
    assert r.exit_code == 0 and "0 image(s) processed" in r.output and "1 already done" in r.output


def test_quiet_by_default_verbose_shows_library_noise(capsys):
    import warnings

    from tagfer.cli import _app

    with warnings.catch_warnings():
        _app._SEEN_WARNINGS.clear()
        _app.quiet_libraries(verbose=False)
        warnings.warn_explicit("old API", FutureWarning, "lib.py", 1, module="somelib")  # a deprecation notice: hidden
        warnings.warn_explicit("torch noise", UserWarning, "x.py", 1, module="torch.nn.modules")  # a library's: hidden
        warnings.warn_explicit("set in __post_init__", UserWarning, "<string>", 176, module="<string>")  # via generated code: shown
        for _ in range(3):  # tagfer's own: one line, once, without the source line
            warnings.warn_explicit("tensorboard is not installed", UserWarning, "config.py", 9, module="tagfer.train.config")
        err = capsys.readouterr().err
        assert "old API" not in err and "torch noise" not in err and "set in __post_init__" in err
        assert err.count("tensorboard is not installed") == 1
        assert "warning: tensorboard is not installed" in " ".join(err.split()) and "config.py" not in err
        _app._SEEN_WARNINGS.clear()
        _app.quiet_libraries(verbose=True)
        warnings.warn_explicit("old API", FutureWarning, "lib.py", 1, module="somelib")
        assert "old API" in capsys.readouterr().err
    import os

    os.environ.pop("TAGFER_VERBOSE", None)


def test_default_threads_is_half_the_cpus(monkeypatch):
    from tagfer.cli import _app

    monkeypatch.setattr(_app.os, "sched_getaffinity", lambda pid: set(range(2)), raising=False)
    assert _app.default_threads() == 1
    monkeypatch.setattr(_app.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert _app.default_threads() == 4
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    _app.set_threads()
    assert os.environ["OMP_NUM_THREADS"] == "4"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    _app.set_threads()
    assert os.environ["OMP_NUM_THREADS"] == "3"  # the user's choice wins


def test_report_to_stdout_is_not_wrapped(tmp_path):
    """`tagfer report … > x.md`: stdout holds the Markdown as written (rows whole, brackets kept)."""
    data = {"run": {"name": "A model with a rather long name [v2]", "model": "m", "dataset": "rafdb", "split": "test"},
            "n": 10, "accuracy": {"value": 0.5, "ci": [0.4, 0.6]}, "macro_f1": {"value": 0.4, "ci": None},
            "format_validity": {"value": 0.9, "ci": None}, "au_iou": None, "cross_au_iou": None}
    (tmp_path / "s.json").write_text(json.dumps(data))
    r = runner.invoke(app, ["report", str(tmp_path / "s.json"), "--out", str(tmp_path / "r.md")], env={"COLUMNS": "40"})
    assert r.exit_code == 0, r.output
    written = (tmp_path / "r.md").read_text()
    assert written.strip() in r.stdout  # exactly the file's text: no row broken at 40 columns, no markup eaten
    assert any(len(line) > 40 and line.startswith("|") for line in r.stdout.splitlines())


def test_progress_bar_knows_its_total(tmp_path, face_crop_path, bad_inputs):
    """`au` on a finite list: the bar's total is the number of images to run (not "?"), and it
    counts the failures the summary lists."""
    r = runner.invoke(app, ["au", str(face_crop_path), str(bad_inputs["not_an_image"]), "-o", str(tmp_path / "a.jsonl")])
    assert r.exit_code == 1
    bar = next(line for line in r.output.splitlines() if line.startswith("tagfer au"))
    assert "2/2 images" in bar and "1 failed" in bar


def test_serve_and_study_limits_reach_the_app_factories(tmp_path, monkeypatch):
    """`serve --allowed-origin/--max-pending` and `study serve --allowed-origin/--max-evaluators/
    --registrations-per-client` are passed to the app factories under their parameter names."""
    import types

    import uvicorn

    from tagfer.evaluation.study import app as study_app
    from tagfer.explainer import serve

    seen: dict[str, dict] = {}

    def fake_serve_app(cfg, **kw):
        seen["serve"] = kw
        return types.SimpleNamespace(state=types.SimpleNamespace(pool=types.SimpleNamespace(warm=lambda: None)))

    def fake_study_app(pairs, db, **kw):
        seen["study"] = kw
        return object()

    monkeypatch.setattr(serve, "create_app", fake_serve_app)
    monkeypatch.setattr(study_app, "create_app", fake_study_app)
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    r = runner.invoke(app, ["serve", "--allowed-origin", "http://a.lan:3000", "--allowed-origin", "http://b.lan", "--max-pending", "7"])
    assert r.exit_code == 0, r.output
    assert seen["serve"]["allowed_origins"] == ["http://a.lan:3000", "http://b.lan"] and seen["serve"]["max_pending"] == 7
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"id": "p1", "image": str(tmp_path / "x.png"), "label": "happiness",
                                 "a": {"name": "A", "text": "a"}, "b": {"name": "B", "text": "b"}}) + "\n")
    r = runner.invoke(app, ["study", "serve", "--pairs", str(pairs), "--db", str(tmp_path / "s.sqlite"),
                            "--allowed-origin", "http://c.lan", "--max-evaluators", "9", "--registrations-per-client", "2"])
    assert r.exit_code == 0, r.output
    assert (seen["study"]["allowed_origins"], seen["study"]["max_evaluators"], seen["study"]["registrations_per_client"]) == \
        (["http://c.lan"], 9, 2)


def test_train_best_checkpoint_is_printed_in_words():
    from tagfer.cli.train import best_text

    text = best_text({"n": 2, "accuracy": 0.5, "au_iou": 0.25, "fmt_rate": 1.0, "score": 0.6, "step": 3})
    assert text == "  (step 3: accuracy 0.50, au_iou 0.25, fmt_rate 1.00, score 0.60 on 2 samples)" and "{" not in text
    assert best_text({"step": 5, "note": "no validation data"}) == "  (step 5: no validation data)" and best_text(None) == ""
