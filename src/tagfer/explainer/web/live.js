// tagfer serve, live camera: getUserMedia → one JPEG at a time to POST /live/{id}/frame (a frame that
// would have to wait is dropped, never queued) → faces, AU boxes, label and a short smoothed score
// strip drawn over the live image from the JSON answer; the current label also as text in an
// aria-live region. "Explain now" freezes the frame and shows its full grounded trace (photo view).
"use strict";
const cam = document.getElementById("cam");
const camOverlay = document.getElementById("cam-overlay");
const liveView = document.getElementById("live-view");
const liveLabel = document.getElementById("live-label");
const liveError = document.getElementById("live-error");
const liveMeta = document.getElementById("live-meta");
const btnStart = document.getElementById("live-start"), btnStop = document.getElementById("live-stop");
const btnExplain = document.getElementById("live-explain"), btnResume = document.getElementById("live-resume");
const LIVE_FPS = 15;           // frames sent per second at most (the server also bounds it)
const LIVE_WIDTH = 640;        // frames are sent at most this wide
const STRIP_S = 4;             // seconds of smoothed scores in the strip
const live = { session: null, stream: null, timer: null, inFlight: false, frozen: false, last: null, history: [],
  colors: LABEL_COLORS, sent: 0, dropped: 0, answered: 0, errors: 0, lastMs: null, grab: document.createElement("canvas") };

function showLiveError(msg) { liveError.textContent = msg; }

async function startLive() {
  if (live.session) return;
  if (typeof hideVideo === "function") hideVideo();
  results.replaceChildren();
  liveView.hidden = false;
  showLiveError("");
  liveLabel.textContent = "starting the camera…";
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    showLiveError("This browser gives no camera access to this page (it needs http://localhost or https).");
    return;
  }
  let resp, body;
  try {
    resp = await fetch("/live", { method: "POST" });
    body = await resp.json();
  } catch (e) { showLiveError("Could not reach the server: " + e); return; }
  if (!resp.ok) {
    const err = body && body.error ? body.error : { kind: "http_" + resp.status, message: resp.statusText };
    showLiveError(err.message + " (" + err.kind + ")");
    liveLabel.textContent = "live mode unavailable";
    return;
  }
  live.session = body; live.colors = body.label_colors || LABEL_COLORS; live.history = []; live.last = null;
  live.sent = live.dropped = live.answered = live.errors = 0;
  try {
    live.stream = await navigator.mediaDevices.getUserMedia({ video: { width: { ideal: 640 }, height: { ideal: 480 } }, audio: false });
  } catch (e) {
    showLiveError("No camera: " + (e.message || e.name));
    await closeSession();
    return;
  }
  cam.srcObject = live.stream;
  await cam.play().catch(() => {});
  btnStart.hidden = true; btnStop.hidden = false; btnExplain.hidden = false; btnResume.hidden = true;
  live.frozen = false;
  liveLabel.textContent = "looking for a face…";
  live.timer = setInterval(tick, Math.round(1000 / Math.min(LIVE_FPS, body.max_fps || LIVE_FPS)));
  requestAnimationFrame(drawLive);
}

async function closeSession() {
  const s = live.session;
  live.session = null;
  if (s) { try { await fetch(s.close_url, { method: "POST", headers: { "X-Live-Token": s.token } }); } catch (e) { /* server gone */ } }
}

function stopLive() {
  if (!live.session && !live.stream) return;
  clearInterval(live.timer); live.timer = null;
  if (live.stream) live.stream.getTracks().forEach(t => t.stop());
  live.stream = null; cam.srcObject = null;
  closeSession();
  btnStart.hidden = false; btnStop.hidden = true; btnExplain.hidden = true; btnResume.hidden = true;
  liveLabel.textContent = "live mode off";
  camOverlay.getContext("2d").clearRect(0, 0, camOverlay.width, camOverlay.height);
}

// The current camera image, at most LIVE_WIDTH wide, on the grab canvas.
function grabFrame() {
  const vw = cam.videoWidth, vh = cam.videoHeight;
  if (!vw || !vh) return null;
  const k = Math.min(1, LIVE_WIDTH / vw), c = live.grab;
  c.width = Math.round(vw * k); c.height = Math.round(vh * k);
  c.getContext("2d").drawImage(cam, 0, 0, c.width, c.height);
  return c;
}

function toJpeg(c) { return new Promise(r => c.toBlob(r, "image/jpeg", 0.85)); }

async function tick() {
  if (!live.session || live.frozen) return;
  if (live.inFlight) { live.dropped++; return; }  // never queue: this frame is dropped
  const c = grabFrame();
  if (!c) return;
  live.inFlight = true;
  const s = live.session;
  try {
    const blob = await toJpeg(c);
    live.sent++;
    const resp = await fetch(s.frame_url, { method: "POST", body: blob, headers: { "Content-Type": "image/jpeg", "X-Live-Token": s.token } });
    const body = await resp.json();
    if (s !== live.session) return;
    if (resp.ok) {
      live.answered++; live.last = body; live.lastMs = body.ms; showLiveError("");
      onLiveAnswer(body);
    } else if (resp.status === 429) {
      live.dropped++;  // the server's own bound: this frame is dropped
    } else {
      live.errors++;
      const err = body && body.error ? body.error : { kind: "http_" + resp.status, message: resp.statusText };
      showLiveError("Frame refused: " + err.message + " (" + err.kind + ")");
      if (err.kind === "session_not_found" || err.kind === "bad_token") { stopLive(); showLiveError(err.message); }
    }
  } catch (e) {
    live.errors++;
    showLiveError("Frame failed: " + e);
  } finally {
    live.inFlight = false;
  }
}

