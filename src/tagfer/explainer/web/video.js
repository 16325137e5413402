// tagfer serve, video clips: upload with a progress bar → background job (GET /jobs/{id}) → playback
// with per-frame boxes and label over the video, a timeline of class scores with the segments shaded,
// and each segment's apex trace with its boxes in their colours and roles (grounded.js, as for a
// photo). The job id is kept in the URL (#job=…) and localStorage, so a reload comes back to the
// same result.
"use strict";
const videoView = document.getElementById("video-view");
const player = document.getElementById("player");
const playerOverlay = document.getElementById("player-overlay");
const timeline = document.getElementById("timeline");
const vprogress = document.getElementById("video-progress");
const vprogressText = document.getElementById("video-progress-text");
const VIDEO_EXT = /\.(mp4|webm|mov|m4v|mkv|avi|mpe?g)$/i;
const video = { job: null, frames: [], faces: {}, segments: [], colors: LABEL_COLORS, mainFace: null, file: null, url: null };

function isVideoFile(file) { return (file.type || "").startsWith("video/") || VIDEO_EXT.test(file.name || ""); }

function hideVideo() { videoView.hidden = true; video.job = null; rememberJob(null); player.removeAttribute("src"); player.load(); }

function showProgress(frac, text) {
  document.getElementById("video-progress-box").hidden = false;
  if (frac === null || frac === undefined) vprogress.removeAttribute("value"); else vprogress.value = frac;
  vprogressText.textContent = text;
}

function rememberJob(id) {
  try { localStorage.setItem("tagfer.job", id || ""); } catch (e) { /* storage disabled: the URL still has it */ }
  history.replaceState(null, "", id ? "#job=" + id : location.pathname);
}

function resetVideoView() {
  videoView.hidden = false;
  results.replaceChildren();
  document.getElementById("segments").replaceChildren();
  document.getElementById("downloads").replaceChildren();
  document.getElementById("timeline-legend").replaceChildren();
  document.getElementById("video-now").textContent = "";
  timeline.getContext("2d").clearRect(0, 0, timeline.width, timeline.height);
  video.frames = []; video.segments = []; video.faces = {};
}

// Upload with XMLHttpRequest (fetch cannot report upload progress).
function analyzeVideo(file) {
  if (typeof stopLive === "function") stopLive();
  resetVideoView();
  video.file = file;
  if (video.url) URL.revokeObjectURL(video.url);
  video.url = URL.createObjectURL(file);
  setStatus("Uploading " + file.name + " …", false);
  showProgress(0, "uploading");
  const fd = new FormData();
  fd.append("file", file, file.name);
  const xhr = new XMLHttpRequest();
  xhr.open("POST", "/analyze?wait=0&overlay=false");
  xhr.responseType = "json";
  xhr.upload.onprogress = e => { if (e.lengthComputable) showProgress(0.2 * e.loaded / e.total, "uploading " + Math.round(100 * e.loaded / e.total) + " %"); };
  xhr.onerror = () => { setStatus("Upload failed (network error)", true); showProgress(0, "failed"); };
  xhr.onload = () => {
    const body = xhr.response;
    if (xhr.status !== 200 && xhr.status !== 202) {
      const err = body && body.error ? body.error : { kind: "http_" + xhr.status, message: xhr.statusText || "request failed" };
      setStatus(err.message + " (" + err.kind + ")", true);
      showProgress(0, "refused");
      return;
    }
    if (!body || !body.job) {  // the server read it as an image after all
      videoView.hidden = true;
      setStatus(file.name + ": " + body.n_faces + " face(s)", false);
      renderResult(body);
      return;
    }
    rememberJob(body.job);
    follow(body);
  };
  xhr.send(fd);
}

async function follow(st) {
  video.job = st.job;
  while (st.state === "queued" || st.state === "running") {
    const p = st.progress || {};
    const frac = p.fraction === null || p.fraction === undefined ? null : 0.2 + 0.8 * p.fraction;
    showProgress(frac, st.state === "queued" ? "waiting for the analyser" :
      "analysing: " + p.frames + (p.expected ? " / ~" + p.expected : "") + " frames");
    setStatus("Analysing " + st.name + " …", false);
    await new Promise(r => setTimeout(r, 500));
    if (video.job !== st.job) return;  // another upload started
    let resp;
    try { resp = await fetch(st.status_url); st = await resp.json(); } catch (e) { setStatus("Lost the server: " + e, true); return; }
    if (!resp.ok) { setStatus((st.error ? st.error.message : "job lost") + " — upload the clip again", true); rememberJob(null); return; }
  }
  showProgress(1, "done: " + st.progress.frames + " frames");
  await showResult(st);
}

