"""The whole user journey on fixture data, through the CLI, as a researcher would run it:
build (FACS teacher) → export → SFT → GRPO → merge → eval (trained model and FACS baseline)
→ score → report → analyze with the trained model."""

import json

import pytest
from typer.testing import CliRunner

from tagfer.cli import app

runner = CliRunner()


def _ok(args, code=0):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == code, (args, r.output, r.exception)
    return r


@pytest.mark.slow
def test_build_export_train_eval_report(tmp_path, rafdb_root, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _ok(["build", "--dataset", f"rafdb:{rafdb_root}", "--teacher", "facs", "--out", "tag_data"])
    accepted = [json.loads(x) for x in (tmp_path / "tag_data" / "accepted.jsonl").read_text().splitlines()]
    assert accepted and all(a["teacher"] == "facs-rules" and "<bbox>" in a["completion"] for a in accepted)
    _ok(["export", "tag_data", "--out", "tag_export"])
    hf = tmp_path / "tag_export" / "hf" / "dataset"
    assert hf.is_dir()

    sft = ["train", "sft", "--config", "tiny_cpu", "--train_data", hf, "--val_size", "0",
           "--max_steps", "3", "--output_dir", "runs/sft"]
    _ok(sft)
    assert (tmp_path / "runs/sft/final/adapter_config.json").is_file()
    grpo = ["train", "grpo", "--config", "tiny_cpu_grpo", "--train_data", hf, "--adapter", "runs/sft/final",
            "--output_dir", "runs/grpo", "--max_steps", "1"]
    _ok(grpo)
    log = [json.loads(x) for x in (tmp_path / "runs/grpo/train_log.jsonl").read_text().splitlines()]
    assert any("reward" in json.dumps(rec) for rec in log)
    _ok(["train", "merge", "runs/grpo/final", "-o", "models/tag-tiny"])

    for name, model in (("tiny", "hf:models/tag-tiny"), ("facs", "facs")):
        _ok(["eval", "--model", model, "--dataset", f"rafdb:{rafdb_root}", "--split", "test",
             "--out", f"runs/{name}.jsonl", "--max-new-tokens", "12", "--no-progress"])
        _ok(["score", f"runs/{name}.jsonl", "--detector", "mediapipe", "--name", name, "--no-progress"])
    tiny = json.loads((tmp_path / "runs/tiny.scores.json").read_text())
    facs = json.loads((tmp_path / "runs/facs.scores.json").read_text())
    assert json.dumps(tiny) != json.dumps(facs)
    _ok(["report", "runs/tiny.scores.json", "runs/facs.scores.json", "--out", "report.md"])
    report = (tmp_path / "report.md").read_text()
    assert "| tiny |" in report and "| facs |" in report and "RAF-DB" in report

    # The trained tiny model writes garbage: analyze reports it as malformed (exit 3), never fixes it.
    r = _ok(["analyze", "sample:astronaut", "--model", "models/tag-tiny", "--json", "--max-new-tokens", "8"], code=3)
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    assert rec["analyses"][0]["well_formed"] is False and rec["analyses"][0]["violations"]
