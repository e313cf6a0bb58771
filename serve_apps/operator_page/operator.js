// The operator's page: draws GET operator/state; a switch is PUT operating-point with the version it was made
// against (409: someone switched meanwhile). Plain DOM and SVG, no dependencies; every server string is set as
// text, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
let state = null;

function el(tag, attrs = {}, ...children) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v;
    else if (k === "onclick") node.addEventListener("click", v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

const fmt = (x, d = 3) => (x === null || x === undefined || Number.isNaN(x) ? "—" : Number(x).toFixed(d));
const when = (t) => (t ? new Date(t * 1000).toISOString().replace("T", " ").slice(0, 19) : "—");
const vec = (w) => (Array.isArray(w) ? "(" + w.map((x) => fmt(x, 3)).join(", ") + ")" : "—");
const point = (p) => (!p ? "—" : p.lambda !== null && p.lambda !== undefined ? `λ = ${fmt(p.lambda, 2)}` : `weights ${vec(p.weights)}`);

function rows(tbody, list, cells) {
  tbody.replaceChildren(...list.map((item) => el("tr", {}, ...cells(item).map((c) => (c instanceof Node ? el("td", {}, c) : el("td", { text: String(c) }))))));
}

let loading = false; // one load at a time: a slow server is not sent a pile of them

async function load() {
  if (loading) return;
  loading = true;
  try {
    const r = await fetch("operator/state", { cache: "no-store" });
    if (!r.ok) throw new Error(`GET operator/state answered ${r.status}`);
    state = await r.json();
    $("load-error").hidden = true;
    draw();
  } catch (e) {
    $("load-error").textContent = `could not load the state: ${e.message}`;
    $("load-error").hidden = false;
  } finally {
    loading = false;
  }
}

function draw() {
  $("app-name").textContent = `app ${state.app}`;
  $("updated").textContent = `as of ${when(state.generated_at)} UTC`;
  $("notes").replaceChildren(...state.notes.map((n) => el("li", { text: n })));
  drawOperatingPoint(state.operating_point);
  drawFrontier(state.frontier, state.operating_point);
  drawExperiment(state.experiment);
  drawCycle(state.cycle);
  drawInnerReward(state.inner_reward);
}

// ---- the operating point ------------------------------------------------------------------------------------
function drawOperatingPoint(op) {
  $("operating-point-panel").hidden = !op;
  if (!op) return;
  $("op-current").textContent = `${point(op)} · version ${op.version} · mode ${op.mode}`;
  const held = Object.values(op.replicas || {});
  const current = held.filter((v) => v >= op.version).length;
  $("op-replicas").textContent = `${current} of ${held.length} live replicas serve version ${op.version}`;
  if (document.activeElement !== $("op-lambda") && $("op-lambda").value === "" && op.lambda !== null) $("op-lambda").value = op.lambda;
  rows($("op-history").tBodies[0], op.audit || [], (a) => [a.version, when(a.at), a.who || "—", point(a.from), point(a.to), a.reason || ""]);
}

let formVersion = null; // the version the operator looked at when opening the confirmation

$("op-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const op = state && state.operating_point;
  if (!op) return;
  formVersion = op.version;
  $("confirm-text").textContent = `From ${point(op)} (version ${op.version}) to λ = ${fmt(Number($("op-lambda").value), 2)}, as ${$("op-operator").value}. Every replica switches at once.`;
  $("confirm").returnValue = "";
  $("confirm").showModal();
});

