"""Live camera sessions of ``tagfer serve`` (tagfer.explainer.live): labels and tracking on real
faces, the limits (sessions, timeouts, rate, one frame in flight, size, decode budget, token,
Host/Origin), frames kept in memory; and in Chromium with a fake camera fed from a y4m clip."""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path

import pytest

from fixtures_live import *  # noqa: F401,F403  (session fixtures; only these tests and test_serve's video ones use them)
from fixtures_live import CAM_W, FACE_SIDE, X_RANGE, serving
from tagfer.explainer.analyze import Analyzer
from tagfer.explainer.live import LiveConfig, LiveError, LiveSessions
from tagfer.explainer.serve import create_app


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def sessions():
    s = LiveSessions(LiveConfig(max_sessions=2))
    yield s
    s.close_all()


def _client(app):
    from fastapi.testclient import TestClient

    return TestClient(app, base_url="http://127.0.0.1")


# ----------------------------------------------------------------------------- the analysis
def test_live_labels_neutral_then_happiness_with_cited_au_boxes(sessions, live_frames):
    s = sessions.open()
    try:
        out = sessions.frame(s.id, s.token, live_frames["neutral"])
        assert out["n_faces"] == 1 and out["width"] == 640 and out["height"] == 480
        f = out["faces"][0]
        assert f["label"] == "neutral" and f["global"]["label"] == "neutral" and f["global"]["net"] == "fer"
        time.sleep(1.1)  # the EMA (tau 0.25 s) forgets the neutral frame
        out = sessions.frame(s.id, s.token, live_frames["smile"])
        f = out["faces"][0]
        assert f["frame_label"] == "happiness" and f["label"] == "happiness" and f["score"] > 0.9
        assert f["agreement"] in ("agree", "disagree") and f["decided_by"] in ("global", "local")
        aus = {a["au"]: a for a in f["aus"]}
        assert 12 in aus and aus[12]["cited"]  # the smile's AU, cited by the trace
        x1, y1, x2, y2 = f["bbox"]  # the face box lies on the pasted face
        assert (CAM_W - FACE_SIDE) // 2 - 5 <= x1 < x2 <= (CAM_W + FACE_SIDE) // 2 + 5 and 0 <= y1 < y2 <= 480
        assert abs(sum(f["scores"].values()) - 1.0) < 0.01
    finally:
        sessions.close(s.id)


def test_smoothing_is_causal_and_the_tracker_follows_the_face(cam_jpeg):
    clock = Clock()
    ss = LiveSessions(LiveConfig(max_sessions=1), clock=clock)
    s = ss.open()
    lo, hi = X_RANGE
    try:
        ss.frame(s.id, s.token, cam_jpeg("neutral", lo))
        ids, centres, labels = [], [], []
        for x in range(lo, hi + 1, 20):  # the smiling face slides 220 px, 20 px per 0.1 s
            clock.t += 0.1
            f = ss.frame(s.id, s.token, cam_jpeg("smile", x))["faces"][0]
            ids.append(f["face_id"])
            centres.append((f["bbox"][0] + f["bbox"][2]) / 2)
            labels.append((f["frame_label"], f["label"], f["scores"]["happiness"]))
        assert len(set(ids)) == 1  # one face, one id
        assert centres[-1] - centres[0] == pytest.approx(hi - lo, abs=25)
        assert all(b - a == pytest.approx(20, abs=12) for a, b in zip(centres, centres[1:]))
        # EMA (tau = 0.25 s): the first smiling frame is happiness raw, its smoothed score still climbs
        assert all(raw == "happiness" for raw, _, _ in labels)
        assert labels[0][2] < labels[1][2] < labels[3][2] and labels[-1][1] == "happiness" and labels[-1][2] > 0.95
    finally:
        ss.close_all()


def test_smoothers_of_faces_that_left_are_dropped(live_frames, grace_path):
    clock = Clock()
    ss = LiveSessions(LiveConfig(max_sessions=1), clock=clock)
    s = ss.open()
    try:
        ss.frame(s.id, s.token, live_frames["smile"])
        assert len(s.smoothers) == 1
        import io

        from PIL import Image

        blank = io.BytesIO()
        Image.new("RGB", (640, 480), (120, 120, 120)).save(blank, "JPEG")
        clock.t += 0.5
        assert ss.frame(s.id, s.token, blank.getvalue())["faces"] == []
        assert len(s.smoothers) == 1  # within max_gap the track may come back
        clock.t += 2.0
        ss.frame(s.id, s.token, blank.getvalue())
        assert s.smoothers == {}  # memory stays bounded as faces come and go
    finally:
        ss.close_all()


