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

function renderTrace(a) {
  const pre = el("div", { class: "trace" });
  for (const seg of a.segments) {
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
