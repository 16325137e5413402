"""tagfer.explainer.analyze and `tagfer analyze`: per-face analyses, frames, overlays, errors, JSON, --model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from tagfer.explainer.analyze import (
    BOX_COLORS,
    EXIT_FAILED,
    EXIT_MALFORMED,
    EXIT_USAGE,
    Analysis,
    Analyzer,
    face_region,
    reframe,
)
from tagfer.cli import app
from fixtures_openface import astronaut_68  # noqa: F401 (fixture)
from tiers import examples
from tagfer.core.canvas import CanvasTransform
from tagfer.core.errors import ItemError
from tagfer.core.imageio import load_image
from tagfer.core.jsonl import read_jsonl
from tagfer.models.backends import FACSBackend, GenResult, TransformersBackend
from tagfer.traces.trace import parse_trace

runner = CliRunner()

ANALYSIS_KEYS = {
    "image", "face", "n_faces", "face_bbox", "frame", "frame_box", "canvas", "engine", "detector", "label",
    "scores", "trace", "well_formed", "violations", "boxes", "box_aus", "box_colors", "segments",
    "evidence_aus", "aus", "au_boxes", "r_fmt", "r_au",
}
RESULT_KEYS = {"image", "width", "height", "n_faces", "analyses", "overlays", "error"}
GROUNDED_KEYS = {"global", "local", "agreement", "decision"}  # the default facs engine's views (issue 19)


def assert_grounded(a: Analysis) -> None:
    """A facs analysis: well-formed, each box exactly the (active) detector box of the AU named before it."""
    assert a.well_formed and a.violations == [] and a.r_fmt > 0
    assert len(a.boxes) <= 3 and a.box_aus == a.evidence_aus
    by_au = {d["au"]: d for d in a.aus}
    for b, au in zip(a.boxes, a.box_aus):
        assert by_au[au]["active"] and b == by_au[au]["box"]
    assert a.label == max(a.scores, key=a.scores.get)
    assert "".join(s["text"] for s in a.segments) == a.trace
    assert [s["box"] for s in a.segments if s["box"] is not None] == list(range(len(a.boxes)))


def test_astronaut(astronaut_analysis):
    a = astronaut_analysis
    assert_grounded(a)
    assert a.label == "happiness" and a.engine == "facs" and a.frame == "face"
    assert a.box_aus[0] == 12 and a.r_au == pytest.approx(1.0)
    assert a.box_colors == list(BOX_COLORS[: len(a.boxes)])
    # The face frame's AU12 box is the mouth: the lower half of the face canvas.
    x1, y1, x2, y2 = a.boxes[0]
    assert y1 > 512 * 0.35 and x2 - x1 > 512 * 0.4


def test_grace(grace_analysis):
    """Changed by issue 13: her AU12 is at rest level after pose normalisation, so by FACS
    (happiness needs AU12) the engine reads neutral; the active cheek raise is still cited."""
    assert_grounded(grace_analysis)
    assert grace_analysis.label == "neutral" and 6 in grace_analysis.box_aus


def test_face_frame_boxes_are_the_image_frame_boxes_moved(mp_detector, astronaut_path):
    """Reframing keeps scores and activations; boxes land on the same image pixels (to rounding)."""
    img = load_image(astronaut_path)
    (f,) = mp_detector.detect(img)
    region = face_region(f.mesh.bbox, img.width, img.height, 0.15)
    g = reframe(f, region, mp_detector.config)
    assert [(d.au, d.score, d.active) for d in g.aus] == [(d.au, d.score, d.active) for d in f.aus]
    full = CanvasTransform(img.width, img.height)
    crop = CanvasTransform(region[2] - region[0], region[3] - region[1])
    for d_img, d_face in zip(f.aus, g.aus):
        px_a = np.array(full.box_to_image(d_img.box))
        px_b = np.array(crop.box_to_image(d_face.box)) + np.array(region[:2] * 2)
        assert np.abs(px_a - px_b).max() < 2.0, d_img.au


def test_image_frame_uses_the_detector_boxes_unchanged(mp_detector, astronaut_path):
    an = Analyzer(detector=mp_detector, frame="image")
    (a,) = an.analyze_image(astronaut_path)
    assert_grounded(a)
    (f,) = mp_detector.detect(load_image(astronaut_path))
    det_boxes = {d.au: list(d.box) for d in f.aus}
    assert a.boxes and all(b == det_boxes[au] for b, au in zip(a.boxes, a.box_aus))
    assert a.frame_box == [0.0, 0.0, 512.0, 512.0]


def test_two_faces_left_to_right(facs_analyzer, two_faces_path):
    res = facs_analyzer.run(two_faces_path)
    assert res.ok and len(res.analyses) == 2
    left, right = res.analyses
    assert (left.face, right.face) == (0, 1) and left.n_faces == right.n_faces == 2
    cx = [(a.face_bbox[0] + a.face_bbox[2]) / 2 for a in res.analyses]
    assert cx[0] < cx[1]
    assert right.face_bbox[0] >= 230  # Grace Hopper was pasted at x = 230
    for a in res.analyses:
        assert_grounded(a)
    overlays = res.render_overlays()
    assert len(overlays) == 2


def test_no_face_and_bad_images(facs_analyzer, bad_inputs):
    with pytest.raises(ItemError) as e:
        facs_analyzer.analyze_image(bad_inputs["no_face"])
    assert e.value.kind == "no_face" and "no face" in e.value.message
    for kind in ("no_face", "corrupt", "not_an_image", "empty_file", "too_small", "not_found"):
        res = facs_analyzer.run(bad_inputs[kind])
        assert res.error["kind"] == kind and res.analyses == [] and res.to_json()["n_faces"] == 0


def test_bytes_input_and_overlay_colours(facs_analyzer, astronaut_path):
    res = facs_analyzer.run(astronaut_path.read_bytes(), name="upload.png")
    assert res.ok and res.image == "upload.png"
    (im,) = res.render_overlays()
    px = np.asarray(im).reshape(-1, 3)
    colours = {tuple(int(h[i : i + 2], 16) for i in (1, 3, 5)) for h in res.analyses[0].box_colors}
    colours.add((0, 200, 70))  # detector green
    for c in colours:
        assert (px == np.array(c)).all(axis=1).sum() > 50, c  # every box colour is drawn


class GarbageVLM:
    """Stands in for tagfer.models.vlm.VLM: returns a fixed malformed completion per image."""

    config = None

    def __init__(self, text):
        self.text = text
        self.calls = []

    def generate(self, images, users, system=None, **kw):
        self.calls.append((images, users, system, kw))
        return [self.text for _ in images]


def test_model_output_is_reported_not_fixed(mp_detector, astronaut_path):
    text = "Sure! <think>mouth <bbox>[300, 10, 20, 40]</bbox></think><answer>happy</answer> done"
    vlm = GarbageVLM(text)
    an = Analyzer(detector=mp_detector, engine=vlm, name="garbage")  # a loaded VLM runs through the hf backend
    (a,) = an.analyze_image(astronaut_path)
    assert a.trace == text and not a.well_formed and a.engine == "garbage"
    assert vlm.calls[0][3]["max_boxes"] == 3  # at most three boxes, enforced while decoding
    assert a.r_fmt == 0.5  # the paper's R_fmt conditions hold (one think, ≤ 3 boxes inside, one valid answer)
    assert a.violations == list(parse_trace(text).violations)
    assert "text_outside" in a.violations and "bbox_degenerate" in a.violations
    assert a.label == "happiness" and a.scores is None and a.box_aus == [None]
    images, users, system, kw = vlm.calls[0]
    assert isinstance(images[0], Image.Image) and kw["temperature"] == 0.0
    assert "512" in system and users[0]
    (im,) = an.run(astronaut_path).render_overlays()  # a degenerate box is listed, not drawn
    assert im.size[0] >= 512


def test_engine_selection(mp_detector):
    assert isinstance(Analyzer(detector=mp_detector).backend, FACSBackend)
    an = Analyzer(detector=mp_detector, engine=GarbageVLM("x"))
    assert isinstance(an.backend, TransformersBackend) and an.name == "hf"  # GarbageVLM has no config: the kind's name
    with pytest.raises(ValueError):
        Analyzer(detector=mp_detector, frame="nope")
    with pytest.raises(TypeError, match="model spec, a Backend or a VLM"):
        Analyzer(detector=mp_detector, engine=42)


class _SpyFACS(FACSBackend):
    """The facs backend, recording the requests it gets; its own detector must never run."""

    def __init__(self):
        super().__init__()
        self.requests = []

    @property
    def detector(self):
        raise AssertionError("the analyzer's grounded face must be used, not a second detection")

    def generate(self, requests, config=None, on_result=None):
        requests = list(requests)
        self.requests.extend(requests)
        return super().generate(requests, config, on_result)


def test_facs_backend_writes_from_the_analyzers_grounded_face(mp_detector, astronaut_path, astronaut_analysis):
    """One model interface: the analyzer hands the facs backend each reframed face with the crop its
    canvas covers (the FER net looks at it; no prompt) and records the engine's scores, cited AUs and
    views from the result's info."""
    from tagfer.au.aus import FaceAUs
    from tagfer.au.facs import explain

    spy = _SpyFACS()
    (a,) = Analyzer(detector=mp_detector, engine=spy).analyze_image(astronaut_path)
    (req,) = spy.requests
    assert req.user == "" and req.system is None and isinstance(req.face, FaceAUs)
    assert req.image is not None and abs(req.image.size[0] - req.image.size[1]) <= 2  # the (square) face-frame crop
    assert [(d.au, d.box) for d in req.face.aus] == [(d["au"], tuple(d["box"])) for d in a.aus]  # the face-frame AUs
    ex = spy.explain(req.face, req.image)
    assert a.trace == ex.trace and a.scores == ex.scores and a.evidence_aus == list(ex.evidence_aus)
    assert a.to_json() == astronaut_analysis.to_json()  # the same analysis as the spec "facs"
    assert a.engine == "facs"  # a backend object is named by its kind

