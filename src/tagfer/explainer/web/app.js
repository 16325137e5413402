// tagfer serve: upload → POST /analyze → overlays, highlighted traces, labels and scores.
"use strict";
const drop = document.getElementById("drop");
const input = document.getElementById("file");
const statusEl = document.getElementById("status");
const results = document.getElementById("results");
const DETECTOR = "#00c846";

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k === "style") e.style.cssText = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function setStatus(text, isError) {
  statusEl.textContent = text;
  statusEl.className = isError ? "error" : "";
}

// A degenerate output stays small: the rules of tagfer.explainer.display.collapse_segments (same
// constants). Runs of more than MAX_BLANK empty lines become one marker line; the text stops after
// MAX_CHARS characters or MAX_LINES lines (the JSON keeps it all); a box is shown whole or not at all.
const MAX_CHARS = 4000, MAX_LINES = 60, MAX_BLANK = 2;
function collapseSegments(segs) {
  const merged = [];
  for (const s of segs) {
    const last = merged[merged.length - 1];
    if (last && s.box === null && last.box === null) last.text += s.text; else merged.push({ text: s.text, box: s.box });
  }
  const blank = new RegExp("\\n(?:[ \\t\\r\\f\\v]*\\n){" + (MAX_BLANK + 1) + ",}", "g");
  const pieces = [];
  for (const s of merged) {
    if (s.box !== null) { pieces.push(s); continue; }
    let pos = 0;
    for (const m of s.text.matchAll(blank)) {
      if (m.index > pos) pieces.push({ text: s.text.slice(pos, m.index), box: null });
      const n = m[0].split("\n").length - 2;
      pieces.push({ text: "\n", box: null }, { text: "⋯ " + n.toLocaleString("en-US") + " empty line" + (n === 1 ? "" : "s") + " ⋯", box: null, note: true }, { text: "\n", box: null });
      pos = m.index + m[0].length;
    }
    if (pos < s.text.length) pieces.push({ text: s.text.slice(pos), box: null });
  }
  const out = [];
  let chars = 0, lines = 0;
  for (let i = 0; i < pieces.length; i++) {
    const p = pieces[i], t = p.text;
    if (p.note) { out.push(p); continue; }
    let cut = Math.min(t.length, Math.max(0, MAX_CHARS - chars));
    const breaksLeft = MAX_LINES - 1 - lines;
    let nl = -1;
    if (breaksLeft < 0) nl = 0; else { for (let k = 0; k <= breaksLeft; k++) { nl = t.indexOf("\n", nl + 1); if (nl < 0) break; } }
    if (nl >= 0) cut = Math.min(cut, nl);
    if (cut < t.length && p.box !== null) cut = 0;
    if (cut > 0) { out.push({ text: t.slice(0, cut), box: p.box }); chars += cut; lines += t.slice(0, cut).split("\n").length - 1; }
    if (cut < t.length) {
      let left = t.length - cut;
      for (const q of pieces.slice(i + 1)) if (!q.note) left += q.text.length;
      const lead = /\n[ \t\r\f\v]*$/.test(out.map(q => q.text).join("")) ? "" : "\n";  // never an extra blank line
      out.push({ text: lead + "⋯ " + left.toLocaleString("en-US") + " more character" + (left === 1 ? "" : "s") + " (the full output is in the JSON) ⋯", box: null, note: true });
      break;
    }
  }
  return out;
}

function renderTrace(a) {
  const pre = el("div", { class: "trace" });
  for (const seg of collapseSegments(a.segments)) {
    if (seg.note) { pre.append(el("span", { class: "note" }, seg.text)); continue; }
    if (seg.box === null) { pre.append(document.createTextNode(seg.text)); continue; }
    const color = a.box_colors[seg.box];
    pre.append(el("mark", { class: "bbox", "data-box": String(seg.box), style: "background-color: " + color }, seg.text));
  }
  return pre;
}

function renderLegend(a) {
  const ul = el("ul", { class: "legend" });
  a.boxes.forEach((b, i) => {
    const cap = a.box_aus[i] !== null ? "AU" + a.box_aus[i] : "box " + (i + 1);
    ul.append(el("li", { "data-box": String(i) },
      el("span", { class: "swatch", style: "background-color: " + a.box_colors[i] }), cap + (b ? " [" + b.join(", ") + "]" : " (unreadable)")));
  });
  const active = a.aus.filter(d => d.active);
  ul.append(el("li", { class: "detector" }, el("span", { class: "swatch", style: "background-color: " + DETECTOR }),
    "detector: " + (active.length ? active.map(d => "AU" + d.au + " " + d.score.toFixed(2)).join(", ") : "no activated AU")));
  return ul;
}

function renderScores(a) {
  if (!a.scores) return el("p", { class: "meta" }, "class scores: not available for this engine");
  const t = el("table", { class: "scores" });
  Object.entries(a.scores).sort((x, y) => y[1] - x[1]).forEach(([c, v]) => {
    t.append(el("tr", {}, el("td", {}, c), el("td", {}, v.toFixed(3)),
      el("td", {}, el("span", { class: "bar", style: "width: " + Math.round(v * 160) + "px" }))));
  });
  return t;
}

function renderResult(r) {
  results.replaceChildren();
  r.analyses.forEach((a, i) => {
    const left = el("div", {});
    if (r.overlays && r.overlays[i]) left.append(el("img", { class: "overlay", alt: "overlay of face " + (i + 1), src: r.overlays[i] }));
    const right = el("div", {},
      el("div", { class: "label" }, a.label || "(no readable answer)"),
      a.well_formed ? el("div", { class: "meta" }, "well-formed trace · R_fmt " + a.r_fmt + " · R_AU " + (a.r_au === null ? "skipped" : a.r_au.toFixed(2)))
                    : el("div", { class: "malformed" }, "malformed output: " + a.violations.join(", ")),
      el("div", { class: "meta" }, "face " + (i + 1) + " of " + r.n_faces + " · engine " + a.engine),
      renderLegend(a), renderTrace(a), renderScores(a));
    const grounded = renderGrounded(a);  // grounded.js: global impression, agreement, local reading
    if (grounded) right.insertBefore(grounded, right.children[1]);
    const section = el("section", { class: "face", "data-face": String(i) }, left, right);
    decorateBoxes(section, a);  // grounded.js: each box's role in the local steps
    results.append(section);
  });
}

async function analyze(file) {
  if (typeof isVideoFile === "function" && isVideoFile(file)) return analyzeVideo(file);  // video.js
  if (typeof hideVideo === "function") hideVideo();
  setStatus("Analysing " + file.name + " …", false);
  results.replaceChildren();
  const fd = new FormData();
  fd.append("file", file, file.name);
  let resp, body;
  try {
    resp = await fetch("/analyze", { method: "POST", body: fd });
    body = await resp.json();
  } catch (e) {
    setStatus("Request failed: " + e, true);
    return;
  }
  if (!resp.ok) {
    const err = body && body.error ? body.error : { kind: "http_" + resp.status, message: resp.statusText };
    setStatus(err.message + " (" + err.kind + ")", true);
    return;
  }
  setStatus(file.name + ": " + body.n_faces + " face(s)", false);
  renderResult(body);
}

input.addEventListener("change", () => { if (input.files.length) analyze(input.files[0]); });
drop.addEventListener("dragover", e => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", e => {
  e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files.length) analyze(e.dataTransfer.files[0]);
});
