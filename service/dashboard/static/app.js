/* modeltailor dashboard: a dependency-free single-page app over the /v1 REST API.
 *
 * Routes (location.hash): #/jobs, #/jobs/ID, #/candidates/ID, #/devices, #/devices/ID,
 * #/compare/ID,ID,... (jobs side by side).
 * The API key is asked for once and kept in sessionStorage (this tab only).
 * Test hooks: body[data-page] and body[data-ready="1"] once a page is drawn; the job
 * scatter carries data-front-count / data-total / data-shown / data-render-ms.
 */
"use strict";

const KEY_STORE = "modeltailor.apiKey";
const FRONT_NAME = "Pareto front";
const FOLDED_NAME = "equal within resolution";
const FAMILY_NAME = "family (one weight set)";
const COLORS = {
  accent: "#4f46e5", faint: "rgba(100,116,139,0.28)", infeasible: "rgba(220,38,38,0.22)",
  baseline: "#0f172a", constraint: "#dc2626", ok: "#059669", family: "#d97706",
  schemes: { dense: "#94a3b8", unstructured: "#f59e0b", nm: "#4f46e5", block: "#0891b2" },
};
// the sensitivity chart's move kinds, in the colours the page already uses for them
COLORS.moves = { skip: COLORS.baseline, width: COLORS.accent, bits: COLORS.ok, sparse: COLORS.schemes.unstructured };
const PLOT_CONFIG = { displaylogo: false, responsive: true,
  modeBarButtonsToRemove: ["lasso2d", "select2d", "autoScale2d", "toggleSpikelines"] };
const BASE_LAYOUT = {
  margin: { l: 64, r: 24, t: 16, b: 52 }, paper_bgcolor: "#fff", plot_bgcolor: "#fff",
  font: { family: "-apple-system, BlinkMacSystemFont, Segoe UI, Roboto, sans-serif", size: 12, color: "#374151" },
  hoverlabel: { bgcolor: "#0f172a", bordercolor: "#0f172a", font: { color: "#f8fafc", size: 12 } },
  legend: { orientation: "h", y: 1.08, x: 0, bgcolor: "rgba(0,0,0,0)" },
};

// ---------------------------------------------------------------- state and helpers

let view = { token: 0, cleanups: [] };   // the page on screen; async work checks its token
const compareSelection = new Set();        // job ids ticked on the jobs page (kept across its refreshes)

function newView() {
  for (const fn of view.cleanups) { try { fn(); } catch (_) { /* already gone */ } }
  view = { token: view.token + 1, cleanups: [] };
  document.body.dataset.ready = "0";
  return view.token;
}
const current = (token) => token === view.token;
const $ = (sel, root = document) => root.querySelector(sel);
const app = () => $("#app");