$("confirm").addEventListener("close", async () => {
  if ($("confirm").returnValue !== "ok") return;
  const body = {
    lambda: Number($("op-lambda").value),
    expected_version: formVersion,
    operator: $("op-operator").value,
    reason: $("op-reason").value || null,
  };
  const out = $("op-result");
  try {
    const r = await fetch("operating-point", { method: "PUT", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
    const text = await r.text();
    let answer;
    try { answer = JSON.parse(text); } catch { answer = text; } // a proxy's plain-text error page
    if (r.status === 200 || r.status === 202) {
      out.className = "result ok";
      out.textContent = `Switched to version ${answer.version}: ${answer.readers_acked} of ${answer.readers_live} replicas serve it` + (r.status === 202 ? " (the rest switch on their next poll)" : "") + ".";
    } else if (r.status === 409) {
      out.className = "result error";
      out.textContent = `Conflict: the operating point changed since you looked (${detail(answer)}). Nothing was switched; the page has reloaded the current state: check it and switch again.`;
    } else {
      out.className = "result error";
      out.textContent = `Refused (${r.status}): ${detail(answer)}`;
    }
  } catch (e) {
    out.className = "result error";
    out.textContent = `The switch did not reach the server: ${e.message}`;
  }
  await load();
});

const detail = (answer) => (answer && Array.isArray(answer.detail) ? answer.detail.map((d) => `${(d.loc || []).join(".")}: ${d.msg}`).join("; ") : typeof answer === "string" ? answer.slice(0, 300) : JSON.stringify(answer));

// ---- charts -------------------------------------------------------------------------------------------------
function scale(lo, hi, a, b) {
  if (!(hi > lo)) { lo -= 1; hi += 1; }
  const pad = (hi - lo) * 0.08;
  lo -= pad; hi += pad;
  const f = (x) => a + ((x - lo) / (hi - lo)) * (b - a);
  f.ticks = [0, 0.25, 0.5, 0.75, 1].map((t) => lo + t * (hi - lo));
  return f;
}

function axes(svg, x, y, box, xlabel, ylabel, digits = 3, xdigits = digits) {
  const [l, t, r, b] = box;
  for (const v of y.ticks) {
    svg.append(el("svg:line", { class: "gridline", x1: l, x2: r, y1: y(v), y2: y(v) }));
    svg.append(el("svg:text", { x: l - 4, y: y(v) + 4, "text-anchor": "end", text: fmt(v, digits) }));
  }
  for (const v of x.ticks) svg.append(el("svg:text", { x: x(v), y: b + 14, "text-anchor": "middle", text: fmt(v, xdigits) }));
  svg.append(el("svg:line", { class: "axis", x1: l, x2: r, y1: b, y2: b }), el("svg:line", { class: "axis", x1: l, x2: l, y1: t, y2: b }));
  svg.append(el("svg:text", { x: (l + r) / 2, y: b + 30, "text-anchor": "middle", text: xlabel }));
  svg.append(el("svg:text", { x: 12, y: (t + b) / 2, transform: `rotate(-90 12 ${(t + b) / 2})`, "text-anchor": "middle", text: ylabel }));
}

function drawFrontier(frontier, op) {
  $("frontier-panel").hidden = !frontier;
  if (!frontier) return;
  $("frontier-version").textContent = `artifact v${frontier.version}, ${frontier.created || ""}`;
  const select = $("frontier-cohort");
  const cohorts = ["all users", ...new Set(frontier.points.flatMap((p) => Object.keys((p.off_policy || {}).cohorts || {})))];
  if ([...select.options].map((o) => o.value).join("\n") !== cohorts.join("\n")) {
    const keep = select.value;
    select.replaceChildren(...cohorts.map((c) => el("option", { value: c, text: c })));
    if (cohorts.includes(keep)) select.value = keep;
  }
  const cohort = select.value || "all users";
  const pts = frontier.points
    .map((p) => ({ p, v: cohort === "all users" ? p.off_policy : ((p.off_policy || {}).cohorts || {})[cohort] }))
    .filter(({ v }) => v && v.clicks !== null && v.long_views !== null && v.clicks !== undefined);
  const svg = $("frontier-chart");
  svg.replaceChildren();
  if (!pts.length) {
    svg.append(el("svg:text", { x: 320, y: 200, "text-anchor": "middle", text: "no off-policy points for this cohort" }));
    return;
  }
  const box = [70, 20, 620, 350];
  const xs = pts.flatMap(({ v }) => [v.clicks - (v.clicks_ci || 0), v.clicks + (v.clicks_ci || 0)]);
  const ys = pts.flatMap(({ v }) => [v.long_views - (v.long_views_ci || 0), v.long_views + (v.long_views_ci || 0)]);
  const x = scale(Math.min(...xs), Math.max(...xs), box[0], box[2]);
  const y = scale(Math.min(...ys), Math.max(...ys), box[3], box[1]);
  axes(svg, x, y, box, "clicks per request", "long views per request");
  const live = op && op.lambda !== null && op.lambda !== undefined ? op.lambda : null;
  const line = pts.slice().sort((a, b) => a.p.lambda - b.p.lambda).map(({ v }) => `${x(v.clicks)},${y(v.long_views)}`).join(" ");
  svg.append(el("svg:polyline", { points: line, fill: "none", stroke: "#98a2b3", "stroke-width": 1 }));
  for (const { p, v } of pts) {
    const cx = x(v.clicks), cy = y(v.long_views);
    const ex = v.clicks_ci || 0, ey = v.long_views_ci || 0;
    svg.append(el("svg:line", { x1: x(v.clicks - ex), x2: x(v.clicks + ex), y1: cy, y2: cy, stroke: "#c8cdd6" }));
    svg.append(el("svg:line", { x1: cx, x2: cx, y1: y(v.long_views - ey), y2: y(v.long_views + ey), stroke: "#c8cdd6" }));
  }
  for (const { p, v } of pts) {
    const cx = x(v.clicks), cy = y(v.long_views);
    const isLive = live !== null && Math.abs(p.lambda - live) < 1e-9;
    const nd = p.non_dominated_off_policy;
    const title = el("svg:title", { text: `λ = ${fmt(p.lambda, 2)}: clicks ${fmt(v.clicks)} ± ${fmt(v.clicks_ci)}, long views ${fmt(v.long_views)} ± ${fmt(v.long_views_ci)}` });
    const shape = isLive
      ? el("svg:rect", { x: cx - 7, y: cy - 7, width: 14, height: 14, transform: `rotate(45 ${cx} ${cy})`, fill: "#f79009", stroke: "#b54708" }, title)
      : el("svg:circle", { cx, cy, r: 5, fill: nd ? "#2457c5" : "#fff", stroke: "#2457c5", "stroke-width": 1.5 }, title);
    shape.setAttribute("class", "point");
    shape.setAttribute("data-lambda", p.lambda);
    shape.addEventListener("click", () => { $("op-lambda").value = p.lambda; $("op-lambda").focus(); });
    svg.append(shape);
    if (nd || isLive || [0, 0.5, 1].includes(p.lambda)) svg.append(el("svg:text", { x: cx + 7, y: cy - 6, text: `λ ${fmt(p.lambda, 2)}` }));
  }
}

$("frontier-cohort").addEventListener("change", () => state && drawFrontier(state.frontier, state.operating_point));

function dayChart(svg, days, lines, digits, bound) {
  svg.replaceChildren();
  const box = [55, 12, 405, 180];
  const vals = lines.flatMap((s) => s.points.flatMap((p) => [p.low ?? p.mean, p.high ?? p.mean])).filter((v) => v != null);
  if (bound !== undefined) vals.push(bound);
  if (!days.length || !vals.length) {
    svg.append(el("svg:text", { x: 210, y: 110, "text-anchor": "middle", text: "no days yet" }));
    return;
  }
  const x = scale(Math.min(...days), Math.max(...days), box[0], box[2]);
  const y = scale(Math.min(...vals), Math.max(...vals), box[3], box[1]);
  x.ticks = days.length <= 8 ? days : x.ticks;
  axes(svg, x, y, box, "day", "", digits, 0);
  if (bound !== undefined) svg.append(el("svg:line", { x1: box[0], x2: box[2], y1: y(bound), y2: y(bound), stroke: "#d92d20", "stroke-dasharray": "4 3" }));
  lines.forEach((s, i) => {
    const pts = s.points.filter((p) => p.mean != null);
    const dx = (i - (lines.length - 1) / 2) * 4; // side by side, so intervals of one day do not hide each other
    svg.append(el("svg:polyline", { points: pts.map((p) => `${x(p.day) + dx},${y(p.mean)}`).join(" "), fill: "none", stroke: s.color }));
    for (const p of pts) {
      if (p.low != null && p.high != null) svg.append(el("svg:line", { x1: x(p.day) + dx, x2: x(p.day) + dx, y1: y(p.low), y2: y(p.high), stroke: s.color }));
      svg.append(el("svg:circle", { cx: x(p.day) + dx, cy: y(p.mean), r: p.mark ? 6 : 3.5, fill: p.mark ? "#d92d20" : s.color }, el("svg:title", { text: `day ${p.day}: ${fmt(p.mean, digits)}` })));
    }
    svg.append(el("svg:text", { x: box[2] - 4, y: box[1] + 12 + 13 * i, "text-anchor": "end", fill: s.color, text: s.name }));
  });
}

// ---- the experiment and the cycle -------------------------------------------------------------------------
function tag(status) {
  const kind = !status ? "other" : status.startsWith("promoted") || status === "new weights" ? "promoted" : status.startsWith("rejected") || status.startsWith("rolled back") ? "rejected" : status === "training failed" ? "failed" : "other";
  return el("span", { class: `tag ${kind}`, text: status || "—" });
}

function drawExperiment(exp) {
  $("experiment-panel").hidden = !exp;
  if (!exp) return;
  $("experiment-name").textContent = exp.name;
  const arms = Object.entries(exp.arms);
  rows($("arms").tBodies[0], arms, ([name, a]) => [
    name, a.policy, fmt(a.share, 2), a.version ?? "—", vec(a.weights), a.requests ?? "—", a.users ?? "—",
    a.kpis ? Object.entries(a.kpis).map(([k, v]) => `${k} ${fmt(v.mean)} [${fmt(v.low)}, ${fmt(v.high)}]`).join("; ") : "—",
  ]);
  $("shadow").textContent = exp.shadow && exp.shadow.active ? `in shadow: ${vec(exp.shadow.weights)} (version ${exp.shadow.version})` : "no candidate in shadow";
  const changes = arms.flatMap(([name, a]) => (a.audit || []).map((e) => ({ arm: name, ...e }))).sort((p, q) => q.at - p.at);
  rows($("arm-history").tBodies[0], changes, (e) => [
    e.arm, e.version, when(e.at), tag(e.action === "rollback" ? `rolled back to v${e.restored_version}` : "new weights"), e.who || "—", vec(e.to ? [e.to.w_click, e.to.w_long_view, e.to.w_purchase] : null), e.reason || "",
  ]);
}

function drawCycle(cycle) {
  $("cycle-panel").hidden = !cycle;
  if (!cycle) return;
  const c = cycle.counts;
  $("cycle-counts").textContent = `${cycle.days.length} days · ${c.promotions} promotions · ${c.rejections} gate rejections · ${c.rollbacks} rollbacks · ${c.training_failures} failed trainings`;
  const days = cycle.days.filter((d) => !d.unreadable);
  dayChart($("kl-chart"), days.map((d) => d.day), [{ name: "KL (● red: breach)", color: "#2457c5", points: days.map((d) => ({ day: d.day, mean: d.kl, mark: d.breach })) }], 2);
  const arms = [...new Set(days.flatMap((d) => Object.keys(d.arms)))];
  const colors = ["#667085", "#2457c5", "#f79009", "#067647"];
  dayChart($("objective-chart"), days.map((d) => d.day), arms.map((arm, i) => ({
    name: arm, color: colors[i % colors.length],
    points: days.filter((d) => d.arms[arm] && d.arms[arm].objective).map((d) => ({ day: d.day, ...d.arms[arm].objective })),
  })), 3);
  rows($("cycle-days").tBodies[0], cycle.days.slice().reverse(), (d) => d.unreadable ? [d.day, "—", `unreadable record: ${d.unreadable}`, "", "", "", ""] : [
    d.day, d.requests ?? "—", tag(d.shadow_status ? `${d.status || "—"} · ${d.shadow_status}` : d.status),
    d.error || d.gate_failed.join("; ") || (d.status === "promoted" ? "passed" : ""),
    fmt(d.kl, 3),
    d.breach ? el("span", { class: "tag breach", text: `breach: ${d.why.join("; ")}${d.rolled_back_to ? ` → rolled back to v${d.rolled_back_to.version}` : ""}` }) : "ok",
    d.live ? `v${d.live.version} ${vec(d.live.weights)}` : "—",
  ]);
}

function drawInnerReward(inner) {
  $("inner-reward-panel").hidden = !inner;
  if (!inner) return;
  $("inner-version").textContent = inner.error ? inner.error : `version ${inner.version} (app ${inner.app})`;
  rows($("inner-weights").tBodies[0], Object.entries(inner.weights || {}), ([k, v]) => [k, fmt(v, 4)]);
}

$("refresh").addEventListener("click", load);
setInterval(() => { if ($("auto-refresh").checked && !$("confirm").open) load(); }, 5000);
load();
