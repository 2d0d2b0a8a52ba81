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

function drawScale(id, max) {  // the colour scale: 0 at the left, ``max`` at the right
  const c = document.getElementById(id), ctx = c.getContext("2d");
  for (let x = 0; x < c.width; x++) { ctx.fillStyle = heat(x, c.width - 1); ctx.fillRect(x, 0, 1, c.height); }
  const label = document.getElementById(id + "-max");
  label.textContent = max; label.dataset.max = max;
}

function labelStep(cell, minPx) { return Math.max(1, Math.ceil(minPx / Math.max(1, cell))); }

function drawExpertMap(s, scope) {
  const rows = scope === "window" ? s.expert_window : s.expert_total;
  const c = document.getElementById("expert-map"), ctx = c.getContext("2d");
  const L = rows.length, E = s.num_experts, left = 40, top = 4, bottom = 26;
  const cw = Math.max(1, Math.floor((c.width - left) / E)), ch = Math.max(2, Math.floor((c.height - top - bottom) / Math.max(1, L)));
  const max = Math.max(1, ...rows.flat());
  ctx.clearRect(0, 0, c.width, c.height);
  ctx.font = "10px sans-serif"; ctx.fillStyle = "#222";
  const ly = labelStep(ch, 10), ex = labelStep(cw, 18), labels = [];
  rows.forEach((row, i) => {
    if (i % ly === 0) ctx.fillText("L" + s.layers[i], 2, top + i * ch + Math.min(ch, 10) - 1);
    row.forEach((v, e) => { ctx.fillStyle = heat(v, max); ctx.fillRect(left + e * cw, top + i * ch, cw, ch); });
    ctx.fillStyle = "#222";
  });
  const base = top + L * ch;
  for (let e = 0; e < E; e += ex) { ctx.fillText(String(e), left + e * cw, base + 11); labels.push(e); }
  ctx.fillText("expert", left, base + 23); ctx.fillText("layer", 2, base + 23);
  drawScale("expert-scale", max);
  c.dataset.counts = JSON.stringify(rows);
  c.dataset.layers = JSON.stringify(s.layers);
  c.dataset.expertLabels = JSON.stringify(labels);
  c.onmousemove = (ev) => {
    const e = Math.floor((ev.offsetX - left) / cw), i = Math.floor((ev.offsetY - top) / ch), tip = document.getElementById("expert-tip");
    if (i < 0 || i >= L || e < 0 || e >= E) { tip.style.display = "none"; return; }
    tip.textContent = `layer ${s.layers[i]} expert ${e}: ${rows[i][e]} pairs (${scopeName(scope)})`;
    tip.style.left = (ev.offsetX + 20) + "px"; tip.style.top = (ev.offsetY + 30) + "px"; tip.style.display = "block";
  };
}

function scopeName(scope) { return scope === "window" ? "the latest window" : "since start"; }

function drawRankMap(s, scope) {
  const rows = scope === "window" ? s.rank_window : s.rank_total;
  const svg = document.getElementById("rank-map");
  svg.replaceChildren();
  const L = rows.length, R = rows.length ? rows[0].length : 0, left = 40, top = 16;
  const cw = Math.max(4, Math.floor((460 - left) / Math.max(1, R))), ch = Math.max(3, Math.floor((240 - top) / Math.max(1, L)));
  const max = Math.max(1, ...rows.flat()), rx = labelStep(cw, 40), ly = labelStep(ch, 10);
  el("text", {x: 2, y: 11, "font-size": 9}, svg).textContent = "layer";
  for (let r = 0; r < R; r += rx) {
    el("text", {x: left + r * cw + 2, y: 11, "font-size": 9, class: "rank-label"}, svg).textContent = `EP ${r} (rank ${s.ranks[0][r]})`;
  }
  rows.forEach((row, i) => {
    if (i % ly === 0) el("text", {x: 2, y: top + i * ch + Math.min(ch, 10) - 1, "font-size": 9}, svg).textContent = "L" + s.layers[i];
    row.forEach((v, r) => {
      const cell = el("rect", {x: left + r * cw, y: top + i * ch, width: cw - 1, height: ch - 1, fill: heat(v, max),
        class: "rank-cell", "data-layer": s.layers[i], "data-rank": s.ranks[i][r], "data-count": v}, svg);
      el("title", {}, cell).textContent = `layer ${s.layers[i]} EP rank ${r} (rank ${s.ranks[i][r]}): ${v} pairs`;
    });
  });
  drawScale("rank-scale", max);
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
    const measured = r.measured_after === null ? "not measured yet" : r.measured_after.toFixed(3);
    el("title", {}, line).textContent = `layer ${r.layer} at step ${r.step}: ${r.result}; ${r.moves} slot(s) in ${r.chunks} chunk(s), ` +
      `longest stall ${(1e3 * r.max_stall_s).toFixed(1)} ms; balancedness ${r.before.toFixed(3)} -> predicted ${r.after.toFixed(3)}, measured ${measured}`;
  });
  document.getElementById("history-note").textContent = `dashed lines: layers rebalanced (red: applied, grey: backed off or failed); ` +
    `${s.checks_skipped} check(s) found no layer worth moving`;
}