# --------------------------------------------------------------------------- CLI
def _json_lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def test_cli_json_schema_and_overlay(tmp_path, astronaut_path, grace_path):
    r = runner.invoke(app, ["analyze", str(astronaut_path), str(grace_path), "--json", "--overlays", str(tmp_path / "ov")])
    assert r.exit_code == 0, r.output
    recs = _json_lines(r.stdout)
    assert len(recs) == 2
    for rec in recs:
        assert set(rec) == RESULT_KEYS and rec["error"] is None and rec["n_faces"] == 1
        (a,) = rec["analyses"]
        assert set(a) == ANALYSIS_KEYS | GROUNDED_KEYS
        assert a["global"]["net"] == "fer" and a["agreement"] in ("agree", "disagree")
        # Grace Hopper's lip corners sit at rest height once pose is normalised: neutral (docs/au.md).
        assert a["label"] == ("happiness" if "astronaut" in rec["image"] else "neutral")
        assert a["well_formed"] and a["engine"] == "facs"
        assert set(a["scores"]) == {"anger", "disgust", "fear", "happiness", "neutral", "sadness", "surprise"}
        assert all(set(d) >= {"au", "name", "score", "active", "box"} for d in a["aus"])
        (ov,) = rec["overlays"]
        assert Image.open(ov).size[0] >= 512