function esc(value) {
  return String(value ?? "").replace(/[&<>"']/g, (c) => (
    { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}
const fmt = {
  pct: (v, d = 2) => (v == null ? "—" : `${(100 * v).toFixed(d)} %`),
  ms: (v) => (v == null ? "—" : `${v < 10 ? v.toFixed(3) : v.toFixed(2)} ms`),
  bytes: (v) => {
    if (v == null) return "—";
    const units = ["B", "KB", "MB", "GB"];
    let i = 0; let x = v;
    while (x >= 1024 && i < units.length - 1) { x /= 1024; i += 1; }
    return `${x.toFixed(i ? 1 : 0)} ${units[i]}`;
  },
  int: (v) => (v == null ? "—" : Number(v).toLocaleString("en-US")),
  num: (v, d = 3) => (v == null ? "—" : Number(v).toFixed(d)),
  macs: (v) => (v == null ? "—" : v >= 1e9 ? `${(v / 1e9).toFixed(2)} G` : v >= 1e6 ? `${(v / 1e6).toFixed(2)} M` : `${(v / 1e3).toFixed(1)} k`),
  secs: (v) => (v == null ? "—" : v < 90 ? `${Math.round(v)} s` : `${Math.round(v / 60)} min`),
  when: (iso) => (iso ? new Date(`${iso}${iso.endsWith("Z") ? "" : "Z"}`).toLocaleString() : "—"),
};
/* Progress bars carry their share in data-share and get their width through the CSSOM: the
 * page's Content-Security-Policy refuses inline style attributes. */
function fillBars(root) {
  for (const span of root.querySelectorAll(".bar > span[data-share]")) {
    span.style.width = `${(100 * Number(span.dataset.share)).toFixed(1)}%`;
  }
}
const badge = (status) => `<span class="badge ${esc(status)}">${esc(status)}</span>`;

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function apiKey() { return sessionStorage.getItem(KEY_STORE); }

async function api(path, options = {}) {
  const headers = { Authorization: `Bearer ${apiKey()}`, ...(options.headers || {}) };
  if (options.json !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(path, {
    method: options.method || "GET", headers, signal: options.signal,
    body: options.json !== undefined ? JSON.stringify(options.json) : undefined,
  });
  if (res.status === 401) {
    sessionStorage.removeItem(KEY_STORE);
    showLogin("Your API key was not accepted; please enter it again.");
    throw new ApiError(401, "unauthorized");
  }
  if (!res.ok) {
    let detail = res.statusText;
    try { detail = (await res.json()).detail || detail; } catch (_) { /* not JSON */ }
    throw new ApiError(res.status, `${res.status}: ${detail}`);
  }
  return options.raw ? res : res.json();
}

/* A GET the page can do without: its body, or null on any error but 401 (which signs out). */
async function optionalApi(path) {
  try { return await api(path); } catch (err) { if (err.status === 401) throw err; return null; }
}

function setPage(name) {
  document.body.dataset.page = name;
  for (const a of document.querySelectorAll("#nav a[data-nav]")) {
    a.classList.toggle("active", a.dataset.nav === name.split("-")[0] || ((name.startsWith("candidate") || name === "compare") && a.dataset.nav === "jobs"));
  }
}
function ready(token) { if (current(token)) document.body.dataset.ready = "1"; }
function showError(token, err) {
  if (!current(token) || err.status === 401) return;
  app().innerHTML = `<div class="card"><h2>Something went wrong</h2><p class="error">${esc(err.message)}</p>
    <p><a href="#/jobs">Back to jobs</a></p></div>`;
  ready(token);
}
function every(ms, fn) {
  const id = setInterval(fn, ms);
  view.cleanups.push(() => clearInterval(id));
}
function plotlyReady() {
  return new Promise((resolve) => {
    if (window.Plotly) { resolve(); return; }
    const wait = setInterval(() => { if (window.Plotly) { clearInterval(wait); resolve(); } }, 10);
  });
}
function purgeOnLeave(div) { view.cleanups.push(() => { if (window.Plotly) Plotly.purge(div); }); }

// ---------------------------------------------------------------- login

function showLogin(message) {
  newView();
  setPage("login");
  $("#session").hidden = true;
  app().replaceChildren($("#login-template").content.cloneNode(true));
  const error = $("#login-error");
  if (message) { error.textContent = message; error.hidden = false; }
  $("#api-key").focus();
  $("#login-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = $("#api-key").value.trim();
    sessionStorage.setItem(KEY_STORE, key);
    try {
      await api("/v1/jobs?limit=1");
      route();
    } catch (err) {
      if (err.status !== 401) { error.textContent = err.message; error.hidden = false; }
    }
  });
  document.body.dataset.ready = "1";
}

// ---------------------------------------------------------------- jobs list

async function pageJobs(token) {
  setPage("jobs");
  const active = await drawJobs(token);
  if (!current(token)) return;
  ready(token);
  if (active) {
    let busy = false;
    every(3000, async () => {
      if (busy || !current(token)) return;
      busy = true;
      try { await drawJobs(token); } catch (_) { /* next tick retries */ }
      busy = false;
    });
  }
}

/* Draw the jobs table; returns whether any job is still queued or running. */
async function drawJobs(token) {
  const [jobs, devices] = await Promise.all([api("/v1/jobs?limit=200"), api("/v1/devices")]);
  if (!current(token)) return false;
  const deviceName = Object.fromEntries(devices.data.map((d) => [d.id, d.name]));
  const rows = jobs.data.map((job) => {
    const p = job.progress || {};
    const done = p.done ?? 0;
    const total = p.total;
    const share = total ? Math.min(1, done / total) : job.status === "succeeded" ? 1 : 0;
    const eta = job.status === "running" && p.eta_s != null ? ` · ETA ${fmt.secs(p.eta_s)}` : "";
    return `<tr class="link" data-href="#/jobs/${job.id}" data-job="${job.id}">
      <td class="pick"><input type="checkbox" class="compare-pick" data-job="${job.id}" aria-label="compare job ${job.id}"${compareSelection.has(job.id) ? " checked" : ""}></td>
      <td class="mono">#${job.id}</td>
      <td>${badge(job.status)}</td>
      <td><div class="progress-cell"><div class="bar"><span data-share="${share}"></span></div>
        <small>${fmt.int(done)}${total ? ` / ${fmt.int(total)}` : ""} candidates${esc(eta)}${p.phase && job.status === "running" ? ` · ${esc(p.phase)}` : ""}</small></div></td>
      <td><span class="chip">${esc(job.algorithm)}</span></td>
      <td>${esc(deviceName[job.device_id] || `device ${job.device_id}`)}</td>
      <td class="best" data-best="${job.id}">${p.best_accuracy != null ? `${fmt.pct(p.best_accuracy)}` : "—"}</td>
      <td class="muted">${esc(fmt.when(job.created_at))}</td>
    </tr>`;
  }).join("");
  const active = jobs.data.some((j) => j.status === "running" || j.status === "queued");
  app().innerHTML = `
    <div class="page-head"><h1>Search jobs</h1><span class="muted">${fmt.int(jobs.count)} total</span>
      <span class="spacer"></span>${active ? '<span class="live">live</span>' : ""}
      <button class="btn" id="compare-button" type="button" title="tick two or more jobs to compare their fronts">Compare selected</button></div>
    <div class="card table-card">${jobs.data.length ? `<table id="jobs-table">
      <thead><tr><th></th><th>Job</th><th>Status</th><th>Progress</th><th>Algorithm</th><th>Device</th>
        <th>Best point</th><th>Submitted</th></tr></thead><tbody>${rows}</tbody></table>`
      : `<div class="empty">No jobs yet. Submit one with <code>modeltailor submit</code>, the SDK or
         <code>POST /v1/jobs</code>; it appears here.</div>`}</div>`;
  fillBars(app());
  for (const tr of document.querySelectorAll("tr.link")) {
    tr.addEventListener("click", () => { location.hash = tr.dataset.href; });
  }
  const compareButton = $("#compare-button");
  const syncCompare = () => {
    compareButton.disabled = compareSelection.size < 2;
    compareButton.textContent = compareSelection.size >= 2 ? `Compare ${compareSelection.size} jobs` : "Compare selected";
  };
  for (const box of document.querySelectorAll(".compare-pick")) {
    box.addEventListener("click", (event) => event.stopPropagation());   // ticking is not opening
    box.addEventListener("change", () => {
      const id = Number(box.dataset.job);
      if (box.checked) compareSelection.add(id); else compareSelection.delete(id);
      syncCompare();
    });
  }
  compareButton.addEventListener("click", () => { location.hash = `#/compare/${[...compareSelection].sort((a, b) => a - b).join(",")}`; });
  syncCompare();
  // The best front point (accuracy at latency) needs the job's detail: fill it in afterwards.
  for (const job of jobs.data.slice(0, 25)) {
    if (job.status === "queued") continue;
    api(`/v1/jobs/${job.id}`).then((full) => {
      const cell = document.querySelector(`[data-best="${job.id}"]`);
      const best = full.best && full.best[0];
      if (!current(token) || !cell || !best) return;
      cell.innerHTML = `<b>${fmt.pct(best.accuracy)}</b> <span class="muted">@ ${fmt.ms(best.latency_ms)}</span>`;
    }).catch(() => {});
  }
  return active;
}

// ---------------------------------------------------------------- one job

function constraintShapes(scatter, metric) {
  const shapes = [];
  const notes = [];
  const c = scatter.constraints || {};
  const line = (axis, value, label) => {
    if (axis === "x") {
      shapes.push({ type: "line", xref: "x", yref: "paper", x0: value, x1: value, y0: 0, y1: 1,
        line: { color: COLORS.constraint, width: 1.5, dash: "dash" } });
      notes.push({ xref: "x", yref: "paper", x: value, y: 1, text: label, showarrow: false,
        xanchor: "left", yanchor: "top", font: { color: COLORS.constraint, size: 11 }, xshift: 4 });
    } else {
      shapes.push({ type: "line", xref: "paper", yref: "y", x0: 0, x1: 1, y0: value, y1: value,
        line: { color: COLORS.constraint, width: 1.5, dash: "dash" } });
      notes.push({ xref: "paper", yref: "y", x: 1, y: value, text: label, showarrow: false,
        xanchor: "right", yanchor: "bottom", font: { color: COLORS.constraint, size: 11 } });
    }
  };
  if (c[metric] && c[metric].max != null) {
    line("x", c[metric].max, metric === "latency_ms" ? `latency ≤ ${c[metric].max} ms` : `size ≤ ${fmt.bytes(c[metric].max)}`);
  }
  if (c.accuracy && c.accuracy.min != null) line("y", c.accuracy.min, `accuracy ≥ ${fmt.pct(c.accuracy.min, 1)}`);
  const base = scatter.baseline && scatter.baseline.accuracy;
  if (c.accuracy_drop && c.accuracy_drop.max != null && base != null) {
    line("y", base - c.accuracy_drop.max, `accuracy drop ≤ ${fmt.pct(c.accuracy_drop.max, 1)}`);
  }
  return { shapes, annotations: notes };
}

function pick(points, indices) {
  const out = {};
  for (const key of Object.keys(points)) out[key] = indices.map((i) => points[key][i]);
  return out;
}

/* A family job's K nested points, linked in budget order (k = 0 first). Latency and accuracy come
 * from the family itself; a size is looked up among the points the scatter carries (every
 * front point is always sent), and a point without one leaves the line out of the size view. */
function familyLine(scatter, family, metric, folded) {
  const points = family ? family.points.filter((p) => p.candidate_id != null) : [];
  if (points.length < 2) return null;
  const sizes = {};
  for (const pts of [scatter.front, folded, scatter.others]) (pts.id || []).forEach((id, i) => { sizes[id] = pts.size_bytes[i]; });
  const x = points.map((p) => (metric === "latency_ms" ? p.latency_ms : sizes[p.candidate_id]));
  if (x.some((v) => v == null)) return null;
  return {
    x, y: points.map((p) => p.accuracy), id: points.map((p) => p.candidate_id),
    text: points.map((p) => `family point ${p.k + 1} of ${points.length} · budget ${pctInt(p.budget)} of dense`),
  };
}

function scatterTraces(scatter, metric, family = null) {
  const others = scatter.others;
  const xTitle = metric === "latency_ms" ? "predicted latency" : "size";
  const xFmt = metric === "latency_ms" ? "%{x:.3f} ms" : "%{x:,.0f} B";
  const hover = `<b>candidate %{customdata}</b><br>accuracy %{y:.2%} · ${xTitle} ${xFmt}<br>%{text}<extra></extra>`;
  const idx = { ok: [], bad: [] };
  others.feasible.forEach((f, i) => idx[f ? "ok" : "bad"].push(i));
  const cloud = (pts, name, color) => ({
    type: "scatter", mode: "markers", name, x: pts[metric], y: pts.accuracy, customdata: pts.id,
    text: pts.summary, hovertemplate: hover, marker: { size: 5, color },
  });
  const folded = scatter.folded || { id: [] };
  let front;
  if (metric === "latency_ms") {
    front = scatter.front;
  } else {   // the accuracy-vs-size front: look its points up among everything sent
    const all = {};
    for (const pts of [scatter.front, folded, others]) pts.id.forEach((id, i) => { all[id] = [pts, i]; });
    front = { id: [], accuracy: [], latency_ms: [], size_bytes: [], summary: [] };
    for (const id of scatter.size_front_ids) {
      const [pts, i] = all[id];
      for (const key of Object.keys(front)) front[key].push(pts[key][i]);
    }
  }
  const order = front.id.map((_, i) => i).sort((a, b) => front[metric][a] - front[metric][b]);
  const sorted = pick(front, order);
  const traces = [
    cloud(pick(others, idx.ok), "candidates", COLORS.faint),
    cloud(pick(others, idx.bad), "violates a constraint", COLORS.infeasible),
    { type: "scatter", mode: "lines+markers", name: metric === "latency_ms" ? FRONT_NAME : `${FRONT_NAME} (size)`,
      x: sorted[metric], y: sorted.accuracy, customdata: sorted.id, text: sorted.summary, hovertemplate: hover,
      line: { shape: "hv", color: COLORS.accent, width: 1.5 },
      marker: { size: 9, color: COLORS.accent, line: { color: "#fff", width: 1.5 } } },
  ];
  if (folded.id.length) {   // front points equal to a representative within resolution
    traces.splice(2, 0, { type: "scatter", mode: "markers", name: FOLDED_NAME, x: folded[metric], y: folded.accuracy,
      customdata: folded.id, text: folded.duplicate_of.map((r, i) => `same as #${r} within resolution · ${folded.summary[i]}`),
      hovertemplate: hover, marker: { size: 7, color: "rgba(0,0,0,0)", line: { color: COLORS.accent, width: 1 } } });
  }
  const fam = familyLine(scatter, family, metric, folded);
  if (fam) {
    traces.push({ type: "scatter", mode: "lines+markers", name: FAMILY_NAME, x: fam.x, y: fam.y, customdata: fam.id,
      text: fam.text, hovertemplate: hover, line: { color: COLORS.family, width: 2, dash: "dot" },
      marker: { size: 11, symbol: "diamond", color: COLORS.family, line: { color: "#fff", width: 1 } } });
  }
  const base = scatter.baseline || {};
  if (base.accuracy != null && base[metric] != null) {
    traces.push({ type: "scatter", mode: "markers", name: "dense model", x: [base[metric]], y: [base.accuracy],
      hovertemplate: `<b>dense model</b><br>accuracy %{y:.2%} · ${xFmt}<extra></extra>`,
      marker: { size: 14, symbol: "star", color: COLORS.baseline } });
  }
  return traces;
}

async function drawScatter(div, scatter, metric, family = null) {
  await plotlyReady();
  const started = performance.now();
  const { shapes, annotations } = constraintShapes(scatter, metric);
  const layout = {
    ...BASE_LAYOUT, shapes, annotations, hovermode: "closest", uirevision: metric,
    xaxis: { title: { text: metric === "latency_ms" ? "predicted latency (ms)" : "size", standoff: 8 },
      gridcolor: "#f1f5f9", zeroline: false, ...(metric === "size_bytes" ? { tickformat: "~s", ticksuffix: "B" } : {}) },
    yaxis: { title: { text: "accuracy", standoff: 8 }, tickformat: ".1%", gridcolor: "#f1f5f9", zeroline: false },
  };
  await Plotly.react(div, scatterTraces(scatter, metric, family), layout, PLOT_CONFIG);
  const front = div.data.find((t) => t.name && t.name.startsWith(FRONT_NAME));
  const familyTrace = div.data.find((t) => t.name === FAMILY_NAME);
  div.dataset.familyCount = String(familyTrace ? familyTrace.x.length : 0);
  div.dataset.frontCount = String(front ? front.x.length : 0);
  div.dataset.total = String(scatter.total);
  div.dataset.shown = String(scatter.shown);
  div.dataset.view = metric;
  div.dataset.renderMs = (performance.now() - started).toFixed(1);
  if (!div.dataset.clickBound) {
    div.dataset.clickBound = "1";
    div.on("plotly_click", (ev) => {
      const point = ev.points && ev.points[0];
      if (point && point.customdata != null) location.hash = `#/candidates/${point.customdata}`;
    });
  }
}

function jobStats(scatter, deviceName) {
  const job = scatter.job;
  const p = job.progress || {};
  const share = p.total ? Math.min(1, (p.done || 0) / p.total) : job.status === "succeeded" ? 1 : 0;
  const f = scatter.front;
  const best = f.id.length ? { accuracy: f.accuracy[0], latency_ms: f.latency_ms[0] } : null;
  const base = scatter.baseline || {};
  const speedup = best && base.latency_ms && best.latency_ms ? base.latency_ms / best.latency_ms : null;
  return `
    <div class="card stat"><div class="label">Progress</div>
      <div class="value">${fmt.int(p.done ?? scatter.total)}${p.total ? `<span class="muted of-total"> / ${fmt.int(p.total)}</span>` : ""}</div>
      <div class="bar spaced"><span data-share="${share}"></span></div>
      <div class="sub">${esc(p.phase || job.status)}${job.status === "running" && p.eta_s != null ? ` · ETA ${fmt.secs(p.eta_s)}` : ""}</div></div>
    <div class="card stat"><div class="label">Candidates</div><div class="value">${fmt.int(scatter.total)}</div>
      <div class="sub">${fmt.int(scatter.feasible_total)} meet the constraints</div></div>
    <div class="card stat"><div class="label">Pareto front</div><div class="value" id="front-count">${fmt.int(scatter.front.id.length)}</div>
      <div class="sub">non-dominated, feasible${scatter.folded && scatter.folded.id.length ? ` · ${fmt.int(scatter.folded.id.length)} equal folded` : ""}</div></div>
    <div class="card stat"><div class="label">Most accurate on front</div>
      <div class="value">${best ? fmt.pct(best.accuracy) : "—"}</div>
      <div class="sub">${best ? `${fmt.ms(best.latency_ms)}${speedup ? ` · ${speedup.toFixed(2)}× faster than dense` : ""}` : "no feasible candidate yet"}</div></div>
    <div class="card stat"><div class="label">Dense model</div><div class="value">${fmt.pct(base.accuracy)}</div>
      <div class="sub">${fmt.ms(base.latency_ms)} on ${esc(deviceName)}</div>
      ${p.space && p.space.note ? `<div class="sub" title="what the device's calibration measured">Space: ${esc(p.space.note)}</div>` : ""}</div>`;
}

/* Words for the fold's resolution (service/front_fold.py). */
function resolutionWords(r) {
  if (!r) return "";
  return `accuracy within one of ${fmt.int(r.n_val)} validation images, latency and size within ${Math.round(100 * r.latency_ms_relative)} %`;
}

function frontTable(scatter, baseline) {
  const f = scatter.front;
  if (!f.id.length) return '<div class="empty">No feasible candidate yet.</div>';
  const folded = scatter.folded || { id: [], duplicate_of: [] };
  const dupRows = {};
  folded.id.forEach((id, i) => { (dupRows[folded.duplicate_of[i]] ||= []).push(i); });
  const speedOf = (lat) => (baseline.latency_ms && lat ? `${(baseline.latency_ms / lat).toFixed(2)}×` : "—");
  const rows = f.id.map((id, i) => {
    const dups = dupRows[id] || [];
    const toggle = dups.length
      ? ` <button class="fold-toggle" type="button" data-rep="${id}" aria-expanded="false" title="${esc(resolutionWords(scatter.resolution))}">+${dups.length} equal</button>`
      : "";
    const sub = dups.map((j) => `<tr class="link dup-row" data-href="#/candidates/${folded.id[j]}" data-dup-of="${id}" hidden>
      <td class="mono">↳ #${folded.id[j]}</td><td class="num">${fmt.pct(folded.accuracy[j])}</td><td class="num">${fmt.ms(folded.latency_ms[j])}</td>
      <td class="num">${speedOf(folded.latency_ms[j])}</td><td class="num">${fmt.bytes(folded.size_bytes[j])}</td>
      <td class="summary">${esc(folded.summary[j])}</td></tr>`).join("");
    return `<tr class="link" data-href="#/candidates/${id}" data-rep-row="${id}"><td class="mono">#${id}${toggle}</td>
      <td class="num">${fmt.pct(f.accuracy[i])}</td><td class="num">${fmt.ms(f.latency_ms[i])}</td>
      <td class="num">${speedOf(f.latency_ms[i])}</td><td class="num">${fmt.bytes(f.size_bytes[i])}</td>
      <td class="summary">${esc(f.summary[i])}</td></tr>${sub}`;
  }).join("");
  const note = folded.id.length
    ? `<div class="note fold-note" id="fold-note">${fmt.int(folded.id.length)} more front point${folded.id.length > 1 ? "s" : ""} equal to one listed here within measurement resolution (${esc(resolutionWords(scatter.resolution))}) folded under it.</div>`
    : "";
  return `<table id="front-table"><thead><tr><th>Candidate</th><th class="num">Accuracy</th>
    <th class="num">Pred. latency</th><th class="num">Speedup</th><th class="num">Size</th><th>Policy</th></tr></thead>
    <tbody>${rows}</tbody></table>${note}`;
}

async function pageJob(token, jobId) {
  setPage("job");
  // One call carries the job and its points: the page never waits on a second front computation.
  const [scatter, devices] = await Promise.all([api(`/v1/jobs/${jobId}/scatter?max_points=4000`), api("/v1/devices")]);
  if (!current(token)) return;
  const job = scatter.job;
  const device = devices.data.find((d) => d.id === job.device_id);
  const deviceName = device ? device.name : `device ${job.device_id}`;
  let metric = "latency_ms";
  app().innerHTML = `
    <div class="crumbs"><a href="#/jobs">Jobs</a> / job ${job.id}</div>
    <div class="page-head"><h1>Job #${job.id}</h1>${badge(job.status)}<span class="chip">${esc(job.algorithm)}</span>
      <span class="muted">on <a href="#/devices/${job.device_id}">${esc(deviceName)}</a> · model ${job.model_id} · data set ${job.dataset_id}</span>
      <span class="spacer"></span><span id="job-live"></span></div>
    ${job.error ? `<div class="banner">${esc(job.error)}</div>` : ""}
    <div class="grid stats" id="job-stats">${jobStats(scatter, deviceName)}</div>
    <div class="card">
      <div class="plot-head"><h2 id="plot-title">Accuracy vs predicted latency</h2><span class="spacer"></span>
        <div class="tabs" role="tablist"><button class="active" data-metric="latency_ms" type="button">Latency</button>
          <button data-metric="size_bytes" type="button">Size</button></div></div>
      <div id="scatter" class="plot"></div>
      <div class="note" id="scatter-note"></div>
      <div class="note" id="family-note" hidden></div>
    </div>
    <div class="card table-card"><h2>Pareto front</h2><div id="front-card">${frontTable(scatter, scatter.baseline || {})}</div></div>
    <div class="card"><div class="plot-head"><h2>Per-layer choices</h2><span class="spacer"></span>
      <button class="btn" id="choices-button" type="button">Show parallel coordinates</button></div>
      <div class="note" id="choices-note">Each line is a candidate: its kept width at every layer the search varied (0: block skipped), coloured by accuracy; thick lines are front points.</div>
      <div id="choices-chart" class="plot" hidden></div></div>
    ${job.algorithm === "rule" ? `<div class="card" id="sensitivity-card" data-state="loading"><h2>Per-layer sensitivity</h2>
      <div class="note" id="sensitivity-note">Reading the single moves the rule agent measured…</div>
      <div id="sensitivity-chart" class="plot small"></div>
      <ul id="sensitivity-none" class="flags"></ul></div>` : ""}`;
  fillBars(app());
  const div = $("#scatter");
  purgeOnLeave(div);
  const bindRows = () => {
    for (const tr of document.querySelectorAll("#front-table tr.link")) {
      tr.addEventListener("click", () => { location.hash = tr.dataset.href; });
    }
    for (const button of document.querySelectorAll("#front-table .fold-toggle")) {
      button.addEventListener("click", (event) => {
        event.stopPropagation();   // the row itself opens the candidate
        const open = button.getAttribute("aria-expanded") !== "true";
        button.setAttribute("aria-expanded", String(open));
        for (const tr of document.querySelectorAll(`#front-table tr[data-dup-of="${button.dataset.rep}"]`)) tr.hidden = !open;
      });
    }
  };
  const note = (s) => {
    $("#scatter-note").textContent = s.decimated
      ? `Showing ${fmt.int(s.shown)} of ${fmt.int(s.total)} candidates: every front point, dominated points thinned on a grid. Click a point to open it.`
      : `${fmt.int(s.total)} candidates. Click a point to open it; drag to zoom, double-click to reset.`;
  };
  bindRows();
  note(scatter);
  let latest = scatter;
  // A family job's points appear in its progress when its search finishes: fetched then, drawn
  // linked on the front.
  let family = null;
  const loadFamily = async (j) => {
    if (!(j.progress || {}).family || (family && family.points.length)) return;
    family = await optionalApi(`/v1/jobs/${jobId}/family`);
    if (family && family.points.length && current(token)) {
      $("#family-note").hidden = false;
      $("#family-note").textContent = `Dotted diamonds: the family's ${family.points.length} nested operating points `
        + `(budgets ${family.points.map((p) => pctInt(p.budget)).join(", ")} of dense latency), one weight set for all.`;
    }
  };
  await loadFamily(job);
  if (!current(token)) return;
  await drawScatter(div, scatter, metric, family);
  if (!current(token)) return;
  for (const button of document.querySelectorAll(".tabs button")) {
    button.addEventListener("click", async () => {
      metric = button.dataset.metric;
      for (const b of document.querySelectorAll(".tabs button")) b.classList.toggle("active", b === button);
      $("#plot-title").textContent = metric === "latency_ms" ? "Accuracy vs predicted latency" : "Accuracy vs model size";
      await drawScatter(div, latest, metric, family);
    });
  }
  $("#choices-button").addEventListener("click", async () => {
    const button = $("#choices-button");
    button.disabled = true;
    try {
      const choices = await api(`/v1/jobs/${jobId}/choices`);
      if (!current(token)) return;
      const chart = $("#choices-chart");
      chart.hidden = false;
      purgeOnLeave(chart);
      await drawChoices(chart, choices);
      button.hidden = true;
    } catch (err) {
      if (current(token)) { $("#choices-note").textContent = err.message; button.disabled = false; }
    }
  });
  ready(token);
  if (job.algorithm === "rule") loadSensitivity(token, jobId);
  if (job.status === "running" || job.status === "queued") {
    liveJob(token, jobId, async () => {
      const s = await api(`/v1/jobs/${jobId}/scatter?max_points=4000`);
      const j = s.job;
      if (!current(token)) return j;
      latest = s;
      $("#job-stats").innerHTML = jobStats(s, deviceName);
      fillBars($("#job-stats"));
      $("#front-card").innerHTML = frontTable(s, s.baseline || {});
      bindRows();
      note(s);
      await loadFamily(j);
      if (!current(token)) return j;
      await drawScatter(div, s, metric, family);
      if (j.status !== "running" && j.status !== "queued") {
        document.querySelector(".page-head .badge").outerHTML = badge(j.status);
      }
      return j;
    });
  }
}

const VIRIDIS = ["#440154", "#46327e", "#365c8d", "#277f8e", "#1fa187", "#4ac16d", "#a0da39", "#fde725"];

/* The rule agent's measured single moves: accuracy lost per resource saved, cheapest at the top;
 * moves that saved nothing on this device listed below the chart. */
async function loadSensitivity(token, jobId) {
  const card = $("#sensitivity-card");
  let body;
  try {
    body = await api(`/v1/jobs/${jobId}/sensitivity`);
  } catch (err) {
    if (current(token) && err.status !== 401) { card.dataset.state = "error"; $("#sensitivity-note").textContent = err.message; }
    return;
  }
  if (!current(token)) return;
  const saving = body.moves.filter((m) => m.saves);
  const none = body.moves.filter((m) => !m.saves);
  const unit = body.resource === "size_bytes" ? "kB" : "ms";
  const scale = body.resource === "size_bytes" ? 1e-3 : 1;   // bytes shown per kB
  card.dataset.state = "ready";
  card.dataset.moves = String(body.moves.length);
  card.dataset.saving = String(saving.length);
  $("#sensitivity-note").textContent = body.moves.length
    ? `${body.moves.length} single moves from the anchor (accuracy ${fmt.pct(body.anchor.accuracy)}), each scored once on this device. `
      + `Bars: accuracy points lost per ${unit} saved, cheapest first — the layers to compress first.`
    : body.note;
  $("#sensitivity-none").innerHTML = none.map((m) => `<li><b>${esc(m.target)}</b>: ${esc(m.move)} saves nothing here `
    + `(${(m.resource_delta * scale) >= 0 ? "+" : ""}${(m.resource_delta * scale).toFixed(3)} ${unit})</li>`).join("");
  if (!saving.length) return;
  await plotlyReady();
  if (!current(token)) return;
  const shown = saving.slice(0, 30).reverse();   // plotly draws the first bar at the bottom
  const div = $("#sensitivity-chart");
  purgeOnLeave(div);
  await Plotly.react(div, [{
    type: "bar", orientation: "h", y: shown.map((m) => `${m.target} · ${m.move}`), x: shown.map((m) => m.cost / scale),
    marker: { color: shown.map((m) => COLORS.moves[m.kind] || COLORS.faint) },
    customdata: shown.map((m) => [100 * m.accuracy_delta, m.resource_delta * scale]),
    hovertemplate: `%{y}<br>%{customdata[0]:+.2f} pts · %{customdata[1]:+.3f} ${unit}<br>%{x:.2f} pts per ${unit}<extra></extra>`,
  }], { ...BASE_LAYOUT, height: Math.max(220, 22 * shown.length + 80), margin: { l: 260, r: 20, t: 10, b: 40 },
    xaxis: { title: { text: `accuracy points lost per ${unit} saved` }, rangemode: "tozero", gridcolor: "#f1f5f9" } }, PLOT_CONFIG);
  div.dataset.bars = String(shown.length);
}

/* Parallel coordinates from plain scatter lines (the bundled plotly "basic" has no parcoords):
 * one trace per accuracy band (and front / not), candidates separated by gaps. */
async function drawChoices(div, c) {
  await plotlyReady();
  const axes = c.layers.map((_, j) => j);
  const acc = c.accuracy.map((a) => (a == null ? NaN : a));
  const finite = acc.filter((a) => Number.isFinite(a));
  const lo = finite.length ? Math.min(...finite) : 0;
  const hi = finite.length ? Math.max(...finite) : 1;
  const band = (a) => (hi > lo ? Math.min(VIRIDIS.length - 1, Math.floor(((a - lo) / (hi - lo)) * VIRIDIS.length)) : VIRIDIS.length - 1);
  const groups = {};
  c.id.forEach((id, i) => {
    if (!Number.isFinite(acc[i])) return;
    const key = `${band(acc[i])}-${c.on_front[i] ? 1 : 0}`;
    const g = (groups[key] ||= { band: band(acc[i]), front: c.on_front[i], x: [], y: [], ids: [], text: [] });
    for (const j of axes) { g.x.push(j); g.y.push(c.width[i][j]); g.ids.push(id); g.text.push(`${(100 * acc[i]).toFixed(2)} %`); }
    g.x.push(null); g.y.push(null); g.ids.push(null); g.text.push(null);
  });
  const traces = Object.values(groups).sort((a, b) => (a.front - b.front) || (a.band - b.band)).map((g) => ({
    type: "scatter", mode: "lines", x: g.x, y: g.y, customdata: g.ids, text: g.text, showlegend: false,
    line: { color: VIRIDIS[g.band], width: g.front ? 2.6 : 1 }, opacity: g.front ? 0.95 : 0.35, connectgaps: false,
    hovertemplate: "candidate %{customdata} · accuracy %{text}<br>kept width %{y:.2f}<extra></extra>",
  }));
  traces.push({ type: "scatter", mode: "markers", x: [null], y: [null], hoverinfo: "skip", showlegend: false,
    marker: { color: [lo, hi], cmin: lo, cmax: hi, colorscale: VIRIDIS.map((col, k) => [k / (VIRIDIS.length - 1), col]),
      showscale: true, colorbar: { title: { text: "accuracy" }, tickformat: ".1%", thickness: 12 } } });
  await Plotly.react(div, traces, { ...BASE_LAYOUT, hovermode: "closest", margin: { l: 56, r: 24, t: 16, b: 110 },
    xaxis: { tickvals: axes, ticktext: c.layers, tickangle: -45, tickfont: { size: 10 }, gridcolor: "#e2e8f0", zeroline: false },
    yaxis: { title: { text: "kept width (0: skipped)" }, range: [-0.03, 1.05], tickformat: ".0%", gridcolor: "#f1f5f9" } }, PLOT_CONFIG);
  div.dataset.lines = String(c.id.filter((_, i) => Number.isFinite(acc[i])).length);
  div.dataset.axes = String(c.layers.length);
  div.on("plotly_click", (ev) => {
    const point = ev.points && ev.points[0];
    if (point && point.customdata != null) location.hash = `#/candidates/${point.customdata}`;
  });
}

/* Live updates: read the job's server-sent events with fetch (EventSource cannot send the
 * API key) and refresh at most every 1.5 s; fall back to polling if the stream breaks. */
function liveJob(token, jobId, refresh) {
  const controller = new AbortController();
  view.cleanups.push(() => controller.abort());
  $("#job-live").innerHTML = '<span class="live">live</span>';
  let pending = false;
  let last = 0;
  let finished = false;
  const kick = async () => {
    if (pending || finished || !current(token)) return;
    pending = true;
    const wait = Math.max(0, 1500 - (performance.now() - last));
    setTimeout(async () => {
      try {
        const job = await refresh();
        last = performance.now();
        if (job && job.status !== "running" && job.status !== "queued") stop();
      } catch (_) { /* next event retries */ }
      pending = false;
    }, wait);
  };
  const stop = () => { finished = true; if (current(token)) $("#job-live").innerHTML = ""; controller.abort(); };
  (async () => {
    try {
      const res = await api(`/v1/jobs/${jobId}/events`, { raw: true, signal: controller.signal });
      const reader = res.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          const kind = (block.match(/^event: (.*)$/m) || [])[1];
          if (kind === "end") { await refresh(); stop(); return; }
          if (kind) kick();
        }
      }
    } catch (_) { /* aborted or broken: poll below */ }
    if (!finished && current(token)) every(3000, kick);
  })();
}

// ---------------------------------------------------------------- one candidate

function layerRows(candidate, model) {
  const policy = candidate.policy || {};
  const def = { width: 1, scheme: "dense", sparsity: 0, nm: null, block: null, bits: null, ...(policy.default || {}) };
  const overrides = policy.layers || {};
  const names = (model && model.layers && model.layers.length) ? model.layers.map((l) => l.name) : Object.keys(overrides);
  for (const name of Object.keys(overrides)) if (!names.includes(name)) names.push(name);
  const skip = policy.skip || [];
  return names.map((name) => {
    const spec = { ...def, ...(overrides[name] || {}) };
    const block = skip.find((b) => name === b || name.startsWith(`${b}.`));
    return { name, ...spec, skipped: block || null };
  });
}

function schemeLabel(r) {
  if (r.scheme === "nm" && r.nm) return `${r.nm[0]}:${r.nm[1]}`;
  if (r.scheme === "block") return `1×${r.block} ${Math.round(100 * (r.sparsity || 0))}%`;
  if (r.scheme === "unstructured") return `unstr. ${Math.round(100 * (r.sparsity || 0))}%`;
  return "dense";
}

async function drawLayers(div, rows) {
  await plotlyReady();
  const names = rows.map((r) => r.name);
  const traces = Object.keys(COLORS.schemes).map((scheme) => {
    const sel = rows.map((r, i) => [r, i]).filter(([r]) => r.scheme === scheme && !r.skipped);
    return {
      type: "bar", name: scheme === "nm" ? "N:M" : scheme, x: sel.map(([r]) => r.name), y: sel.map(([r]) => r.width),
      marker: { color: COLORS.schemes[scheme] }, text: sel.map(([r]) => (r.scheme === "dense" ? "" : schemeLabel(r))), textposition: "inside",
      insidetextanchor: "end", textfont: { color: "#fff", size: 10 },
      hovertemplate: `<b>%{x}</b><br>width %{y:.2f}<br>${scheme}<extra></extra>`,
    };
  }).filter((t) => t.x.length);
  const skipped = rows.filter((r) => r.skipped);
  if (skipped.length) {
    traces.push({ type: "bar", name: "skipped block", x: skipped.map((r) => r.name), y: skipped.map(() => 1),
      marker: { color: "rgba(220,38,38,0.12)", line: { color: COLORS.constraint, width: 1 }, pattern: { shape: "/", fgcolor: COLORS.constraint } },
      hovertemplate: "<b>%{x}</b><br>removed (block skipped)<extra></extra>" });
  }
  traces.push({ type: "scatter", mode: "markers", name: "weight bits", x: names,
    y: rows.map((r) => (r.skipped ? null : r.bits ?? 32)), yaxis: "y2",
    marker: { symbol: "diamond", size: 9, color: "#0f172a" },
    hovertemplate: "<b>%{x}</b><br>%{y} bit weights<extra></extra>" });
  const layout = {
    ...BASE_LAYOUT, barmode: "overlay", bargap: 0.25, margin: { l: 56, r: 56, t: 40, b: 110 },
    legend: { ...BASE_LAYOUT.legend, y: 1.16 },
    xaxis: { tickangle: -45, categoryorder: "array", categoryarray: names, automargin: true, tickfont: { size: 10 } },
    yaxis: { title: { text: "kept width" }, range: [0, 1.08], tickformat: ".0%", gridcolor: "#f1f5f9" },
    yaxis2: { title: { text: "weight bits" }, overlaying: "y", side: "right", type: "log",
      range: [Math.log10(1.6), Math.log10(44)], tickvals: [2, 4, 8, 16, 32], ticktext: ["2", "4", "8", "16", "fp32"],
      showgrid: false },
  };
  await Plotly.react(div, traces, layout, PLOT_CONFIG);
  div.dataset.layers = String(rows.length);
  div.dataset.skipped = String(skipped.length);
}

async function drawLatency(div, candidate, job, artifact) {
  await plotlyReady();
  const base = job.baseline || {};
  const bars = [
    ["dense (predicted)", base.latency_ms, "#94a3b8"],
    ["predicted", candidate.latency_ms, COLORS.accent],
    ["measured (search)", candidate.measured_latency_ms, COLORS.ok],
  ];
  if (artifact && artifact.dense_latency_ms != null) bars.push(["dense (export run)", artifact.dense_latency_ms, "#64748b"]);
  if (artifact && artifact.measured_latency_ms != null) bars.push(["measured (export)", artifact.measured_latency_ms, "#047857"]);
  const shown = bars.filter((b) => b[1] != null);
  await Plotly.react(div, [{ type: "bar", orientation: "h", y: shown.map((b) => b[0]), x: shown.map((b) => b[1]),
    marker: { color: shown.map((b) => b[2]) }, text: shown.map((b) => fmt.ms(b[1])), textposition: "outside",
    cliponaxis: false, hovertemplate: "%{y}: %{x:.3f} ms<extra></extra>" }],
  { ...BASE_LAYOUT, margin: { l: 130, r: 70, t: 8, b: 40 }, showlegend: false,
    xaxis: { title: { text: "latency (ms)" }, gridcolor: "#f1f5f9", rangemode: "tozero" },
    yaxis: { autorange: "reversed" } }, PLOT_CONFIG);
}

function artifactBox(a) {
  const rows = [
    ["Artifact", `#${a.id} · ${esc(a.format)}${a.int8 ? " int8" : " fp32"}${a.finetune_epochs ? ` · fine-tuned ${a.finetune_epochs} epochs` : ""}`],
  ];
  if (a.status === "ready") {
    rows.push(["Measured latency", fmt.ms(a.measured_latency_ms)], ["Dense, same run", fmt.ms(a.dense_latency_ms)],
      ["Speedup", a.speedup != null ? `<b>${a.speedup.toFixed(2)}×</b>` : "—"],
      ["Predicted latency", fmt.ms(a.predicted_latency_ms)], ["Accuracy", fmt.pct(a.accuracy)],
      ["Size", fmt.bytes(a.size_bytes)], ["sha256", `<span class="mono">${esc((a.sha256 || "").slice(0, 16))}…</span>`]);
  }
  const head = { pending: "Exporting… building, writing and measuring the model.", ready: "Export ready.",
    failed: "Export failed." }[a.status] || a.status;
  return `<div class="result ${esc(a.status)}" id="export-result" data-status="${esc(a.status)}">
    <b>${esc(head)}</b>${a.error ? `<div id="export-error">${esc(a.error)}</div>` : ""}
    <dl>${rows.map(([k, v]) => `<dt>${k}</dt><dd>${v}</dd>`).join("")}</dl>
    ${a.status === "ready" ? `<p class="download-row"><button class="btn" id="download" type="button">Download ONNX</button></p>` : ""}
  </div>`;
}

/* A family point's siblings: every point of its family in budget order, this one unlinked. */
function familyCard(family, candidateId) {
  const points = family ? family.points : [];
  const me = points.find((p) => p.candidate_id === candidateId);
  if (!me) return "";
  const item = (p) => {
    const label = `point ${p.k + 1} · budget ${pctInt(p.budget)} · ${fmt.pct(p.accuracy)} @ ${fmt.ms(p.latency_ms)}`;
    if (p.candidate_id === candidateId) return `<li class="current"><b>${label}</b> (this candidate)</li>`;
    if (p.candidate_id == null) return `<li class="muted">${label} (not stored)</li>`;
    return `<li><a href="#/candidates/${p.candidate_id}" data-sibling="${p.candidate_id}">${label}</a> <span class="muted">#${p.candidate_id}</span></li>`;
  };
  return `<div class="card" id="family-card"><h2>Family point ${me.k + 1} of ${points.length}</h2>
    <div class="note">One weight set serves every point: each keeps a subset of the previous point's channels and weights. Its bundle (all points, one weight set) comes from the family export: SDK <code>export_family</code>, REST <code>POST /v1/jobs/{id}/family-export</code>.</div>
    <ol class="family-points">${points.map(item).join("")}</ol></div>`;
}

async function pageCandidate(token, candidateId) {
  setPage("candidate");
  const candidate = await api(`/v1/candidates/${candidateId}`);
  const job = await api(`/v1/jobs/${candidate.job_id}`);
  const model = await optionalApi(`/v1/models/${job.model_id}`);
  const family = job.spec && job.spec.family ? await optionalApi(`/v1/jobs/${job.id}/family`) : null;
  if (!current(token)) return;
  const base = job.baseline || {};
  const drop = base.accuracy != null && candidate.accuracy != null ? candidate.accuracy - base.accuracy : null;
  const onFront = (job.best || []).some((c) => c.id === candidate.id);
  const speed = base.latency_ms && candidate.latency_ms ? base.latency_ms / candidate.latency_ms : null;
  const rows = layerRows(candidate, model);
  // A front point the job fine-tuned (distillation after the search) shows both accuracies.
  const tuned = candidate.one_shot_accuracy != null
    ? `<div class="sub" id="finetune-accuracy">one-shot ${fmt.pct(candidate.one_shot_accuracy)} · fine-tuned ${candidate.finetuned_accuracy != null ? fmt.pct(candidate.finetuned_accuracy) : "failed"}</div>`
    : "";
  app().innerHTML = `
    <div class="crumbs"><a href="#/jobs">Jobs</a> / <a href="#/jobs/${job.id}">job ${job.id}</a> / candidate ${candidate.id}</div>
    <div class="page-head"><h1>Candidate #${candidate.id}</h1>
      ${candidate.feasible ? "" : '<span class="badge failed plain">violates a constraint</span>'}
      ${onFront ? '<span class="chip">on the Pareto front</span>' : ""}
      <span class="muted">evaluation #${candidate.index + 1} of job ${job.id}${model ? ` · ${esc(model.name)}` : ""}</span></div>
    <div class="grid stats">
      <div class="card stat"><div class="label">Accuracy</div><div class="value">${fmt.pct(candidate.accuracy)}</div>
        <div class="sub ${drop != null && drop < -0.01 ? "bad" : ""}">${drop != null ? `${drop >= 0 ? "+" : ""}${(100 * drop).toFixed(2)} pts vs dense` : ""}</div>${tuned}</div>
      <div class="card stat"><div class="label">Predicted latency</div><div class="value">${fmt.ms(candidate.latency_ms)}</div>
        <div class="sub">${speed ? `${speed.toFixed(2)}× vs dense · ` : ""}predictor v${candidate.predictor_version ?? "—"}</div></div>
      <div class="card stat"><div class="label">Measured latency</div><div class="value">${fmt.ms(candidate.measured_latency_ms)}</div>
        <div class="sub">${candidate.measured_latency_ms != null ? "re-measured on the device" : "export to measure"}</div></div>
      <div class="card stat"><div class="label">Size</div><div class="value">${fmt.bytes(candidate.size_bytes)}</div>
        <div class="sub">${candidate.macs != null ? `${fmt.macs(candidate.macs)}MACs` : ""}</div></div>
    </div>
    ${familyCard(family, candidate.id)}
    <div class="card"><h2>Per-layer policy</h2>
      <div id="layer-chart" class="plot small"></div>
      <div class="note">Bars: kept fraction of output channels, coloured by sparsity scheme; diamonds: weight bits; hatched: blocks replaced by identity.</div></div>
    <div class="card" id="breakdown" data-state="loading"><h2>Where the time goes</h2>
      <div class="note" id="breakdown-source">Pricing each layer on the job's device…</div>
      <div id="time-chart" class="plot small"></div>
      <div class="grid two gap-top">
        <div><h3>Why not faster</h3><ol id="why-not-faster" class="advice"></ol></div>
        <div><h3>Choices that buy no speed here</h3><ul id="no-speed" class="flags"></ul></div></div></div>
    <div class="grid two gap-top">
      <div class="card"><h2>Latency: predicted vs measured</h2><div id="latency-chart" class="plot small"></div></div>
      <div class="card"><h2>Export</h2>
        <div class="export-form">
          <label><input type="checkbox" id="export-int8"> int8 (QDQ)</label>
          <label>fine-tune epochs <input type="number" id="export-epochs" value="0" min="0" max="100"></label>
          <button class="btn btn-primary" id="export-button" type="button">Export ONNX</button>
        </div>
        <div class="muted">Builds the compressed model, measures it on the job's device next to the dense model and reports the speedup.</div>
        <div id="export-status"></div></div>
    </div>
    <div class="card table-card"><h2>Layers</h2><table id="layer-table"><thead><tr><th>Layer</th><th class="num">Width</th><th>Scheme</th><th class="num">Bits</th><th>Skipped</th></tr></thead>
      <tbody>${rows.map((r) => `<tr><td class="mono">${esc(r.name)}</td><td class="num">${r.skipped ? "—" : Number(r.width).toFixed(2)}</td>
        <td>${r.skipped ? "—" : esc(schemeLabel(r))}</td><td class="num">${r.skipped ? "—" : r.bits ?? "fp32"}</td>
        <td>${r.skipped ? `<span class="badge failed plain">skipped with ${esc(r.skipped)}</span>` : ""}</td></tr>`).join("")}</tbody></table></div>`;
  const layerDiv = $("#layer-chart");
  const latDiv = $("#latency-chart");
  purgeOnLeave(layerDiv);
  purgeOnLeave(latDiv);
  await Promise.all([drawLayers(layerDiv, rows), drawLatency(latDiv, candidate, job, null)]);
  if (!current(token)) return;
  $("#export-button").addEventListener("click", () => exportCandidate(token, candidate, job, latDiv));
  ready(token);
  const timeDiv = $("#time-chart");
  purgeOnLeave(timeDiv);
  try {   // the first look at a model builds its graph on the server: the rest of the page is up already
    const breakdown = await api(`/v1/candidates/${candidate.id}/breakdown`);
    if (current(token)) await drawBreakdown(timeDiv, breakdown);
  } catch (err) {
    if (!current(token) || err.status === 401) return;
    $("#breakdown").dataset.state = "error";
    $("#breakdown-source").textContent = `No per-layer breakdown: ${err.message}`;
  }
}

const pctInt = (v) => `${Math.round(100 * v)} %`;

async function drawBreakdown(div, b) {
  const card = $("#breakdown");
  const present = b.layers.filter((l) => l.present);
  const names = [...present.map((l) => l.name), "overhead"];
  const flagged = present.filter((l) => l.flags.length);
  $("#breakdown-source").textContent = `${b.source === "predictor" ? "Predicted" : "Estimated"} ${fmt.ms(b.total_ms)} against ${fmt.ms(b.dense_total_ms)} dense · ${b.source_words}` +
    `${b.round_to > 1 ? ` · channel block ${b.round_to}` : ""}. Bars: each layer's time in this candidate next to the dense model; amber: a choice that buys no speed.`;
  const hoverOf = (l) => `${esc(l.name)}: ${(100 * l.share).toFixed(1)} % of the time · ${pctInt(l.removed)} of its work removed, ${pctInt(Math.max(l.saved, 0))} of its time saved` +
    (l.flags.length ? `<br>${l.flags.map((f) => `⚠ ${esc(f.reason)}`).join("<br>")}` : "");
  await plotlyReady();
  const traces = [
    { type: "bar", name: "dense model", x: names, y: [...present.map((l) => l.dense_ms), b.dense_overhead_ms],
      marker: { color: "#cbd5e1" }, hovertemplate: "%{x}: %{y:.3f} ms dense<extra></extra>" },
    { type: "bar", name: "this candidate", x: names, y: [...present.map((l) => l.predicted_ms), b.overhead_ms],
      marker: { color: [...present.map((l) => (l.flags.length ? "#d97706" : COLORS.accent)), "#64748b"] },
      hovertext: [...present.map(hoverOf), "session, input copy and per-op costs"], textposition: "none",
      hovertemplate: "%{y:.3f} ms · %{hovertext}<extra></extra>" },
  ];
  await Plotly.react(div, traces, { ...BASE_LAYOUT, barmode: "group", bargap: 0.2, margin: { l: 56, r: 16, t: 30, b: 110 },
    xaxis: { tickangle: -45, categoryorder: "array", categoryarray: names, automargin: true, tickfont: { size: 10 } },
    yaxis: { title: { text: "time (ms)" }, gridcolor: "#f1f5f9", rangemode: "tozero" } }, PLOT_CONFIG);
  div.dataset.layers = String(present.length);
  div.dataset.flagged = String(flagged.length);
  $("#why-not-faster").innerHTML = b.advice.length
    ? b.advice.map((a) => `<li data-layer="${esc(a.layer)}"><b class="mono">${esc(a.layer)}</b>: ${pctInt(a.removed)} of its work removed, ${pctInt(Math.max(a.saved, 0))} of its time saved.
        <div class="suggestion">→ ${esc(a.suggestion)}</div></li>`).join("")
    : '<li class="muted">Every pruned layer got faster in proportion to the work removed.</li>';
  $("#no-speed").innerHTML = flagged.length
    ? flagged.flatMap((l) => l.flags.map((f) => `<li data-layer="${esc(l.name)}" data-kind="${esc(f.kind)}"><b class="mono">${esc(l.name)}</b>: ${esc(f.reason)}</li>`)).join("")
    : '<li class="muted">None: every choice of this candidate is one the device turns into speed.</li>';
  card.dataset.state = "ready";
}

async function exportCandidate(token, candidate, job, latDiv) {
  const button = $("#export-button");
  const status = $("#export-status");
  button.disabled = true;
  status.innerHTML = '<div class="result pending" id="export-result" data-status="submitting"><b>Submitting…</b></div>';
  try {
    const accepted = await api(`/v1/candidates/${candidate.id}/export`, {
      method: "POST", json: { format: "onnx", int8: $("#export-int8").checked,
        finetune_epochs: Number($("#export-epochs").value || 0) },
    });
    let artifact = { id: accepted.artifact_id, status: accepted.status, format: "onnx", int8: $("#export-int8").checked,
      finetune_epochs: Number($("#export-epochs").value || 0) };
    while (current(token)) {
      status.innerHTML = artifactBox(artifact);
      if (artifact.status !== "pending") break;
      await new Promise((r) => setTimeout(r, 700));
      artifact = await api(`/v1/artifacts/${accepted.artifact_id}`);
    }
    if (!current(token)) return;
    if (artifact.status === "ready") {
      await drawLatency(latDiv, candidate, job, artifact);
      $("#download").addEventListener("click", async () => {
        const res = await api(`/v1/artifacts/${artifact.id}/download`, { raw: true });
        const url = URL.createObjectURL(await res.blob());
        const a = Object.assign(document.createElement("a"), { href: url, download: `candidate-${candidate.id}.onnx` });
        a.click();
        setTimeout(() => URL.revokeObjectURL(url), 1000);
      });
    }
  } catch (err) {
    if (!current(token)) return;
    status.innerHTML = `<div class="result failed" id="export-result" data-status="error"><b>The server refused the export.</b>
      <div id="export-error">${esc(err.message)}</div></div>`;
  } finally {
    if (current(token)) button.disabled = false;
  }
}

// ---------------------------------------------------------------- devices

async function pageDevices(token, deviceId) {
  setPage(deviceId ? "device" : "devices");
  const devices = await api("/v1/devices");
  if (!current(token)) return;
  const list = devices.data.map((d) => `<tr class="link ${d.id === deviceId ? "selected" : ""}" data-href="#/devices/${d.id}">
      <td><b>${esc(d.name)}</b></td><td>${esc(d.kind)}</td><td>${esc(d.runtime)}</td><td class="num">${d.threads}</td>
      <td>${d.shared ? '<span class="chip">built-in</span>' : "yours"}</td></tr>`).join("");
  app().innerHTML = `
    <div class="page-head"><h1>Devices</h1><span class="muted">latency targets, their measurements and predictors</span></div>
    <div class="card table-card"><table id="devices-table"><thead><tr><th>Name</th><th>Kind</th><th>Runtime</th>
      <th class="num">Threads</th><th></th></tr></thead><tbody>${list}</tbody></table></div>
    <div id="device-detail">${deviceId ? "" : '<div class="card empty gap-top">Pick a device to see its measurements and latency predictor.</div>'}</div>`;
  for (const tr of document.querySelectorAll("tr.link")) {
    tr.addEventListener("click", () => { location.hash = tr.dataset.href; });
  }
  if (!deviceId) { ready(token); return; }
  const device = devices.data.find((d) => d.id === deviceId);
  if (!device) throw new ApiError(404, `device ${deviceId} not found`);
  const [measurements, predictors] = await Promise.all([
    api(`/v1/devices/${deviceId}/measurements?limit=2000`), api(`/v1/predictors?device_id=${deviceId}`),
  ]);
  if (!current(token)) return;
  await deviceDetail(token, device, measurements, predictors);
  ready(token);
}

function holdoutPairs(metrics) {
  const h = (metrics && metrics.holdout) || null;
  if (!h) return null;
  if (Array.isArray(h)) return { measured: h.map((p) => p.measured_ms), predicted: h.map((p) => p.predicted_ms), names: h.map((p) => p.name || "") };
  if (h.measured_ms && h.predicted_ms) return { measured: h.measured_ms, predicted: h.predicted_ms, names: h.names || h.measured_ms.map(() => "") };
  return null;
}

function metricLabel(key) {
  const labels = { rmse_ms: "RMSE", mape: "MAPE", within_5pct: "within ±5 %", within_10pct: "within ±10 %",
    n_train: "trained on", n_holdout: "held-out", n_test: "held-out" };
  return labels[key] || key.replace(/_/g, " ");
}
function metricValue(key, v) {
  if (typeof v !== "number") return esc(String(v));
  if (key.startsWith("within") || key === "mape") return v <= 1 ? fmt.pct(v, 1) : `${v.toFixed(1)} %`;
  if (key.endsWith("_ms")) return fmt.ms(v);
  return Number.isInteger(v) ? fmt.int(v) : v.toFixed(4);
}

async function deviceDetail(token, device, measurements, predictors) {
  const done = measurements.data.filter((m) => m.status === "done" && m.latency_ms != null);
  const counts = {};
  for (const m of measurements.data) counts[m.status] = (counts[m.status] || 0) + 1;
  // The predictor your jobs use: your own newest on a shared device, else the device's newest.
  const own = predictors.data.filter((p) => p.scope === "tenant");
  const usable = own.length ? own : predictors.data;
  const latest = usable[usable.length - 1];
  const scalar = latest ? Object.entries(latest.metrics || {}).filter(([, v]) => typeof v !== "object") : [];
  const within = latest && latest.metrics ? latest.metrics.within_10pct : null;
  $("#device-detail").innerHTML = `
    <div class="page-head device-head"><h1>${esc(device.name)}</h1><span class="chip">${esc(device.runtime)} · ${device.threads} thread${device.threads > 1 ? "s" : ""}</span></div>
    <div class="grid stats">
      <div class="card stat"><div class="label">Measurements</div><div class="value" id="measurement-count">${fmt.int(measurements.count)}</div>
        <div class="sub">${Object.entries(counts).map(([k, v]) => `${v} ${esc(k)}`).join(" · ") || "none yet"}</div></div>
      <div class="card stat"><div class="label">Predictor</div><div class="value">${latest ? `v${latest.version}` : "—"}</div>
        <div class="sub">${latest ? esc(latest.kind) : "calibrate the device to train one"}</div></div>
      <div class="card stat"><div class="label">Held-out within ±10 %</div><div class="value">${within != null ? metricValue("within_10pct", within) : "—"}</div>
        <div class="sub">on architectures not seen in training</div></div>
      <div class="card stat"><div class="label">Median latency</div><div class="value">${done.length ? fmt.ms(median(done.map((m) => m.latency_ms))) : "—"}</div>
        <div class="sub">of ${fmt.int(done.length)} measured models</div></div>
    </div>
    <div class="grid two">
      <div class="card"><h2>Predicted vs measured (held out)</h2><div id="predictor-chart" class="plot small"></div>
        <div class="note" id="predictor-note"></div></div>
      <div class="card"><h2>Predictor versions</h2>${predictors.data.length ? `<table id="predictor-table"><thead><tr><th>Version</th><th>Kind</th>
        ${scalar.map(([k]) => `<th class="num">${esc(metricLabel(k))}</th>`).join("")}</tr></thead><tbody>
        ${predictors.data.slice().reverse().map((p) => `<tr><td>v${p.version}</td><td>${esc(p.kind)}</td>
          ${scalar.map(([k]) => `<td class="num">${p.metrics && p.metrics[k] != null ? metricValue(k, p.metrics[k]) : "—"}</td>`).join("")}</tr>`).join("")}
        </tbody></table>` : '<div class="empty">No predictor yet.</div>'}</div>
    </div>
    <div class="card"><h2>Measured latency</h2><div id="measurement-chart" class="plot small"></div></div>
    <div class="card table-card"><h2>Latest measurements <span class="muted light">(${Math.min(15, measurements.data.length)} of ${fmt.int(measurements.count)})</span></h2><table id="measurement-table"><thead><tr><th>#</th><th>Status</th><th>Purpose</th>
      <th class="num">Latency</th><th class="num">MACs</th><th>Measured</th></tr></thead><tbody>
      ${measurements.data.slice(0, 15).map((m) => `<tr><td class="mono">${m.id}</td><td><span class="badge ${{ done: "succeeded", failed: "failed", claimed: "running" }[m.status] || "queued"}">${esc(m.status)}</span></td>
        <td>${esc(m.purpose)}</td><td class="num">${fmt.ms(m.latency_ms)}</td><td class="num">${fmt.macs((m.features || {}).macs)}</td>
        <td class="muted">${esc(fmt.when(m.measured_at))}${m.error ? ` <span class="error">${esc(m.error)}</span>` : ""}</td></tr>`).join("")
        || '<tr><td colspan="6" class="empty">No measurements yet.</td></tr>'}
      </tbody></table></div>`;
  await plotlyReady();
  if (!current(token)) return;
  const predDiv = $("#predictor-chart");
  const measDiv = $("#measurement-chart");
  purgeOnLeave(predDiv);
  purgeOnLeave(measDiv);
  const pairs = latest ? holdoutPairs(latest.metrics) : null;
  if (pairs && pairs.measured.length) {
    const hi = Math.max(...pairs.measured, ...pairs.predicted) * 1.08;
    const inBand = pairs.measured.map((m, i) => Math.abs(pairs.predicted[i] - m) <= 0.1 * m);
    await Plotly.react(predDiv, [
      { x: [0, hi, hi, 0], y: [0, 1.1 * hi, 0.9 * hi, 0], fill: "toself", mode: "lines", name: "±10 %",
        fillcolor: "rgba(5,150,105,0.10)", line: { width: 0 }, hoverinfo: "skip" },
      { x: [0, hi], y: [0, hi], mode: "lines", name: "exact", line: { color: "#94a3b8", dash: "dot", width: 1 }, hoverinfo: "skip" },
      { type: "scatter", mode: "markers", name: "held-out model", x: pairs.measured, y: pairs.predicted, text: pairs.names,
        marker: { size: 7, color: inBand.map((ok) => (ok ? COLORS.ok : COLORS.constraint)), line: { color: "#fff", width: 1 } },
        hovertemplate: "%{text}<br>measured %{x:.3f} ms<br>predicted %{y:.3f} ms<extra></extra>" },
    ], { ...BASE_LAYOUT, xaxis: { title: { text: "measured (ms)" }, range: [0, hi], gridcolor: "#f1f5f9" },
      yaxis: { title: { text: "predicted (ms)" }, range: [0, hi], gridcolor: "#f1f5f9" } }, PLOT_CONFIG);
    predDiv.dataset.points = String(pairs.measured.length);
    predDiv.dataset.inBand = String(inBand.filter(Boolean).length);
    $("#predictor-note").textContent = `${inBand.filter(Boolean).length} of ${inBand.length} held-out predictions within ±10 % (predictor v${latest.version}).`;
  } else {
    predDiv.innerHTML = `<div class="empty">${latest ? "This predictor version stored no held-out pairs." : "No predictor trained for this device yet."}</div>`;
    predDiv.dataset.points = "0";
  }
  if (done.length) {
    const withMacs = done.filter((m) => (m.features || {}).macs != null);
    const useMacs = withMacs.length === done.length;
    await Plotly.react(measDiv, [{
      type: "scatter", mode: "markers", x: useMacs ? done.map((m) => m.features.macs) : done.map((m) => m.id),
      y: done.map((m) => m.latency_ms), marker: { size: 6, color: COLORS.accent, opacity: 0.7 },
      text: done.map((m) => m.purpose), hovertemplate: `measurement %{text}<br>%{y:.3f} ms<extra></extra>`,
    }], { ...BASE_LAYOUT, showlegend: false,
      xaxis: { title: { text: useMacs ? "MACs" : "measurement id" }, tickformat: useMacs ? "~s" : "", gridcolor: "#f1f5f9" },
      yaxis: { title: { text: "latency (ms)" }, gridcolor: "#f1f5f9", rangemode: "tozero" } }, PLOT_CONFIG);
  } else {
    measDiv.innerHTML = '<div class="empty">No finished measurements yet.</div>';
  }
  measDiv.dataset.points = String(done.length);
}

function median(values) {
  const s = values.slice().sort((a, b) => a - b);
  const mid = Math.floor(s.length / 2);
  return s.length % 2 ? s[mid] : (s[mid - 1] + s[mid]) / 2;
}

// ---------------------------------------------------------------- compare jobs

const JOB_COLORS = ["#4f46e5", "#059669", "#dc2626", "#d97706", "#0891b2", "#7c3aed", "#db2777", "#475569"];
const BOUND_LABELS = {
  max_latency_ms: ["latency ≤", "ms", "the most accurate candidate at most this slow"],
  min_accuracy: ["accuracy ≥", "%", "the fastest candidate at least this accurate"],
  max_accuracy_drop: ["accuracy drop ≤", "points", "the fastest candidate within this drop of its own dense model"],
};
const jobLabel = (j) => `#${j.id} ${j.algorithm} · seed ${j.seed} · ${j.device}`;

async function pageCompare(token, idsText) {
  setPage("compare");
  const ids = idsText.split(",").map((x) => x.trim()).filter(Boolean);
  if (!ids.length) throw new ApiError(422, "pick jobs to compare on the jobs page");
  const data = await api(`/v1/compare?jobs=${encodeURIComponent(ids.join(","))}`);
  if (!current(token)) return;
  app().innerHTML = `
    <div class="crumbs"><a href="#/jobs">Jobs</a> / compare</div>
    <div class="page-head"><h1>Compare ${data.jobs.length} jobs</h1>
      <span class="muted">${data.jobs.map((j) => `<a href="#/jobs/${j.id}">#${j.id}</a>`).join(" · ")}</span></div>
    <div class="grid two">
      <div class="card"><h2>Fronts: accuracy vs predicted latency</h2><div id="compare-fronts" class="plot"></div>
        <div class="note">Each job's front of feasible candidates, points equal within measurement resolution folded. Click a point to open it.</div></div>
      <div class="card"><h2>Hypervolume as candidates arrive</h2><div id="compare-hv" class="plot"></div>
        <div class="note">Area each front dominates up to its reference point (${esc(data.reference)}), as a share of that reference box: comparable across devices.</div></div>
    </div>
    <div class="card table-card"><div class="plot-head bound-head"><h2>Best point under a bound</h2><span class="spacer"></span>
      <form id="bound-form" class="bound-form">
        <select id="bound-kind">${Object.entries(BOUND_LABELS).map(([k, [label]]) => `<option value="${k}">${esc(label)}</option>`).join("")}</select>
        <input id="bound-value" type="number" step="any" min="0" required placeholder="value">
        <span class="muted" id="bound-unit">ms</span>
        <button class="btn btn-primary" type="submit">Apply</button></form></div>
      <div id="compare-table-card">${compareTable(data)}</div></div>`;
  const frontsDiv = $("#compare-fronts");
  const hvDiv = $("#compare-hv");
  purgeOnLeave(frontsDiv);
  purgeOnLeave(hvDiv);
  const kind = $("#bound-kind");
  kind.addEventListener("change", () => { $("#bound-unit").textContent = BOUND_LABELS[kind.value][1]; });
  $("#bound-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const raw = Number($("#bound-value").value);
    const value = kind.value === "max_latency_ms" ? raw : raw / 100;   // the form takes % and points
    const card = $("#compare-table-card");
    try {
      const bounded = await api(`/v1/compare?jobs=${encodeURIComponent(ids.join(","))}&${kind.value}=${encodeURIComponent(value)}`);
      if (current(token)) card.innerHTML = compareTable(bounded);
    } catch (err) {
      if (current(token)) card.innerHTML = `<div class="banner" id="bound-error">${esc(err.message)}</div>${compareTable(data)}`;
    }
  });
  await drawCompare(frontsDiv, hvDiv, data);
  ready(token);
}

function compareTable(data) {
  const bound = data.bound;
  const words = bound ? (() => {
    const [label, unit, meaning] = BOUND_LABELS[bound.kind];
    const shown = bound.kind === "max_latency_ms" ? bound.value : 100 * bound.value;
    return `${label} ${Number(shown.toFixed(4))} ${unit}: ${meaning}`;
  })() : "";
  const rows = data.jobs.map((j, i) => {
    const hv = j.hypervolume.final_normalized;
    const best = j.best;
    const bestCell = !bound ? '<span class="muted">set a bound</span>'
      : best ? `<a href="#/candidates/${best.id}"><b>${fmt.pct(best.accuracy)}</b> @ ${fmt.ms(best.latency_ms)}</a> <span class="muted">#${best.id}</span>`
        : '<span class="muted">none meets it</span>';
    return `<tr data-job="${j.id}"><td><span class="legend-dot job-dot-${i}"></span><a href="#/jobs/${j.id}" class="mono">#${j.id}</a></td>
      <td><span class="chip">${esc(j.algorithm)}</span></td><td>${esc(j.device)}</td><td class="num">${j.seed}</td>
      <td class="num">${fmt.int(j.total)}</td><td class="num">${fmt.int(j.front.id.length)}</td>
      <td class="num">${hv == null ? "—" : fmt.pct(hv, 1)}</td><td class="best-under" data-best="${best ? best.id : ""}">${bestCell}</td></tr>`;
  }).join("");
  return `${bound ? `<div class="note bound-note" id="bound-words">${esc(words)}</div>` : ""}
    <table id="compare-table"><thead><tr><th>Job</th><th>Algorithm</th><th>Device</th><th class="num">Seed</th>
    <th class="num">Candidates</th><th class="num">Front points</th><th class="num">Hypervolume</th><th>Best under the bound</th></tr></thead>
    <tbody>${rows}</tbody></table>`;
}

