// lmforge's page: the run dashboard (metrics.jsonl as uPlot charts, polled while a run is live)
// and the chat playground (OpenAI-style streaming from this server's /v1/chat/completions).
// Plain script, no build step; every text from a run or a model is set with textContent.
"use strict";

const POLL_MS = 2000; // metrics of the runs on screen are re-read this often
const LIST_EVERY = 3; // ...and the run list every third poll
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd"];
const $ = (id) => document.getElementById(id);

const state = {
  info: null, // {chat, runs_dir}
  runs: [], // [{name, status, updated, last}], newest first
  metrics: {}, // run name -> {events, offset, fileId, badLines}
  current: null, // the run shown in the Runs view
  charts: {}, // loss, lr, other, compare: uPlot instances (tests read their data)
  chatHistory: [],
  chatAbort: null,
};
window.lmforge = state; // for the browser tests and for poking at it from the console

async function getJSON(url) {
  const resp = await fetch(url);
  if (!resp.ok) {
    let detail = resp.statusText;
    try { detail = (await resp.json()).detail || detail; } catch (e) { /* not JSON */ }
    throw new Error(`${url}: ${detail}`);
  }
  return resp.json();
}

function showError(el, message) {
  el.textContent = message || "";
  el.hidden = !message;
}

// ---- metrics: read metrics.jsonl incrementally (byte offset + file identity) ----

async function pullMetrics(name) {
  const m = state.metrics[name] || (state.metrics[name] = { events: [], offset: 0, fileId: "", badLines: 0 });
  let changed = false;
  for (;;) {
    const q = new URLSearchParams({ name, offset: m.offset, file_id: m.fileId });
    const chunk = await getJSON(`web/metrics?${q}`);
    if (chunk.reset) { m.events = []; m.badLines = 0; changed = true; } // a resumed run rewrote its log
    if (chunk.events.length) { m.events.push(...chunk.events); changed = true; }
    m.offset = chunk.offset;
    m.fileId = chunk.file_id;
    m.badLines += chunk.bad_lines;
    if (!chunk.more) return changed;
  }
}

// {x, y} of `key` over steps; the last value wins when a step repeats (a final eval logged twice)
function points(events, key) {
  const byStep = new Map();
  for (const e of events) {
    if (typeof e.step === "number" && key in e) byStep.set(e.step, typeof e[key] === "number" ? e[key] : null);
  }
  return byStep;
}

// uPlot wants one shared, sorted x array; series missing a step get null (gaps are spanned)
function align(maps) {
  const xs = [...new Set(maps.flatMap((m) => [...m.keys()]))].sort((a, b) => a - b);
  return [xs, ...maps.map((m) => xs.map((x) => (m.has(x) ? m.get(x) : null)))];
}

function valLossKey(events) {
  for (const e of events) for (const k in e) if (/^val_.*loss$/.test(k)) return k;
  return "val_loss";
}

function numericKeys(events) {
  const keys = new Set();
  for (const e of events) for (const k in e) if (k !== "step" && typeof e[k] === "number") keys.add(k);
  return [...keys].sort();
}

// ---- charts ----

const chartHeight = (elId) => (elId === "chart-compare" ? 400 : 240);

function makeChart(elId, title, seriesDefs, yLabel) {
  const el = $(elId);
  el.textContent = "";
  const opts = {
    title,
    width: Math.max(300, el.clientWidth || 600),
    height: chartHeight(elId),
    scales: { x: { time: false } },
    series: [{ label: "step" }, ...seriesDefs.map((s, i) => ({
      label: s.label,
      stroke: s.color || COLORS[i % COLORS.length],
      width: 1.5,
      dash: s.dash,
      spanGaps: true,
      points: { show: s.points || false, size: 5 },
    }))],
    // 3 significant digits: uPlot's default ticks would print 0.0015 and 0.002 both as "0.002"
    axes: [{ label: "step" }, { label: yLabel || "", size: 70, values: (u, ticks) => ticks.map((v) => String(Number(v.toPrecision(3)))) }],
    legend: { live: true },
  };
  return new uPlot(opts, [[], ...seriesDefs.map(() => [])], el);
}

