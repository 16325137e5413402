"""tagfer.au.video / tagfer.au.video_render: sampling, smoothing, segments, tracking (pure), and the
whole job on clips built from the real sample faces (fixtures_video.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fixtures_video import *  # noqa: F401,F403  (session clips; imported here, not in conftest: only these tests use them)
from fixtures_video import CLIP_FPS, HAPPY_FRAMES, write_clip
from tiers import examples
from tagfer.core.jsonl import read_jsonl
from tagfer.core.labels import LABELS
from tagfer.traces.trace import parse_trace
from tagfer.au.video import (
    FaceTracker,
    FrameFile,
    Sampler,
    Segmenter,
    SmoothingConfig,
    VideoConfig,
    run_video,
    segments_from_records,
    segments_path,
    smooth_series,
)

FRAME = 1.0 / CLIP_FPS


# ----------------------------------------------------------------------------- pure parts
@settings(max_examples=examples(60), deadline=None)
@given(st.lists(st.integers(1, 200), min_size=1, max_size=80), st.sampled_from([1.0, 3.0, 7.5, 12.0, 30.0]))
def test_sampler_keeps_first_frame_of_each_sampling_interval(gaps_ms, fps):
    times = np.cumsum([0] + gaps_ms) / 1000.0
    s = Sampler(fps)
    kept = [t for t in times if s.keep(float(t))]
    slot = [math.floor((t - times[0]) * fps + 1e-6) for t in times]
    expected = [t for i, t in enumerate(times) if i == 0 or slot[i] != slot[i - 1]]
    assert kept == expected


def test_sampler_start_end_bounds():
    s = Sampler(None, start=0.5, end=1.0)
    kept = [t for t in np.arange(0, 2, 0.1) if s.keep(round(float(t), 3))]
    assert kept[0] == pytest.approx(0.5) and kept[-1] == pytest.approx(1.0) and len(kept) == 6


@settings(max_examples=examples(40), deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=60), st.sampled_from(["window", "ema", "none"]))
def test_smoothing_stays_within_range_and_keeps_constants(vals, method):
    t = np.arange(len(vals)) * FRAME
    cfg = SmoothingConfig(method=method, window=0.3)
    out = smooth_series(t, [[v, 0.25] for v in vals], cfg)
    assert out.shape == (len(vals), 2)
    assert out[:, 0].min() >= min(vals) - 1e-9 and out[:, 0].max() <= max(vals) + 1e-9
    assert np.allclose(out[:, 1], 0.25)
    if method == "none":
        assert np.allclose(out[:, 0], vals)


def test_centred_window_has_no_lag_and_ema_lags_by_tau():
    t = np.arange(100) * FRAME
    peak = np.maximum(0.0, 1.0 - np.abs(t - 2.0) / 0.5)  # symmetric peak at 2.0 s
    win = smooth_series(t, peak[:, None], SmoothingConfig("window", 0.4))[:, 0]
    assert t[np.argmax(win)] == pytest.approx(2.0)
    step = (t >= 1.0).astype(float)
    ema = smooth_series(t, step[:, None], SmoothingConfig("ema", 0.4))[:, 0]  # tau = 0.2 s
    for k in (1, 5, 10):  # after k samples of the step: 1 - exp(-k·Δt/tau); k·Δt = tau → 1 - 1/e
        i = int(np.argmin(np.abs(t - (1.0 + (k - 1) * FRAME))))
        assert ema[i] == pytest.approx(1 - math.exp(-k * FRAME / 0.2), abs=1e-9)
    assert SmoothingConfig("ema", 0.4).lag == pytest.approx(0.2) and SmoothingConfig("window", 0.4).lag == 0.0


def _face(fid: int, label: str, frame_box=(10, 10, 90, 90)) -> dict:
    scores = {c: (0.8 if c == label else 0.2 / 6) for c in LABELS}
    au12 = 0.9 if label == "happiness" else 0.05
    return {"face_id": fid, "bbox": list(frame_box), "label": label, "scores": scores,
            "aus": [{"au": 12, "score": au12, "active": au12 >= 0.3, "box": [300, 300, 400, 400]},
                    {"au": 6, "score": au12 * 0.8, "active": au12 >= 0.3, "box": [150, 150, 350, 250]}]}


def _records(labels: list[str | None], fid: int = 0) -> list[dict]:
    return [{"video": "v", "record": "frame", "frame": i, "t": i * FRAME, "faces": [] if lab is None else [_face(fid, lab)],
             "error": None} for i, lab in enumerate(labels)]


def test_segments_follow_label_runs_without_smoothing():
    labels = ["neutral"] * 10 + ["happiness"] * 20 + ["neutral"] * 10
    segs = list(segments_from_records(_records(labels), SmoothingConfig("none", min_duration=0.1)))
    assert [(s.label, s.start_frame, s.end_frame) for s in segs] == [("neutral", 0, 9), ("happiness", 10, 29), ("neutral", 30, 39)]
    hap = segs[1]
    assert hap.onset == pytest.approx(10 * FRAME) and hap.offset == pytest.approx(29 * FRAME)
    assert 10 <= hap.apex_frame <= 29 and hap.n_frames == 20
    assert [a["au"] for a in hap.aus] == [12, 6]  # the happiness prototype AUs active at the apex
    assert hap.trace_label == "happiness" and parse_trace(hap.trace).well_formed
    assert hap.evidence_aus[0] == 12 and hap.boxes[0] == [300, 300, 400, 400]


@settings(max_examples=examples(60), deadline=None)
@given(st.lists(st.sampled_from(["neutral", "happiness", "surprise"]), min_size=1, max_size=60), st.sampled_from([0.0, 0.1, 0.3]))
def test_segments_partition_the_frames(labels, min_duration):
    segs = list(segments_from_records(_records(labels), SmoothingConfig("none", min_duration=min_duration)))
    covered = [f for s in segs for f in range(s.start_frame, s.end_frame + 1)]
    assert covered == list(range(len(labels)))  # every frame once, in order, no overlap
    assert all(a.label != b.label for a, b in zip(segs, segs[1:]))
    assert all(s.start_frame <= s.apex_frame <= s.end_frame and labels[s.apex_frame] == s.label for s in segs)
    if min_duration == 0.0:
        runs = [lab for i, lab in enumerate(labels) if i == 0 or lab != labels[i - 1]]
        assert [s.label for s in segs] == runs


def test_short_blip_stays_in_its_segment_and_a_gap_splits():
    labels = ["happiness"] * 15 + ["surprise"] * 2 + ["happiness"] * 15  # 2 frames = 0.04 s < min_duration
    segs = list(segments_from_records(_records(labels), SmoothingConfig("none", min_duration=0.2)))
    assert [(s.label, s.start_frame, s.end_frame) for s in segs] == [("happiness", 0, 31)]
    gap = ["happiness"] * 10 + [None] * 40 + ["happiness"] * 10  # face gone 1.6 s > max_gap
    segs = list(segments_from_records(_records(gap), SmoothingConfig("none", max_gap=1.0)))
    assert [(s.start_frame, s.end_frame) for s in segs] == [(0, 9), (50, 59)]


def test_segmenter_boundary_is_where_the_new_label_first_appeared():
    sg = Segmenter("v", 0, SmoothingConfig("none", min_duration=0.2), [6, 12])
    out = []
    for i, lab in enumerate(["neutral"] * 8 + ["happiness"] * 12):
        from tagfer.au.video import face_samples

        rec = _records([lab])[0] | {"frame": i, "t": i * FRAME}
        for _, s in face_samples(rec, [6, 12]):
            s.smoothed = s.values
            out += sg.push(s)
    out += sg.flush()
    assert [(s.label, s.start_frame, s.end_frame) for s in out] == [("neutral", 0, 7), ("happiness", 8, 19)]


def test_tracker_keeps_ids_through_moves_and_renews_after_gap():
    tr = FaceTracker(iou_min=0.3, max_gap=0.5)
    assert tr.update(0.0, [[0, 0, 50, 50], [100, 0, 150, 50]]) == [0, 1]
    assert tr.update(0.04, [[105, 2, 155, 52], [3, 1, 53, 51]]) == [1, 0]  # order of detection does not matter
    assert tr.update(0.08, [[30, 0, 80, 50]]) == [0]  # a fast move: no IoU overlap needed, centre close
    assert tr.update(1.0, [[30, 0, 80, 50]]) == [2]  # lost for longer than max_gap: a new face


# ----------------------------------------------------------------------------- real clips
@pytest.fixture(scope="session")
def happy_run(tmp_path_factory, happy_clip):
    d = tmp_path_factory.mktemp("happy_run")
    out = d / "frames.jsonl"
    summ = run_video(happy_clip, out, VideoConfig(media_dir=str(d / "media")))
    return summ, out, [r for r in read_jsonl(out)]


def test_frames_of_a_real_clip(happy_run, happy_clip):
    summ, out, recs = happy_run
    frames = [r for r in recs if r["record"] == "frame"]
    assert summ.error is None and summ.frames_sampled == 48 and summ.faces_seen == 1
    assert [r["frame"] for r in frames] == list(range(48))
    assert [r["t"] for r in frames] == pytest.approx([i * FRAME for i in range(48)], abs=1e-3)
    assert all(r["n_faces"] == 1 and r["faces"][0]["face_id"] == 0 for r in frames)
    lo, hi = HAPPY_FRAMES
    labels = [r["faces"][0]["label"] for r in frames]
    assert labels == ["happiness" if lo <= i <= hi else "neutral" for i in range(48)]
    f = frames[20]["faces"][0]
    assert 12 in f["active"] and set(f["scores"]) == set(LABELS) and len(f["bbox"]) == 4
    assert recs[-1]["record"] == "video" and recs[-1]["video"] == happy_clip


def test_segments_of_a_real_clip_follow_the_frames(happy_run):
    summ, out, _ = happy_run
    segs = list(read_jsonl(segments_path(out)))
    assert summ.segments == len(segs) == 3
    assert [s["label"] for s in segs] == ["neutral", "happiness", "neutral"]
    hap = segs[1]
    lo, hi = HAPPY_FRAMES
    tol = 0.25 + FRAME  # half the default 0.5 s window, plus one frame
    assert abs(hap["onset"] - lo * FRAME) <= tol and abs(hap["offset"] - hi * FRAME) <= tol
    assert lo <= hap["apex_frame"] <= hi and hap["peak"] > 0.8
    assert hap["aus"][0]["au"] in (12, 6) and {a["au"] for a in hap["aus"]} >= {12}
    parsed = parse_trace(hap["trace"])
    assert parsed.well_formed and parsed.label == "happiness" and hap["trace_label"] == "happiness"
    assert [list(b) for b in parsed.box_coords] == hap["boxes"]
    # Without smoothing the boundaries are exactly the cuts of the clip.
    raw = list(segments_from_records(FrameFile(out, summ.video), SmoothingConfig("none")))
    assert [(s.label, s.start_frame, s.end_frame) for s in raw] == [("neutral", 0, lo - 1), ("happiness", lo, hi), ("neutral", hi + 1, 47)]


def test_annotated_video_and_plot(happy_run):
    import av
    from PIL import Image

    summ, _, _ = happy_run
    with av.open(summ.annotated) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 48

    def orange(a):  # the happiness caption colour (#ff7f0e), allowing for compression
        return int(((np.abs(a.astype(int) - [255, 127, 14]) < 40).all(axis=-1)).sum())

    assert orange(frames[20]) > 500 and orange(frames[2]) < 100  # Grace has a few orange-ish pixels of her own
    im = Image.open(summ.plot)
    assert im.format == "PNG" and im.width > 400 and im.height > 300


def test_resume_after_a_kill_gives_the_same_records(tmp_path, happy_clip, happy_run):
    out = tmp_path / "f.jsonl"
    n = [0]

    class Killed(Exception):
        pass

    def die(rec):
        n[0] += 1
        if n[0] == 20:
            raise Killed

    with pytest.raises(Killed):
        run_video(happy_clip, out, VideoConfig(), on_record=die)
    with open(out, "a") as f:
        f.write('{"video": "half a li')  # a partial last line, as a kill mid-write leaves
    summ = run_video(happy_clip, out, VideoConfig())
    assert summ.frames_resumed == 20 and summ.frames_sampled == 28
    frames = [r for r in read_jsonl(out) if r.get("record") == "frame"]
    ref = [r for r in happy_run[2] if r.get("record") == "frame"]
    assert [r["frame"] for r in frames] == list(range(48))
    assert [(r["faces"][0]["face_id"], r["faces"][0]["label"]) for r in frames] == [(r["faces"][0]["face_id"], r["faces"][0]["label"]) for r in ref]
    again = run_video(happy_clip, out, VideoConfig())  # done: nothing more is written
    assert again.frames_sampled == 0 and sum(1 for r in read_jsonl(out) if r.get("record") == "video") == 1


def test_faces_entering_and_leaving_get_their_own_ids(tmp_path, enter_leave_clip):
    out = tmp_path / "f.jsonl"
    summ = run_video(enter_leave_clip, out, VideoConfig())
    frames = [r for r in read_jsonl(out) if r.get("record") == "frame"]
    ids = [[f["face_id"] for f in r["faces"]] for r in frames]
    assert ids == [[0]] * 10 + [[]] * 15 + [[1]] * 15
    assert frames[30]["faces"][0]["bbox"][0] > 320 - 192 - 5  # the astronaut is on the right
    segs = list(read_jsonl(segments_path(out)))
    assert summ.faces_seen == 2 and [(s["face_id"], s["label"]) for s in segs] == [(0, "neutral"), (1, "happiness")]


def test_fps_start_end_sampling_on_a_real_clip(tmp_path, happy_clip):
    out = tmp_path / "f.jsonl"
    run_video(happy_clip, out, VideoConfig(fps=10, start=0.4, end=1.2))
    ts = [r["t"] for r in read_jsonl(out) if r.get("record") == "frame"]
    assert ts[0] == pytest.approx(0.4, abs=1e-3) and ts[-1] <= 1.2 + 1e-6
    assert len(ts) == 9 and min(np.diff(ts)) >= 0.08 - 1e-6


def test_folder_of_frames_is_a_video(tmp_path, clip_faces):
    from PIL import Image

    d = tmp_path / "frames"
    d.mkdir()
    for i in range(12):  # natural order: frame_2 before frame_10
        Image.fromarray(clip_faces["astronaut" if i >= 6 else "grace"]).save(d / f"frame_{i}.png")
    out = tmp_path / "f.jsonl"
    summ = run_video(str(d), out, VideoConfig(folder_fps=10))
    frames = [r for r in read_jsonl(out) if r.get("record") == "frame"]
    assert summ.error is None and [r["t"] for r in frames] == pytest.approx([i / 10 for i in range(12)])
    assert [r["faces"][0]["label"] for r in frames] == ["neutral"] * 6 + ["happiness"] * 6
    assert (summ.width, summ.height) == (192, 192)  # the frames' size, as for a video file (was null)


# ----------------------------------------------------------------------------- bad input
@pytest.fixture(scope="session")
def bad_videos(tmp_path_factory, clip_faces):
    import av

    d = tmp_path_factory.mktemp("bad_videos")
    a = clip_faces["astronaut"]
    out = {}
    c = av.open(str(d / "zero.mp4"), "w")
    s = c.add_stream("libx264", rate=25)
    s.width = s.height = 64
    s.pix_fmt = "yuv420p"
    c.start_encoding()
    c.close()
    out["zero_length"] = d / "zero.mp4"
    (d / "text.mp4").write_text("not a video\n")
    out["corrupt"] = d / "text.mp4"
    (d / "empty.webm").write_bytes(b"")
    out["empty_file"] = d / "empty.webm"
    full = write_clip(d / "full.mp4", [a] * 20)
    raw = open(full, "rb").read()
    (d / "cut.mp4").write_bytes(raw[: len(raw) // 2])  # the index (moov) is at the end: unopenable
    out["corrupt_cut"] = d / "cut.mp4"
    out["no_face"] = write_clip(d / "gray.mp4", [np.full((96, 96, 3), 128, np.uint8)] * 5)
    out["vfr"] = write_clip(d / "vfr.mp4", [a] * 6, times=[0.0, 0.04, 0.3, 0.32, 0.9, 1.5])
    big = np.full((2160, 3840, 3), 90, np.uint8)
    from PIL import Image

    big[500:1700, 1400:2600] = np.asarray(Image.fromarray(a).resize((1200, 1200)))
    out["4k"] = write_clip(d / "4k.mp4", [big] * 2)
    return out


@pytest.mark.parametrize("kind", ["zero_length", "corrupt", "empty_file", "corrupt_cut", "no_face"])
def test_bad_videos_get_a_clear_per_file_error(tmp_path, bad_videos, kind):
    out = tmp_path / "f.jsonl"
    summ = run_video(str(bad_videos[kind]), out, VideoConfig())
    assert summ.error is not None and summ.error["kind"] == kind.split("_cut")[0]
    last = list(read_jsonl(out))[-1]
    assert last["record"] == "video" and last["error"]["kind"] == summ.error["kind"]


def test_variable_frame_rate_keeps_true_times(tmp_path, bad_videos):
    out = tmp_path / "f.jsonl"
    summ = run_video(str(bad_videos["vfr"]), out, VideoConfig())
    ts = [r["t"] for r in read_jsonl(out) if r.get("record") == "frame"]
    assert summ.error is None and ts == pytest.approx([0.0, 0.04, 0.3, 0.32, 0.9, 1.5], abs=2e-3)


def test_4k_frames_are_downscaled_and_boxes_stay_in_original_pixels(tmp_path, bad_videos):
    out = tmp_path / "f.jsonl"
    summ = run_video(str(bad_videos["4k"]), out, VideoConfig(max_side=960))
    fr = next(r for r in read_jsonl(out) if r.get("record") == "frame")
    assert summ.error is None and (fr["width"], fr["height"]) == (3840, 2160)
    x1, y1, x2, y2 = fr["faces"][0]["bbox"]
    assert 1400 <= x1 < x2 <= 2600 and 500 <= y1 < y2 <= 1700 and fr["faces"][0]["label"] == "happiness"


def test_truncated_stream_is_recorded_not_lost(tmp_path, clip_faces):
    import av

    p = tmp_path / "clip.webm"  # WebM keeps its frames decodable when the file is cut
    c = av.open(str(p), "w")
    s = c.add_stream("libvpx", rate=25)
    s.width = s.height = 192
    s.pix_fmt = "yuv420p"
    s.options = {"lag-in-frames": "0", "g": "1"}
    for i in range(40):
        f = av.VideoFrame.from_ndarray(clip_faces["astronaut"], format="rgb24")
        f.pts = i
        for pkt in s.encode(f):
            c.mux(pkt)
    for pkt in s.encode():
        c.mux(pkt)
    c.close()
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) * 6 // 10])
    out = tmp_path / "f.jsonl"
    summ = run_video(str(p), out, VideoConfig())
    recs = list(read_jsonl(out))
    good = [r for r in recs if r.get("record") == "frame" and not r["error"]]
    assert 10 <= len(good) < 40 and all(r["n_faces"] == 1 for r in good)
    assert summ.error["kind"] == "truncated" and any((r.get("error") or {}).get("kind") == "truncated" for r in recs if r.get("record") == "frame")


# ----------------------------------------------------------------------------- CLI
def test_cli_analyze_and_au_on_videos(tmp_path, happy_clip, bad_videos, astronaut_path):
    from typer.testing import CliRunner

    from tagfer.cli import app

    r = CliRunner()
    out = tmp_path / "a.jsonl"
    res = r.invoke(app, ["analyze", happy_clip, "--out", str(out), "--fps", "12.5", "--render", "gif", "--no-progress"])
    assert res.exit_code == 0, res.output
    media = list((tmp_path / "a_media").iterdir())
    assert sorted(p.suffix for p in media) == [".gif", ".png"]
    assert [s["label"] for s in read_jsonl(segments_path(out))] == ["neutral", "happiness", "neutral"]
    assert sum(1 for x in read_jsonl(out) if x.get("record") == "frame") == 24
    assert r.invoke(app, ["analyze", happy_clip]).exit_code == 2  # a video needs --out
    res = r.invoke(app, ["au", str(bad_videos["corrupt"]), "--out", str(tmp_path / "b.jsonl"), "--no-progress"])
    assert res.exit_code == 1
    (rec,) = list(read_jsonl(tmp_path / "b.jsonl"))
    assert rec["error"]["kind"] == "corrupt" and json.dumps(rec)
    # --retry-errors with an image in the run: the failed video is done again, its new record kept
    for _ in range(2):
        res = r.invoke(app, ["au", str(bad_videos["corrupt"]), str(astronaut_path), "--out", str(tmp_path / "b.jsonl"),
                             "--retry-errors", "--no-progress"])
        assert res.exit_code == 1
        recs = list(read_jsonl(tmp_path / "b.jsonl"))
        assert [x["error"]["kind"] for x in recs if x.get("record") == "video"] == ["corrupt"]  # redone, kept once
        assert [x["error"] for x in recs if "image" in x] == [None]


def test_cli_au_all_aus_draws_every_active_au_box_on_the_video(tmp_path, happy_clip):
    """`tagfer au CLIP --all-aus` draws every active AU box (as `tagfer analyze --all-aus`); without it only
    the AUs the segment's trace cites: the annotated frames differ exactly where an active AU is not cited."""
    import av
    from typer.testing import CliRunner

    from tagfer.au.video_render import CitedAUs
    from tagfer.cli import app
    from tagfer.core.canvas import CanvasTransform

    frames = {}
    for name, extra in (("cited", []), ("all", ["--all-aus"])):
        out = tmp_path / f"{name}.jsonl"
        res = CliRunner().invoke(app, ["au", happy_clip, "--out", str(out), "--overlays", str(tmp_path / name), "--fps", "12.5",
                                       "--no-progress"] + extra)
        assert res.exit_code == 0, res.output
        (mp4,) = (tmp_path / name).glob("*.annotated.mp4")
        with av.open(str(mp4)) as c:
            frames[name] = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    recs = _frames(tmp_path / "cited.jsonl")
    assert len(recs) == len(frames["cited"]) == len(frames["all"]) == 24
    cited_at = CitedAUs(read_jsonl(segments_path(tmp_path / "cited.jsonl")), recs[0]["video"]).at
    green = lambda a: (np.abs(a.astype(int) - [0, 200, 70]) < 60).all(-1)  # noqa: E731  (the AU box colour, after H.264)

    def outline(a, box):  # green pixels on a box's outline (±1 px)
        x1, y1, x2, y2 = (round(v) for v in box)
        m = np.zeros(a.shape[:2], bool)
        m[y1 - 1:y1 + 2, x1:x2 + 1] = m[y2 - 1:y2 + 2, x1:x2 + 1] = m[y1:y2 + 1, x1 - 1:x1 + 2] = m[y1:y2 + 1, x2 - 1:x2 + 2] = True
        return int((green(a) & m).sum())

    extra = 0
    for r, cited, every in zip(recs, frames["cited"], frames["all"]):
        f = r["faces"][0]
        keep = cited_at(r["t"]).get(f["face_id"], set())
        uncited = [a for a in f["aus"] if a["active"] and a["au"] not in keep]
        if not uncited:  # nothing more to draw: the same frame
            assert abs(int(green(every).sum()) - int(green(cited).sum())) <= 5
            continue
        extra += 1
        tr = CanvasTransform(r["width"], r["height"], canvas=r["canvas"])
        for a in uncited:
            box = tr.box_to_image(a["box"])
            assert outline(every, box) > outline(cited, box) + 40, (r["frame"], a["au"])
    assert extra >= 10  # the smile's frames: AU10 is active but not cited by the trace