function drawHottest(s) {
  document.getElementById("hottest-scope").textContent = scopeName(s.hottest_scope);
  const body = document.querySelector("#hottest tbody");
  body.replaceChildren(...s.hottest.map((h) => {
    const tr = document.createElement("tr");
    tr.innerHTML = `<td>${h.layer}</td><td>${h.expert}</td><td>${h.tokens}</td><td>${(100 * h.share).toFixed(1)}%</td>`;
    return tr;
  }));
}

function slots(phy2log, copies, moved) {
  const div = document.createElement("div");
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

function layerBlock(cls, title) {
  const block = document.createElement("div"); block.className = cls;
  const h = document.createElement("h3"); h.textContent = title; block.appendChild(h);
  return block;
}

function drawPlacement(s) {
  const placement = document.getElementById("placement"), plan = document.getElementById("plan");
  if (!s.placement) {
    placement.textContent = s.num_ranks > 1 ? "the replicas' placements differ (each rebalances on its own): pick a replica above"
      : "every rank holds every expert (no expert parallelism)";
    plan.textContent = s.num_ranks > 1 ? "see each replica" : "nothing to plan (no expert parallelism)"; return;
  }
  placement.replaceChildren(...s.placement.map((layer, i) => {
    const block = layerBlock("layer-placement", `layer ${s.layers[i]}: balancedness ${s.balancedness_placement[i].toFixed(3)} ` +
      `over ${s.placement_pairs[i]} pairs since its placement began`);
    block.dataset.layer = s.layers[i];
    block.appendChild(slots(layer, s.copies[i], null));
    return block;
  }));
  if (!s.plan) { plan.textContent = "nothing to plan yet (no load)"; return; }
  const p = s.plan;
  plan.replaceChildren(...p.phy2log.map((layer, i) => {
    const held = {};
    layer.flat().forEach((e) => { held[e] = (held[e] || 0) + 1; });
    const copies = Object.keys(held).filter((e) => held[e] > 1).map(Number);
    const moved = layer.map((row, r) => row.map((e, k) => s.placement[i][r][k] !== e));
    const block = layerBlock("layer-plan", `layer ${s.layers[i]}: balancedness now ${p.balancedness_now[i].toFixed(3)} -> ` +
      `predicted ${p.balancedness_after[i].toFixed(3)} (heaviest rank ${(100 * p.predicted_gain[i]).toFixed(1)}% faster); ` +
      `${p.moves[i]} slot(s) would move`);
    block.appendChild(slots(layer, copies, moved));
    return block;
  }));
}

function pickReplica(states) {  // the first state sums every replica; one replica: only that one
  const select = document.getElementById("replica"), chosen = select.value;
  document.getElementById("replica-pick").hidden = states.length < 2;
  if (select.options.length !== states.length) {
    select.replaceChildren(...states.map((st, i) => { const o = document.createElement("option"); o.value = i; o.textContent = st.label; return o; }));
  }
  const i = Math.min(Number(chosen || 0), states.length - 1);
  select.value = i;
  return states[i];
}

function render() {
  if (!latest) return;
  const scope = document.getElementById("scope").value, s = pickReplica(latest.states);
  document.querySelectorAll(".scope-name").forEach((n) => { n.textContent = scopeName(scope); });
  drawExpertMap(s, scope); drawRankMap(s, scope); drawHistory(s); drawHottest(s); drawPlacement(s);
  const worst = (b) => b.length ? Math.min(...b) : 1;
  document.getElementById("status").textContent = `${s.label}, step ${s.step} - ${new Date(s.time * 1000).toLocaleTimeString()} - ` +
    `worst layer balancedness: latest window (${s.window_steps} steps, ${s.window_s.toFixed(1)} s) ${worst(s.balancedness).toFixed(3)}, ` +
    `since start ${worst(s.balancedness_total).toFixed(3)}`;
  document.body.dataset.step = s.step;
  document.body.dataset.replicas = latest.states.length;
}

document.getElementById("scope").onchange = render;
document.getElementById("replica").onchange = render;
const events = new EventSource("/dashboard/events" + suffix);
events.addEventListener("load", (ev) => { latest = JSON.parse(ev.data); render(); });
events.onerror = () => { document.getElementById("status").textContent = "disconnected; retrying..."; };