function resizeCharts() {
  for (const [key, chart] of Object.entries(state.charts)) {
    const el = $(`chart-${key}`);
    if (chart && el && el.clientWidth) chart.setSize({ width: el.clientWidth, height: chartHeight(el.id) });
  }
}

function drawRunCharts() {
  const m = state.metrics[state.current];
  if (!m) return;
  const ev = m.events;
  const vkey = valLossKey(ev);
  if (state.lossKey !== vkey) { // the legend names the validation key (val_loss, val_mlm_loss...)
    if (state.charts.loss) state.charts.loss.destroy();
    state.charts.loss = makeChart("chart-loss", "loss", [{ label: "train loss" }, { label: vkey, points: true }], "nats/token");
    state.lossKey = vkey;
  }
  state.charts.loss.setData(align([points(ev, "loss"), points(ev, vkey)]));
  state.charts.lr.setData(align([points(ev, "lr")]));
  fillSelect($("other-metric"), numericKeys(ev).filter((k) => !["loss", "lr", vkey].includes(k)), "grad_norm");
  const other = $("other-metric").value;
  if (state.otherKey !== other) {
    if (state.charts.other) state.charts.other.destroy();
    state.charts.other = makeChart("chart-other", other || "(no other metric)", [{ label: other || "-" }]);
    state.otherKey = other;
  }
  state.charts.other.setData(align([points(ev, other)]));
  showError($("run-bad-lines"), m.badLines ? `${m.badLines} line(s) of metrics.jsonl are not JSON objects and were skipped` : "");
}

function drawCompare() {
  const a = $("compare-a").value, b = $("compare-b").value;
  const ea = (state.metrics[a] || { events: [] }).events, eb = (state.metrics[b] || { events: [] }).events;
  fillSelect($("compare-metric"), ["loss + val loss", ...numericKeys([...ea, ...eb])], "loss + val loss");
  const metric = $("compare-metric").value;
  const key = `${a}\u0000${b}\u0000${metric}`;
  if (state.compareKey !== key) { // the series labels change: a new chart
    if (state.charts.compare) state.charts.compare.destroy();
    const defs = metric === "loss + val loss"
      ? [{ label: `${a} loss`, color: COLORS[0] }, { label: `${b} loss`, color: COLORS[1] },
         { label: `${a} ${valLossKey(ea)}`, color: COLORS[0], dash: [6, 4], points: true },
         { label: `${b} ${valLossKey(eb)}`, color: COLORS[1], dash: [6, 4], points: true }]
      : [{ label: `${a} ${metric}`, color: COLORS[0] }, { label: `${b} ${metric}`, color: COLORS[1] }];
    state.charts.compare = makeChart("chart-compare", metric === "loss + val loss" ? "loss" : metric, defs);
    state.compareKey = key;
  }
  const maps = metric === "loss + val loss"
    ? [points(ea, "loss"), points(eb, "loss"), points(ea, valLossKey(ea)), points(eb, valLossKey(eb))]
    : [points(ea, metric), points(eb, metric)];
  state.charts.compare.setData(align(maps));
}

// keep a select's options equal to `values`, its choice kept when still offered
function fillSelect(sel, values, preferred) {
  const current = sel.value;
  const have = [...sel.options].map((o) => o.value);
  if (have.length !== values.length || have.some((v, i) => v !== values[i])) {
    sel.textContent = "";
    for (const v of values) sel.append(new Option(v, v));
  }
  if (values.includes(current)) sel.value = current;
  else if (values.includes(preferred)) sel.value = preferred;
}

// ---- the runs view ----

function fmt(v) {
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : v.toPrecision(5);
  if (v === null) return "null";
  return typeof v === "object" ? JSON.stringify(v) : String(v);
}

