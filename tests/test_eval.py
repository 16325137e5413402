"""The prediction runner, AU ground truth and scoring (tagfer.evaluation.eval), with the scripted server as the model."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fakeserver import Reply
from fixtures_evaluate import SMILE_BOXES, tag_answer, write_openface_csv
from tiers import examples
from tagfer.evaluation import eval as E
from tagfer.models.backends import make_backend
from tagfer.core.jsonl import read_jsonl
from tagfer.core.labels import LABELS
from tagfer.data.sources import open_source


def _backend(srv, **kw):
    return make_backend(f"openai:{srv.url}", max_retries=kw.pop("max_retries", 1), backoff_base_s=0.01, timeout_s=5, **kw)


def _preds(path):
    return [E.Prediction.from_json(r) for r in read_jsonl(path)]


# ------------------------------------------------------------------ parsing
def test_parse_prediction_strict_and_lenient():
    p = E.parse_prediction(E.Prediction("a", "x", "test", None, "happiness"), tag_answer("Happy."))
    assert p.pred == "happiness" and p.pred_from == "answer" and p.well_formed and p.boxes == [list(b) for b in SMILE_BOXES]
    bare = E.parse_prediction(E.Prediction("a", "x", "test", None, "anger"), "Angry.")
    assert bare.pred is None and not bare.well_formed and "no_answer" in bare.violations
    lenient = E.parse_prediction(E.Prediction("a", "x", "test", None, "anger"), "Angry.", lenient=True)
    assert lenient.pred == "anger" and lenient.pred_from == "lenient" and not lenient.well_formed
    two = E.parse_prediction(E.Prediction("a", "x", "test", None, "anger"), "<think>x</think><answer>anger or fear</answer>", lenient=True)
    assert two.pred is None and "answer_multiple_labels" in two.violations
    cont = E.parse_prediction(E.Prediction("a", "x", "test", None, "anger"), "<think>x</think><answer>contempt</answer>")
    assert cont.pred is None
    none = E.parse_prediction(E.Prediction("a", "x", "test", None, "anger"), None)
    assert none.pred is None and none.boxes == [] and not none.well_formed


@settings(max_examples=examples(200), deadline=None)
@given(st.text(max_size=200))
def test_parse_prediction_never_crashes_and_pred_is_a_label(text):
    p = E.parse_prediction(E.Prediction("a", "x", "test", None, "anger"), text, lenient=True)
    assert p.pred is None or p.pred in LABELS
    assert p.well_formed == (not p.violations)
    json.dumps(p.to_json())


def test_generation_defaults_follow_the_paper():
    assert E.generation_defaults() == {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 512, "seed": 0, "max_boxes": 3}
    b = E.generation_defaults(baseline=True, max_new_tokens=64, temperature=None)
    assert b["top_p"] == 0.9 and b["temperature"] == 1.0 and b["max_new_tokens"] == 64 and b["max_boxes"] is None


def test_size_warning():
    assert E.size_warning("rafdb", "test", 3068) is None
    assert "3068" in E.size_warning("rafdb", "test", 4)
    assert E.size_warning("rafdb", "train", 4) is None and E.size_warning("generic", "test", 4) is None
    assert E.PAPER_TEST_SIZES == {"rafdb": 3068, "ferplus": 3517, "affectnet": 3500}


# ------------------------------------------------------------------ runner against the scripted server
FOUR = ("<think>look " + " ".join(f"r{i} <bbox>[{i}, 0, {i + 50}, 50]</bbox>" for i in range(4))
        + " so the brows are raised.</think><answer>fear</answer>")


class _InProcess:
    """A stand-in for the in-process backend (name "hf": it limits boxes while decoding): it replies
    what BoxLimitProcessor lets a model write that wanted FOUR: the 4th box never opens."""

    name = "hf"

    def __init__(self, text):
        self.text, self.seen = text, []

    def generate(self, requests, config, on_result=None):
        from tagfer.models.backends import GenResult

        for r in requests:
            self.seen.append(config.max_boxes)
            yield GenResult(r.id, self.text, None, {}, {"latency_s": 0.0})


def test_eval_served_model_writing_four_boxes_keeps_its_answer_and_scores_as_in_process(tmp_path, rafdb_root, eval_server):
    """A served reply with a 4th box loses that box element, not its answer: same prediction and scores as
    the in-process path, where the 4th box cannot be written; the record says it was repaired."""
    eval_server.reset(lambda req, i: FOUR)
    with _backend(eval_server) as be:
        E.eval_source(f"rafdb:{rafdb_root}", be, tmp_path / "tag.jsonl", model="fake", limit=2)
        E.eval_source(f"rafdb:{rafdb_root}", be, tmp_path / "base.jsonl", model="fake", limit=1, gen=E.generation_defaults(baseline=True))
    assert all("structured_outputs" not in r and "guided_regex" not in r for r in eval_server.requests)  # not asked for
    tag = _preds(tmp_path / "tag.jsonl")
    assert all(t.pred == "fear" and len(t.boxes) == 3 and t.well_formed and t.box_limit == "repaired" for t in tag)
    assert tag[0].raw_output == FOUR and tag[0].box_limit_info["boxes"] == 4 and tag[0].gen["max_boxes"] == 3
    assert "r3 so the brows" in tag[0].output and "<answer>fear</answer>" in tag[0].output
    (base,) = _preds(tmp_path / "base.jsonl")
    assert len(base.boxes) == 4 and base.box_limit == "none" and base.raw_output is None and base.pred == "fear"

    # the in-process path: the model writes "r3" and goes on without the box
    in_process = FOUR.replace(" <bbox>[3, 0, 53, 50]</bbox>", "")
    be = _InProcess(in_process)
    E.eval_source(f"rafdb:{rafdb_root}", be, tmp_path / "hf.jsonl", model="hf", limit=2)
    hf = _preds(tmp_path / "hf.jsonl")
    assert be.seen == [3, 3] and all(h.box_limit == "decode" for h in hf)  # the limit went to the decoder
    assert [h.output for h in hf] == [t.output for t in tag]
    au = {t.id: [[0, 0, 50, 50], [3, 0, 53, 50]] for t in tag}
    served_scores = E.score_predictions([t.to_json() for t in tag], au, bootstrap=None)
    hf_scores = E.score_predictions([h.to_json() for h in hf], au, bootstrap=None)
    for k in ("accuracy", "format_validity", "au_iou", "boxes_histogram", "confusion"):
        assert served_scores[k] == hf_scores[k], k


def test_eval_asks_a_vllm_server_for_the_box_limit_while_decoding(tmp_path, rafdb_root, eval_server):
    """With gen["box_request"] the request body carries vLLM's structured-output regex; it accepts a
    3-box trace and refuses the 4th box. A server that honours it replies within the limit (mode
    "decode"); one that ignores it gets its reply repaired."""
    import re

    from tagfer.traces.boxtags import box_limit_regex

    three = FOUR.replace(" <bbox>[3, 0, 53, 50]</bbox>", "")
    for api in ("structured_outputs", "guided_regex"):
        eval_server.reset(lambda req, i: three if i == 0 else FOUR)
        gen = E.generation_defaults(box_request=api)
        with _backend(eval_server, concurrency=1) as be:
            E.eval_source(f"rafdb:{rafdb_root}", be, tmp_path / f"{api}.jsonl", model="fake", limit=2, gen=gen)
        bodies = eval_server.requests
        sent = [b["structured_outputs"]["regex"] if api == "structured_outputs" else b["guided_regex"] for b in bodies]
        regex = sent[0]
        assert len(sent) == 2 and set(sent) == {box_limit_regex(3)}
        assert re.fullmatch(regex, three) and re.fullmatch(regex, tag_answer("fear"))
        assert not re.fullmatch(regex, FOUR) and not re.fullmatch(regex, three.replace("r2", "r2 < BBox >[1, 1, 9, 9]</bbox>"))
        honoured, ignored = sorted(_preds(tmp_path / f"{api}.jsonl"), key=lambda p: p.output != three)
        assert honoured.box_limit == "decode" and honoured.raw_output is None and honoured.pred == "fear"
        assert ignored.box_limit == "repaired" and ignored.pred == "fear" and ignored.gen["box_request"] == api
    with pytest.raises(ValueError, match="box_request"):
        E.run_eval([], _backend(eval_server), tmp_path / "x.jsonl", gen=E.generation_defaults(box_request="json"))


def test_eval_rafdb_with_server_resume_and_errors(tmp_path, rafdb_root, eval_server):
    # the "model" answers happiness for everything; the 2nd request gets a non-retryable 400
    eval_server.reset(lambda req, i: Reply(status=400) if i == 1 else tag_answer("happiness"))
    out = tmp_path / "preds.jsonl"
    with _backend(eval_server, concurrency=1) as be:
        s = E.eval_source(f"rafdb:{rafdb_root}", be, out, model="fake", limit=3)
    assert s.processed == 3 and s.failed == 1 and s.errors == {"http_400": 1} and s.metric("dataset_size") == 4
    assert any("3068" in w for w in s.warnings)  # 4 test images, not the paper's 3,068
    preds = _preds(out)
    assert [p.id for p in preds] == ["rafdb/test_0001", "rafdb/test_0002", "rafdb/test_0003"]
    bad = preds[1]
    assert bad.error["kind"] == "http_400" and bad.output is None and bad.pred is None
    ok = preds[0]
    assert ok.label == "happiness" and ok.pred == "happiness" and ok.well_formed and len(ok.boxes) == 3
    assert ok.model == "fake" and ok.gen["temperature"] == 0.0 and ok.image.endswith("test_0001_aligned.jpg")
    # the request carried the unified prompt and the image
    blob = json.dumps(eval_server.requests[0])
    assert "<answer>" in blob and "data:image/" in blob and '"temperature": 0.0' in blob and '"max_tokens": 512' in blob

    # resume: only the 4th image is new; then retry the recorded error
    eval_server.reset(lambda req, i: tag_answer("neutral"))
    with _backend(eval_server) as be:
        s2 = E.eval_source(f"rafdb:{rafdb_root}", be, out, model="fake")
    assert s2.processed == 1 and s2.skipped == 3
    with _backend(eval_server) as be:
        s3 = E.eval_source(f"rafdb:{rafdb_root}", be, out, model="fake", retry_errors=True)
    assert s3.metric("retried_errors") == 1 and s3.processed == 1 and s3.failed == 0
    preds = _preds(out)
    assert sorted(p.id for p in preds) == [f"rafdb/test_000{i}" for i in range(1, 5)]
    assert all(p.error is None for p in preds)

    # a finished re-run never loads its model: this spec could not even be built here (no vLLM)
    s4 = E.eval_source(f"rafdb:{rafdb_root}", "vllm:/models/never-loaded", out)
    assert (s4.processed, s4.skipped, s4.exit_code()) == (0, 4, 0)
    with pytest.raises(Exception, match="vLLM"):  # with something left to do it is loaded (and fails here)
        E.eval_source(f"rafdb:{rafdb_root}", "vllm:/models/never-loaded", tmp_path / "fresh.jsonl", limit=1)


def test_eval_bytes_images_bad_outputs_and_bad_image(tmp_path, ferplus_root, eval_server, bad_inputs):
    outputs = ["I cannot help with identifying people.", tag_answer("anger")[:40], '{"answer": "anger"}']
    eval_server.reset(lambda req, i: outputs[i % 3])
    out = tmp_path / "fer.jsonl"
    with _backend(eval_server, concurrency=1) as be:
        s = E.eval_source(f"ferplus:{ferplus_root}", be, out, model="fake", lenient=True)
    preds = _preds(out)
    assert s.processed == len(preds) == 3 and s.failed == 0
    assert all(p.image is None and p.pred is None and not p.well_formed for p in preds)  # refusal, truncated, JSON
    assert any("unclosed_tag" in p.violations or "no_answer" in p.violations for p in preds)

    recs = [_Rec("g/corrupt", str(bad_inputs["corrupt"])), _Rec("g/missing", str(bad_inputs["not_found"])),
            _Rec("g/x", str(bad_inputs["corrupt"]), label="excluded", excluded=True), _Rec("g/none", None)]
    eval_server.reset(lambda req, i: tag_answer("fear"))
    with _backend(eval_server) as be:
        s = E.run_eval(recs, be, tmp_path / "bad.jsonl")
    assert s.processed == 3 and s.failed == 3 and s.metric("excluded") == 1 and eval_server.calls == 0
    kinds = {p.id: p.error["kind"] for p in _preds(tmp_path / "bad.jsonl")}
    assert kinds == {"g/corrupt": "corrupt", "g/missing": "not_found", "g/none": "no_image"}


def test_eval_tiny_model_through_transformers(tmp_path, rafdb_root, tiny_vlm):
    from tagfer.models.backends import TransformersBackend

    out = tmp_path / "tiny.jsonl"
    be = TransformersBackend(tiny_vlm, batch_size=4)
    s = E.eval_source(f"rafdb:{rafdb_root}", be, out, model="hf:tiny", gen=E.generation_defaults(max_new_tokens=12))
    preds = _preds(out)
    assert s.processed == 4 and len(preds) == 4 and all(p.error is None and isinstance(p.output, str) for p in preds)
    assert all(p.gen["max_new_tokens"] == 12 for p in preds)


# ------------------------------------------------------------------ AU truth and scoring
def test_au_truth_detector_cache_and_scores(tmp_path, rafdb_root, eval_server, landmarker):
    eval_server.reset(lambda req, i: tag_answer("happiness"))
    preds_path = tmp_path / "p.jsonl"
    with _backend(eval_server) as be:
        E.eval_source(f"rafdb:{rafdb_root}", be, preds_path, model="fake")
    from tagfer.au.detectors import DetectorSpec

    cache = tmp_path / "au.jsonl"
    seen = []
    au = E.au_truth(preds_path, DetectorSpec(), cache, on_record=seen.append)
    assert len(au) == 4 and len(seen) == 4 and all(v for v in au.values())  # real faces: active AUs with boxes
    again = E.au_truth(preds_path, DetectorSpec(), cache, on_record=seen.append)
    assert again == au and len(seen) == 4  # cached, nothing recomputed

    images = [p.image for p in _preds(preds_path)]
    csv_path = write_openface_csv(tmp_path / "of.csv", images, {12: 4.0, 6: 3.0, 4: 0.2})
    cross = E.au_truth(preds_path, DetectorSpec(kind=f"openface:{csv_path}"), tmp_path / "x.jsonl")
    assert all(v for v in cross.values()) and cross != au
    assert E.au_geometries(cache) == {"mediapipe-regions": 4}  # recorded per image; OpenFace's own geometry once its table says so
    geo = E.au_geometries(tmp_path / "x.jsonl")
    assert sum(geo.values()) == 4  # whichever geometry the OpenFace table used, every image says it

    out = tmp_path / "scores.json"
    s = E.score_file(preds_path, out, au=au, cross_au=cross, au_source="mediapipe", cross_source="openface", png=tmp_path / "cm.png")
    from tagfer.traces.rewards import r_au

    expected = [r_au([list(b) for b in SMILE_BOXES], au[p.id]) for p in _preds(preds_path)]
    assert s["au_iou"]["value"] == pytest.approx(sum(expected) / 4) and s["au_iou"]["n_scored"] == 4
    assert s["cross_au_iou"]["value"] is not None and s["cross_au_iou"]["n_scored"] == 4
    assert s["accuracy"]["value"] == pytest.approx(0.25)  # only test_0001 is happiness
    assert s["run"]["dataset"] == "rafdb" and s["run"]["model"] == "fake" and s["run"]["cross_detector"] == "openface"
    assert json.loads(out.read_text())["n"] == 4 and (tmp_path / "cm.png").stat().st_size > 1000


def test_score_joins_au_jsonl_by_path_and_skips_missing(tmp_path):
    preds = [
        {"id": "a", "source": "rafdb", "split": "test", "image": "/x/a.jpg", "label": "anger", "pred": "anger", "boxes": [[0, 0, 100, 100]], "well_formed": True},
        {"id": "b", "source": "rafdb", "split": "test", "image": "/x/b.jpg", "label": "fear", "pred": None, "boxes": [], "well_formed": False, "error": {"kind": "timeout", "message": ""}},
        {"id": "c", "source": "rafdb", "split": "test", "image": "/x/c.jpg", "label": "fear", "pred": "fear", "boxes": [[0, 0, 50, 50]], "well_formed": True},
        {"id": "c", "source": "rafdb", "split": "test", "image": "/x/c.jpg", "label": "fear", "pred": "anger", "boxes": [[0, 0, 50, 50]], "well_formed": True},
    ]
    au_file = tmp_path / "au.jsonl"
    lines = [
        {"image": "/other/dir/a.jpg", "faces": [{"au_boxes": [[0, 0, 100, 100]]}], "error": None},  # joined by file name
        {"image": "/x/b.jpg", "faces": [{"au_boxes": [[0, 0, 10, 10]]}], "error": None},
        {"image": "/x/c.jpg", "faces": [], "error": {"kind": "no_face", "message": ""}},  # skipped
    ]
    au_file.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    s = E.score_predictions(preds, au=E.load_au_jsonl(au_file))
    assert s["n"] == 3  # the duplicate "c" keeps its last record
    assert s["accuracy"]["value"] == pytest.approx(1 / 3)
    assert s["au_iou"]["value"] == pytest.approx(0.5) and s["au_iou"]["n_scored"] == 2 and s["au_iou"]["n_skipped"] == 1
    assert s["errors"] == {"timeout": 1}


def test_facs_baseline_backend(tmp_path, rafdb_root, bad_inputs):
    from tagfer.evaluation.eval import FACSBackend

    out = tmp_path / "facs.jsonl"
    with FACSBackend() as be:
        s = E.eval_source(f"rafdb:{rafdb_root}", be, out, model="facs")
        bad = E.run_eval([_Rec("g/noface", str(bad_inputs["no_face"]))], be, tmp_path / "bad.jsonl")
    preds = _preds(out)
    assert s.processed == 4 and s.failed == 0
    assert all(p.well_formed and p.pred in LABELS and 1 <= len(p.boxes) <= 3 for p in preds)  # the engine writes valid TAG traces
    assert bad.failed == 1 and _preds(tmp_path / "bad.jsonl")[0].error["kind"] == "no_face"


def test_run_eval_takes_a_model_spec(tmp_path, rafdb_root, eval_server):
    """A spec string goes through the one registry (tagfer.models.backends.make_backend) and names the model."""
    eval_server.reset(lambda req, i: tag_answer("happiness"))
    spec = f"openai:{eval_server.url}"
    s = E.eval_source(f"rafdb:{rafdb_root}", spec, tmp_path / "p.jsonl", limit=2)
    preds = _preds(tmp_path / "p.jsonl")
    assert s.processed == 2 and [p.model for p in preds] == [spec, spec] and all(p.pred == "happiness" for p in preds)
    with pytest.raises(Exception, match="unknown model kind"):
        E.eval_source(f"rafdb:{rafdb_root}", "gpt9:x", tmp_path / "q.jsonl")


@dataclass
class _Rec:
    id: str
    image_path: str
    label: str = "fear"
    source: str = "generic"
    split: str = "test"
    excluded: bool = False


@pytest.mark.model
def test_eval_cli_bad_arguments(tmp_path, rafdb_root, eval_server):
    from typer.testing import CliRunner

    from tagfer.cli import app

    runner = CliRunner()
    out = str(tmp_path / "p.jsonl")
    r = runner.invoke(app, ["eval", "--model", "facs", "--dataset", "rafdb:/nonexistent", "--out", out])
    assert r.exit_code == 2 and "does not exist" in r.output
    r = runner.invoke(app, ["eval", "--model", str(tmp_path / "no_model"), "--dataset", f"rafdb:{rafdb_root}", "--out", out])
    assert r.exit_code == 2 and "cannot build backend" in r.output
    r = runner.invoke(app, ["eval", "--model", "facs", "--dataset", f"rafdb:{rafdb_root}", "--split", "nope", "--out", out])
    assert r.exit_code == 2
    eval_server.reset(lambda req, i: Reply(status=500))
    r = runner.invoke(app, ["eval", "--model", f"openai:{eval_server.url}", "--dataset", f"rafdb:{rafdb_root}", "--out", out,
                            "--request-retries", "0", "--no-progress", "--image-format", "jpeg"])
    assert r.exit_code == 1 and "4 image(s) processed (4 failed)" in r.output and "http_500 (4): " in r.output
    assert "image/jpeg" in json.dumps(eval_server.requests[0])
    r = runner.invoke(app, ["score", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "s.json")])
    assert r.exit_code == 2


def test_au_truth_for_images_stored_as_bytes(tmp_path, ferplus_root, eval_server, landmarker):
    from tagfer.au.detectors import DetectorSpec

    eval_server.reset(lambda req, i: tag_answer("happiness"))
    preds_path = tmp_path / "fer.jsonl"
    with _backend(eval_server) as be:
        E.eval_source(f"ferplus:{ferplus_root}", be, preds_path, model="fake")
    ids = [p.id for p in _preds(preds_path)]
    # without the dataset the bytes cannot be found: recorded, skipped in AU IoU
    no_ds = E.au_truth(preds_path, DetectorSpec(), tmp_path / "a.jsonl")
    assert set(no_ds) == set(ids) and all(v is None for v in no_ds.values())
    assert {r["error"]["kind"] for r in read_jsonl(tmp_path / "a.jsonl")} == {"no_image"}
    cache = tmp_path / "b.jsonl"
    E.au_truth(preds_path, DetectorSpec(), cache, dataset=f"ferplus:{ferplus_root}")
    recs = list(read_jsonl(cache))
    assert len(recs) == len(ids) and all(r["error"] is None or r["error"]["kind"] == "no_face" for r in recs)
    assert any(r["error"] is None for r in recs)  # the 48x48 CSV faces were decoded and grounded
    s = E.score_file(preds_path, au=E.load_au_jsonl(cache))
    assert s["au_iou"]["n_scored"] + s["au_iou"]["n_skipped"] == len(ids)


def test_prebuilt_messages_equal_the_backends_own(tmp_path, rafdb_root, eval_server):
    recs = list(open_source(f"rafdb:{rafdb_root}", split="test"))
    bodies = []
    for workers in (0, 2):
        eval_server.reset(lambda req, i: tag_answer("happiness"))
        with _backend(eval_server, concurrency=1) as be:
            s = E.run_eval(recs, be, tmp_path / f"w{workers}.jsonl", encode_workers=workers)
        assert s.processed == 4 and s.failed == 0
        bodies.append(sorted(json.dumps(q["messages"], sort_keys=True) for q in eval_server.requests))
    assert bodies[0] == bodies[1]  # the same requests (arrival order may differ with parallel encoding)


# ------------------------------------------------------------------ one canvas: a mismatch is an error, never a rescale
def test_au_boxes_on_another_canvas_are_refused(tmp_path):
    preds = [{"id": "a", "source": "rafdb", "split": "test", "image": "/x/a.jpg", "label": "anger", "pred": "anger",
              "boxes": [[0, 0, 100, 100]], "well_formed": True}]
    au_file = tmp_path / "au256.jsonl"
    au_file.write_text(json.dumps({"image": "/x/a.jpg", "canvas": 256, "faces": [{"au_boxes": [[0, 0, 50, 50]]}], "error": None}) + "\n")
    with pytest.raises(E.CanvasMismatch, match=r"256×256 canvas .* 512×512.*--canvas 512"):
        E.load_au_jsonl(au_file)
    # read on its own canvas, the same file is accepted and scored there
    s = E.score_predictions(preds, au=E.load_au_jsonl(au_file, canvas=256), canvas=256)
    assert s["au_iou"]["value"] == pytest.approx(0.25)
    # an error record carries no boxes and no canvas check; a record without canvas is on the default one
    au_file.write_text(json.dumps({"image": "/x/a.jpg", "faces": [{"au_boxes": [[0, 0, 100, 100]]}], "error": None}) + "\n")
    assert E.load_au_jsonl(au_file)["a.jpg"] == [[0, 0, 100, 100]]


def test_au_truth_refuses_a_detector_or_cache_on_another_canvas(tmp_path):
    from tagfer.au.aus import AUConfig
    from tagfer.au.detectors import DetectorSpec

    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps({"id": "a", "image": str(tmp_path / "a.jpg"), "label": "anger"}) + "\n")
    with pytest.raises(E.CanvasMismatch, match="256"):  # checked before any image is read or model opened
        E.au_truth(preds, DetectorSpec(config=AUConfig(canvas=256)), tmp_path / "c.jsonl")
    cache = tmp_path / "cache.jsonl"
    cache.write_text(json.dumps({"id": "a", "image": None, "detector": "mediapipe", "au_boxes": [[1, 1, 9, 9]], "error": None, "canvas": 300}) + "\n")
    with pytest.raises(E.CanvasMismatch, match="300"):
        E.au_truth(preds, DetectorSpec(), cache)


def test_score_cli_rejects_tagfer_au_output_on_another_canvas(tmp_path, face_crop_path):
    """`tagfer au --canvas 256` output is not scored as if it were on the 512 canvas (issue 11 item 6)."""
    from typer.testing import CliRunner

    from tagfer.cli import app

    runner = CliRunner()
    preds = tmp_path / "preds.jsonl"
    preds.write_text(json.dumps({"id": "x/1", "source": "rafdb", "split": "test", "image": str(face_crop_path), "label": "happiness",
                                 "pred": "happiness", "boxes": [list(b) for b in SMILE_BOXES], "well_formed": True}) + "\n")
    for side in (256, 512):
        au = tmp_path / f"au{side}.jsonl"
        r = runner.invoke(app, ["au", str(face_crop_path), "--out", str(au), "--canvas", str(side), "--no-progress"])
        assert r.exit_code == 0, r.output
        r = runner.invoke(app, ["score", str(preds), "--au", str(au), "--out", str(tmp_path / f"s{side}.json"), "--n-boot", "0"])
        if side == 256:
            assert r.exit_code == 2 and "canvas" in r.output and "--canvas 512" in " ".join(r.output.split()), r.output
            assert not (tmp_path / "s256.json").exists()
        else:
            assert r.exit_code == 0, r.output
            assert json.loads((tmp_path / "s512.json").read_text())["au_iou"]["n_scored"] == 1


def test_eval_records_replies_with_look_alike_tags(tmp_path, rafdb_root, eval_server):
    # issue 14: a served model answering with "<thınk>"/"<anſwer>" crashed eval with 0 records written
    replies = ["<th\u0131nk>x</th\u0131nk><answer>happiness</answer>", "<think>x</think><an\u017fwer>happiness</an\u017fwer>",
               "<think>\u200b<bbox>[1, 2, 30, 40]</bbox></think><answer>happiness</answer>"]
    eval_server.reset(lambda req, i: replies[i % 3])
    out = tmp_path / "lookalike.jsonl"
    with _backend(eval_server, concurrency=1) as be:
        s = E.eval_source(f"rafdb:{rafdb_root}", be, out, model="fake", limit=3)
    preds = _preds(out)
    assert s.processed == 3 and s.failed == 0 and len(preds) == 3
    assert all(p.error is None and not p.well_formed for p in preds)
    # which image got which reply depends on arrival order (images are encoded in parallel): check the set
    assert sorted(p.pred or "" for p in preds) == ["", "happiness", "happiness"]
    assert sum("text_outside" in p.violations for p in preds) >= 1
    assert any(p.pred is None and "no_answer" in p.violations for p in preds)
    assert any(p.violations == ["think_empty"] for p in preds)


def test_score_cli_prints_both_validities_and_the_cross_detector_geometry(tmp_path):
    """`tagfer score` reports the paper's R_fmt validity beside the strict one, and which geometry the
    cross-detector boxes had (an AU table that names none is MediaPipe's regions)."""
    from typer.testing import CliRunner

    from tagfer.cli import app

    good = tag_answer("happiness")
    preds = tmp_path / "p.jsonl"
    with open(preds, "w") as f:
        for i, text in enumerate([good, "Note: " + good]):
            p = E.parse_prediction(E.Prediction(f"r/{i}", "rafdb", "test", f"/x/{i}.jpg", "happiness", model="m"), text)
            f.write(json.dumps(p.to_json()) + "\n")
    au = tmp_path / "au.jsonl"
    au.write_text("".join(json.dumps({"image": f"/x/{i}.jpg", "faces": [{"au_boxes": [list(SMILE_BOXES[0])]}], "error": None}) + "\n" for i in range(2)))
    cross = tmp_path / "of.jsonl"
    cross.write_text("".join(json.dumps({"image": f"/x/{i}.jpg", "geometry": "openface-landmarks",
                                         "faces": [{"au_boxes": [list(SMILE_BOXES[1])]}], "error": None}) + "\n" for i in range(2)))
    r = CliRunner().invoke(app, ["score", str(preds), "--au", str(au), "--cross-au", str(cross), "--n-boot", "50", "--out", str(tmp_path / "s.json")])
    assert r.exit_code == 0, r.output
    assert "paper's R_fmt rules" in r.output and "strict grammar" in r.output and "openface-landmarks" in r.output
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["format_validity_paper"]["value"] == 1.0 and s["format_validity_strict"]["value"] == 0.5
    assert s["run"]["cross_geometry"] == {"openface-landmarks": 2} and s["cross_au_iou"]["geometry"] == {"openface-landmarks": 2}
    assert s["run"]["au_geometry"] == {"mediapipe-regions": 2}
