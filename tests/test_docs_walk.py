"""The docs walk: every ``tagfer …`` command in a code block of README.md and docs/*.md, taken as a
new user would type it, so the docs cannot drift from the CLI (issue 22).

* Fast tier: every command parses — its subcommand exists, every option it uses exists and takes
  the value given, required options are there (click's own validation, nothing runs); and each
  command is either run for real below or listed in :data:`NOT_RUN` with the reason.
* Slow tier: the commands that can run offline run for real, in document order, in a scratch
  folder holding the files the docs name (``face.jpg``, ``photos/`` … are the bundled sample
  faces; ``clip.mp4`` a short clip of them; ``rafdb:/data/RAF-DB`` the RAF-DB-shaped fixture;
  ``openai:http://gpu0:8000/v1`` a fake OpenAI-compatible server, tests/fakeserver.py). Each must
  exit as the docs say: 0, unless the line's comment says ``exit N``.
* Model tier: the training commands' TRL-style ``--field value`` arguments are valid fields of
  the preset's config (TRL's parser; imports transformers).
"""

from __future__ import annotations

import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from tagfer.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
_ENV = re.compile(r"^[A-Z_][A-Z0-9_]*=\S*$")


@dataclass(frozen=True)
class DocCommand:
    where: str  # file:line
    text: str  # as written (continuation lines joined)
    env: tuple[tuple[str, str], ...]
    argv: tuple[str, ...]  # after `tagfer`
    exit_code: int  # 0, or what the line's comment says ("exit 3")


def doc_commands() -> list[DocCommand]:
    """Every ``tagfer …`` line of the docs' code blocks (``\\`` continuations joined, comments cut)."""
    found = []
    for f in DOC_FILES:
        text = f.read_text(encoding="utf-8")
        for m in _FENCE.finditer(text):
            first_line = text.count("\n", 0, m.start(1)) + 1
            lines = m.group(1).split("\n")
            i = 0
            while i < len(lines):
                start, line = i, lines[i].strip().removeprefix("$ ")
                while line.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    line = line[:-1].rstrip() + " " + lines[i].strip()
                i += 1
                if not re.match(r"([A-Z_][A-Z0-9_]*=\S*\s+)*tagfer(\s|$)", line):
                    continue
                words = shlex.split(line, comments=True)
                env = []
                while words and _ENV.match(words[0]):
                    env.append(tuple(words.pop(0).split("=", 1)))
                if not words or words[0] != "tagfer":
                    continue
                comment = line.split("#", 1)[1] if "#" in line else ""
                code = re.search(r"\bexit (?:code )?(\d)\b", comment)
                found.append(DocCommand(f"{f.name}:{first_line + start}", line, tuple(env), tuple(words[1:]),
                                        int(code.group(1)) if code else 0))
    return found


def parse(argv: tuple[str, ...]):
    """Resolve the subcommand chain and parse its options as click would, running nothing.
    Returns (command path, the command's context); raises click's UsageError on a bad option.
    An eager option (``--version``, ``--help``) ends the parse where it stands (context None)."""
    cmd = typer.main.get_command(app)
    path: list[str] = []
    try:
        ctx = cmd.make_context("tagfer", list(argv))
        while hasattr(cmd, "commands"):
            rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
            name, cmd, rest = cmd.resolve_command(ctx, rest)
            path.append(name)
            ctx = cmd.make_context(name, rest, parent=ctx)
    except Exception as e:
        if type(e).__name__ == "Exit" and getattr(e, "exit_code", 1) == 0:
            return tuple(path), None
        raise
    return tuple(path), ctx