function renderRunList() {
  const ul = $("run-list");
  ul.textContent = "";
  for (const r of state.runs) {
    const li = document.createElement("li");
    const a = document.createElement("a");
    a.href = `#run=${encodeURIComponent(r.name)}`;
    a.textContent = r.name;
    a.dataset.run = r.name;
    if (r.name === state.current) a.className = "selected";
    const meta = document.createElement("span");
    meta.className = `badge ${r.status}`;
    meta.textContent = r.status + (typeof r.last.step === "number" ? ` · step ${r.last.step}` : "");
    li.append(a, " ", meta);
    ul.append(li);
  }
  const noRuns = $("no-runs");
  noRuns.hidden = state.runs.length > 0;
  noRuns.textContent = `No run folders under ${state.info.runs_dir} yet: start one, e.g. ` +
    `lmforge pretrain --out_dir ${state.info.runs_dir}/my-run`;
  for (const id of ["compare-a", "compare-b"]) fillSelect($(id), state.runs.map((r) => r.name), null);
}

async function refreshRuns() {
  state.runs = (await getJSON("web/runs")).runs;
  renderRunList();
  if (state.current === null && state.runs.length && !location.hash.slice(1)) route(); // a first run appeared
}

async function showRun(name) {
  state.current = name;
  renderRunList();
  $("run-detail").hidden = !name;
  if (!name) return;
  $("run-title").textContent = name;
  if (state.charts.lr) state.charts.lr.destroy();
  state.charts.lr = makeChart("chart-lr", "learning rate", [{ label: "lr" }]);
  state.lossKey = state.otherKey = state.detailStatus = undefined; // drawRunCharts makes the others
  await Promise.all([pullMetrics(name), showDetails(name)]);
  if (state.current === name) drawRunCharts(); // unless another run was chosen meanwhile
}

async function showDetails(name) {
  const d = await getJSON(`web/run?name=${encodeURIComponent(name)}`);
  if (state.current !== name) return;
  const badge = $("run-status");
  badge.textContent = d.status;
  badge.className = `badge ${d.status}`;
  showError($("run-failure"), d.failure);
  showError($("run-summary-error"), d.summary_error);
  const table = $("run-summary");
  table.textContent = "";
  for (const [k, v] of Object.entries(d.summary || {})) {
    if (k === "sample" || k === "samples" || k === "sample_prompt") continue; // shown below
    const tr = table.insertRow();
    tr.insertCell().textContent = k;
    tr.insertCell().textContent = fmt(v);
  }
  const samples = $("run-samples");
  samples.textContent = d.samples.length ? "" : (d.summary ? "(no sample in summary.json)" : "(the run has no summary.json yet)");
  for (const s of d.samples) {
    const pre = document.createElement("pre");
    const prompt = document.createElement("b");
    prompt.textContent = s.prompt;
    pre.append(prompt, s.output);
    if (s.expected !== undefined) pre.append(`\n(expected: ${s.expected})`);
    samples.append(pre);
  }
  showDoctor(d.doctor);
  $("run-config").textContent = d.config ?? "(no config.yaml)";
  state.detailStatus = d.status;
}

// The training doctor's findings (lmforge doctor), most severe first.
function showDoctor(findings) {
  const box = $("run-doctor");
  box.textContent = "";
  if (findings === null || findings === undefined) {
    box.textContent = "(not enough metrics to diagnose yet)";
    return;
  }
  if (!findings.length) {
    box.textContent = "No problems found.";
    return;
  }
  for (const f of findings) {
    const p = document.createElement("p");
    p.className = `finding ${f.severity}`;
    const head = document.createElement("b");
    head.textContent = `${f.severity}: ${f.kind}. `;
    const remedy = document.createElement("i");
    remedy.textContent = ` → ${f.remedy}`;
    p.append(head, f.evidence, remedy);
    box.append(p);
  }
}

// ---- navigation and polling ----