function mainFace(ans) {  // the largest face
  let best = null, area = -1;
  for (const f of ans.faces) { const a = (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]); if (a > area) { area = a; best = f; } }
  return best;
}

function onLiveAnswer(ans) {
  const f = mainFace(ans);
  const now = performance.now() / 1000;
  if (f) {
    live.history.push({ t: now, scores: f.scores });
    const g = f.global ? " · global " + f.global.label + " " + Number(f.global.confidence).toFixed(2) + " · " + f.agreement : "";
    liveLabel.textContent = f.label + " " + f.score.toFixed(2);
    liveLabel.style.color = live.colors[f.label] || "#222";
    liveLabel.dataset.label = f.label;
    liveMeta.textContent = ans.n_faces + " face(s)" + g + " · frame answered in " + ans.ms + " ms · sent " + live.sent + ", dropped " + live.dropped;
  } else {
    liveLabel.textContent = "no face";
    liveLabel.style.color = "#666";
    liveLabel.dataset.label = "";
    liveMeta.textContent = "no face in the frame · sent " + live.sent + ", dropped " + live.dropped;
  }
  while (live.history.length && now - live.history[0].t > STRIP_S) live.history.shift();
}

function drawStrip(ctx, W, H) {
  if (live.history.length < 2) return;
  const h = Math.min(60, H * 0.18), y0 = H - h - 6, x0 = 6, w = W - 12, now = performance.now() / 1000;
  ctx.fillStyle = "rgba(255,255,255,0.75)"; ctx.fillRect(x0, y0, w, h);
  for (const c of Object.keys(live.colors)) {
    ctx.strokeStyle = live.colors[c]; ctx.lineWidth = 2; ctx.beginPath();
    live.history.forEach((p, i) => {
      const x = x0 + w * (1 - (now - p.t) / STRIP_S), y = y0 + h - 2 - (h - 4) * (p.scores[c] || 0);
      i ? ctx.lineTo(x, y) : ctx.moveTo(x, y);
    });
    ctx.stroke();
  }
}

function drawLive() {
  if (!live.session || live.frozen) return;  // explainNow / resumeLive stop and restart this loop
  const ctx = camOverlay.getContext("2d");
  const geo = fitOverlay(cam, camOverlay);
  ctx.clearRect(0, 0, camOverlay.width, camOverlay.height);
  if (live.last) drawFaces(ctx, live.last, geo, live.colors, { videoWidth: cam.videoWidth });
  drawStrip(ctx, camOverlay.width, camOverlay.height);
  requestAnimationFrame(drawLive);
}

// "Explain now": freeze the current frame and show its full grounded trace, as for a photo.
async function explainNow() {
  if (!live.session) return;
  const c = grabFrame();
  if (!c) return;
  live.frozen = true;
  cam.pause();
  btnExplain.hidden = true; btnResume.hidden = false;
  const ctx = camOverlay.getContext("2d");
  const geo = fitOverlay(cam, camOverlay);
  ctx.clearRect(0, 0, camOverlay.width, camOverlay.height);
  ctx.drawImage(c, geo.ox, geo.oy, cam.videoWidth * geo.s, cam.videoHeight * geo.s);  // the frozen frame stays on screen
  if (live.last) drawFaces(ctx, live.last, geo, live.colors, { videoWidth: cam.videoWidth });
  setStatus("Explaining the frozen frame …", false);
  const s = live.session;
  let resp, body;
  try {
    const blob = await toJpeg(c);
    for (let i = 0; i < 20; i++) {  // a frame sent just before the freeze may still be in flight (429): wait for it
      resp = await fetch(s.explain_url, { method: "POST", body: blob, headers: { "Content-Type": "image/jpeg", "X-Live-Token": s.token } });
      body = await resp.json();
      if (resp.status !== 429) break;
      await new Promise(r => setTimeout(r, 150));
    }
  } catch (e) { setStatus("Request failed: " + e, true); return; }
  if (!resp.ok) {
    const err = body && body.error ? body.error : { kind: "http_" + resp.status, message: resp.statusText };
    setStatus("Explain now: " + err.message + " (" + err.kind + ")", true);
    return;
  }
  setStatus("Frozen frame: " + body.n_faces + " face(s) — analysed in memory, not stored", false);
  renderResult(body);
}

function resumeLive() {
  live.frozen = false;
  cam.play().catch(() => {});
  btnExplain.hidden = false; btnResume.hidden = true;
  requestAnimationFrame(drawLive);
}

btnStart.addEventListener("click", startLive);
btnStop.addEventListener("click", stopLive);
btnExplain.addEventListener("click", explainNow);
btnResume.addEventListener("click", resumeLive);
window.addEventListener("pagehide", () => {
  const s = live.session;
  if (s && navigator.sendBeacon) navigator.sendBeacon(s.close_url + "?token=" + encodeURIComponent(s.token));
});