#: Commands the walk does not run, each matched by a pattern on its text, with the reason.
#: (Every command is still parsed: the options it uses must exist.)
NOT_RUN: list[tuple[str, str]] = [
    (r"--endpoint http://(gpu|127\.0\.0\.1:800[1-3])", "a teacher on 4 GPU servers (tests/test_build.py runs build against fake servers)"),
    (r"/data/(FERPlus|AffectNet)|affectnet:|ferplus:", "needs FERPlus/AffectNet copies (only a RAF-DB-shaped fixture ships with the tests)"),
    (r"openface:/data", "needs an OpenFace table of the real test set"),
    (r"hf:/?models/|--model models/|path/to/tag-checkpoint", "needs a trained 7B checkpoint (tests/test_pipeline.py runs the same commands on a tiny model)"),
    (r"--served-model Qwen2\.5-VL-7B-Instruct --baseline", "a served 7B baseline (the openai path runs against the fake server in test_eval.py)"),
    (r"https://api\.example\.com", "a hosted judge API (tests/test_judge.py runs the judge against a fake server)"),
    (r"^tagfer (serve|study serve)\b", "starts a web server that runs until stopped (tests/test_serve.py, tests/test_study.py)"),
    (r"^tagfer train (sft|grpo)\b", "minutes to hours of training (tests/test_pipeline.py and tests/test_train_*.py run tiny configs)"),
    (r"^tagfer train (merge|plot) runs/", "needs the output of a training run above"),
    (r"^tagfer (export|stats) tag_data\b", "needs the build of the 4-GPU teacher above (test_build/test_export/test_stats cover them)"),
    (r"runs/tag(_rafdb)?\.jsonl|runs/qwen|runs/\*\.scores\.json|study_rafdb\.sqlite", "needs the predictions of the 7B models above"),
    (r"interview\.webm lab\.mov|frames_dir/", "needs the user's own recordings (tests/test_video.py covers webm, mov and folders of frames)"),
    (r"^tagfer train export-", "imports TRL (model tier): see test_docs_train_fields_are_config_fields"),
]


def not_run_reason(c: DocCommand) -> str | None:
    text = "tagfer " + shlex.join(c.argv)
    return next((why for pat, why in NOT_RUN if re.search(pat, text)), None)


COMMANDS = doc_commands()


def test_the_docs_have_commands_to_walk():
    files = {c.where.split(":")[0] for c in COMMANDS}
    assert len(COMMANDS) >= 40 and {"README.md", "analyze.md", "data.md", "eval.md", "train.md", "video.md"} <= files


@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.where for c in COMMANDS])
def test_every_documented_command_parses(cmd):
    try:
        path, _ = parse(cmd.argv)
    except Exception as e:  # click.UsageError / BadParameter: the docs use an option the CLI does not have
        pytest.fail(f"{cmd.where}: `{cmd.text}` does not parse: {e}")
    assert path or cmd.argv[0] in ("--version", "--help"), cmd.where


def test_a_changed_flag_is_caught():
    """The walk would fail on the flags this issue renamed (the check is not vacuous)."""
    for argv in (("analyze", "x.jpg", "--overlay", "o.png"), ("export", "d", "--to", "o"), ("build", "--source", "rafdb:x"),
                 ("eval", "--model", "facs", "--dataset", "rafdb:x", "-o", "p.jsonl", "--max-retries", "0"), ("nope",)):
        with pytest.raises(Exception) as e:
            parse(argv)
        assert "UsageError" in {c.__name__ for c in type(e.value).__mro__}, argv  # click's (typer's vendored click)
    assert parse(("train", "sft", "--config", "tiny_cpu", "--any_trl_field", "1"))[0] == ("train", "sft")


