// tagfer serve: the default engine's two views of a face (global impression, AU evidence) and
// helpers shared by the photo, video and live views. Loaded before app.js.
"use strict";

// The label colours of the video plot (tagfer.au.video_render.LABEL_COLORS); the server sends its own too.
const LABEL_COLORS = { anger: "#d62728", disgust: "#8c564b", fear: "#9467bd", happiness: "#ff7f0e",
  neutral: "#7f7f7f", sadness: "#1f77b4", surprise: "#17becf" };
const AU_GREEN = "#00c846";

// A box on the canvas (the frame letterboxed onto canvas × canvas, centred) → frame pixels.
function canvasToFrame(box, w, h, canvas) {
  const s = canvas / Math.max(w, h), ox = (canvas - w * s) / 2, oy = (canvas - h * s) / 2;
  return [(box[0] - ox) / s, (box[1] - oy) / s, (box[2] - ox) / s, (box[3] - oy) / s];
}

// The role of box i in the local steps: "support", "for <class>" (an AU that argues for another
// class) or "isolated" (an AU of no prototype); null when the engine gives no steps.
function boxRole(a, i) {
  if (!a.local || !Array.isArray(a.local.steps) || !a.box_aus) return null;
  const au = a.box_aus[i];
  const step = a.local.steps.find(s => s.au === au);
  if (!step) return null;
  if (step.role === "support") return "support";
  if (step.role === "contrary") return "for " + step.for;
  return step.role;
}

function fmt(v) { return typeof v === "number" ? v.toFixed(2) : "?"; }

// "global impression (fer): happiness 0.99", the agree/disagree badge and the local reading.
function renderGrounded(a) {
  if (!a.global) return null;
  const g = a.global, d = a.decision || {};
  const box = document.createElement("div");
  box.className = "grounded";
  const line = document.createElement("div");
  line.className = "global";
  line.textContent = "global impression (" + (g.net || "net") + "): " + g.label + " " + fmt(g.confidence);
  const badge = document.createElement("span");
  badge.className = "badge " + (a.agreement === "agree" ? "agree" : "disagree");
  badge.textContent = (a.agreement || "?") + " · decided by " + (d.decided_by || "?") + (d.rule ? " (" + d.rule + ")" : "");
  const local = document.createElement("div");
  local.className = "local";
  const lab = a.local && a.local.label ? a.local.label : "none";
  const ev = a.local && a.local.evidence && a.local.label in a.local.evidence ? " (AU evidence " + fmt(a.local.evidence[a.local.label]) + ")" : "";
  local.textContent = "local reading (AU evidence): " + lab + ev;
  box.append(line, badge, local);
  return box;
}

// Give every highlighted box of a face's trace and legend its role in the local steps.
function decorateBoxes(root, a) {
  root.querySelectorAll("mark.bbox[data-box]").forEach(m => {
    const r = boxRole(a, Number(m.dataset.box));
    if (r) { m.dataset.role = r; m.title = r; }
  });
  root.querySelectorAll(".legend li[data-box]").forEach(li => {
    const r = boxRole(a, Number(li.dataset.box));
    if (r && !li.querySelector(".role")) {
      const s = document.createElement("span");
      s.className = "role role-" + r.split(" ")[0];
      s.textContent = r;
      li.append(" ", s);
    }
  });
}