async function resumeJob(id) {
  videoView.hidden = false;
  setStatus("Loading the earlier result …", false);
  let resp, st;
  try { resp = await fetch("/jobs/" + encodeURIComponent(id)); st = await resp.json(); } catch (e) { setStatus("Request failed: " + e, true); return; }
  if (!resp.ok) { videoView.hidden = true; rememberJob(null); setStatus("The earlier video result is gone (" + (st.error ? st.error.kind : resp.status) + ")", true); return; }
  video.file = null;
  follow(st);
}

function bsearch(frames, t) {  // last frame with frame.t <= t
  let lo = 0, hi = frames.length - 1, best = -1;
  while (lo <= hi) { const m = (lo + hi) >> 1; if (frames[m].t <= t + 1e-3) { best = m; lo = m + 1; } else hi = m - 1; }
  return best;
}

async function showResult(st) {
  video.colors = st.label_colors || LABEL_COLORS;
  video.segments = st.segments || [];
  const s = st.summary || {};
  const msg = st.name + ": " + s.frames_sampled + " frames, " + s.faces_seen + " face(s), " + video.segments.length + " segment(s)";
  setStatus(st.error ? msg + " — " + st.error.message + " (" + st.error.kind + ")" : msg, !!st.error);
  const dl = document.getElementById("downloads");
  dl.replaceChildren("Download: ", el("a", { href: st.records_url, download: "" }, "records (JSONL)"), " · ",
    el("a", { href: st.segments_url, download: "" }, "segments (JSONL)"), " · ", el("a", { href: st.result_url, download: "" }, "everything (JSON)"));
  const text = await (await fetch(st.records_url)).text();
  video.frames = text.split("\n").filter(l => l.trim()).map(l => JSON.parse(l)).filter(r => r.record === "frame" && !r.error && r.frame !== null);
  video.frames.sort((a, b) => a.t - b.t);
  const counts = {};
  video.frames.forEach(r => r.faces.forEach(f => { counts[f.face_id] = (counts[f.face_id] || 0) + 1; }));
  const ids = Object.keys(counts);
  video.mainFace = ids.length ? Number(ids.sort((a, b) => counts[b] - counts[a])[0]) : null;
  player.src = video.file && video.url ? video.url : st.clip_url;
  drawTimeline();
  renderSegments();
}

// ---------------------------------------------------------------- playback overlay
function fitOverlay(vid, cv) {
  const w = vid.clientWidth, h = vid.clientHeight;
  if (cv.width !== w || cv.height !== h) { cv.width = w; cv.height = h; }
  // the picture inside the element (object-fit: contain)
  const vw = vid.videoWidth || 1, vh = vid.videoHeight || 1, s = Math.min(w / vw, h / vh);
  return { s, ox: (w - vw * s) / 2, oy: (h - vh * s) / 2 };
}

function drawFaces(ctx, rec, geo, colors, opts) {
  // rec: a frame record (video) or a live answer; boxes in frame pixels (bbox) and on the canvas (aus)
  const vw = (opts && opts.videoWidth) || rec.width, k = geo.s * (vw / rec.width);  // frame pixels → display
  for (const f of rec.faces) {
    const col = colors[f.label] || "#ffffff";
    const b = f.bbox.map((v, i) => (i % 2 ? geo.oy : geo.ox) + v * k);
    for (const a of (f.aus || []).filter(a => a.active !== false && a.box)) {
      const fb = canvasToFrame(a.box, rec.width, rec.height, rec.canvas).map((v, i) => (i % 2 ? geo.oy : geo.ox) + v * k);
      ctx.strokeStyle = AU_GREEN; ctx.lineWidth = 1.5;
      ctx.strokeRect(fb[0], fb[1], fb[2] - fb[0], fb[3] - fb[1]);
      ctx.fillStyle = AU_GREEN; ctx.font = "11px system-ui, sans-serif";
      ctx.fillText("AU" + a.au, fb[0] + 2, fb[1] + 11);
    }
    ctx.strokeStyle = col; ctx.lineWidth = 3;
    ctx.strokeRect(b[0], b[1], b[2] - b[0], b[3] - b[1]);
    const score = f.score !== undefined ? f.score : (f.scores ? f.scores[f.label] : null);
    const cap = "#" + f.face_id + " " + f.label + (score !== null && score !== undefined ? " " + score.toFixed(2) : "");
    ctx.font = "bold 15px system-ui, sans-serif";
    const tw = ctx.measureText(cap).width + 8, ty = b[1] > 22 ? b[1] - 22 : b[3] + 2;
    ctx.fillStyle = col; ctx.fillRect(b[0], ty, tw, 20);
    ctx.fillStyle = "#fff"; ctx.fillText(cap, b[0] + 4, ty + 15);
  }
}