def test_cli_walks_folders_and_rejects_empty_ones(tmp_path, astronaut_path, grace_path):
    import shutil

    d = tmp_path / "faces" / "sub"
    d.mkdir(parents=True)
    shutil.copy(astronaut_path, d / "a.png")
    shutil.copy(grace_path, tmp_path / "faces" / "g.jpg")
    (tmp_path / "faces" / "notes.txt").write_text("not an image, skipped inside folders")
    r = runner.invoke(app, ["analyze", str(tmp_path / "faces"), "--json"])
    assert r.exit_code == 0, r.output
    recs = _json_lines(r.stdout)
    assert sorted(Path(rec["image"]).name for rec in recs) == ["a.png", "g.jpg"]
    (tmp_path / "empty").mkdir()
    r = runner.invoke(app, ["analyze", str(tmp_path / "empty")])
    assert r.exit_code == 2 and "no image found" in r.output


def test_cli_out_file_streams_and_resumes(tmp_path, astronaut_path, grace_path, bad_inputs):
    import shutil

    d = tmp_path / "faces"
    d.mkdir()
    shutil.copy(astronaut_path, d / "a.png")
    shutil.copy(bad_inputs["corrupt"], d / "b.jpg")
    out = tmp_path / "analyses.jsonl"
    r = runner.invoke(app, ["analyze", str(d), "--out", str(out), "--no-progress"])
    assert r.exit_code == 1 and r.stdout == ""  # one image failed; nothing printed per image
    first = _json_lines(out.read_text())
    assert [Path(x["image"]).name for x in first] == ["a.png", "b.jpg"] and first[1]["error"]["kind"] == "corrupt"
    shutil.copy(grace_path, d / "c.jpg")
    r = runner.invoke(app, ["analyze", str(d), "--out", str(out), "--no-progress"])
    recs = _json_lines(out.read_text())
    assert [Path(x["image"]).name for x in recs] == ["a.png", "b.jpg", "c.jpg"]  # only the new image was analysed
    assert recs[:2] == first and "2 already done" in r.output
    shutil.copy(astronaut_path, d / "b.jpg")  # the corrupt file is repaired: --retry-errors redoes it
    r = runner.invoke(app, ["analyze", str(d), "--out", str(out), "--no-progress", "--retry-errors"])
    assert r.exit_code == 0, r.output
    recs = _json_lines(out.read_text())
    assert sorted(Path(x["image"]).name for x in recs) == ["a.png", "b.jpg", "c.jpg"] and not any(x["error"] for x in recs)
    r = runner.invoke(app, ["analyze", str(d), "--out", str(out), "--no-progress", "--no-resume", "--workers", "2"])
    parallel = _json_lines(out.read_text())
    assert [Path(x["image"]).name for x in parallel] == ["a.png", "b.jpg", "c.jpg"]  # input order kept
    strip = lambda x: {k: v for k, v in x.items() if k != "overlays"}  # noqa: E731
    assert [strip(x) for x in parallel] == [strip(x) for x in sorted(recs, key=lambda x: x["image"])]