async function drawCompare(frontsDiv, hvDiv, data) {
  await plotlyReady();
  const fronts = data.jobs.map((j, i) => {
    const order = j.front.id.map((_, k) => k).sort((a, b) => j.front.latency_ms[a] - j.front.latency_ms[b]);
    const f = pick(j.front, order);
    return { type: "scatter", mode: "lines+markers", name: jobLabel(j), x: f.latency_ms, y: f.accuracy, customdata: f.id,
      text: f.summary.map((t, k) => (f.duplicates[k] ? `${t} (+${f.duplicates[k]} equal)` : t)),
      hovertemplate: `<b>${esc(jobLabel(j))}</b><br>candidate %{customdata}<br>accuracy %{y:.2%} · %{x:.3f} ms<br>%{text}<extra></extra>`,
      line: { shape: "hv", color: JOB_COLORS[i % JOB_COLORS.length], width: 1.5 },
      marker: { size: 7, color: JOB_COLORS[i % JOB_COLORS.length] } };
  });
  const dense = data.jobs.filter((j) => j.baseline.accuracy != null && j.baseline.latency_ms != null);
  if (dense.length) {
    fronts.push({ type: "scatter", mode: "markers", name: "dense model", x: dense.map((j) => j.baseline.latency_ms),
      y: dense.map((j) => j.baseline.accuracy), text: dense.map((j) => jobLabel(j)),
      hovertemplate: "<b>dense model</b> of %{text}<br>accuracy %{y:.2%} · %{x:.3f} ms<extra></extra>",
      marker: { size: 13, symbol: "star", color: COLORS.baseline } });
  }
  const layout = { ...BASE_LAYOUT, hovermode: "closest", legend: { ...BASE_LAYOUT.legend, y: 1.14 },
    xaxis: { title: { text: "predicted latency (ms)" }, gridcolor: "#f1f5f9", zeroline: false },
    yaxis: { title: { text: "accuracy" }, tickformat: ".1%", gridcolor: "#f1f5f9", zeroline: false } };
  await Plotly.react(frontsDiv, fronts, layout, PLOT_CONFIG);
  frontsDiv.dataset.jobs = String(data.jobs.length);
  frontsDiv.dataset.points = String(data.jobs.reduce((n, j) => n + j.front.id.length, 0));
  frontsDiv.on("plotly_click", (ev) => {
    const point = ev.points && ev.points[0];
    if (point && point.customdata != null) location.hash = `#/candidates/${point.customdata}`;
  });
  const curves = data.jobs.map((j, i) => {
    const h = j.hypervolume;
    return { type: "scatter", mode: "lines", name: jobLabel(j), x: h.candidates, y: h.normalized,
      text: h.elapsed_s.map((s) => (s == null ? "" : ` · ${fmt.secs(s)} in`)),
      hovertemplate: `<b>${esc(jobLabel(j))}</b><br>%{x} candidates%{text}<br>hypervolume %{y:.1%}<extra></extra>`,
      line: { color: JOB_COLORS[i % JOB_COLORS.length], width: 2, shape: "hv" } };
  });
  await Plotly.react(hvDiv, curves, { ...BASE_LAYOUT, hovermode: "x unified", legend: { ...BASE_LAYOUT.legend, y: 1.14 },
    xaxis: { title: { text: "candidates evaluated" }, gridcolor: "#f1f5f9", rangemode: "tozero" },
    yaxis: { title: { text: "hypervolume (share of reference box)" }, tickformat: ".0%", gridcolor: "#f1f5f9", rangemode: "tozero" } },
  PLOT_CONFIG);
  hvDiv.dataset.curves = String(curves.filter((c) => c.x.length).length);
}

// ---------------------------------------------------------------- router

async function route() {
  if (!apiKey()) { showLogin(); return; }
  const token = newView();
  $("#session").hidden = false;
  $("#key-hint").textContent = `key ${apiKey().slice(0, 6)}…`;
  const parts = (location.hash.replace(/^#\/?/, "") || "jobs").split("/");
  const id = parts[1] ? Number(parts[1]) : null;
  app().innerHTML = '<div class="empty">Loading…</div>';
  try {
    if (parts[0] === "jobs" && id) await pageJob(token, id);
    else if (parts[0] === "candidates" && id) await pageCandidate(token, id);
    else if (parts[0] === "devices") await pageDevices(token, id);
    else if (parts[0] === "compare") await pageCompare(token, parts[1] || "");
    else await pageJobs(token);
  } catch (err) {
    showError(token, err);
  }
}

window.addEventListener("hashchange", route);
document.addEventListener("DOMContentLoaded", () => {
  $("#sign-out").addEventListener("click", () => { sessionStorage.removeItem(KEY_STORE); showLogin(); });
  route();
});