def test_cli_au_all_aus_lists_every_detector_au_of_an_image(tmp_path, astronaut_path):
    """On an image, `tagfer au --show --all-aus` lists every detector AU, as `tagfer analyze --all-aus` does."""
    import re

    from typer.testing import CliRunner

    from tagfer.cli import app

    out = tmp_path / "au.jsonl"
    shown = {}
    for name, extra in (("default", []), ("all", ["--all-aus"])):
        res = CliRunner().invoke(app, ["au", str(astronaut_path), "--out", str(out), "--no-progress", "--no-resume", "--show"] + extra)
        assert res.exit_code == 0, res.output
        shown[name] = set(map(int, re.findall(r"│ AU(\d+) ", res.output)))
    (face,) = next(iter(read_jsonl(out)))["faces"]
    quiet = {a["au"] for a in face["aus"] if not a["active"] and a["au"] not in face["top"]}
    assert quiet and not quiet & shown["default"]
    assert shown["all"] == {a["au"] for a in face["aus"]}


def test_video_writer_gif_webp_keep_frames_and_times(tmp_path, clip_faces):
    from PIL import Image

    from tagfer.au.video_render import VideoWriter

    a, g = clip_faces["astronaut"], clip_faces["grace"]
    for ext in ("gif", "webp"):
        p = write_clip(tmp_path / f"x.{ext}", [a, g, a], times=[0.0, 0.1, 0.5])
        im = Image.open(p)
        assert im.n_frames == 3 and im.size == a.shape[1::-1]
        if ext == "gif":
            im.seek(1)
            assert im.info["duration"] == pytest.approx(400, abs=20)  # the frames' own times, not a fixed rate
    with pytest.raises(ValueError):
        VideoWriter(tmp_path / "x.txt")
    with pytest.raises(RuntimeError):  # a failed encode leaves no file under the final name
        with VideoWriter(tmp_path / "y.mp4") as w:
            w.write(a, 0.0)
            raise RuntimeError("stop")
    assert not list(tmp_path.glob("y*"))


