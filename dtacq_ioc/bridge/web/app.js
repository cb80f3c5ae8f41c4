// The bridge's own page: PVWS over /pvws/pv, plots with uPlot. No build step.
"use strict";

const state = { ws: null, cards: [], card: null, values: {}, labels: {}, readonly: true,
                channels: new Set([1]), wfUpdates: 0, wf: {}, spec: {}, freq: null, wfPlot: null,
                specPlot: null };
const $ = (id) => document.getElementById(id);
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"];

function pv(suffix) { return state.card.prefix + suffix; }

function decode(msg) {
  const b64 = msg.b64dbl || msg.b64flt || msg.b64int || msg.b64srt || msg.b64byt;
  if (!b64) return null;
  const bin = atob(b64);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  if (msg.b64dbl) return new Float64Array(bytes.buffer);
  if (msg.b64flt) return new Float32Array(bytes.buffer);
  if (msg.b64int) return new Int32Array(bytes.buffer);
  if (msg.b64srt) return new Int16Array(bytes.buffer);
  return bytes;
}

function show(msg) {
  const name = msg.pv;
  if (msg.labels) state.labels[name] = msg.labels;
  const cur = state.values[name] || (state.values[name] = {});
  Object.assign(cur, msg);
  if (msg.readonly !== undefined && name === pv("CLKDIV")) {
    state.readonly = msg.readonly;
    document.querySelectorAll("button.write").forEach((b) => { b.disabled = msg.readonly; });
  }
  const suffix = name.slice(state.card.prefix.length);
  const arr = decode(msg);
  if (arr) {
    const m = suffix.match(/^1:AI:(WF|SPEC):(\d\d)(:V)?$/);
    if (m && m[1] === "WF" && m[3]) { state.wf[+m[2]] = arr; state.wfUpdates++; drawWaveforms(); }
    else if (m && m[1] === "SPEC") { state.spec[+m[2]] = arr; drawSpectra(); }
    else if (suffix === "1:AI:SPEC:FREQ") state.freq = arr;
    return;
  }
  const text = cur.text !== undefined ? cur.text : formatNumber(cur.value, cur.precision);
  document.querySelectorAll(`[data-pv="${CSS.escape(suffix)}"]`).forEach((el) => {
    el.textContent = cur.connected === false ? "(disconnected)" : (text === undefined ? "" : text);
    el.className = el.className.replace(/ ?alarm-\w+/g, "") + (cur.severity ? ` alarm-${cur.severity}` : "");
  });
  if (suffix === "1:GAIN:ALL" && msg.labels) fillGains(msg.labels);
  if (suffix === "1:NCHAN" && msg.value !== undefined) fillChannels(+msg.value);
  if (suffix === "RUN:RECENT" && cur.text !== undefined) showRecent(cur.text);
  if (suffix === "CLKDIV_RBV" && !$("clkdiv").value) $("clkdiv").value = cur.value;
}

// Numbers as the PV's precision says (its first update carries it), not all 15 digits.
function formatNumber(v, precision) {
  if (typeof v !== "number" || Number.isInteger(v) || precision === undefined) return v;
  return v.toFixed(Math.max(0, Math.min(precision, 12)));
}

// Log-axis ticks: 1e-5 must not read "0".
function logTicks(u, vals) {
  return vals.map((v) => (v == null ? "" : v >= 0.01 && v < 1e4 ? String(+v.toPrecision(3))
                                                                : v.toExponential(0)));
}

function fillGains(labels) {
  $("gain").innerHTML = labels.map((l, i) => `<option value="${i}">${l}</option>`).join("");
}

function fillChannels(n) {
  const box = $("channels");
  if (box.childElementCount === n) return;
  box.innerHTML = "";
  for (let ch = 1; ch <= n; ch++) {
    const label = document.createElement("label");
    const cb = document.createElement("input");
    cb.type = "checkbox"; cb.checked = state.channels.has(ch); cb.dataset.ch = ch;
    cb.addEventListener("change", () => {
      if (cb.checked) state.channels.add(ch); else state.channels.delete(ch);
      resubscribePlots();
    });
    label.append(cb, ` ${ch}`);
    box.append(label);
  }
}

function plotSuffixes() {
  const out = ["1:AI:SPEC:FREQ"];
  for (const ch of state.channels) {
    const nn = String(ch).padStart(2, "0");
    out.push(`1:AI:WF:${nn}:V`, `1:AI:SPEC:${nn}`);
  }
  return out;
}

let plotted = [];
function resubscribePlots() {
  const want = plotSuffixes().map(pv);
  const drop = plotted.filter((n) => !want.includes(n));
  if (drop.length) send({ type: "clear", pvs: drop });
  send({ type: "subscribe", pvs: want });
  plotted = want;
  state.wf = {}; state.spec = {};
  for (const p of [state.wfPlot, state.specPlot]) if (p) p.destroy();
  state.wfPlot = state.specPlot = null;
}

function makePlot(el, xlabel, ylabel, chans, log) {
  const series = [{ label: xlabel }].concat(chans.map((ch, i) => ({
    label: `ch ${ch}`, stroke: COLORS[i % COLORS.length], width: 1 })));
  return new uPlot({ width: Math.max(400, el.clientWidth - 10), height: 260, series,
    scales: { x: { time: false }, y: log ? { distr: 3 } : {} },
    axes: [{ label: xlabel }, log ? { label: ylabel, values: logTicks, size: 60 } : { label: ylabel }] },
    [[]].concat(chans.map(() => [])), el);
}