def test_frames_are_decoded_in_memory_and_never_written(monkeypatch, tmp_path, live_frames):
    """No temporary file is made for a live frame (tempfile's directory is watched) and nothing
    is opened for writing."""
    import builtins

    watched = tmp_path / "tmp"
    watched.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(watched))
    app = create_app(lambda: Analyzer(), pool_size=1, live=LiveConfig(max_sessions=1))
    writes: list[str] = []
    real_open = builtins.open

    def spy(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+"):
            writes.append(str(file))
        return real_open(file, mode, *a, **k)

    with _client(app) as c:
        s = c.post("/live").json()
        monkeypatch.setattr(builtins, "open", spy)
        for name in ("smile", "neutral", "smile"):
            r = c.post(s["frame_url"], content=live_frames[name], headers={"X-Live-Token": s["token"], "Content-Type": "image/jpeg"})
            assert r.status_code == 200, r.text
            time.sleep(0.04)
        r = c.post(s["explain_url"], content=live_frames["smile"], headers={"X-Live-Token": s["token"]})
        assert r.status_code == 200 and r.json()["analyses"][0]["label"] == "happiness"
        monkeypatch.setattr(builtins, "open", real_open)
    assert list(watched.iterdir()) == [] and writes == []


# ----------------------------------------------------------------------------- limits
def test_sessions_are_bounded_and_time_out():
    clock = Clock()
    closed: list[int] = []

    class FakeLandmarker:
        def close(self) -> None:
            closed.append(1)

    ss = LiveSessions(LiveConfig(max_sessions=2, idle_timeout_s=30, max_session_s=100), clock=clock,
                      engine_factory=object, landmarker_factory=FakeLandmarker)
    a, b = ss.open(), ss.open()
    with pytest.raises(LiveError) as e:
        ss.open()
    assert e.value.kind == "live_full" and "2 live session(s)" in e.value.message
    assert ss.close(a.id) and closed == [1]
    c = ss.open()  # a slot was freed
    clock.t += 31  # b and c idle for 31 s
    with pytest.raises(LiveError) as e:
        ss.get(b.id, b.token)
    assert e.value.kind == "session_not_found" and len(ss) == 0 and len(closed) == 3
    d = ss.open()
    for _ in range(4):  # active, but older than max_session_s in the end
        clock.t += 29
        d.last_seen = clock.t
    with pytest.raises(LiveError):
        ss.get(d.id, d.token)
    assert c.id not in ss._sessions


def test_abandoned_sessions_are_closed_without_any_request():
    closed = threading.Event()
    ss = LiveSessions(LiveConfig(max_sessions=1, idle_timeout_s=0.4), engine_factory=object,
                      landmarker_factory=lambda: type("L", (), {"close": lambda self: closed.set()})())
    ss.open()
    assert closed.wait(3) and len(ss) == 0  # the page went away: its landmarker is released by the reaper
    ss.open()  # the slot is free


def test_one_frame_in_flight_and_a_bounded_rate(live_frames):
    clock = Clock()
    ss = LiveSessions(LiveConfig(max_sessions=1, max_fps=10), clock=clock, engine_factory=object,
                      landmarker_factory=lambda: type("L", (), {"close": lambda self: None})())
    s = ss.open()
    s.busy.acquire()  # a frame being analysed
    with pytest.raises(LiveError) as e:
        ss.frame(s.id, s.token, live_frames["smile"])
    assert e.value.kind == "frame_in_flight"
    s.busy.release()
    s.step = lambda data: {"ok": len(data)}  # the analysis itself is tested above
    assert ss.frame(s.id, s.token, b"x")["ok"] == 1
    clock.t += 0.05  # 20 frames/s > max_fps
    with pytest.raises(LiveError) as e:
        ss.frame(s.id, s.token, b"x")
    assert e.value.kind == "too_fast"
    clock.t += 0.11
    assert ss.frame(s.id, s.token, b"xy")["ok"] == 2
    with pytest.raises(LiveError) as e:
        ss.frame(s.id, "wrong", b"x")
    assert e.value.kind == "bad_token"


def test_live_config_is_checked():
    for bad in (dict(max_fps=float("nan")), dict(idle_timeout_s=0), dict(max_sessions=-1), dict(max_fps=float("inf"))):
        with pytest.raises(ValueError):
            LiveConfig(**bad)
    from tagfer.au.segments import SmoothingConfig

    with pytest.raises(ValueError, match="causal"):
        LiveConfig(smoothing=SmoothingConfig("window", 0.5))


@pytest.fixture(scope="module")
def live_app():
    return create_app(lambda: Analyzer(), pool_size=1, max_upload_mb=1,
                      live=LiveConfig(max_sessions=1, max_frame_bytes=300_000, max_fps=1000))


def test_http_refusals_are_clear_and_the_session_survives_bad_frames(live_app, live_frames, bombs):
    with _client(live_app) as c:
        r = c.post("/live")
        assert r.status_code == 201
        s = r.json()
        assert "never stored" in s["note"] and s["token"] and s["frame_url"].startswith("/live/")
        full = c.post("/live")  # one session at most
        assert full.status_code == 503 and full.json()["error"]["kind"] == "live_full" and full.headers["retry-after"]
        assert "already open" in full.json()["error"]["message"]
        hdr = {"X-Live-Token": s["token"], "Content-Type": "image/jpeg"}
        bad = {
            "not_an_image": (b"this is not a frame" * 10, 415),
            "empty_file": (b"", 422),
            "too_large": (b"\xff" * 300_001, 413),  # above max_frame_bytes, refused from Content-Length
        }
        for kind, (body, code) in bad.items():
            r = c.post(s["frame_url"], content=body, headers=hdr)
            assert r.status_code == code and r.json()["error"]["kind"] == kind, (kind, r.text)
        bomb = next(p for p in bombs.values() if p.stat().st_size < 300_000)
        r = c.post(s["frame_url"], content=bomb.read_bytes(), headers=hdr)  # a header above the decode budget
        assert r.status_code == 413 and "decode budget" in r.json()["error"]["message"]
        r = c.post(s["frame_url"], content=live_frames["smile"], headers=hdr)  # the session goes on
        assert r.status_code == 200 and r.json()["faces"][0]["label"] == "happiness"
        assert c.post(s["frame_url"], content=live_frames["smile"], headers={"X-Live-Token": "nope"}).status_code == 403
        assert c.post(s["frame_url"], content=live_frames["smile"]).json()["error"]["kind"] == "bad_token"
        r = c.post("/live/unknown/frame", content=live_frames["smile"], headers=hdr)
        assert r.status_code == 404 and r.json()["error"]["kind"] == "session_not_found"
        # cross-origin pages may neither open a session nor send frames; foreign Host names are refused
        for h in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"}):
            assert c.post("/live", headers=h).json()["error"]["kind"] == "cross_origin"
            r = c.post(s["frame_url"], content=live_frames["smile"], headers={**hdr, **h})
            assert r.status_code == 403 and r.json()["error"]["kind"] == "cross_origin"
        assert c.post(s["frame_url"], content=live_frames["smile"], headers={**hdr, "Host": "evil.example"}).status_code == 400
        same = {**hdr, "Origin": "http://127.0.0.1"}
        assert c.post(s["frame_url"], content=live_frames["neutral"], headers=same).status_code == 200
        held = live_app.state.live._sessions[s["session"]].busy
        held.acquire()  # a frame of this session being analysed: an explanation waits its turn (429), never queues
        try:
            r = c.post(s["explain_url"], content=live_frames["smile"], headers=hdr)
            assert r.status_code == 429 and r.json()["error"]["kind"] == "frame_in_flight"
        finally:
            held.release()
        r = c.post(s["close_url"], headers={"X-Live-Token": s["token"]})
        assert r.json() == {"closed": True}
        assert c.post(s["frame_url"], content=live_frames["smile"], headers=hdr).status_code == 404
        assert c.post("/live").status_code == 201  # the slot is free again


# ----------------------------------------------------------------------------- the page in Chromium, fake camera
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream", "--autoplay-policy=no-user-gesture-required"]

WATCH = """() => {
  // the camera's marker square (white while the face smiles) and every change of the live label
  window.__w = { marker: [], label: [], boxes: [] };
  const c = document.createElement("canvas"); c.width = c.height = 4;
  const x = c.getContext("2d", { willReadFrequently: true });
  let prev = null, lastAns = null;
  function poll() {
    const v = document.getElementById("cam");
    if (v.videoWidth) {
      x.drawImage(v, 4, 4, 12, 12, 0, 0, 4, 4);
      const on = x.getImageData(1, 1, 1, 1).data[0] > 128;
      if (on !== prev) { __w.marker.push([performance.now(), on]); prev = on; }
    }
    if (live.last && live.last !== lastAns) {
      lastAns = live.last;
      const f = live.last.faces[0];
      if (f) __w.boxes.push([performance.now(), f.label, (f.bbox[0] + f.bbox[2]) / 2, f.aus.length, prev]);
    }
    requestAnimationFrame(poll);
  }
  poll();
  const el = document.getElementById("live-label");
  new MutationObserver(() => __w.label.push([performance.now(), el.textContent])).observe(el, { childList: true, characterData: true, subtree: true });
}"""


def _shots_dir(tmp_path: Path) -> Path:
    d = Path(os.environ.get("TAGFER_SHOTS") or tmp_path)
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="module")
def browser_server():
    app = create_app(lambda: Analyzer(), pool_size=1, max_upload_mb=5, live=LiveConfig(max_sessions=2))
    with serving(app) as url:
        yield url