def test_cli_pretty_and_single_overlay(tmp_path, astronaut_path):
    out = tmp_path / "face.png"
    r = runner.invoke(app, ["analyze", str(astronaut_path), "--scores", "--overlays", str(out)])
    assert r.exit_code == 0, r.output
    assert "happiness" in r.stdout and "AU12" in r.stdout and "class scores" in r.stdout and "<bbox>" in r.stdout
    assert out.is_file()


@pytest.mark.model
def test_cli_no_face_and_usage_errors(tmp_path, astronaut_path, bad_inputs):
    r = runner.invoke(app, ["analyze", str(bad_inputs["no_face"]), str(astronaut_path), "--json"])
    assert r.exit_code == EXIT_FAILED
    no_face, ok = _json_lines(r.stdout)
    assert no_face["error"]["kind"] == "no_face" and no_face["analyses"] == [] and ok["error"] is None
    r = runner.invoke(app, ["analyze", str(bad_inputs["no_face"])])
    assert r.exit_code == EXIT_FAILED and "no face" in r.output
    r = runner.invoke(app, ["analyze", str(astronaut_path), str(astronaut_path), "--overlays", str(tmp_path / "x.png")])
    assert r.exit_code == EXIT_USAGE
    r = runner.invoke(app, ["analyze", str(astronaut_path), "--model", str(tmp_path / "no_such_model")])
    assert r.exit_code == EXIT_USAGE and "error" in r.output