def test_worse_exit_code_order():
    from tagfer.cli.video import worse_exit

    assert worse_exit(0, 3) == 3 and worse_exit(3, 1) == 1 and worse_exit(1, 2) == 2 and worse_exit(0, 0) == 0


def test_cli_au_mixes_videos_and_images(tmp_path, happy_clip, astronaut_path):
    from typer.testing import CliRunner

    from tagfer.cli import app

    out = tmp_path / "au.jsonl"
    args = ["au", happy_clip, str(astronaut_path), "--out", str(out), "--fps", "5", "--smooth", "ema:0.4", "--no-progress"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    recs = list(read_jsonl(out))
    assert sum(1 for r in recs if r.get("record") == "frame") == 10 and sum(1 for r in recs if "image" in r) == 1
    assert {s["smoothing"] for s in read_jsonl(segments_path(out))} == {"ema tau 0.2s"}
    res = CliRunner().invoke(app, args)  # everything done: nothing added
    assert res.exit_code == 0 and len(list(read_jsonl(out))) == len(recs)
    assert CliRunner().invoke(app, ["au", happy_clip, "--out", str(out), "--smooth", "median:3"]).exit_code == 2


# ----------------------------------------------------------------------------- issue 21: adversarial clips
def _frames(out) -> list[dict]:
    return [r for r in read_jsonl(out) if r.get("record") == "frame"]


def _on_canvas(rgb: np.ndarray, w: int, h: int, x: int, y: int, fill: int = 200) -> np.ndarray:
    f = np.full((h, w, 3), fill, np.uint8)
    f[y:y + rgb.shape[0], x:x + rgb.shape[1]] = rgb
    return f


def test_frames_growing_past_their_header_are_budgeted_and_keep_their_own_geometry(tmp_path, monkeypatch, clip_faces):
    """Issue 21 rows 1–2: the header says 64×64; frames are 192², then one 2000² (above a 3 MB budget:
    refused before FFmpeg allocates it), then 640×480 (downscaled from their own size, recorded as 640×480)."""
    from fixtures_video import jpeg_bytes, mux_packets

    a = clip_faces["astronaut"]
    wide = _on_canvas(a, 640, 480, 400, 150)
    payloads = [jpeg_bytes(a)] * 3 + [jpeg_bytes(np.full((2000, 2000, 3), 90, np.uint8), quality=30)] + [jpeg_bytes(wide)] * 3
    clip = mux_packets(tmp_path / "grow.avi", payloads, codec="mjpeg", header=(64, 64), pix_fmt="yuvj420p", fmt="avi")
    monkeypatch.setenv("TAGFER_DECODE_BUDGET_MB", "3")
    out = tmp_path / "f.jsonl"
    summ = run_video(clip, out, VideoConfig(max_side=256, media_dir=str(tmp_path / "media"), plot=False))
    frames = _frames(out)
    errors = [r for r in frames if r["error"]]
    assert [e["error"]["kind"] for e in errors] == ["too_large"] and "budget" in errors[0]["error"]["message"]
    good = [r for r in frames if not r["error"]]
    assert [(r["width"], r["height"]) for r in good] == [(192, 192)] * 3 + [(640, 480)] * 3
    for r in good:
        (f,) = r["faces"]
        x1, y1, x2, y2 = f["bbox"]
        assert 0 <= x1 < x2 <= r["width"] and 0 <= y1 < y2 <= r["height"] and f["label"] == "happiness"
        c1, c2, c3, c4 = f["bbox_canvas"]
        assert 0 <= c1 < c3 <= 511 and 0 <= c2 < c4 <= 511
    assert good[-1]["faces"][0]["bbox"][0] > 380  # the face is on the right of the 640-wide frame
    assert summ.annotated and summ.error is None and summ.frames_failed == 1


def test_a_header_above_the_budget_is_refused_before_decoding(tmp_path, monkeypatch):
    """Issue 21 row 1: 16-bit frames whose header costs more than the budget → too_large, nothing decoded."""
    from fixtures_video import mux_packets, png_bytes

    big = np.zeros((600, 600, 3), np.uint16)  # rgb48: 6 bytes per pixel, 2.16 MB decoded
    clip = mux_packets(tmp_path / "deep.mov", [png_bytes(big, "rgb48be")] * 2, codec="png", header=(600, 600), pix_fmt="rgb48be", fmt="mov")
    monkeypatch.setenv("TAGFER_DECODE_BUDGET_MB", "2")  # 600² is within budget / 4 pixels: refused on the header's cost
    summ = run_video(clip, tmp_path / "f.jsonl", VideoConfig())
    assert summ.error["kind"] == "too_large" and "600×600 rgb48be needs 2 MB" in summ.error["message"] and summ.frames_sampled == 0
    monkeypatch.setenv("TAGFER_DECODE_BUDGET_MB", "1")  # 600² > budget / 4 pixels: FFmpeg refuses each frame undecoded
    summ = run_video(clip, tmp_path / "g.jsonl", VideoConfig())
    assert summ.error["kind"] == "too_large" and summ.frames_failed == summ.frames_sampled == 2
    assert all(r["error"]["kind"] == "too_large" for r in _frames(tmp_path / "g.jsonl"))
    monkeypatch.setenv("TAGFER_DECODE_BUDGET_MB", "3")  # within budget: decoded (a blank frame: no face)
    assert run_video(clip, tmp_path / "h.jsonl", VideoConfig()).error["kind"] == "no_face"


def test_a_frame_wider_than_its_header_format_is_checked_at_its_decoded_cost(tmp_path, monkeypatch, clip_faces):
    """Issue 21 rows 1–2: an 8-bit header, then one 16-bit RGBA frame (8 bytes per pixel, 1.16 MB > 1 MB):
    that frame is recorded too_large at its own index, the others are analysed."""
    from fixtures_video import mux_packets, png_bytes

    a = clip_faces["astronaut"]
    deep = np.zeros((380, 380, 4), np.uint16)
    payloads = [png_bytes(a, "rgb24"), png_bytes(deep, "rgba64be"), png_bytes(a, "rgb24")]
    clip = mux_packets(tmp_path / "mixed.mov", payloads, codec="png", header=(64, 64), pix_fmt="rgb24", fmt="mov")
    monkeypatch.setenv("TAGFER_DECODE_BUDGET_MB", "1")
    run_video(clip, tmp_path / "f.jsonl", VideoConfig())
    frames = _frames(tmp_path / "f.jsonl")
    assert [(r["frame"], (r["error"] or {}).get("kind")) for r in frames] == [(0, None), (1, "too_large"), (2, None)]
    assert "380×380 rgba64be" in frames[1]["error"]["message"] and frames[2]["faces"][0]["label"] == "happiness"


@pytest.mark.parametrize("fps", [None, 5.0])
@pytest.mark.parametrize("broken", [10**12, 2**62])
def test_a_broken_pts_is_repaired_and_the_rest_of_the_clip_kept(tmp_path, clip_faces, broken, fps):
    """Issue 21 row 6: one frame's pts is 10¹² ms (or 2⁶²) in a 20-frame clip at 25 fps."""
    from fixtures_video import jpeg_bytes, mux_packets

    pts = [i * 40 for i in range(20)]
    pts[6] = broken
    clip = mux_packets(tmp_path / "pts.mkv", [jpeg_bytes(clip_faces["astronaut"])] * 20, codec="mjpeg", header=(192, 192),
                       pix_fmt="yuvj420p", fmt="matroska", pts=pts)
    out = tmp_path / "f.jsonl"
    summ = run_video(clip, out, VideoConfig(fps=fps))
    frames = _frames(out)
    ts = [r["t"] for r in frames]
    assert summ.error is None and summ.frames_failed == 0 and all(r["n_faces"] == 1 for r in frames)
    assert len(frames) == (20 if fps is None else 4) and all(b > a for a, b in zip(ts, ts[1:])) and ts[-1] < 0.8
    if fps is None:
        assert [r["t_repaired"] for r in frames[5:8]] == [None, "jump", "backwards"] and ts[6] == pytest.approx(0.24)
    segs = list(read_jsonl(segments_path(out)))
    assert [s["label"] for s in segs] == ["happiness"] and segs[0]["offset"] < 0.8


def test_repeated_and_backward_pts_are_nudged_forward(tmp_path, clip_faces):
    from fixtures_video import jpeg_bytes, mux_packets

    pts = [0, 40, 80, 80, 80, 60, 200, 240]
    clip = mux_packets(tmp_path / "dup.mkv", [jpeg_bytes(clip_faces["astronaut"])] * 8, codec="mjpeg", header=(192, 192),
                       pix_fmt="yuvj420p", fmt="matroska", pts=pts)
    run_video(clip, tmp_path / "f.jsonl", VideoConfig())
    frames = _frames(tmp_path / "f.jsonl")
    assert [r["t_repaired"] for r in frames] == [None, None, None, "repeated", "repeated", "repeated", None, None]
    assert [r["t"] for r in frames] == pytest.approx([0, 0.04, 0.08, 0.081, 0.082, 0.083, 0.2, 0.24], abs=1e-4)
    assert not any(r["error"] for r in frames)


@settings(max_examples=examples(80), deadline=None)
@given(st.lists(st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True),
                          st.floats(0, 5), st.sampled_from([1e9, 2.0**62, -1e9])), min_size=1, max_size=60),
       st.sampled_from([None, 25.0, 0.0, 1e9]))
