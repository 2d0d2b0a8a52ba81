// moeserve expert-load dashboard: plain JS, canvas and SVG; state arrives as server-sent events.
"use strict";
const key = new URLSearchParams(location.search).get("key");
const suffix = key ? "?key=" + encodeURIComponent(key) : "";
const SVG = "http://www.w3.org/2000/svg";
let latest = null;

function heat(v, max) {  // white -> orange -> dark red
  const t = max > 0 ? Math.min(1, v / max) : 0;
  const r = 255 - Math.round(60 * t * t), g = Math.round(255 * (1 - t)), b = Math.round(255 * (1 - t) * (1 - t));
  return `rgb(${r},${g},${b})`;
}

function el(tag, attrs, parent) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (parent) parent.appendChild(e);
  return e;
}

function drawExpertMap(s, scope) {
  const rows = scope === "window" ? s.expert_window : s.expert_total;
  const c = document.getElementById("expert-map"), ctx = c.getContext("2d");
  const L = rows.length, E = s.num_experts, left = 40, top = 4;
  const cw = Math.max(1, Math.floor((c.width - left) / E)), ch = Math.max(2, Math.floor((c.height - top - 4) / Math.max(1, L)));
  const max = Math.max(1, ...rows.flat());
  ctx.clearRect(0, 0, c.width, c.height);
  ctx.font = "10px sans-serif"; ctx.fillStyle = "#222";
  rows.forEach((row, i) => {
    if (ch >= 9) ctx.fillText("L" + s.layers[i], 2, top + i * ch + ch - 2);
    row.forEach((v, e) => { ctx.fillStyle = heat(v, max); ctx.fillRect(left + e * cw, top + i * ch, cw, ch); });
    ctx.fillStyle = "#222";
  });
  c.dataset.counts = JSON.stringify(rows);
  c.dataset.layers = JSON.stringify(s.layers);
  c.onmousemove = (ev) => {
    const e = Math.floor((ev.offsetX - left) / cw), i = Math.floor((ev.offsetY - top) / ch), tip = document.getElementById("expert-tip");
    if (i < 0 || i >= L || e < 0 || e >= E) { tip.style.display = "none"; return; }
    tip.textContent = `layer ${s.layers[i]} expert ${e}: ${rows[i][e]} tokens`;
    tip.style.left = (ev.offsetX + 20) + "px"; tip.style.top = (ev.offsetY + 30) + "px"; tip.style.display = "block";
  };
}

function drawRankMap(s, scope) {
  const rows = scope === "window" ? s.rank_window : s.rank_total;
  const svg = document.getElementById("rank-map");
  svg.replaceChildren();
  const L = rows.length, R = rows.length ? rows[0].length : 0, left = 40, top = 16;
  const cw = Math.max(4, Math.floor((460 - left) / Math.max(1, R))), ch = Math.max(3, Math.floor((240 - top) / Math.max(1, L)));
  const max = Math.max(1, ...rows.flat());
  for (let r = 0; r < R && cw >= 14; r++) el("text", {x: left + r * cw + 2, y: 11, "font-size": 9}, svg).textContent = "r" + s.ranks[0][r];
  rows.forEach((row, i) => {
    if (ch >= 9) el("text", {x: 2, y: top + i * ch + ch - 2, "font-size": 9}, svg).textContent = "L" + s.layers[i];
    row.forEach((v, r) => {
      const cell = el("rect", {x: left + r * cw, y: top + i * ch, width: cw - 1, height: ch - 1, fill: heat(v, max),
        class: "rank-cell", "data-layer": s.layers[i], "data-rank": s.ranks[i][r], "data-count": v}, svg);
      el("title", {}, cell).textContent = `layer ${s.layers[i]} rank ${s.ranks[i][r]}: ${v} tokens`;
    });
  });
}