def test_cli_tiny_random_vlm_is_malformed(tiny_vlm_dir, astronaut_path):
    r = runner.invoke(app, ["analyze", str(astronaut_path), "--model", str(tiny_vlm_dir), "--json", "--max-new-tokens", "24", "--device", "cpu"])
    assert r.exit_code == EXIT_MALFORMED, r.output
    (rec,) = _json_lines(r.stdout)
    (a,) = rec["analyses"]
    assert a["engine"] == str(tiny_vlm_dir) and a["scores"] is None
    assert not a["well_formed"] and a["violations"] and a["r_fmt"] == 0
    assert a["violations"] == list(parse_trace(a["trace"]).violations)


def test_tiny_vlm_output_is_the_raw_generation(tiny_vlm, mp_detector, astronaut_path):
    an = Analyzer(detector=mp_detector, engine=tiny_vlm, max_new_tokens=16)
    (a,) = an.analyze_image(astronaut_path)
    res = an.run(astronaut_path)
    assert res.analyses[0].trace == a.trace  # greedy: deterministic
    system, user = an.system, an.user
    img = load_image(astronaut_path)
    region = a.frame_box
    pic = Image.fromarray(img.rgb[int(np.floor(region[1])) : int(np.ceil(region[3])), int(np.floor(region[0])) : int(np.ceil(region[2]))])
    (direct,) = tiny_vlm.generate([pic], [user], system=system, max_new_tokens=16, temperature=0.0)
    assert a.trace == direct  # reported exactly as generated


# --------------------------------------------------------------------------- backends (OpenAI-compatible server)
def test_openai_backend_engine_parses_the_reply(fake_openai, mp_detector, astronaut_path, facs_analyzer):
    """A served model's answer goes through the one parser; its boxes are scored against the detector's."""
    from tagfer.explainer.analyze import load_engine

    ref = facs_analyzer.analyze_image(astronaut_path)[0]
    b = ref.boxes[0]
    reply = (f"<think>The face is bright. The mouth corners rise, AU12 <bbox>[{b[0]}, {b[1]}, {b[2]}, {b[3]}]</bbox>."
             "</think>\n<answer>Happy</answer>")
    seen = []

    def script(req, i):
        seen.append(req)
        return reply

    srv = fake_openai(script)
    eng = load_engine(f"openai:{srv.url}")
    an = Analyzer(detector=mp_detector, engine=eng, max_new_tokens=64)
    (a,) = an.analyze_image(astronaut_path)
    eng.close()
    assert a.engine == f"openai:{srv.url}" and a.trace == reply
    assert a.well_formed and a.label == "happiness" and a.box_aus == [12] and a.r_au == pytest.approx(1.0)
    msgs = seen[0]["messages"]
    assert msgs[0]["role"] == "system" and seen[0]["temperature"] == 0.0 and seen[0]["max_tokens"] == 64
    assert any(part.get("type") == "image_url" for part in msgs[-1]["content"])
    # CLI: same engine via --model, exit 0; then a malformed answer → exit 3
    r = runner.invoke(app, ["analyze", str(astronaut_path), "--json", "--model", f"openai:{srv.url}"])
    assert r.exit_code == 0, r.output
    srv.reset(lambda req, i: "happy, I think")
    r = runner.invoke(app, ["analyze", str(astronaut_path), "--json", "--model", f"openai:{srv.url}"])
    assert r.exit_code == EXIT_MALFORMED
    (a,) = _json_lines(r.stdout)[0]["analyses"]
    assert a["trace"] == "happy, I think" and {"no_think", "no_answer"} <= set(a["violations"])


def test_backend_failure_fails_the_image(fake_openai, mp_detector, astronaut_path):
    from fakeserver import Reply

    from tagfer.explainer.analyze import load_engine

    srv = fake_openai(lambda req, i: Reply(status=400))
    an = Analyzer(detector=mp_detector, engine=f"openai:{srv.url}", own_detector=False)  # a spec: the analyzer closes its backend
    res = an.run(astronaut_path)
    assert not res.ok and res.error["kind"].startswith("generation_") and res.analyses == []
    an.close()
    assert an.backend._runner is None  # the backend's loop thread is gone