function drawPlayerOverlay() {
  const ctx = playerOverlay.getContext("2d");
  const geo = fitOverlay(player, playerOverlay);
  ctx.clearRect(0, 0, playerOverlay.width, playerOverlay.height);
  const i = bsearch(video.frames, player.currentTime);
  const now = document.getElementById("video-now");
  if (i < 0) { now.textContent = ""; drawPlayhead(); return; }
  const rec = video.frames[i];
  drawFaces(ctx, rec, geo, video.colors, { videoWidth: player.videoWidth });
  now.textContent = "t = " + rec.t.toFixed(2) + " s · " + (rec.faces.length ? rec.faces.map(f => "#" + f.face_id + " " + f.label).join(", ") : "no face");
  drawPlayhead();
}

function loop() { if (!videoView.hidden && video.frames.length) drawPlayerOverlay(); requestAnimationFrame(loop); }
requestAnimationFrame(loop);

// ---------------------------------------------------------------- timeline
let timelineImage = null;
function drawTimeline() {
  const ctx = timeline.getContext("2d"), W = timeline.width, H = timeline.height, pad = 24;
  ctx.clearRect(0, 0, W, H);
  const fr = video.frames.filter(r => r.faces.some(f => f.face_id === video.mainFace));
  const t1 = Math.max(player.duration || 0, video.frames.length ? video.frames[video.frames.length - 1].t : 1, 1e-3);
  video.t1 = t1;
  const x = t => pad + (W - 2 * pad) * t / t1, y = v => H - pad - (H - 2 * pad) * v;
  for (const s of video.segments.filter(s => s.face_id === video.mainFace)) {
    ctx.fillStyle = (video.colors[s.label] || "#ccc") + "40";
    ctx.fillRect(x(s.onset), pad, Math.max(2, x(s.offset) - x(s.onset)), H - 2 * pad);
    ctx.strokeStyle = video.colors[s.label] || "#ccc"; ctx.setLineDash([4, 3]);
    ctx.beginPath(); ctx.moveTo(x(s.apex), pad); ctx.lineTo(x(s.apex), H - pad); ctx.stroke(); ctx.setLineDash([]);
  }
  ctx.strokeStyle = "#bbb"; ctx.lineWidth = 1; ctx.strokeRect(pad, pad, W - 2 * pad, H - 2 * pad);
  ctx.fillStyle = "#555"; ctx.font = "11px system-ui, sans-serif";
  ctx.fillText("0 s", pad, H - 6); ctx.fillText(t1.toFixed(1) + " s", W - pad - 30, H - 6); ctx.fillText("1", 8, pad + 4); ctx.fillText("0", 8, H - pad);
  const labels = Object.keys(video.colors);
  for (const c of labels) {
    ctx.strokeStyle = video.colors[c]; ctx.lineWidth = 1.6; ctx.beginPath();
    fr.forEach((r, j) => { const f = r.faces.find(f => f.face_id === video.mainFace); const px = x(r.t), py = y(f.scores[c] || 0); j ? ctx.lineTo(px, py) : ctx.moveTo(px, py); });
    ctx.stroke();
  }
  timelineImage = ctx.getImageData(0, 0, W, H);
  const lg = document.getElementById("timeline-legend");
  lg.replaceChildren(...labels.map(c => el("span", { class: "lg" }, el("span", { class: "swatch", style: "background-color: " + video.colors[c] }), c)),
    el("span", { class: "meta" }, video.mainFace === null ? " (no face)" : " · face #" + video.mainFace));
}

function drawPlayhead() {
  if (!timelineImage) return;
  const ctx = timeline.getContext("2d"), W = timeline.width, H = timeline.height, pad = 24;
  ctx.putImageData(timelineImage, 0, 0);
  const px = pad + (W - 2 * pad) * player.currentTime / (video.t1 || 1);
  ctx.strokeStyle = "#000"; ctx.lineWidth = 1; ctx.beginPath(); ctx.moveTo(px, pad - 4); ctx.lineTo(px, H - pad + 4); ctx.stroke();
}

timeline.addEventListener("click", e => {
  const r = timeline.getBoundingClientRect(), pad = 24 * r.width / timeline.width;
  const t = (e.clientX - r.left - pad) / (r.width - 2 * pad) * (video.t1 || 0);
  if (isFinite(t)) player.currentTime = Math.max(0, t);
});
player.addEventListener("loadedmetadata", () => { if (video.frames.length) drawTimeline(); });