# --------------------------------------------------------------------------- running them
@pytest.fixture()
def workspace(tmp_path, monkeypatch, astronaut_path, grace_path, two_faces_path, rafdb_root, fake_openai, tmp_path_factory):
    """A folder holding what the docs' commands name, and the substitutions for the rest."""
    from fixtures_evaluate import tag_answer
    from fixtures_video import face_square, write_clip

    import numpy as np
    from PIL import Image

    for name in ("face.jpg", "photo.jpg", "a.jpg", "more.jpg"):
        Image.open(astronaut_path).convert("RGB").save(tmp_path / name)
    shutil.copy(two_faces_path, tmp_path / "group.jpg")
    (tmp_path / "photos").mkdir()
    Image.open(astronaut_path).convert("RGB").save(tmp_path / "photos" / "astronaut.jpg")
    Image.open(grace_path).convert("RGB").save(tmp_path / "photos" / "grace.jpg")
    face = face_square(np.asarray(Image.open(astronaut_path).convert("RGB")), (110, 20, 350, 260))
    write_clip(tmp_path / "clip.mp4", [face] * 20, fps=10)
    (tmp_path / "runs").mkdir()
    srv = fake_openai(lambda req, i: tag_answer("happiness"))
    subst = {"/data/RAF-DB": str(rafdb_root), "http://gpu0:8000/v1": srv.url}
    monkeypatch.chdir(tmp_path)
    return subst


def _run(cmd: DocCommand, subst: dict[str, str]):
    argv = []
    for a in cmd.argv:
        for k, v in subst.items():
            a = a.replace(k, v)
        argv.append(a)
    return CliRunner().invoke(app, argv, env=dict(cmd.env))


@pytest.mark.slow
def test_documented_commands_run_and_exit_as_documented(workspace):
    """Every command not in NOT_RUN runs for real, in document order, with the documented exit code."""
    ran = []
    for cmd in COMMANDS:
        if not_run_reason(cmd) is not None:
            continue
        r = _run(cmd, workspace)
        assert r.exit_code == cmd.exit_code, f"{cmd.where}: `{cmd.text}` exited {r.exit_code}:\n{r.output}\n{r.exception!r}"
        ran.append(cmd.where)
    assert len(ran) >= 12, ran  # the offline image/video/eval/report commands, the openai ones on the fake server


def test_each_command_is_run_or_has_a_reason():
    """A new docs command gets a decision: it runs in the slow walk, or NOT_RUN says why not.
    The run set is the offline set: sample faces, the RAF-DB fixture, the fake server."""
    runnable = [c for c in COMMANDS if not_run_reason(c) is None]
    offline = re.compile(r"--version|--help|face\.jpg|photo\.jpg|group\.jpg|photos/|a\.jpg|sample:|clip\.mp4|rafdb:/data/RAF-DB|"
                         r"http://gpu0:8000/v1|tagfer (au|analyze|score|report|study pairs|study export|judge)\b|au\.jsonl")
    for c in runnable:
        text = "tagfer " + shlex.join(c.argv)
        assert offline.search(text), f"{c.where}: `{c.text}` is neither runnable offline nor listed in NOT_RUN"
    assert {pat for pat, _ in NOT_RUN} == {pat for pat, _ in NOT_RUN if any(re.search(pat, "tagfer " + shlex.join(c.argv)) for c in COMMANDS)}, \
        "a NOT_RUN entry matches no docs command any more: remove it"


@pytest.mark.model
def test_docs_train_fields_are_config_fields(tmp_path, monkeypatch):
    """`tagfer train sft|grpo|show|export-* -c PRESET --field value …` in the docs: every field is a
    field of the preset's TRL config (TRL's parser would stop a user at it), and the export
    commands write their files."""
    from tagfer.train.config import parse_config

    monkeypatch.chdir(tmp_path)
    checked = 0
    for cmd in COMMANDS:
        path, ctx = parse(cmd.argv)
        if path[:1] != ("train",) or path[1] not in ("sft", "grpo", "show", "export-llamafactory", "export-verl"):
            continue
        stage = path[1] if path[1] in ("sft", "grpo") else None
        parse_config(ctx.params["config"], list(ctx.args), stage=stage)
        if path[1].startswith("export-"):
            r = CliRunner().invoke(app, list(cmd.argv))
            assert r.exit_code == cmd.exit_code, (cmd.where, r.output)
            assert Path(ctx.params["out"]).is_file()
        checked += 1
    assert checked >= 8