def test_timeline_is_finite_increasing_and_bounded(raws, rate):
    from tagfer.au.temporal import MAX_JUMP, Timeline

    tl = Timeline(rate)
    ts = [tl.next(r)[0] for r in raws]
    assert all(math.isfinite(t) for t in ts) and ts[0] >= 0
    assert all(0 < b - a <= MAX_JUMP for a, b in zip(ts, ts[1:]))


@settings(max_examples=examples(40), deadline=None)
@given(st.lists(st.floats(1e-3, 2.0), min_size=1, max_size=40))
def test_timeline_keeps_sound_times_as_they_are(steps):
    from tagfer.au.temporal import Timeline

    raws = list(np.cumsum([0.0] + steps))
    tl = Timeline(25.0)
    out = [tl.next(float(r)) for r in raws]
    assert [t for t, _ in out] == [float(r) for r in raws] and all(rep is None for _, rep in out)


@pytest.mark.parametrize("kw", [{"fps": math.inf}, {"fps": 1e308}, {"fps": math.nan}, {"fps": 0.0}, {"folder_fps": math.inf},
                                {"start": math.nan}, {"end": math.inf}, {"max_side": 10**9 + 0.5}])
def test_video_options_must_be_finite_and_in_range(kw):
    with pytest.raises(ValueError, match="must be"):
        VideoConfig(**kw)