def test_downscaled_decode_keeps_original_pixel_frame(mp_detector, astronaut_path, astronaut_analysis):
    """Images decoded below full size (max_side) are analysed in original-pixel coordinates."""
    an = Analyzer(detector=mp_detector, max_side=256)
    res = an.run(astronaut_path)
    (a,) = res.analyses
    assert res.loaded.scale == 0.5 and (res.width, res.height) == (512, 512)
    assert a.label == "happiness" and a.box_aus[0] == 12
    assert np.abs(np.array(a.frame_box) - np.array(astronaut_analysis.frame_box)).max() < 8
    (im,) = res.render_overlays()
    assert im.size[0] >= 512


model_text = st.lists(
    st.one_of(
        st.text(alphabet=st.characters(codec="utf-8", exclude_characters="<"), max_size=30),
        st.sampled_from(["<think>", "</think>", "<answer>", "</answer>", "AU12 ", "AU 4 ", "happy", "<bbox>", "</bbox>"]),
        st.tuples(*[st.integers(-50, 600)] * 4).map(lambda b: f"<bbox>[{b[0]}, {b[1]}, {b[2]}, {b[3]}]</bbox>"),
    ),
    max_size=12,
).map("".join)


@pytest.mark.slow
@settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=model_text)
def test_any_model_output_is_reported_and_drawn(text, astronaut_analysis, facs_analyzer, astronaut_path):
    """Whatever a model writes: segments rebuild it, each box gets a colour and a caption, the overlay draws."""
    import dataclasses

    from tagfer.explainer.overlay import box_color, render_overlay
    from tagfer.explainer.records import box_aus, segments

    p = parse_trace(text)
    segs = segments(p)
    assert "".join(s["text"] for s in segs) == text
    assert [s["box"] for s in segs if s["box"] is not None] == list(range(len(p.boxes)))
    aus = box_aus(p)
    assert len(aus) == len(p.boxes)
    a = dataclasses.replace(
        astronaut_analysis, trace=text, boxes=[list(c) if c else None for c in p.box_coords], box_aus=aus,
        box_colors=[box_color(i) for i in range(len(p.boxes))], segments=segs,
    )
    assert len(a.au_labels) == len(p.boxes)
    render_overlay(_ASTRO_IMG.setdefault("img", load_image(astronaut_path)), a)


_ASTRO_IMG: dict = {}