// ---------------------------------------------------------------- segments and their apex traces
// A segment record read as a photo's analysis for grounded.js: its apex trace's views (global,
// local with the steps, agreement, decision: absent in older records and for facs-rules) and the
// AU before each box (the server's view of the trace).
function segmentAnalysis(s) {
  return { global: s.global, local: s.local, agreement: s.agreement, decision: s.decision, box_aus: s.view ? s.view.box_aus : null };
}

function renderSegments() {
  const box = document.getElementById("segments");
  box.replaceChildren(el("h2", { class: "small" }, video.segments.length ? "Segments" : "No segment"));
  const thumbs = [];
  video.segments.forEach((s, i) => {
    const cv = el("canvas", { class: "apex", width: "320", height: "240", "aria-label": "apex frame of segment " + (i + 1) });
    const head = el("div", { class: "label", style: "color: " + (video.colors[s.label] || "#222") }, s.label);
    const meta = el("div", { class: "meta" }, "face #" + s.face_id + " · onset " + s.onset.toFixed(2) + " s · apex " + s.apex.toFixed(2) +
      " s · offset " + s.offset.toFixed(2) + " s · peak " + (s.peak !== undefined ? Number(s.peak).toFixed(2) : "?") +
      (s.trace_label && s.trace_label !== s.label ? " · apex frame reads " + s.trace_label : ""));
    const right = el("div", {}, head, meta);
    const apex = segmentAnalysis(s);  // the apex trace as a photo's analysis: its views and box AUs
    const grounded = renderGrounded(apex);  // grounded.js: global impression, agreement, local reading
    if (grounded) right.append(grounded);
    if (s.view) {
      const ul = el("ul", { class: "legend" });
      s.view.boxes.forEach((b, j) => ul.append(el("li", { "data-box": String(j) }, el("span", { class: "swatch", style: "background-color: " + s.view.box_colors[j] }),
        s.view.box_aus[j] !== null ? "AU" + s.view.box_aus[j] : "box " + (j + 1))));
      right.append(ul, renderTrace({ segments: s.view.segments, box_colors: s.view.box_colors }));
    }
    const jump = el("button", { type: "button", class: "jump" }, "play from onset");
    jump.addEventListener("click", () => { player.currentTime = s.onset; player.play(); });
    right.append(jump);
    const section = el("section", { class: "face segment", "data-segment": String(i), "data-label": s.label }, el("div", {}, cv), right);
    decorateBoxes(section, apex);  // grounded.js: each box's role in the apex trace's local steps, as for a photo
    box.append(section);
    thumbs.push([cv, s]);
  });
  drawApexFrames(thumbs);
}

// Seek a second, hidden <video> to each apex in turn and draw the frame with the trace's boxes.
async function drawApexFrames(thumbs) {
  if (!thumbs.length) return;
  const v = document.createElement("video");
  v.muted = true; v.preload = "auto"; v.src = player.src;
  await new Promise(r => { v.addEventListener("loadeddata", r, { once: true }); v.addEventListener("error", r, { once: true }); });
  if (v.error) return;
  for (const [cv, s] of thumbs) {
    await new Promise(r => { v.addEventListener("seeked", r, { once: true }); v.currentTime = Math.max(0, s.apex + 0.001); });
    const ctx = cv.getContext("2d"), vw = v.videoWidth, vh = v.videoHeight, k = Math.min(cv.width / vw, cv.height / vh);
    const ox = (cv.width - vw * k) / 2, oy = (cv.height - vh * k) / 2;
    ctx.fillStyle = "#000"; ctx.fillRect(0, 0, cv.width, cv.height);
    ctx.drawImage(v, ox, oy, vw * k, vh * k);
    const rec = video.frames[bsearch(video.frames, s.apex)] || { width: vw, height: vh, canvas: s.canvas || 512 };
    (s.view ? s.view.boxes : []).forEach((b, j) => {
      if (!b) return;
      const fb = canvasToFrame(b, rec.width || vw, rec.height || vh, s.canvas || rec.canvas || 512).map((p, i) => (i % 2 ? oy : ox) + p * k * (vw / (rec.width || vw)));
      ctx.strokeStyle = s.view.box_colors[j]; ctx.lineWidth = 2.5; ctx.strokeRect(fb[0], fb[1], fb[2] - fb[0], fb[3] - fb[1]);
    });
    cv.dataset.drawn = "1";
  }
}

// A reload comes back to the last clip's result.
(function resumeFromUrl() {
  const m = /[#&]job=([0-9a-f]{8,64})/.exec(location.hash);
  let id = m ? m[1] : null;
  if (!id) { try { id = localStorage.getItem("tagfer.job") || null; } catch (e) { id = null; } }
  if (id) resumeJob(id);
})();