@pytest.mark.parametrize("window", [math.nan, math.inf, 1e9, -1.0])
def test_smoothing_window_must_be_finite_and_in_range(window):
    for method in ("window", "ema"):
        with pytest.raises(ValueError, match="smoothing window"):
            SmoothingConfig(method, window)


@pytest.mark.parametrize("args", [["--fps", "inf"], ["--fps", "1e308"], ["--fps", "nan"], ["--smooth", "window:nan"],
                                  ["--smooth", "window:1e9"], ["--smooth", "ema:abc"], ["--end", "inf"]])
def test_cli_refuses_bad_video_options_with_exit_2(tmp_path, happy_clip, args):
    from typer.testing import CliRunner

    from tagfer.cli import app

    for cmd in ("analyze", "au"):
        res = CliRunner().invoke(app, [cmd, happy_clip, "--out", str(tmp_path / "x.jsonl"), "--no-progress", *args])
        assert res.exit_code == 2, (cmd, args, res.output)
        assert "error" in res.output and "Traceback" not in res.output and res.exception is None or isinstance(res.exception, SystemExit)
    assert not (tmp_path / "x.jsonl").exists()


def test_centred_smoothing_reads_each_sample_a_bounded_number_of_times():
    """Issue 21 row 7: the centred window keeps a running sum: work per sample does not grow with the window."""
    from tagfer.au.segments import Sample, Smoother

    class Counted(Sample):
        reads = 0

        def __getattribute__(self, name):
            if name == "values":
                Counted.reads += 1
            return object.__getattribute__(self, name)

    n = 1500
    t = np.arange(n) * FRAME
    vals = np.random.default_rng(0).random((n, 3))
    sm = Smoother(SmoothingConfig("window", 10.0))  # 250 frames per window
    out = []
    for i in range(n):
        out += sm.push(Counted(i, float(t[i]), vals[i]))
    out += sm.flush()
    assert Counted.reads <= 6 * n  # a mean over the window per sample would read ~250 × n
    got = np.array([s.smoothed for s in sorted(out, key=lambda s: s.frame)])
    ref = np.array([vals[np.abs(t - ti) <= 5.0 + 1e-9].mean(axis=0) for ti in t])
    assert np.allclose(got, ref, atol=1e-9)


