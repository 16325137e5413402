import json
import shutil

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
    assert "1 processed (1 failed), 1 already done" in r.output and "not_an_image=1" in r.output
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