function route() {
  let hash = "";
  try { hash = decodeURIComponent(location.hash.slice(1)); } catch (e) { /* a mangled address: the landing view */ }
  const hasRuns = state.info.runs_dir !== null;
  let view = hash.split("=")[0] || (hasRuns ? "runs" : "chat");
  if (view === "run") view = "runs";
  if ((view === "chat" && !state.info.chat) || (view !== "chat" && !hasRuns)) view = hasRuns ? "runs" : "chat";
  for (const v of ["runs", "compare", "chat"]) {
    $(`view-${v}`).hidden = v !== view;
    $(`tab-${v}`).classList.toggle("active", v === view);
  }
  if (view === "runs") {
    // the landing page draws the newest run without a click
    const name = hash.startsWith("run=") ? hash.slice(4) : (state.runs[0] || {}).name || null;
    if (!name) $("run-detail").hidden = true;
    else if (name !== state.current) showRun(name).catch(pageError);
  } else if (view === "compare") {
    if (!$("compare-b").value && state.runs.length > 1) $("compare-b").value = state.runs[1].name;
    pollCompare().catch(pageError);
  } else if (view === "chat") {
    if (!$("chat-model").options.length) loadModels();
  }
  return view;
}

async function pollCompare() {
  const names = [...new Set([$("compare-a").value, $("compare-b").value])].filter(Boolean);
  await Promise.all(names.map(pullMetrics));
  drawCompare();
}

let ticks = 0;
let polling = false;
async function tick() {
  if (document.hidden || polling || state.info.runs_dir === null) return;
  polling = true;
  try {
    ticks += 1;
    if (ticks % LIST_EVERY === 0) await refreshRuns();
    if (!$("view-runs").hidden && state.current) {
      if (await pullMetrics(state.current)) drawRunCharts();
      const listed = state.runs.find((r) => r.name === state.current);
      if (listed && listed.status !== state.detailStatus) await showDetails(state.current);
    } else if (!$("view-compare").hidden) {
      await pollCompare();
    }
    showError($("page-error"), "");
  } catch (e) {
    pageError(e);
  } finally {
    polling = false;
  }
}

function pageError(e) { showError($("page-error"), String(e.message || e)); }

// ---- chat playground ----

