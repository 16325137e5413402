"""Report tables (tagfer.evaluation.report): layout, averages, best/second marks, CSV output."""

from __future__ import annotations

import csv
import json

import pytest

from tagfer.evaluation import report as R


def _score(tmp_path, name, dataset, acc, au=None, xau=None, train_set=None, fname=None):
    data = {
        "run": {"name": name, "model": f"m-{name}", "dataset": dataset, "split": "test", "train_set": train_set},
        "n": 100,
        "accuracy": {"value": acc, "ci": [acc - 0.05, acc + 0.05]},
        "macro_f1": {"value": acc - 0.1, "ci": None},
        "format_validity": {"value": 0.9, "ci": [0.85, 0.95]},
        "au_iou": None if au is None else {"value": au, "ci": [au - 0.1, au + 0.1], "n_scored": 90, "n_skipped": 10},
        "cross_au_iou": None if xau is None else {"value": xau, "ci": None},
    }
    p = tmp_path / (fname or f"{name}_{dataset}_{train_set}.json")
    p.write_text(json.dumps(data))
    return p


def test_main_table_layout_average_and_marks(tmp_path):
    paths = [
        _score(tmp_path, "Base", "rafdb", 0.5675),
        _score(tmp_path, "Base", "ferplus", 0.6636),
        _score(tmp_path, "Base", "affectnet", 0.3389),
        _score(tmp_path, "TAG", "affectnet", 0.6703),
        _score(tmp_path, "TAG", "rafdb", 0.9280),
        _score(tmp_path, "TAG", "ferplus", 0.9150),
        _score(tmp_path, "SFT", "rafdb", 0.8902),
        _score(tmp_path, "SFT", "ferplus", 0.8101),
    ]
    runs = R.load_scores(paths)
    t = R.main_table(runs)
    assert t.columns == ["RAF-DB", "FERPlus", "AffectNet", "Avg"]  # paper order, not file order
    assert t.rows == ["Base", "TAG", "SFT"]
    tag = t.values[1]
    assert tag[:3] == pytest.approx([92.80, 91.50, 67.03])
    assert tag[3] == pytest.approx((92.80 + 91.50 + 67.03) / 3)  # 83.78 as in the paper
    assert t.values[2][2] is None and t.values[2][3] is None  # SFT lacks AffectNet → no average
    md = R.to_markdown(t)
    assert "| TAG | **92.80** | **91.50** | **67.03** | **83.78** |" in md
    assert "| SFT | <u>89.02</u> | <u>81.01</u> | – | – |" in md
    assert "| Base | 56.75 | 66.36 | <u>33.89</u> | <u>52.33</u> |" in md
    f1 = R.build_tables(runs, ["main"], metric="macro_f1")[0]
    assert f1.title.startswith("macro_f1") and f1.values[1][0] == pytest.approx(82.80)


def test_ranks_ties_share_marks():
    assert R.ranks([0.5, 0.7, 0.7, None, 0.6]) == [0, 1, 1, 0, 2]
    assert R.ranks([None, None]) == [0, 0]
    assert R.ranks([1.004, 1.001, 0.9]) == [1, 1, 2]  # equal as displayed (2 decimals)


def test_ablation_drops_empty_columns(tmp_path):
    runs = R.load_scores(
        [
            _score(tmp_path, "SFT", "rafdb", 0.89, au=0.4673),
            _score(tmp_path, "RLVR", "rafdb", 0.91, au=0.4346),
            _score(tmp_path, "TAG", "rafdb", 0.928, au=0.6024, xau=0.41),
        ]
    )
    t = R.ablation_table(runs)
    assert t.columns == ["RAF-DB Acc", "RAF-DB AU IoU", "RAF-DB X-IoU"]
    assert t.values[2] == pytest.approx([92.8, 60.24, 41.0])
    assert t.values[0][2] is None
    md = R.to_markdown(t)
    assert "| TAG | **92.80** | **60.24** | **41.00** |" in md and "| SFT | 89.00 | <u>46.73</u> | – |" in md


def test_cross_table_and_write_report(tmp_path):
    paths = [
        _score(tmp_path, "TAG-raf", "rafdb", 0.92, train_set="rafdb"),
        _score(tmp_path, "TAG-raf", "ferplus", 0.61, train_set="rafdb"),
        _score(tmp_path, "TAG-fer", "rafdb", 0.70, train_set="ferplus"),
        _score(tmp_path, "TAG-fer", "ferplus", 0.91, train_set="ferplus"),
        _score(tmp_path, "Base", "rafdb", 0.56),  # no train set: not in the cross table
    ]
    runs = R.load_scores(paths)
    t = R.cross_table(runs)
    assert t.rows == ["RAF-DB", "FERPlus"] and t.columns == ["RAF-DB", "FERPlus"]
    assert t.values == [pytest.approx([92.0, 61.0]), pytest.approx([70.0, 91.0])]
    md, csvs = R.write_report(runs, tmp_path / "out" / "report.md")
    assert (tmp_path / "out" / "report.md").read_text() == md
    assert "### Cross-dataset" in md and "### Details" in md and "92.00 [87.0, 97.0]" in md
    names = sorted(p.name for p in csvs)
    assert names == ["report_ablation.csv", "report_cross.csv", "report_details.csv", "report_main.csv"]
    rows = list(csv.reader(open(tmp_path / "out" / "report_main.csv")))
    assert rows[0] == ["Model", "RAF-DB", "FERPlus", "Avg"]
    assert rows[1][0] == "TAG-raf" and float(rows[1][1]) == pytest.approx(92.0) and "*" not in "".join(rows[1])