def test_plot_memory_is_bounded_in_the_number_of_segments(tmp_path, monkeypatch):
    """Issue 21 row 8: 3,000 segments are drawn as a bounded number of artists (time columns per label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tagfer.au.video_render import plot_timeline

    n = 3000
    recs = _records(["happiness" if (i // 2) % 2 else "neutral" for i in range(n)])
    seg_file = tmp_path / "s.jsonl"
    with open(seg_file, "w") as f:
        for k in range(n // 2):
            t0 = 2 * k * FRAME
            f.write(json.dumps({"video": "v", "face_id": 0, "label": "happiness" if k % 2 else "neutral",
                                "onset": t0, "offset": t0 + FRAME, "apex": t0}) + "\n")
    figs = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figs.append(fig), close(fig)))
    plot_timeline(recs, seg_file, "v", tmp_path / "p.png", VideoConfig(smoothing=SmoothingConfig("none")))
    (fig,) = figs
    artists = sum(len(ax.patches) + len(ax.lines) + len(ax.collections) for ax in fig.axes)
    assert artists < 60  # one shading collection and one apex collection per label and axis, plus the curves
    shaded = [c for ax in fig.axes for c in ax.collections if len(c.get_paths()) > 1]
    assert shaded and all(len(c.get_paths()) <= 2000 for c in shaded)


def test_video_writer_fits_a_frame_of_another_size_instead_of_cropping_it(tmp_path, clip_faces):
    import av

    from tagfer.au.video_render import VideoWriter

    a = clip_faces["astronaut"]
    wide = np.zeros((192, 384, 3), np.uint8)
    wide[:, 192:] = (0, 0, 255)  # the right half, which a crop to 192×192 would cut away
    with VideoWriter(tmp_path / "v.mp4", crf=18) as w:
        w.write(a, 0.0)
        w.write(wide, 0.04)
    with av.open(str(tmp_path / "v.mp4")) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    blue = (frames[1][..., 2] > 180) & (frames[1][..., 0] < 60)
    assert frames[1].shape == a.shape and blue[60:130, 100:190].mean() > 0.9 and not blue[:40].any()


# ----------------------------------------------------------------------------- issue 19 item 5: short expressions survive
def _scored_records(rows: list[tuple[str, float]], step: float = FRAME) -> list[dict]:
    """Frame records of one face: each row is (raw label, its score); the rest share what is left,
    neutral taking most of it (a weak expression has a close neutral second)."""
    recs = []
    for i, (lab, p) in enumerate(rows):
        scores = {c: 0.0 for c in LABELS}
        scores[lab] = p
        if lab != "neutral":
            scores["neutral"] = 0.9 * (1 - p)
        rest = 1 - sum(scores.values())
        for c in LABELS:
            if scores[c] == 0.0:
                scores[c] = rest / (len(LABELS) - (1 if lab == "neutral" else 2))
        face = _face(0, lab) | {"scores": scores}
        recs.append({"video": "v", "record": "frame", "frame": i, "t": i * step, "faces": [face], "error": None})
    return recs


@pytest.mark.parametrize("step,n_tail", [(FRAME, 3), (0.1, 2), (0.2, 2), (FRAME, 2)])
@pytest.mark.parametrize("smooth", [SmoothingConfig(), SmoothingConfig("ema", 0.5), SmoothingConfig("window", 1.0)])
def test_an_expression_held_to_the_end_is_a_segment_of_its_own(step, n_tail, smooth):
    rows = [("neutral", 0.8)] * round(2.0 / step) + [("surprise", 0.6)] * n_tail
    segs = list(segments_from_records(_scored_records(rows, step), smooth))
    last = segs[-1]
    assert last.label == "surprise" and (last.start_frame, last.end_frame) == (len(rows) - n_tail, len(rows) - 1)
    assert [s.label for s in segs] == ["neutral", "surprise"]


@pytest.mark.parametrize("smooth", [SmoothingConfig(), SmoothingConfig("ema", 0.5), SmoothingConfig("window", 1.0)])
def test_smoothing_neither_drops_nor_shrinks_an_expression_held_for_0_3_s(smooth):
    # 8 frames at 25 fps = 0.32 s of a weak happiness (0.5 vs neutral 0.45) between strong neutral stretches:
    # a 0.5 s mean alone gives neutral the argmax on every one of those frames.
    rows = [("neutral", 0.9)] * 30 + [("happiness", 0.5)] * 8 + [("neutral", 0.9)] * 30
    sm = smooth_series([r["t"] for r in _scored_records(rows)], [[r["faces"][0]["scores"][c] for c in LABELS] for r in _scored_records(rows)], smooth)
    assert all(LABELS[int(np.argmax(v))] == "neutral" for v in sm[30:38]) or smooth.method == "ema"
    segs = list(segments_from_records(_scored_records(rows), smooth))
    hap = [s for s in segs if s.label == "happiness"]
    assert len(hap) == 1 and hap[0].start_frame <= 30 and hap[0].end_frame >= 37  # the whole 0.32 s, maybe more
    assert hap[0].start_frame == 30 or smooth.method != "window"  # the centred window never moves its onset later


@settings(max_examples=examples(60), deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["neutral", "happiness", "surprise"]), st.integers(1, 14), st.floats(0.35, 0.95)),
                min_size=1, max_size=12),
       st.sampled_from([SmoothingConfig(), SmoothingConfig("ema", 0.5), SmoothingConfig("window", 2.0), SmoothingConfig("none")]))
def test_every_raw_run_of_0_3_s_lies_inside_one_segment_of_its_label(runs, smooth):
    rows = [(lab, p) for lab, n, p in runs for _ in range(n)]
    segs = list(segments_from_records(_scored_records(rows), smooth))
    covered = [f for s in segs for f in range(s.start_frame, s.end_frame + 1)]
    assert covered == list(range(len(rows)))
    label_of = {f: s.label for s in segs for f in range(s.start_frame, s.end_frame + 1)}
    raw = [lab for lab, _ in rows]  # consecutive runs of one label make one raw run
    start = 0
    for i in range(1, len(raw) + 1):
        if i == len(raw) or raw[i] != raw[start]:
            n = i - start
            held = (n >= 2 and (n - 1) * FRAME * n / (n - 1) >= 0.3 - 1e-9) or (i == len(raw) and n >= 2)
            if held:
                assert all(label_of[f] == raw[start] for f in range(start, i)), (raw[start], start, i)
            start = i


def _neutral_then_expression_clip(path, clip_faces, n_expr: int, n_total: int = 50) -> str:
    g, a = clip_faces["grace"], clip_faces["astronaut"]
    return write_clip(path, [a if i >= n_total - n_expr else g for i in range(n_total)])


@pytest.mark.parametrize("n_expr,fps", [(10, None), (10, 10.0), (3, None)])
def test_a_real_clip_ending_on_a_short_smile_ends_with_that_segment(tmp_path, clip_faces, n_expr, fps):
    """Issue 19 item 5 (done-when): Grace Hopper (neutral) for 2 s, then the astronaut smiling for the
    last 0.4 s (10 frames; at --fps 10 the last 4 sampled frames) or the last 3 frames."""
    clip = _neutral_then_expression_clip(tmp_path / "c.mp4", clip_faces, n_expr)
    out = tmp_path / "f.jsonl"
    summ = run_video(clip, out, VideoConfig(fps=fps))
    frames = _frames(out)
    assert summ.error is None and frames[-1]["faces"][0]["label"] == "happiness"
    segs = list(read_jsonl(segments_path(out)))
    assert [s["label"] for s in segs] == ["neutral", "happiness"]
    assert segs[-1]["end_frame"] == frames[-1]["frame"] and segs[-1]["start_frame"] >= 50 - n_expr - 2
    assert segs[-1]["trace_label"] == "happiness"


def test_a_real_0_32_s_smile_mid_clip_keeps_its_frames(tmp_path, clip_faces):
    g, a = clip_faces["grace"], clip_faces["astronaut"]
    clip = write_clip(tmp_path / "c.mp4", [a if 20 <= i < 28 else g for i in range(50)])
    out = tmp_path / "f.jsonl"
    run_video(clip, out, VideoConfig())
    segs = list(read_jsonl(segments_path(out)))
    assert [(s["label"], s["start_frame"], s["end_frame"]) for s in segs] == [("neutral", 0, 19), ("happiness", 20, 27), ("neutral", 28, 49)]


# ----------------------------------------------------------------------------- the same engine as a photo (issue 19)
def test_each_frame_is_decided_by_the_photo_engine(happy_run):
    """Every face of every frame carries the FER net's impression and the decision of the photo engine
    (tagfer.au.fusion.decide on the same AUs), and a segment's apex trace is the grounded engine's."""
    from tagfer.au.aus import AUDetection
    from tagfer.au.fusion import decide

    summ, out, recs = happy_run
    frames = [r for r in recs if r["record"] == "frame" and r["faces"]]
    for r in frames[::6]:
        f = r["faces"][0]
        assert set(f["global_scores"]) == set(LABELS)
        dets = [AUDetection.from_json(d) for d in f["aus"]]
        d = decide(f["global_scores"], dets)
        assert f["label"] == d.label and f["scores"] == pytest.approx(d.scores, abs=2e-4)
    hap = next(s for s in read_jsonl(segments_path(out)) if s["label"] == "happiness")
    assert "overall impression" in hap["trace"] or "At first glance" in hap["trace"]  # the global step comes first


def test_a_segment_carries_the_box_roles_analyze_gives_its_apex_frame(happy_run, happy_clip, mp_detector, tmp_path):
    """A segment record carries its apex trace's views (the local steps: each box's AU and role),
    equal to what `tagfer analyze --frame image` gives for that frame as a photo; a record written
    before the views existed still loads."""
    from PIL import Image

    from tagfer.au.segments import VIEW_KEYS, SegmentRecord
    from tagfer.au.video_io import iter_frames
    from tagfer.explainer.analyze import Analyzer
    from tagfer.explainer.records import box_aus

    summ, out, _ = happy_run
    segs = list(read_jsonl(segments_path(out)))
    hap = next(s for s in segs if s["label"] == "happiness")
    steps = hap["local"]["steps"]
    assert [st["au"] for st in steps] == hap["evidence_aus"] and {"role", "for"} <= set(steps[0])
    assert steps[0] == {"au": 12, "role": "support", "for": "happiness"}  # the smile's first box backs the answer
    assert box_aus(parse_trace(hap["trace"])) == hap["evidence_aus"]  # the still view's box AUs: one per box, in order
    (fr,) = [f for f in iter_frames(happy_clip, VideoConfig()) if f.index == hap["apex_frame"]]
    Image.fromarray(fr.image.rgb).save(tmp_path / "apex.png")
    (a,) = Analyzer(detector=mp_detector, frame="image", own_detector=False).analyze_image(tmp_path / "apex.png")
    assert a.views["local"]["steps"] == steps and a.box_aus == hap["evidence_aus"] and a.boxes == hap["boxes"]
    assert a.views["agreement"] == hap["agreement"] and a.views["global"]["label"] == hap["global"]["label"]
    assert a.views["decision"]["rule"] == hap["decision"]["rule"]
    assert all(set(VIEW_KEYS) <= set(s) for s in segs)  # every segment of the default engine has them
    # old records (no views) load; new ones round-trip
    old = {k: v for k, v in hap.items() if k not in VIEW_KEYS}
    assert SegmentRecord.from_json(old).views == {} and SegmentRecord.from_json(old).to_json() == old
    assert SegmentRecord.from_json(hap).to_json() == hap


def test_facs_rules_engine_on_a_video(tmp_path, happy_clip):
    """`--model facs-rules` on a video: the FACS prototypes alone decide each frame (no net impression)."""
    from tagfer.au.aus import AUDetection
    from tagfer.au.facs import class_scores

    out = tmp_path / "rules.jsonl"
    summ = run_video(happy_clip, out, VideoConfig(engine="facs-rules", fps=5))
    frames = [r for r in read_jsonl(out) if r["record"] == "frame" and r["faces"]]
    assert summ.error is None and frames
    for r in frames:
        f = r["faces"][0]
        assert f["global_scores"] is None
        ref = class_scores([AUDetection.from_json(d) for d in f["aus"]])
        assert f["scores"] == pytest.approx(ref, abs=2e-4)
    segs = list(read_jsonl(segments_path(out)))  # the rules give no global impression, hence no views (as for a photo)
    assert segs and all(s["trace"] and "local" not in s and "global" not in s for s in segs)
    with pytest.raises(ValueError, match="engine"):
        VideoConfig(engine="gpt")


# ----------------------------------------------------------------------------- what the rendered media look like
def test_annotated_video_lasts_as_long_as_the_source_at_its_rate(tmp_path, clip_faces):
    """A 2.0 s clip at 10 fps gives a 2.0 s, 10 fps annotated video (was 1.94 s / 10.3 fps: the
    last frame lasted one 25 fps tick); GIF output keeps the length too."""
    import av
    from PIL import Image

    clip = write_clip(tmp_path / "ten.mp4", [clip_faces["astronaut"]] * 20, fps=10)
    for render in ("mp4", "gif"):
        summ = run_video(clip, tmp_path / f"{render}.jsonl", VideoConfig(media_dir=str(tmp_path / render), render=render, plot=False))
        if render == "mp4":
            with av.open(summ.annotated) as c:
                s = c.streams.video[0]
                assert c.duration / 1e6 == pytest.approx(2.0, abs=0.011) and s.frames == 20
                assert float(s.average_rate) == pytest.approx(10.0, abs=0.01)
        else:
            im = Image.open(summ.annotated)
            total = 0
            for k in range(im.n_frames):
                im.seek(k)
                total += im.info["duration"]
            assert im.n_frames == 20 and total == pytest.approx(2000, abs=20)


def _frame_record(face_box, aus):
    return {"canvas": 512, "faces": [{"face_id": 0, "bbox_canvas": list(face_box), "label": "happiness",
                                      "scores": {c: (0.9 if c == "happiness" else 0.0) for c in LABELS},
                                      "aus": [{"au": a, "score": 0.8, "active": True, "box": list(b)} for a, b in aus]}]}


@pytest.mark.parametrize("face_box", [(130, 120, 380, 470), (130, 2, 380, 330), (60, 0, 450, 511)])
def test_face_caption_sits_above_or_below_the_face_never_over_it(face_box):
    """The `#id label score` caption (the label's colour) is drawn outside the face box — above it,
    below it when the box touches the top — and inside the frame; only the bottom edge of a box
    that fills the whole height may carry it."""
    from tagfer.au.video_render import LABEL_COLORS, annotate_frame

    eyes = (face_box[0] + 20, face_box[1] + 40, face_box[2] - 20, face_box[1] + 120)
    im = np.asarray(annotate_frame(np.full((512, 512, 3), 100, np.uint8), _frame_record(face_box, [(6, eyes)]), (512, 512)))
    orange = (np.abs(im.astype(int) - [int(LABEL_COLORS["happiness"][i:i + 2], 16) for i in (1, 3, 5)]) < 8).all(-1)
    x1, y1, x2, y2 = face_box
    inner = orange[y1 + 4: y2 - 4, x1 + 4: x2 - 4]
    if y2 - y1 < 480:
        assert inner.sum() == 0  # nothing over the face
        assert orange[:y1].sum() + orange[y2 + 3:].sum() > 150  # the caption is outside, in the frame
    else:
        rows = np.flatnonzero(inner.any(axis=1))
        assert len(rows) and rows.min() > (y2 - y1) * 0.8  # only over the chin, never over the eyes
    assert orange[y1 + 40: y1 + 120, x1 + 4: x2 - 4].sum() == 0


def test_only_the_cited_aus_are_drawn_unless_asked():
    from tagfer.au.video_render import CitedAUs, annotate_frame

    rec = _frame_record((100, 100, 420, 470), [(12, (150, 330, 370, 420)), (6, (140, 200, 380, 260))])
    blank = np.full((512, 512, 3), 100, np.uint8)

    def green_rows(im, box):  # green outline pixels along the box's top edge
        a = np.asarray(im)[box[1]:box[1] + 2, box[0] + 5: box[2] - 5]
        return int((np.abs(a.astype(int) - [0, 200, 70]) < 10).all(-1).sum())

    cited = annotate_frame(blank, rec, (512, 512), {0: {12}})
    assert green_rows(cited, (150, 330, 370, 420)) > 100 and green_rows(cited, (140, 200, 380, 260)) == 0
    every = annotate_frame(blank, rec, (512, 512), None)
    assert green_rows(every, (140, 200, 380, 260)) > 100
    segs = [{"video": "v", "face_id": 0, "onset": 0.0, "offset": 0.96, "evidence_aus": [12]},
            {"video": "v", "face_id": 0, "onset": 1.0, "offset": 2.0, "evidence_aus": [6, 25]},
            {"video": "w", "face_id": 0, "onset": 0.0, "offset": 9.0, "evidence_aus": [4]}]
    at = CitedAUs(segs, "v").at
    assert at(0.5) == {0: {12}} and at(1.0) == {0: {6, 25}} and at(0.98) == {0: {12}}
    from tagfer.au.video_render import frame_boxes

    big = frame_boxes(rec, (512, 512), 512, {0: {12, 6}})
    assert [b.label for b in big] == ["#0 happiness 0.90", "AU12", "AU6"] and big[0].outside
    small = frame_boxes(rec, (512, 512), 128, {0: {12, 6}})  # the frame drawn at 128 px: too small for tags
    assert [b.label for b in small] == ["#0 happiness 0.90 · AU6 AU12", "", ""]
    assert VideoConfig(render_aus="active").render_aus == "active"
    with pytest.raises(ValueError, match="render_aus"):
        VideoConfig(render_aus="some")


def test_plot_spans_are_edge_to_edge_and_legends_beside_the_curves(tmp_path, monkeypatch):
    """Segments one frame apart are shaded without a blank column between them; a real gap
    (no segment for 1 s) stays blank; every legend lies right of its axes, off the curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tagfer.au.video_render import plot_timeline

    labels = ["neutral"] * 20 + ["happiness"] * 20 + ["neutral"] * 20 + ["neutral"] * 25 + ["happiness"] * 15
    recs = _records(labels)
    seg_file = tmp_path / "s.jsonl"
    runs = [(0, 19, "neutral"), (20, 39, "happiness"), (40, 59, "neutral"), (85, 99, "happiness")]  # 60–84: no segment
    with open(seg_file, "w") as f:
        for a, b, lab in runs:
            f.write(json.dumps({"video": "v", "face_id": 0, "label": lab, "onset": a * FRAME, "offset": b * FRAME,
                                "apex": (a + b) / 2 * FRAME}) + "\n")
    figs = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figs.append(fig), close(fig)))
    plot_timeline(recs, seg_file, "v", tmp_path / "p.png", VideoConfig(smoothing=SmoothingConfig("none")))
    (fig,) = figs
    fig.canvas.draw()
    ax = fig.axes[1]
    spans = sorted((x, x + w) for c in ax.collections if len(c.get_paths()) and c.get_alpha() == 0.15
                   for p in c.get_paths() for x, w in [(p.vertices[:, 0].min(), np.ptp(p.vertices[:, 0]))])
    merged = [list(spans[0])]
    for a, b in spans[1:]:
        if a <= merged[-1][1] + 1e-9:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    assert len(merged) == 2, merged  # 0–59 shaded in one piece (was three), then 85–99 after the real gap
    assert merged[0][0] == pytest.approx(0.0, abs=0.01) and merged[0][1] == pytest.approx(59 * FRAME, abs=0.01)
    assert merged[1][0] == pytest.approx(85 * FRAME, abs=0.01)
    for a in fig.axes:
        leg, box = a.get_legend().get_window_extent(), a.get_window_extent()
        assert leg.x0 >= box.x1  # beside the axes, not over the curves
        assert min(t.get_fontsize() for t in a.get_legend().get_texts()) >= 10 and a.title.get_fontsize() >= 12