function authHeaders() {
  const key = $("chat-api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function loadModels() {
  const sel = $("chat-model");
  try {
    const resp = await fetch("v1/models", { headers: authHeaders() });
    if (!resp.ok) throw new Error(resp.status === 401 ? "the server wants an API key: enter it on the right" : `v1/models: ${resp.status} ${resp.statusText}`);
    fillSelect(sel, (await resp.json()).data.map((m) => m.id), null);
    showError($("chat-error"), "");
  } catch (e) {
    showError($("chat-error"), String(e.message || e));
  }
}

function chatBubble(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  div.textContent = text;
  $("chat-log").append(div);
  return div;
}

function numberField(id, name, { min, max, integer, optional }) {
  const raw = $(id).value.trim();
  if (raw === "" && optional) return undefined;
  const v = Number(raw);
  if (raw === "" || !Number.isFinite(v) || (integer && !Number.isInteger(v)) || v < min || v > max) {
    throw new Error(`${name} must be ${integer ? "an integer" : "a number"} from ${min} to ${max}, got "${raw}"`);
  }
  return v;
}

async function sendChat(text) {
  const body = {
    model: $("chat-model").value,
    messages: [],
    stream: true,
    temperature: numberField("chat-temperature", "temperature", { min: 0, max: 2 }),
    top_p: numberField("chat-top-p", "top_p", { min: 0.000001, max: 1 }),
    max_tokens: numberField("chat-max-tokens", "max_tokens", { min: 1, max: 1e9, integer: true }),
  };
  const seed = numberField("chat-seed", "seed", { min: -(2 ** 53), max: 2 ** 53, integer: true, optional: true });
  if (seed !== undefined) body.seed = seed;
  const system = $("chat-system").value.trim();
  if (system) body.messages.push({ role: "system", content: system });
  state.chatHistory.push({ role: "user", content: text });
  body.messages.push(...state.chatHistory);
  chatBubble("user", text);
  const bubble = chatBubble("assistant", "");
  bubble.classList.add("streaming");
  const abort = new AbortController();
  state.chatAbort = abort;
  $("chat-stop").hidden = false;
  $("chat-send").disabled = true;
  let reply = "", pieces = 0, finish = null;
  const t0 = performance.now();
  try {
    const resp = await fetch("v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(body),
      signal: abort.signal,
    });
    if (!resp.ok) {
      let msg = `${resp.status} ${resp.statusText}`;
      try { const j = await resp.json(); msg = (j.error && j.error.message) || j.detail || msg; } catch (e) { /* not JSON */ }
      throw new Error(typeof msg === "string" ? msg : JSON.stringify(msg));
    }
    // server-sent events: "data: {json}" lines, "data: [DONE]" at the end
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "", done = false;
    while (!done) {
      const r = await reader.read();
      if (r.done) break;
      buf += decoder.decode(r.value, { stream: true });
      let nl;
      while (!done && (nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl).replace(/\r$/, "");
        buf = buf.slice(nl + 1);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") { done = true; break; }
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
        const choice = (chunk.choices || [])[0] || {};
        const piece = (choice.delta || {}).content;
        if (piece) { reply += piece; pieces += 1; bubble.textContent = reply; }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
    if (!done) throw new Error("the stream ended before [DONE]");
  } catch (e) {
    if (e.name !== "AbortError") showError($("chat-error"), String(e.message || e));
  } finally {
    bubble.classList.remove("streaming");
    state.chatAbort = null;
    $("chat-stop").hidden = true;
    $("chat-send").disabled = false;
    const secs = (performance.now() - t0) / 1000;
    $("chat-stats").textContent = `${pieces} chunks in ${secs.toFixed(1)} s` + (finish ? ` · finish: ${finish}` : "");
    if (reply) state.chatHistory.push({ role: "assistant", content: reply });
    else state.chatHistory.pop(); // nothing came back: the turn is not kept
    bubble.dataset.done = "true";
  }
}

function setupChat() {
  $("chat-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("chat-input").value;
    if (!text.trim() || state.chatAbort) return;
    showError($("chat-error"), "");
    try {
      sendChat(text).catch((e) => showError($("chat-error"), String(e.message || e)));
      $("chat-input").value = "";
    } catch (e) {
      showError($("chat-error"), String(e.message || e)); // a bad sampling field: nothing sent
    }
  });
  $("chat-input").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("chat-form").requestSubmit(); }
  });
  $("chat-stop").addEventListener("click", () => state.chatAbort && state.chatAbort.abort());
  $("chat-clear").addEventListener("click", () => {
    if (state.chatAbort) state.chatAbort.abort();
    state.chatHistory = [];
    $("chat-log").textContent = "";
  });
  $("chat-api-key").addEventListener("change", loadModels);
  $("chat-settings").addEventListener("submit", (ev) => ev.preventDefault()); // Enter in a field
}

// ---- start ----

async function main() {
  state.info = await getJSON("web/info");
  const hasRuns = state.info.runs_dir !== null;
  $("tab-runs").hidden = $("tab-compare").hidden = !hasRuns;
  $("tab-chat").hidden = !state.info.chat;
  $("runs-dir").textContent = hasRuns ? `runs: ${state.info.runs_dir}` : "";
  if (state.info.chat) setupChat();
  if (hasRuns) {
    await refreshRuns();
    if (state.runs.length > 1) $("compare-b").value = state.runs[1].name;
    for (const id of ["compare-a", "compare-b", "compare-metric"]) $(id).addEventListener("change", () => pollCompare().catch(pageError));
    $("other-metric").addEventListener("change", drawRunCharts);
    setInterval(tick, POLL_MS);
  }
  window.addEventListener("hashchange", route);
  window.addEventListener("resize", resizeCharts);
  route();
}

main().catch(pageError);