def test_cli_workers_send_concurrent_requests_to_a_served_model(fake_openai, tmp_path, astronaut_path):
    import shutil

    from fakeserver import Reply

    reply = "<think>The mouth corners rise, AU12 <bbox>[100, 200, 300, 300]</bbox>.</think>\n<answer>happiness</answer>"
    srv = fake_openai(lambda req, i: Reply(text=reply, delay_s=0.3))
    d = tmp_path / "faces"
    d.mkdir()
    for i in range(6):
        shutil.copy(astronaut_path, d / f"f{i}.png")
    out = tmp_path / "a.jsonl"
    r = runner.invoke(app, ["analyze", str(d), "--model", f"openai:{srv.url}", "--workers", "3", "--out", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    recs = _json_lines(out.read_text())
    assert [Path(x["image"]).name for x in recs] == [f"f{i}.png" for i in range(6)]
    assert all(x["analyses"][0]["trace"] == reply and x["analyses"][0]["well_formed"] for x in recs)
    assert srv.max_in_flight >= 2  # images really were analysed concurrently


def test_one_canvas_for_detector_trace_and_record(landmarker, astronaut_path):
    """The Analyzer parses and records on the detector's canvas; a reward config on another canvas is refused."""
    from tagfer.au.aus import AUConfig
    from tagfer.au.detectors import MediaPipeAUDetector
    from tagfer.traces.rewards import RewardConfig

    det = MediaPipeAUDetector(AUConfig(canvas=256), landmarker=landmarker)
    with pytest.raises(ValueError, match="canvas"):
        Analyzer(detector=det, reward_config=RewardConfig(canvas=512), own_detector=False)
    an = Analyzer(detector=det, frame="image", own_detector=False)
    (a,) = an.analyze_image(astronaut_path)
    assert an.reward_config.canvas == a.canvas == an.backend.config.canvas == 256  # the FACS engine validates boxes there too
    with pytest.raises(ValueError, match="FACS engine's canvas"):
        Analyzer(detector=det, engine=FACSBackend(), own_detector=False)
    assert a.well_formed and a.boxes and all(0 <= v <= 255 for b in a.boxes for v in b)
    assert a.r_au is not None and a.r_au > 0.99  # the FACS engine cites the detector's own boxes, on the same canvas


# --------------------------------------------------------------------------- batches (Python API)
class _ScriptBackend:
    """A Backend object handed to the library directly (no spec): answers the same text for every face."""

    name = "script"
    thread_safe = True
    batch_size = 4

    def __init__(self, text):
        self.text = text
        self.closed = False

    def model_name(self):
        return "script"

    def generate(self, requests, config=None, on_result=None):
        for r in requests:
            yield GenResult(r.id, self.text, None, {}, {})

    def close(self):
        self.closed = True


def test_analyze_batch_resumes_writes_overlays_and_sets_the_exit_code(tmp_path, mp_detector, astronaut_path, grace_path, bad_inputs):
    import shutil

    from tagfer.core.jobs import Done, Started
    from tagfer.explainer.batch import BatchSetupError, analyze_batch
    from tagfer.explainer.records import EXIT_OK

    d = tmp_path / "faces"
    d.mkdir()
    shutil.copy(astronaut_path, d / "a.png")
    shutil.copy(bad_inputs["corrupt"], d / "b.jpg")
    out, ov = tmp_path / "a.jsonl", tmp_path / "ov"
    good = "<think>The mouth corners rise, AU12 <bbox>[180, 300, 330, 420]</bbox>.</think>\n<answer>happiness</answer>"
    backend = _ScriptBackend(good)
    factory = lambda: Analyzer(detector=mp_detector, engine=backend)  # noqa: E731 - a Backend object is an engine
    seen, events = [], []
    s = analyze_batch([d], factory=factory, out=out, overlay=ov, on_event=events.append, on_result=seen.append)
    assert events[0] == Started(2) and isinstance(events[-1], Done) and events[-1].result is s
    assert [Path(r.image).name for r in seen] == ["a.png", "b.jpg"]
    assert (s.total, s.processed, s.failed, s.malformed, s.skipped) == (2, 2, 1, 0, 0) and s.exit_code() == EXIT_FAILED
    assert sum(s.failed_items.values(), []) == [str(d / "b.jpg")]  # which image failed, by kind
    assert seen[0].analyses[0].engine == "script" and seen[0].analyses[0].well_formed
    assert seen[0].overlays and all(Path(p).is_file() and Path(p).parent == ov for p in seen[0].overlays)
    assert [r["image"] for r in read_jsonl(out)] == [r.image for r in seen]
    shutil.copy(grace_path, d / "c.jpg")
    s = analyze_batch([d], factory=factory, out=out)  # resume: only the new image; the failure is still reported
    assert (s.processed, s.skipped, s.failed_before, s.exit_code()) == (1, 2, 1, EXIT_FAILED)
    shutil.copy(astronaut_path, d / "b.jpg")
    s = analyze_batch([d], factory=factory, out=out, retry_errors=True)
    assert (s.processed, s.skipped, s.failed, s.failed_before, s.exit_code()) == (1, 2, 0, 0, EXIT_OK)
    assert sorted(Path(r["image"]).name for r in read_jsonl(out)) == ["a.png", "b.jpg", "c.jpg"]
    backend.text = "happy, I think"  # a malformed answer: exit 3, and still 3 on a re-run that skips it
    s = analyze_batch([d / "a.png"], factory=factory, out=tmp_path / "m.jsonl")
    assert (s.malformed, s.exit_code()) == (1, EXIT_MALFORMED)
    s = analyze_batch([d / "a.png"], factory=factory, out=tmp_path / "m.jsonl")
    assert (s.processed, s.malformed_before, s.exit_code()) == (0, 1, EXIT_MALFORMED)
    assert not backend.closed  # an engine handed in stays the caller's
    (tmp_path / "empty").mkdir()
    for bad, match in ((dict(images=[tmp_path / "empty"]), "no image"), (dict(images=[d], frame="nope"), "frame"),
                       (dict(images=[d], overlay=tmp_path / "one.png", resume=False, out=tmp_path / "x.jsonl"), "one image")):
        with pytest.raises(BatchSetupError, match=match):
            analyze_batch(factory=factory, **bad)


def test_reframe_keeps_a_faces_own_68_point_geometry(astronaut_68):
    """A face whose boxes came from an AU table's own 68 landmarks (OpenFace) is reframed on those
    landmarks, not on MediaPipe's 478-point regions (which it does not have)."""
    from tagfer.au.aus import AUConfig
    from tagfer.au.regions68 import GEOMETRY_OPENFACE, ground_face_68
    from tagfer.explainer.frames import reframe

    cfg = AUConfig()
    lm = astronaut_68
    scores = {12: 0.9, 6: 0.8, 4: 0.1}
    face = ground_face_68(lm, CanvasTransform(512, 512, canvas=512), cfg, scores)
    region = (100.0, 50.0, 400.0, 350.0)
    got = reframe(face, region, cfg)
    ref = ground_face_68(lm - np.array([100.0, 50.0]), CanvasTransform(300, 300, canvas=512), cfg, scores,
                         active={d.au: d.active for d in face.aus})
    assert got.geometry == GEOMETRY_OPENFACE
    assert [(d.au, d.box, d.active) for d in got.aus] == [(d.au, d.box, d.active) for d in ref.aus]


def test_face_frame_grounded_once_equals_detect_then_reframe(landmarker, astronaut_path, grace_path, two_faces_path):
    """A detector with the region capability (MediaPipe's, and a subclass that keeps its detect) grounds
    each face straight on its face frame; one without it is detected and reframed. The analyses are
    the same, and a subclass with its own scores keeps them (it falls back to detect + reframe)."""
    from tagfer.au.aus import ground_face
    from tagfer.au.detectors import MediaPipeAUDetector, RegionAUDetector

    class Plain(MediaPipeAUDetector):  # keeps MediaPipe's detect, so inherits the fast path
        pass

    def no_detect(image, key=None):
        raise AssertionError("the analyzer called detect on a detector that can ground on a region")

    class NoCapability:  # an AUDetector only: name, config, detect, close
        name = "mediapipe"

        def __init__(self, inner):
            self.inner, self.config = inner, inner.config

        def detect(self, image, key=None):
            return self.inner.detect(image, key)

        def close(self):
            pass

    class OwnScores(MediaPipeAUDetector):  # overrides detect: loses the inherited fast path
        name = "own"

        def detect(self, image, key=None):
            tr = CanvasTransform(image.width, image.height, canvas=self.config.canvas)
            return [ground_face(m, tr, self.config, scores={12: 0.05, 4: 0.95}, detector=self.name)
                    for m in self.meshes(image)]

    plain = Plain(landmarker=landmarker)
    plain.detect = no_detect
    dets = {"mediapipe": MediaPipeAUDetector(landmarker=landmarker), "subclass": plain,
            "none": NoCapability(MediaPipeAUDetector(landmarker=landmarker))}
    assert [isinstance(d, RegionAUDetector) for d in dets.values()] == [True, True, False]
    analyzers = {k: Analyzer(detector=d) for k, d in dets.items()}
    for p in (astronaut_path, grace_path, two_faces_path):
        got = {k: [x.to_json() for x in an.analyze_image(p)] for k, an in analyzers.items()}
        assert got["mediapipe"] and all(v == got["none"] for v in got.values()), p
    own = OwnScores(landmarker=landmarker)
    assert not isinstance(own, RegionAUDetector)
    (a,) = Analyzer(detector=own).analyze_image(astronaut_path)
    assert a.detector == "own" and {d["au"]: d["score"] for d in a.aus} == {12: 0.05, 4: 0.95}