function drawWaveforms() {
  $("wf-updates").textContent = state.wfUpdates;
  const chans = [...state.channels].filter((c) => state.wf[c]);
  if (!chans.length) return;
  const n = Math.min(...chans.map((c) => state.wf[c].length));
  if (!state.wfPlot || state.wfPlot.series.length !== chans.length + 1) {
    if (state.wfPlot) state.wfPlot.destroy();
    state.wfPlot = makePlot($("wf-plot"), "ms", "V", chans, false);
  }
  const rate = (state.values[pv("SAMPLE_RATE_RBV")] || {}).value;
  const ms = rate > 0 ? 1e3 / rate : 1;  // sample index until the rate is known
  const x = Array.from({ length: n }, (_, i) => i * ms);
  state.wfPlot.setData([x].concat(chans.map((c) => Array.from(state.wf[c].subarray(0, n)))));
}

function drawSpectra() {
  const chans = [...state.channels].filter((c) => state.spec[c]);
  if (!chans.length || !state.freq) return;
  const n = Math.min(state.freq.length, ...chans.map((c) => state.spec[c].length));
  if (!state.specPlot || state.specPlot.series.length !== chans.length + 1) {
    if (state.specPlot) state.specPlot.destroy();
    state.specPlot = makePlot($("spec-plot"), "Hz", "V", chans, true);
  }
  const floor = (v) => (v > 1e-12 ? v : 1e-12);  // a log axis cannot show zero
  state.specPlot.setData([Array.from(state.freq.subarray(0, n))].concat(
    chans.map((c) => Array.from(state.spec[c].subarray(0, n), floor))));
}

function showRecent(text) {
  let runs = [];
  try { runs = JSON.parse(text || "[]"); } catch (e) { return; }
  const body = $("recent").querySelector("tbody");
  body.innerHTML = "";
  for (const run of runs) {
    const tr = document.createElement("tr");
    const files = (run.files || []).map((f) => {
      const path = typeof f === "string" ? f : (f.path || f.name);
      const a = document.createElement("a");
      a.href = "/data/" + String(path).split("/").map(encodeURIComponent).join("/");
      a.textContent = String(path).split("/").pop();
      return a;
    });
    for (const v of [run.run_id, run.state, run.samples]) {
      const td = document.createElement("td"); td.textContent = v === undefined ? "" : v; tr.append(td);
    }
    const td = document.createElement("td");
    files.forEach((a, i) => { if (i) td.append(" "); td.append(a); });
    tr.append(td);
    body.append(tr);
  }
}

function send(obj) { if (state.ws && state.ws.readyState === 1) state.ws.send(JSON.stringify(obj)); }
function write(suffix, value) { send({ type: "write", pv: pv(suffix), value }); }

const STATUS = ["STATE", "CONNECTED", "MODEL", "HOST", "SITES", "CLKDIV", "CLKDIV_RBV", "SAMPLE_RATE_RBV",
  "EXT_CLOCK", "STREAM:MBPS", "STREAM:COUNTER_ERRORS", "LAST_ERROR", "RUN:STATE_RBV", "RUN:ID_RBV",
  "RUN:SAMPLES_RBV", "RUN:FILE_RBV", "RUN:RECENT", "RUN:NAME", "RUN:LOG", "RUN:SAVE", "1:NCHAN",
  "1:GAIN:ALL", "RUN:START", "RUN:STOP"];

function connect() {
  if (state.ws) state.ws.close();
  state.card = state.cards[+$("card").value];
  state.values = {}; state.wf = {}; state.spec = {}; plotted = [];
  const token = $("token").value;
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const url = `${proto}//${location.host}/pvws/pv` + (token ? `?token=${encodeURIComponent(token)}` : "");
  const ws = new WebSocket(url);
  state.ws = ws;
  ws.onopen = () => {
    $("link").textContent = "connected"; $("link").className = "good";
    send({ type: "subscribe", pvs: STATUS.map(pv) });
    resubscribePlots();
  };
  ws.onclose = () => {
    if (state.ws !== ws) return;
    $("link").textContent = "disconnected"; $("link").className = "bad";
    setTimeout(() => { if (state.ws === ws) connect(); }, 2000);
  };
  ws.onmessage = (ev) => {
    const msg = JSON.parse(ev.data);
    if (msg.type === "update") show(msg);
    else if (msg.type === "error") $("message").textContent = msg.message;
  };
}

async function init() {
  const params = new URLSearchParams(location.search);
  if (params.get("token")) $("token").value = params.get("token");
  state.cards = await (await fetch("cards.json")).json();
  $("card").innerHTML = state.cards.map((c, i) => `<option value="${i}">${c.name} (${c.host})</option>`).join("");
  $("card").addEventListener("change", connect);
  $("connect").addEventListener("click", connect);
  $("set-clkdiv").addEventListener("click", () => write("CLKDIV", +$("clkdiv").value));
  $("set-gain").addEventListener("click", () => write("1:GAIN:ALL", +$("gain").value));
  $("start").addEventListener("click", () => {
    $("message").textContent = "";
    // The IOC ignores empty CHAR-array puts, so empty fields are sent as one space.
    write("RUN:NAME", $("run-name").value || " ");
    write("RUN:LOG", $("run-log").value || " ");
    write("RUN:SAVE", $("run-save").checked ? 1 : 0);
    write("RUN:START", 1);
  });
  $("stop").addEventListener("click", () => write("RUN:STOP", 1));
  connect();
}

init();