function drawHistory(s) {
  const svg = document.getElementById("history");
  svg.replaceChildren();
  const h = s.history, W = 460, H = 220, left = 30;
  el("line", {x1: left, y1: 10, x2: left, y2: H, stroke: "#999"}, svg);
  [0, 0.5, 1].forEach((v) => el("text", {x: 2, y: H - v * (H - 10) + 3, "font-size": 9}, svg).textContent = v.toFixed(1));
  if (!h.length) return;
  const t0 = h[0][0], t1 = Math.max(t0 + 1, h[h.length - 1][0]);
  const x = (t) => left + (W - left - 5) * (t - t0) / (t1 - t0), y = (v) => H - v * (H - 10);
  el("polyline", {points: h.map((p) => `${x(p[0])},${y(p[2])}`).join(" "), fill: "none", stroke: "#23395d", "stroke-width": 1.5}, svg);
  s.rebalances.filter((r) => r.time >= t0).forEach((r) => {
    const line = el("line", {x1: x(r.time), x2: x(r.time), y1: 10, y2: H, stroke: r.result === "applied" ? "#c0392b" : "#999",
      "stroke-dasharray": "4 3", class: "rebalance-mark"}, svg);
    el("title", {}, line).textContent = `rebalance at step ${r.step}: ${r.result}, ${r.seconds.toFixed(3)} s`;
  });
}

function drawHottest(s) {
  const body = document.querySelector("#hottest tbody");
  body.replaceChildren(...s.hottest.map((h) => {
    const tr = document.createElement("tr");
    tr.innerHTML = `<td>${h.layer}</td><td>${h.expert}</td><td>${h.tokens}</td><td>${(100 * h.share).toFixed(1)}%</td>`;
    return tr;
  }));
}

function slots(phy2log, copies, moved) {
  const div = document.createElement("div");
  if (!phy2log) { div.textContent = "every rank holds every expert (no expert parallelism)"; return div; }
  phy2log.forEach((row, r) => {
    const line = document.createElement("div"); line.className = "rank"; line.textContent = `rank ${r}: `;
    row.forEach((e, i) => {
      const span = document.createElement("span");
      span.className = "slot" + (copies.includes(e) ? " copy" : "") + (moved && moved[r][i] ? " moved" : "");
      span.textContent = e; line.appendChild(span);
    });
    div.appendChild(line);
  });
  return div;
}

function drawPlacement(s) {
  document.getElementById("placement").replaceChildren(slots(s.placement, s.copies, null));
  const plan = document.getElementById("plan");
  if (!s.plan) { plan.textContent = "nothing to plan yet (no expert parallelism, or no load)"; return; }
  const p = s.plan, held = {};
  p.phy2log.flat().forEach((e) => { held[e] = (held[e] || 0) + 1; });
  const copies = Object.keys(held).filter((e) => held[e] > 1).map(Number);
  const moved = p.phy2log.map((row, r) => row.map((e, i) => !s.placement || s.placement[r][i] !== e));
  const text = document.createElement("p");
  text.textContent = `balancedness now ${p.balancedness_now.toFixed(3)} -> predicted ${p.balancedness_after.toFixed(3)}; ${p.moves} slot(s) would move`;
  plan.replaceChildren(text, slots(p.phy2log, copies, moved));
}

function render() {
  if (!latest) return;
  const scope = document.getElementById("scope").value, s = latest;
  drawExpertMap(s, scope); drawRankMap(s, scope); drawHistory(s); drawHottest(s); drawPlacement(s);
  const bal = s.balancedness.length ? Math.min(...s.balancedness) : 1;
  document.getElementById("status").textContent = `step ${s.step} - ${new Date(s.time * 1000).toLocaleTimeString()} - worst layer balancedness ${bal.toFixed(3)}`;
  document.body.dataset.step = s.step;
}

document.getElementById("scope").onchange = render;
const events = new EventSource("/dashboard/events" + suffix);
events.addEventListener("load", (ev) => { latest = JSON.parse(ev.data); render(); });
events.onerror = () => { document.getElementById("status").textContent = "disconnected; retrying..."; };