def test_no_cross_table_without_train_sets_and_bad_inputs(tmp_path):
    runs = R.load_scores([_score(tmp_path, "A", "rafdb", 0.5)], names=["Renamed"])
    assert runs[0].name == "Renamed"
    assert [t.key for t in R.build_tables(runs)] == ["main", "ablation", "details"]
    with pytest.raises(ValueError):
        R.build_tables(runs, ["nope"])
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError):
        R.load_scores([bad])


def test_end_to_end_cli_eval_score_report(tmp_path, rafdb_root, ferplus_root, tiny_vlm_dir, eval_server, landmarker):
    """`tagfer eval` + `tagfer score` + `tagfer report`: the tiny model (hf) and a server-backed baseline on fixture data."""
    from typer.testing import CliRunner

    from fixtures_evaluate import tag_answer
    from tagfer.cli import app

    runner = CliRunner()
    answers = {0: tag_answer("happiness"), 1: tag_answer("neutral"), 2: "Sadness.", 3: tag_answer("surprise")}
    eval_server.reset(lambda req, i: answers[i % 4])
    scores = []
    for ds, spec in (("rafdb", f"rafdb:{rafdb_root}"), ("ferplus", f"ferplus:{ferplus_root}")):
        for name, model, extra in (
            ("Tiny-TAG", f"hf:{tiny_vlm_dir}", ["--max-new-tokens", "12", "--device", "cpu"]),
            ("Server-baseline", f"openai:{eval_server.url}", ["--baseline", "--concurrency", "1", "--lenient"]),
        ):
            preds = tmp_path / f"{name}_{ds}.jsonl"
            r = runner.invoke(app, ["eval", "--model", model, "--dataset", spec, "--out", str(preds), "--name", name, "--no-progress", *extra])
            assert r.exit_code == 0, r.output
            assert "images in the split" in r.output
            score = tmp_path / f"{name}_{ds}.json"
            args = ["score", str(preds), "--out", str(score), "--no-progress", "--n-boot", "200"]
            if ds == "rafdb":
                args += ["--detector", "mediapipe"]
            r = runner.invoke(app, args)
            assert r.exit_code == 0, r.output
            assert "accuracy" in r.output
            scores.append(score)
    base = json.loads((tmp_path / "Server-baseline_rafdb.json").read_text())
    assert base["accuracy"]["value"] == 1.0  # the scripted answers match RAF-DB's 4 test labels in order
    assert base["run"]["gen"]["top_p"] == 0.9 and base["au_iou"]["n_scored"] == 4
    report = tmp_path / "report.md"
    r = runner.invoke(app, ["report", *map(str, scores), "--out", str(report)])
    assert r.exit_code == 0, r.output
    md = report.read_text()
    assert "| Model | RAF-DB | FERPlus | Avg |" in md
    assert "| Server-baseline | **100.00** |" in md
    assert "| Tiny-TAG |" in md and "RAF-DB AU IoU" in md
    r = runner.invoke(app, ["report", str(tmp_path / "nope.json"), "--out", str(report)])
    assert r.exit_code == 2


def test_details_show_both_format_validities_and_the_box_geometry_of_each_au_table(tmp_path):
    """A new score file has format_validity_paper / _strict and the geometries; an old one (only
    format_validity, the strict figure) still reads, in the strict column."""
    new = json.loads(_score(tmp_path, "TAG", "rafdb", 0.9, au=0.5, xau=0.3).read_text())
    new["format_validity_paper"] = {"value": 0.97, "ci": [0.95, 0.99]}
    new["format_validity_strict"] = {"value": 0.81, "ci": [0.78, 0.84]}
    new["run"].update(au_geometry={"mediapipe-regions": 100}, cross_geometry={"openface-landmarks": 96, "mediapipe-regions": 4})
    (tmp_path / "new.json").write_text(json.dumps(new))
    old = _score(tmp_path, "Old", "rafdb", 0.8, fname="old.json")  # format_validity 0.9 only
    t = R.details_table(R.load_scores([tmp_path / "new.json", old]))
    col = {c: j for j, c in enumerate(t.columns)}
    assert t.values[0][col["Format valid (paper)"]] == pytest.approx(97.0) and t.values[0][col["Format valid (strict)"]] == pytest.approx(81.0)
    assert t.text[0][col["AU boxes"]] == "mediapipe-regions"
    assert t.text[0][col["X-IoU boxes"]] == "openface-landmarks 96, mediapipe-regions 4"
    assert t.values[1][col["Format valid (paper)"]] is None and t.values[1][col["Format valid (strict)"]] == pytest.approx(90.0)
    md, _ = R.write_report(R.load_scores([tmp_path / "new.json", old]), tmp_path / "r.md")
    assert "Format valid (paper)" in md and "97.00 [95.0, 99.0]" in md and "openface-landmarks 96" in md