@pytest.mark.browser
def test_browser_live_camera_label_and_boxes_follow_the_face(browser_server, cam_y4m, tmp_path):
    pw = pytest.importorskip("playwright.sync_api")
    if not os.path.exists("/usr/bin/chromium"):
        pytest.skip("no Chromium at /usr/bin/chromium")
    with pw.sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[*CHROMIUM_ARGS, f"--use-file-for-fake-video-capture={cam_y4m}"])
        try:
            ctx = browser.new_context(permissions=["camera"], viewport={"width": 1100, "height": 1000})
            page = ctx.new_page()
            page.goto(browser_server + "/")
            assert page.get_attribute("#live-label", "aria-live") == "polite"
            page.click("#live-start")
            page.evaluate(WATCH)
            assert "never stored" in page.inner_text(".privacy")
            # a smile onset seen in the camera stream after a neutral reading, then the first "happiness" after it
            page.wait_for_function("""() => {
                const L = __w.label, M = __w.marker;
                const n = L.findIndex(l => l[1].startsWith("neutral"));
                if (n < 0) return false;
                const on = M.find(m => m[1] && m[0] > L[n][0]);
                return on && L.some(l => l[0] > on[0] && l[1].startsWith("happiness"));
            }""", timeout=30_000)
            delay = page.evaluate("""() => {
                const L = __w.label, M = __w.marker;
                const n = L.findIndex(l => l[1].startsWith("neutral"));
                const on = M.find(m => m[1] && m[0] > L[n][0]);
                return L.find(l => l[0] > on[0] && l[1].startsWith("happiness"))[0] - on[0];
            }""")
            assert 0 <= delay <= 2000, f"happiness shown {delay:.0f} ms after the smile appeared"
            # boxes drawn over the live image in the label's colour, and the AU boxes in green
            page.wait_for_function("() => live.last && live.last.faces.length && live.last.faces[0].label === 'happiness'", timeout=10_000)
            # let the face travel: enough smiling answers to see the boxes follow it (a count, not a fixed
            # wait, so a loaded machine that answers fewer frames per second still gets there)
            lo, hi = X_RANGE
            page.wait_for_function("""(need) => {
                const xs = __w.boxes.filter(b => b[1] === 'happiness' && b[4]).map(b => b[2]);
                return xs.length >= 8 && Math.max(...xs) - Math.min(...xs) >= need;
            }""", arg=0.4 * (hi - lo), timeout=45_000)
            drawn = page.evaluate("""() => {
                const cv = document.getElementById("cam-overlay"), ctx = cv.getContext("2d");
                const d = ctx.getImageData(0, 0, cv.width, cv.height).data;
                let orange = 0, green = 0;
                const near = (i, r, g, b) => Math.abs(d[i] - r) + Math.abs(d[i + 1] - g) + Math.abs(d[i + 2] - b) < 40;
                for (let i = 0; i < d.length; i += 4) {
                  if (d[i + 3] > 150 && near(i, 255, 127, 14)) orange++;
                  if (d[i + 3] > 100 && near(i, 0, 200, 70)) green++;
                }
                return [orange, green];
            }""")
            assert drawn[0] > 200 and drawn[1] > 50, drawn  # face box + caption (#ff7f0e), AU boxes (#00c846)
            shots = _shots_dir(tmp_path)
            page.screenshot(path=str(shots / "live_camera.png"), full_page=True)
            boxes = page.evaluate("() => __w.boxes")
            smiling = [b for b in boxes if b[1] == "happiness" and b[4]]
            assert len(smiling) >= 8 and all(b[3] > 0 for b in smiling)  # AU boxes with every smiling answer
            xs = [b[2] for b in smiling]
            lo, hi = X_RANGE
            assert min(xs) >= lo and max(xs) <= hi + FACE_SIDE  # always on the face's path
            assert max(xs) - min(xs) >= 0.4 * (hi - lo)  # and it moves with the face
            # Explain now: the frozen frame's full grounded trace, as for a photo
            page.wait_for_function("() => document.getElementById('live-label').textContent.startsWith('happiness')", timeout=10_000)
            page.click("#live-explain")
            page.wait_for_selector("#results .face .grounded", timeout=60_000)
            glob = page.inner_text("#results .grounded .global")
            assert glob.startswith("global impression (fer): happiness")
            assert page.inner_text("#results .badge").startswith(("agree", "disagree"))
            assert page.inner_text("#results .grounded .local").startswith("local reading (AU evidence): ")
            roles = page.eval_on_selector_all("#results mark.bbox", "ms => ms.map(m => m.dataset.role)")
            assert roles and "support" in roles
            assert page.is_visible("#live-resume")
            page.screenshot(path=str(shots / "live_explain_now.png"), full_page=True)
            page.click("#live-resume")
            page.click("#live-stop")
            page.wait_for_function("() => document.getElementById('live-label').textContent === 'live mode off'")
        finally:
            browser.close()
