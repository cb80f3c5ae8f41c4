// The bridge's own page: PVWS over /pvws/pv, plots with uPlot, the runs view over /runs/.
// No build step.
"use strict";

const $ = (id) => document.getElementById(id);
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"];
const STATUS = ["STATE", "CONNECTED", "MODEL", "HOST", "SITES", "SITELIST", "CLKDIV", "CLKDIV_RBV", "SAMPLE_RATE_RBV",
  "SYSCLK_RBV", "EXT_CLOCK", "EXT_CLOCK_RBV", "EXT_CLOCK_FREQ", "STREAM:MBPS", "STREAM:COUNTER_ERRORS",
  "LAST_ERROR", "RESET", "REBOOT", "RUN:START", "RUN:STOP", "RUN:NAME", "RUN:LOG", "RUN:SAVE",
  "RUN:UPLOAD", "RUN:DOWNSAMPLE", "RUN:TRIGGER", "RUN:TRIGGER_ARGS", "RUN:CHANNELS", "RUN:STATE_RBV",
  "RUN:ID_RBV", "RUN:SAMPLES_RBV", "RUN:BYTES_RBV", "RUN:FILE_RBV", "RUN:ELAPSED_RBV", "RUN:LAST_RESULT",
  "RUN:RECENT", "TRIGGERS"];
const SITE_PVS = ["NCHAN", "MODEL", "GAIN:ALL", "DIVIDER_RBV"];
const TR = "MODE:TRANSIENT:";
const SHOT_PVS = ["MODE", TR + "PRE", TR + "POST", TR + "TRIGGER", TR + "SOFT_TRIGGER", TR + "AUTO_REARM",
  TR + "SET_ARM", TR + "SET_ABORT", "SIG:SOFT_TRIGGER", "MODE:TRANS_ACT:STATE", "MODE:TRANS_ACT:PRE",
  "MODE:TRANS_ACT:POST", "MODE:TRANS_ACT:TOTSAM", "SHOT"];
const TRIGGER_LINE = "#000";

const state = {
  ws: null, cards: [], card: null, access: {}, values: {}, readonly: true,
  sites: [], nchan: {},            // site -> channel count, as the card reports them
  plotChans: new Set(["1:01"]),    // "site:NN" keys of plotted channels
  units: "V", fftLog: true, wf: {}, spec: {}, freq: {}, wfUpdates: 0, wfPlot: null, specPlot: null,
  subscribed: new Set(), knownSites: [], lastRunState: null, userStopped: false, runsStarted: 0,
  lastWriteAt: -1e9, refusal: false,
  transient: false, tw: {}, twTb: {}, shotPlot: null,  // the last transient shot, per "site:NN"
};

const nn = (ch) => String(ch).padStart(2, "0");
const pv = (suffix) => state.card.prefix + suffix;
const value = (suffix) => (state.values[suffix] || {}).value;
const text = (suffix) => { const v = state.values[suffix] || {}; return v.text !== undefined ? v.text : v.value; };

// --- PVWS ---

function send(obj) { if (state.ws && state.ws.readyState === 1) state.ws.send(JSON.stringify(obj)); }
function write(suffix, v) {
  state.lastWriteAt = performance.now();
  state.refusal = false;
  send({ type: "write", pv: pv(suffix), value: v });
}

function subscribe(suffixes) {
  const fresh = suffixes.filter((s) => !state.subscribed.has(s));
  fresh.forEach((s) => state.subscribed.add(s));
  if (fresh.length) send({ type: "subscribe", pvs: fresh.map(pv) });
}

function unsubscribe(suffixes) {
  const gone = suffixes.filter((s) => state.subscribed.delete(s));
  if (gone.length) send({ type: "clear", pvs: gone.map(pv) });
}

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

function connect() {
  if (state.ws) state.ws.close();
  state.card = state.cards[+$("card").value];
  Object.assign(state, { values: {}, wf: {}, spec: {}, freq: {}, subscribed: new Set(), sites: [],
                         nchan: {}, knownSites: [], readonly: true, lastRunState: null,
                         transient: false, tw: {}, twTb: {} });
  $("gains").innerHTML = ""; $("channels").innerHTML = ""; $("save-sites").innerHTML = "";
  const token = $("token").value;
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const url = `${proto}//${location.host}/pvws/pv` + (token ? `?token=${encodeURIComponent(token)}` : "");
  const ws = new WebSocket(url);
  state.ws = ws;
  ws.onopen = () => {
    $("link").textContent = "connected"; $("link").className = "good";
    subscribe(STATUS.concat(SHOT_PVS));
    showAccess();
  };
  ws.onclose = () => {
    if (state.ws !== ws) return;
    $("link").textContent = "disconnected"; $("link").className = "bad";
    setTimeout(() => { if (state.ws === ws) connect(); }, 2000);
  };
  ws.onmessage = (ev) => {
    const msg = JSON.parse(ev.data);
    if (msg.type === "update") update(msg);
    else if (msg.type === "error") writeError(msg);
  };
}

// A refused put reaches the bridge without the IOC's reason, which the IOC puts in
// LAST_ERROR at once: a LAST_ERROR that changes after our write is shown instead.
function writeError(msg) {
  if (msg.pv && state.refusal) return;  // the IOC's own words are already up
  const last = text("LAST_ERROR");
  showMessage(msg.message + (msg.pv && last ? ` (the IOC's last error: ${last})` : ""));
}

function lastErrorChanged(cur, msg, before) {
  // A new text, not the subscription's first value (nor the same text republished).
  const fresh = before !== undefined && msg.text !== undefined && msg.text !== before;
  if (!fresh || !cur.text || performance.now() - state.lastWriteAt > 15000) return;
  state.refusal = true;
  showMessage(cur.text);
}

function showMessage(msg) {
  $("message").textContent = msg || "";
  $("message").hidden = !msg;
}

// Why the page cannot write, in words, from what the bridge told us.
function showAccess() {
  const box = $("access");
  let why = "";
  if (state.readonly) {
    const token = $("token").value;
    if (!state.access.tokens) {
      why = "Read-only: this bridge has no write token configured ([bridge] tokens in the IOC's " +
            "config), so nobody can control the cards from here.";
    } else if (!token) {
      why = state.access.one_time
        ? "Read-only: no token. Open the link with ?token=… that the IOC logged when it started " +
          "(a new one-time token is made at each start)."
        : "Read-only: enter one of the bridge's write tokens above and press Connect.";
    } else {
      why = "Read-only: the token was not accepted" +
            (state.access.one_time ? " (the IOC makes a new one at each start: use its latest link)." : ".");
    }
  }
  box.textContent = why;
  box.hidden = !why;
  document.querySelectorAll("button.write, select.write-select").forEach((b) => { b.disabled = state.readonly; });
  showSitesControl();
}

// --- updates ---

function update(msg) {
  const suffix = msg.pv.slice(state.card.prefix.length);
  const first = !state.values[suffix];
  const cur = state.values[suffix] || (state.values[suffix] = {});
  const before = cur.text;
  Object.assign(cur, msg);
  if (msg.readonly !== undefined && suffix === "CLKDIV") { state.readonly = msg.readonly; showAccess(); }
  const arr = decode(msg);
  if (arr) { array(suffix, arr); return; }
  const shown = cur.text !== undefined ? cur.text : formatNumber(cur.value, cur.precision);
  document.querySelectorAll(`[data-pv="${CSS.escape(suffix)}"]`).forEach((el) => {
    el.textContent = cur.connected === false ? "(disconnected)" : (shown === undefined ? "" : shown);
    el.className = el.className.replace(/ ?alarm-\w+/g, "") + (cur.severity ? ` alarm-${cur.severity}` : "");
  });
  const site = suffix.match(/^(\d+):(NCHAN|MODEL|GAIN:ALL|GAIN:(\d\d))$/);
  if (suffix === "SITES" && cur.text !== undefined) setSites(cur.text);
  else if (suffix === "SITELIST" && cur.text !== undefined) setKnownSites(cur.text);
  else if (site && site[2] === "NCHAN" && cur.value !== undefined) setNchan(+site[1], +cur.value);
  else if (site && site[2].startsWith("GAIN")) showSelect(suffix, cur);
  else if (suffix === "TRIGGERS") fillTriggers(cur.text);
  else if (suffix === "LAST_ERROR") lastErrorChanged(cur, msg, before);
  else if (suffix === "RUN:TRIGGER_ARGS" && !$("run-trigger-args").value && cur.text !== "{}") {
    $("run-trigger-args").value = cur.text || "";
  }
  else if (suffix === "MODE") modeChanged(cur);
  else if (suffix.startsWith(TR)) showShotSetting(suffix, cur);
  else if (suffix === "SHOT") drawShot();
  else if (suffix === "RUN:RECENT") showRecent(cur.text);
  else if (suffix === "RUN:LAST_RESULT") showLastRun(cur.text, first);
  else if (suffix === "RUN:STATE_RBV") runStateChanged(cur.value);
  else if (suffix === "RUN:SAMPLES_RBV" || suffix === "RUN:ELAPSED_RBV") showProgress();
  else if (suffix === "RUN:CHANNELS") showSaveChannels();
  else if (suffix === "RUN:FILE_RBV") {
    const m = String(cur.text || "").match(/-(\d+)\.dig$/);  // files are <date>-<n>.dig
    $("run-files").textContent = m ? +m[1] + 1 : 0;
  }
  else if (site && site[2] === "MODEL") showModels();
  else if (suffix === "RUN:TRIGGER" && !state.triggerTouched) $("run-trigger").value = String(cur.value).trim();
  else if (suffix === "RUN:DOWNSAMPLE" && cur.value > 1 && !$("run-ds").value) {
    $("run-ds-on").checked = true; fillInput(suffix, cur.value);
  }
  else if (typeof cur.value === "number") fillInput(suffix, cur.value);
  else if (suffix === "EXT_CLOCK" && msg.value !== undefined) $("ext-clock").checked = labelOf(cur) === "External";
  else if (suffix === "RUN:SAVE" && msg.value !== undefined) $("run-save").checked = labelOf(cur) === "Yes";
  else if (suffix === "RUN:UPLOAD" && msg.value !== undefined) $("run-upload").checked = labelOf(cur) === "Yes";
}

// Setpoint fields start at the card's values; what the user typed is kept.
const FIELDS = { CLKDIV_RBV: ["clkdiv", 1], SAMPLE_RATE_RBV: ["rate-khz", 1e-3], EXT_CLOCK_FREQ: ["ext-freq", 1],
                 "RUN:DOWNSAMPLE": ["run-ds", 1], [TR + "PRE"]: ["tr-pre", 1], [TR + "POST"]: ["tr-post", 1] };
function fillInput(suffix, v) {
  const f = FIELDS[suffix];
  if (f && !$(f[0]).value) $(f[0]).value = +(v * f[1]).toPrecision(9);
}

function labelOf(cur) { return cur.labels ? cur.labels[cur.value] : cur.value; }

// Numbers as the PV's precision says (its first update carries it), not all 15 digits.
function formatNumber(v, precision) {
  if (typeof v !== "number" || Number.isInteger(v) || precision === undefined) return v;
  return v.toFixed(Math.max(0, Math.min(precision, 12)));
}

// --- sites, channels, gains ---

const siteNumbers = (text) => String(text).split(",").map((s) => +s.trim()).filter((s) => s > 0);

// SITELIST: every site the IOC can read, the boxes of the "modules to read" choice.
function setKnownSites(textValue) {
  state.knownSites = [...new Set([...siteNumbers(textValue), ...state.sites])].sort((a, b) => a - b);
  showSitesControl();
}

function setSites(textValue) {
  const sites = siteNumbers(textValue);
  if (sites.join() === state.sites.join()) return;
  state.sites = sites;
  state.knownSites = [...new Set([...state.knownSites, ...sites])].sort((a, b) => a - b);
  // Only channels of the sites read out are plotted; the first of them if none is left.
  for (const key of [...state.plotChans]) if (!sites.includes(+key.split(":")[0])) state.plotChans.delete(key);
  if (!state.plotChans.size && sites.length) state.plotChans.add(`${sites[0]}:01`);
  subscribe(sites.flatMap((s) => SITE_PVS.map((p) => `${s}:${p}`)));
  buildChannels(); buildSaveChannels(); buildGains(); showSitesControl(); resubscribePlots();
}

// The modules read out are the card's SITES, a setpoint: the IOC restarts the card's stream
// on the sites ticked here, and the channels, gains and plots follow. The choice appears,
// and is written, only where the PV takes writes (a read-only bridge, another IOC). The
// boxes are the sites of SITELIST.
function showSitesControl() {
  const box = $("read-sites");
  const cur = state.values.SITES || {};
  const writable = cur.readonly === false;
  box.hidden = !writable;
  if (!writable) return;
  const sites = state.knownSites;
  if (box.querySelectorAll("input").length !== sites.length) {
    box.querySelector("span").innerHTML = sites.map((s) =>
      `<label><input type="checkbox" class="read-site" data-site="${s}"> ${s}</label>`).join(" ");
  }
  box.querySelectorAll(".read-site").forEach((cb) => { cb.checked = state.sites.includes(+cb.dataset.site); });
}

function showModels() {
  for (const s of state.sites) {
    const model = text(`${s}:MODEL`);
    document.querySelectorAll(`.model[data-site="${s}"]`).forEach((el) => { el.textContent = model || ""; });
  }
}

function setNchan(site, n) {
  if (state.nchan[site] === n) return;
  state.nchan[site] = n;
  const gainPvs = [];
  for (let ch = 1; ch <= n; ch++) gainPvs.push(`${site}:GAIN:${nn(ch)}`);
  subscribe(gainPvs);
  buildGains(); buildChannels(); buildSaveChannels(); resubscribePlots();
}

function orderedSites() { return state.sites.filter((s) => state.nchan[s]); }

function buildGains() {
  const box = $("gains");
  box.innerHTML = "";
  for (const s of orderedSites()) {
    const div = document.createElement("div");
    div.className = "site-gains";
    div.innerHTML = `<p>Site ${s}, all channels <select id="gain-all-${s}" data-pv-select="${s}:GAIN:ALL"></select>
      <button class="write" id="set-gain-${s}">Set</button></p>
      <details><summary>per channel</summary><div class="grid" id="gain-ch-${s}"></div></details>`;
    box.append(div);
    const grid = div.querySelector(".grid");
    for (let ch = 1; ch <= state.nchan[s]; ch++) {
      const label = document.createElement("label");
      label.innerHTML = `${nn(ch)} <select id="gain-${s}-${nn(ch)}" class="write-select"
        data-pv-select="${s}:GAIN:${nn(ch)}"></select>`;
      grid.append(label);
      label.querySelector("select").addEventListener("change", (e) => write(`${s}:GAIN:${nn(ch)}`, +e.target.value));
    }
    div.querySelector("button").addEventListener("click", () => write(`${s}:GAIN:ALL`, +$(`gain-all-${s}`).value));
    div.querySelector("button").disabled = state.readonly;
  }
  for (const [suffix, cur] of Object.entries(state.values)) if (/:GAIN:/.test(suffix)) showSelect(suffix, cur);
}

function showSelect(suffix, cur) {
  const sel = document.querySelector(`[data-pv-select="${CSS.escape(suffix)}"]`);
  if (!sel || !cur.labels) return;
  if (sel.options.length !== cur.labels.length) {
    sel.innerHTML = cur.labels.map((l, i) => `<option value="${i}">${l}</option>`).join("");
  }
  if (cur.value !== undefined && document.activeElement !== sel) sel.value = String(cur.value);
}

function buildChannels() {
  const box = $("channels");
  box.innerHTML = "";
  for (const s of orderedSites()) {
    const row = document.createElement("div");
    row.innerHTML = `<b>site ${s}</b> `;
    for (let ch = 1; ch <= state.nchan[s]; ch++) {
      const key = `${s}:${nn(ch)}`;
      const label = document.createElement("label");
      const cb = document.createElement("input");
      cb.type = "checkbox"; cb.checked = state.plotChans.has(key); cb.dataset.key = key;
      cb.addEventListener("change", () => {
        if (cb.checked) state.plotChans.add(key); else state.plotChans.delete(key);
        resubscribePlots();
      });
      label.append(cb, ` ${ch}`);
      row.append(label);
    }
    box.append(row);
  }
}

// Channels to save: RUN:CHANNELS holds 0-based indices over the sites in order ("" = all).
function channelOffsets() {
  const out = {};
  let i = 0;
  for (const s of orderedSites()) { out[s] = i; i += state.nchan[s]; }
  return { offsets: out, total: i };
}

function buildSaveChannels() {
  const box = $("save-sites");
  box.innerHTML = "";
  const { offsets } = channelOffsets();
  for (const s of orderedSites()) {
    const row = document.createElement("div");
    row.innerHTML = `<label><input type="checkbox" class="save-site" data-site="${s}"> <b>site ${s}</b>
      <span class="model" data-site="${s}"></span></label> `;
    for (let ch = 1; ch <= state.nchan[s]; ch++) {
      row.insertAdjacentHTML("beforeend", `<label><input type="checkbox" class="save-ch"
        data-site="${s}" data-index="${offsets[s] + ch - 1}"> ${ch}</label>`);
    }
    box.append(row);
    row.querySelector(".save-site").addEventListener("change", (e) => {
      row.querySelectorAll(".save-ch").forEach((cb) => { cb.checked = e.target.checked; });
    });
    row.querySelectorAll(".save-ch").forEach((cb) => cb.addEventListener("change", () => syncSiteBoxes()));
  }
  showSaveChannels();
  showModels();
}

function syncSiteBoxes() {
  document.querySelectorAll(".save-site").forEach((site) => {
    const boxes = [...document.querySelectorAll(`.save-ch[data-site="${site.dataset.site}"]`)];
    site.checked = boxes.every((b) => b.checked);
    site.indeterminate = !site.checked && boxes.some((b) => b.checked);
  });
}

function parseChannels(textValue) {
  const t = String(textValue || "").trim().toLowerCase();
  if (!t || t === "all") return null;
  const out = new Set();
  for (const part of t.split(",")) {
    const [lo, hi] = part.split("-").map((x) => +x);
    for (let i = lo; i <= (hi === undefined ? lo : hi); i++) out.add(i);
  }
  return out;
}

function showSaveChannels() {
  const chosen = parseChannels(text("RUN:CHANNELS"));
  document.querySelectorAll(".save-ch").forEach((cb) => { cb.checked = !chosen || chosen.has(+cb.dataset.index); });
  syncSiteBoxes();
}

function saveChannelsText() {
  const boxes = [...document.querySelectorAll(".save-ch")];
  const on = boxes.filter((b) => b.checked).map((b) => +b.dataset.index);
  if (on.length === boxes.length) return "all";
  return on.join(",");
}

// --- live plots ---

function plotSuffixes() {
  const out = [];
  for (const key of state.plotChans) {
    const [s, ch] = key.split(":");
    if (!state.nchan[+s]) continue;
    out.push(`${s}:AI:WF:${ch}` + (state.units === "V" ? ":V" : ""), `${s}:AI:SPEC:${ch}`, `${s}:AI:SPEC:FREQ`);
  }
  return [...new Set(out)];
}

function resubscribePlots() {
  const want = plotSuffixes();
  unsubscribe([...state.subscribed].filter((s) => /:AI:(WF|SPEC)/.test(s) && !want.includes(s)));
  subscribe(want);
  state.wf = {}; state.spec = {};
  for (const p of [state.wfPlot, state.specPlot]) if (p) p.destroy();
  state.wfPlot = state.specPlot = null;
  resubscribeShot();
}

function array(suffix, arr) {
  const m = suffix.match(/^(\d+):AI:(WF|SPEC|TW):(\d\d|FREQ|TB)(:V)?$/);
  if (!m) return;
  const key = `${m[1]}:${m[3]}`;
  if (m[2] === "TW") { shotArray(m[1], key, m[3] === "TB", Boolean(m[4]), arr); return; }
  if (m[2] === "SPEC" && m[3] === "FREQ") { state.freq[m[1]] = arr; return; }
  if (m[2] === "SPEC") { state.spec[key] = arr; drawSpectra(); return; }
  if ((state.units === "V") !== Boolean(m[4])) return;  // the other unit, still on its way out
  state.wf[key] = arr; state.wfUpdates++; drawWaveforms();
}

function plotWidth(el) { return Math.max(260, el.clientWidth - 10); }

function logTicks(u, vals) {
  return vals.map((v) => (v == null ? "" : v >= 0.01 && v < 1e4 ? String(+v.toPrecision(3)) : v.toExponential(0)));
}

function makePlot(el, xlabel, ylabel, names, log, opts = {}) {
  const series = [{ label: xlabel }].concat(names.map((n, i) => ({
    label: n.label || n, stroke: COLORS[(n.color ?? i) % COLORS.length], width: 1 })));
  return new uPlot({ width: plotWidth(el), height: 260, series,
    scales: { x: { time: false }, y: log ? { distr: 3 } : {} },
    axes: [{ label: xlabel }, log ? { label: ylabel, values: logTicks, size: 60 } : { label: ylabel, size: 60 }],
    ...opts }, [[]].concat(names.map(() => [])), el);
}

function drawWaveforms() {
  $("wf-updates").textContent = state.wfUpdates;
  const keys = [...state.plotChans].filter((k) => state.wf[k]);
  if (!keys.length) return;
  const n = Math.min(...keys.map((k) => state.wf[k].length));
  if (!state.wfPlot || state.wfPlot.series.length !== keys.length + 1) {
    if (state.wfPlot) state.wfPlot.destroy();
    state.wfPlot = makePlot($("wf-plot"), "ms", state.units === "V" ? "V" : "ADC", keys, false);
  }
  const rate = value("SAMPLE_RATE_RBV");
  const ms = rate > 0 ? 1e3 / rate : 1;  // sample index until the rate is known
  const x = Array.from({ length: n }, (_, i) => i * ms);
  state.wfPlot.setData([x].concat(keys.map((k) => Array.from(state.wf[k].subarray(0, n)))));
}

function drawSpectra() {
  const keys = [...state.plotChans].filter((k) => state.spec[k] && state.freq[k.split(":")[0]]);
  if (!keys.length) return;
  const freq = state.freq[keys[0].split(":")[0]];
  const n = Math.min(freq.length, ...keys.map((k) => state.spec[k].length));
  if (!state.specPlot || state.specPlot.series.length !== keys.length + 1) {
    if (state.specPlot) state.specPlot.destroy();
    state.specPlot = makePlot($("spec-plot"), "Hz", "V", keys, state.fftLog);
  }
  const floor = state.fftLog ? (v) => (v > 1e-12 ? v : 1e-12) : (v) => v;  // a log axis cannot show zero
  state.specPlot.setData([Array.from(freq.subarray(0, n))].concat(
    keys.map((k) => Array.from(state.spec[k].subarray(0, n), floor))));
}

// --- transient shots ---

// The last shot's waveforms of the plotted channels, in the page's unit, while in TRANSIENT.
function shotSuffixes() {
  if (!state.transient) return [];
  const out = [];
  for (const key of state.plotChans) {
    const [s, ch] = key.split(":");
    if (state.nchan[+s]) out.push(`${s}:AI:TW:${ch}` + (state.units === "V" ? ":V" : ""), `${s}:AI:TW:TB`);
  }
  return [...new Set(out)];
}

function resubscribeShot() {
  const want = shotSuffixes();
  unsubscribe([...state.subscribed].filter((s) => /:AI:TW:/.test(s) && !want.includes(s)));
  subscribe(want);  // a new subscription brings the last shot at once (TB stays: still subscribed)
  state.tw = {};
  if (state.shotPlot) state.shotPlot.destroy();
  state.shotPlot = null;
}

function shotArray(site, key, isTb, volts, arr) {
  if (isTb) state.twTb[site] = arr;
  else if ((state.units === "V") === volts) state.tw[key] = arr;
  drawShot();
}

function drawShot() {
  if (!(value("SHOT") > 0)) return;  // no shot yet: the waveforms hold nothing
  const keys = [...state.plotChans].filter((k) => state.tw[k] && state.twTb[k.split(":")[0]]);
  if (!keys.length) return;
  const tb = state.twTb[keys[0].split(":")[0]];
  const n = Math.min(tb.length, ...keys.map((k) => state.tw[k].length));
  if (!state.shotPlot || state.shotPlot.series.length !== keys.length + 1) {
    if (state.shotPlot) state.shotPlot.destroy();
    state.shotPlot = makePlot($("shot-plot"), "ms from trigger", state.units === "V" ? "V" : "ADC", keys,
                              false, { hooks: { draw: [drawTriggerLine] } });
  }
  state.shotPlot.setData([Array.from(tb.subarray(0, n), (t) => t * 1e3)].concat(
    keys.map((k) => Array.from(state.tw[k].subarray(0, n)))));
}

// The trigger, t = 0, as a vertical line over the series.
function drawTriggerLine(u) {
  const x = Math.round(u.valToPos(0, "x", true));
  const { left, top, width, height } = u.bbox;
  const el = $("shot-plot");
  if (x < left || x > left + width) { delete el.dataset.triggerX; return; }
  const c = u.ctx;
  c.save();
  c.strokeStyle = c.fillStyle = TRIGGER_LINE;
  c.lineWidth = 2 * devicePixelRatio;
  c.beginPath(); c.moveTo(x, top); c.lineTo(x, top + height); c.stroke();
  c.font = `${11 * devicePixelRatio}px sans-serif`;
  c.fillText("trigger", x + 4 * devicePixelRatio, top + 12 * devicePixelRatio);
  c.restore();
  el.dataset.triggerX = x;  // canvas pixels, for whoever checks the drawing
}

function modeChanged(cur) {
  showSelect("MODE", cur);
  const transient = labelOf(cur) === "TRANSIENT";
  $("transient").hidden = $("shot-box").hidden = !transient;
  if (transient === state.transient) return;
  state.transient = transient;
  resubscribeShot();
}

function showShotSetting(suffix, cur) {
  const yes = labelOf(cur) === "Yes";
  if (suffix === TR + "SOFT_TRIGGER") $("tr-self").checked = yes;
  else if (suffix === TR + "AUTO_REARM") $("tr-rearm").checked = yes;
  else if (suffix === TR + "TRIGGER") showTrigger(cur.text);
  else if (typeof cur.value === "number") fillInput(suffix, cur.value);
}

// TRIGGER is "soft" or "dN rising|falling".
function showTrigger(textValue) {
  const [line, edge] = String(textValue || "soft").trim().toLowerCase().split(/\s+/);
  const src = $("tr-source");
  src.value = line;
  if (src.value !== line) src.value = "soft";
  $("tr-edge").value = edge === "falling" ? "falling" : "rising";
  $("tr-edge").disabled = src.value === "soft";
}

function triggerText() {
  const line = $("tr-source").value;
  return line === "soft" ? "soft" : `${line} ${$("tr-edge").value}`;
}

// Arm writes the shot's settings first, as Start writes the run's.
function arm() {
  showMessage("");
  const pre = Number($("tr-pre").value), post = Number($("tr-post").value);
  if (!Number.isInteger(pre) || pre < 0) { showMessage("PRE: give a whole number of samples, 0 or more"); return; }
  if (!Number.isInteger(post) || post < 1) { showMessage("POST: give a whole number of samples, 1 or more"); return; }
  write(TR + "PRE", pre);
  write(TR + "POST", post);
  write(TR + "TRIGGER", triggerText());
  write(TR + "SOFT_TRIGGER", $("tr-self").checked ? 1 : 0);
  write(TR + "AUTO_REARM", $("tr-rearm").checked ? 1 : 0);
  write(TR + "SET_ARM", 1);
}

// --- run control ---

function fillTriggers(textValue) {
  let names = [];
  try { names = JSON.parse(textValue || "[]"); } catch (e) { return; }
  const sel = $("run-trigger");
  const keep = sel.value || text("RUN:TRIGGER") || "always";
  sel.innerHTML = names.map((n) => `<option>${n}</option>`).join("");
  if (names.includes(keep)) sel.value = keep;
}

function startRun() {
  showMessage("");
  let args = $("run-trigger-args").value.trim() || "{}";
  try { args = JSON.stringify(JSON.parse(args)); } catch (e) {
    showMessage(`trigger arguments are not JSON: ${e.message}`); return false;
  }
  const channels = saveChannelsText();
  if (channels === "") { showMessage("choose at least one channel to save"); return false; }
  // The IOC ignores empty CHAR-array puts, so empty fields are sent as one space.
  write("RUN:NAME", $("run-name").value || " ");
  write("RUN:LOG", $("run-log").value || " ");
  write("RUN:SAVE", $("run-save").checked ? 1 : 0);
  write("RUN:UPLOAD", $("run-upload").checked ? 1 : 0);
  write("RUN:DOWNSAMPLE", $("run-ds-on").checked ? Math.max(1, +$("run-ds").value || 1) : 1);
  write("RUN:TRIGGER", $("run-trigger").value || "always");
  write("RUN:TRIGGER_ARGS", args);
  write("RUN:CHANNELS", channels);
  write("RUN:START", 1);
  state.userStopped = false;
  state.runsStarted++;
  $("run-count").textContent = state.runsStarted;
  return true;
}

function runStateChanged(v) {
  state.lastRunState = (state.values["RUN:STATE_RBV"].labels || [])[v] || v;
  showProgress();
}

// Auto repeat lives in the page, as in the old one: a run that ends by itself starts the
// next. A run's end is told by a new RUN:LAST_RESULT (a short run may begin and end
// between two updates of RUN:STATE_RBV).
function runEnded(run, first) {
  const fresh = !first && run && run.run_id && run.run_id !== state.lastResultId;
  state.lastResultId = run && run.run_id;
  if (fresh && $("auto-repeat").checked && !state.userStopped && !state.readonly) startRun();
}

function showProgress() {
  const bar = $("run-progress");
  const running = state.lastRunState === "RUNNING";
  let args = {};
  try { args = JSON.parse(text("RUN:TRIGGER_ARGS") || "{}"); } catch (e) { /* shown as indeterminate */ }
  const trig = String(text("RUN:TRIGGER") || "").trim();
  let frac = null;
  if (trig === "sample_count" && args.samples > 0) frac = (value("RUN:SAMPLES_RBV") || 0) / args.samples;
  if (trig === "time_limit" && args.seconds > 0) frac = (value("RUN:ELAPSED_RBV") || 0) / args.seconds;
  if (!running) bar.value = state.lastRunState === "IDLE" && value("RUN:SAMPLES_RBV") ? 1 : 0;
  else if (frac === null) bar.removeAttribute("value");  // indeterminate: the run ends on Stop
  else bar.value = Math.min(1, frac);
}

function fileLink(path) {
  const a = document.createElement("a");
  a.href = "/data/" + String(path).split("/").map(encodeURIComponent).join("/");
  a.textContent = String(path).split("/").pop();
  return a;
}

function showLastRun(textValue, first) {
  let run = null;
  try { run = JSON.parse(textValue || "null"); } catch (e) { return; }
  runEnded(run, first);
  const box = $("last-run");
  box.innerHTML = "";
  if (!run || !run.run_id) return;
  const open = document.createElement("a");
  open.href = `#run=${encodeURIComponent(run.run_id)}`; open.textContent = run.run_id; open.className = "open-run";
  box.append(open, ` ${run.state}, ${run.samples} samples `);
  (run.files || []).forEach((f) => box.append(fileLink(typeof f === "string" ? f : f.path), " "));
}

function showRecent(textValue) {
  let runs = [];
  try { runs = JSON.parse(textValue || "[]"); } catch (e) { return; }
  const body = $("recent").querySelector("tbody");
  body.innerHTML = "";
  for (const run of runs) {
    const tr = document.createElement("tr");
    for (const v of [run.run_id, run.state, run.samples]) {
      const td = document.createElement("td"); td.textContent = v === undefined ? "" : v; tr.append(td);
    }
    const td = document.createElement("td");
    (run.files || []).forEach((f, i) => { if (i) td.append(" "); td.append(fileLink(typeof f === "string" ? f : f.path || f.name)); });
    tr.append(td);
    body.append(tr);
  }
}

function setRate() {
  const khz = +$("rate-khz").value;
  const external = labelOf(state.values["EXT_CLOCK_RBV"] || {}) === "External";
  const clock = external ? value("EXT_CLOCK_FREQ") : value("SYSCLK_RBV");
  const site = orderedSites()[0];
  const divider = value(`${site}:DIVIDER_RBV`) || 1;
  if (!(khz > 0) || !(clock > 0)) { showMessage("sample rate: give a rate in kHz (the card's clock is not known yet)"); return; }
  const clkdiv = Math.max(1, Math.round(clock / (khz * 1e3 * divider)));
  $("clkdiv").value = clkdiv;
  write("CLKDIV", clkdiv);
}

// --- runs view ---

const runsView = { id: null, detail: null, plot: null, range: null, channels: new Set() };

function showView(name) {
  $("live").hidden = name !== "live"; $("runs").hidden = name !== "runs";
  $("tab-live").classList.toggle("on", name === "live"); $("tab-runs").classList.toggle("on", name === "runs");
}

function route() {
  const h = decodeURIComponent(location.hash.slice(1));
  if (h.startsWith("run=")) { showView("runs"); loadRuns(); openRun(h.slice(4)); }
  else if (h === "runs") { showView("runs"); loadRuns(); }
  else showView("live");
}

async function getJSON(url) {
  const resp = await fetch(url);
  const body = await resp.json();
  if (!resp.ok) throw new Error(body.error || resp.statusText);
  return body;
}

function integrity(r) {
  const bad = [];
  if (r.state !== "complete") bad.push(r.state + (r.fault ? `: ${r.fault}` : ""));
  if (r.counter_errors) bad.push(`${r.counter_errors} counter errors`);
  if (r.overruns) bad.push(`${r.overruns} overruns`);
  return bad.length ? bad.join(", ") : "ok";
}

async function loadRuns() {
  const q = new URLSearchParams({ name: $("q-name").value, since: $("q-since").value, until: $("q-until").value });
  let runs;
  try { runs = await getJSON(`runs/?${q}`); } catch (e) { $("runs-note").textContent = e.message; return; }
  const body = $("runs-table").querySelector("tbody");
  body.innerHTML = "";
  for (const r of runs) {
    const tr = document.createElement("tr");
    tr.dataset.run = r.run_id;
    const cells = [r.run_id, r.name, (r.started || "").replace("T", " ").replace("+00:00", ""), r.samples,
                   integrity(r), r.upload || "-"];
    cells.forEach((v, i) => {
      const td = document.createElement("td");
      if (i === 0) { const a = document.createElement("a"); a.href = `#run=${encodeURIComponent(v)}`; a.textContent = v; td.append(a); }
      else td.textContent = v;
      if (i === 4 && v !== "ok") td.className = "err";
      tr.append(td);
    });
    body.append(tr);
  }
  $("runs-note").textContent = runs.length ? `${runs.length} runs` : "no runs match";
}

async function openRun(id) {
  let r;
  try { r = await getJSON(`runs/${encodeURIComponent(id)}`); } catch (e) { showMessage(e.message); return; }
  Object.assign(runsView, { id, detail: r, range: null });
  $("run-detail").hidden = false;
  $("rd-id").textContent = r.run_id;
  $("rd-summary").textContent = `${r.name}; ${r.card}; started ${r.started}; ${r.seconds ?? "?"} s; ` +
    `${r.samples} samples; ${integrity(r)}; upload ${r.upload || "-"}` + (r.log ? `; log: ${r.log}` : "");
  $("rd-files").innerHTML = "";
  r.file_links.forEach((f) => {
    const a = document.createElement("a"); a.textContent = f.name;
    if (f.href) a.href = f.href;
    $("rd-files").append(a, ` (${f.size} B) `);
  });
  $("rd-csv").href = `runs/${encodeURIComponent(id)}/export?format=csv`;
  $("rd-npy").href = `runs/${encodeURIComponent(id)}/export?format=npy`;
  $("rd-header").textContent = JSON.stringify(r.header, null, 1);
  const chans = (r.header.channel_list || []).map(Number);
  runsView.channels = new Set(chans.slice(0, 4));
  const box = $("rd-channels");
  box.innerHTML = "<b>channels</b> ";
  for (const ch of chans) {
    const label = document.createElement("label");
    const cb = document.createElement("input");
    cb.type = "checkbox"; cb.checked = runsView.channels.has(ch); cb.dataset.ch = ch;
    cb.addEventListener("change", () => {
      if (cb.checked) runsView.channels.add(ch); else runsView.channels.delete(ch);
      plotRun();
    });
    label.append(cb, ` ${ch}`);
    box.append(label);
  }
  plotRun();
}

async function plotRun() {
  const id = runsView.id;
  const el = $("rd-plot");
  const chans = [...runsView.channels].sort((a, b) => a - b);
  const t0 = performance.now();
  const q = new URLSearchParams({ channels: chans.join(","), width: Math.min(2000, plotWidth(el)) });
  if (runsView.range) { q.set("start", runsView.range[0]); q.set("end", runsView.range[1]); }
  let d;
  try { d = await getJSON(`runs/${encodeURIComponent(id)}/plot?${q}`); } catch (e) { $("rd-note").textContent = e.message; return; }
  if (id !== runsView.id) return;
  if (runsView.plot) runsView.plot.destroy();
  const names = chans.flatMap((ch, i) => [{ label: `ch ${ch} min`, color: i }, { label: `ch ${ch} max`, color: i }]);
  const hooks = { setSelect: [(u) => {
    if (u.select.width < 2) return;
    const a = u.posToVal(u.select.left, "x"), b = u.posToVal(u.select.left + u.select.width, "x");
    const toRow = (x) => Math.round(d.rate_hz ? x * d.rate_hz : x);
    runsView.range = [Math.max(0, toRow(a)), Math.min(d.rows, toRow(b) + 1)];
    plotRun();
  }] };
  runsView.plot = makePlot(el, d.x_units, d.units, names, false, { hooks, cursor: { drag: { x: true, y: false, setScale: false } } });
  runsView.plot.setData([d.x].concat(chans.flatMap((ch) => [d.min[ch], d.max[ch]])));
  const ms = Math.round(performance.now() - t0);
  el.dataset.drawn = (+(el.dataset.drawn || 0) + 1);
  $("rd-note").textContent = `samples ${d.start}-${d.end} of ${d.rows}, ${d.width} columns of ` +
    `${d.rows_per_column} samples, ${d.exact ? "exact min/max" : "min/max of sampled blocks (zoom in for exact)"}; ` +
    `drawn in ${ms} ms`;
}

// --- start ---

async function init() {
  const params = new URLSearchParams(location.search);
  if (params.get("token")) $("token").value = params.get("token");
  [state.cards, state.access] = await Promise.all([getJSON("cards.json"), getJSON("access.json")]);
  $("card").innerHTML = state.cards.map((c, i) => `<option value="${i}">${c.name} (${c.host})</option>`).join("");
  $("card").addEventListener("change", connect);
  $("connect").addEventListener("click", connect);
  $("tab-live").addEventListener("click", () => { location.hash = ""; });
  $("tab-runs").addEventListener("click", () => { location.hash = "runs"; });
  window.addEventListener("hashchange", route);
  $("run-search").addEventListener("submit", (e) => { e.preventDefault(); loadRuns(); });
  $("rd-full").addEventListener("click", () => { runsView.range = null; plotRun(); });
  $("set-clkdiv").addEventListener("click", () => write("CLKDIV", +$("clkdiv").value));
  $("set-rate").addEventListener("click", setRate);
  $("set-ext").addEventListener("click", () => {
    if ($("ext-freq").value) write("EXT_CLOCK_FREQ", +$("ext-freq").value);
    write("EXT_CLOCK", $("ext-clock").checked ? 1 : 0);
  });
  $("reset").addEventListener("click", () => {
    if (confirm("Reset the readout of this card (restarts its stream)?")) write("RESET", 1);
  });
  $("reboot").addEventListener("click", () => {
    if (confirm("Reboot this card? It is gone for about a minute and any run ends.")) write("REBOOT", 1);
  });
  $("save-all").addEventListener("click", () => { document.querySelectorAll(".save-ch").forEach((c) => { c.checked = true; }); syncSiteBoxes(); });
  $("save-none").addEventListener("click", () => { document.querySelectorAll(".save-ch").forEach((c) => { c.checked = false; }); syncSiteBoxes(); });
  document.querySelectorAll('input[name="units"]').forEach((r) => r.addEventListener("change", () => {
    state.units = r.value; resubscribePlots();
  }));
  document.querySelectorAll('input[name="fft"]').forEach((r) => r.addEventListener("change", () => {
    state.fftLog = r.value === "log";
    if (state.specPlot) state.specPlot.destroy();
    state.specPlot = null; drawSpectra();
  }));
  $("set-sites").addEventListener("click", () => {
    const on = [...document.querySelectorAll(".read-site")].filter((c) => c.checked).map((c) => c.dataset.site);
    write("SITES", on.join(","));
  });
  $("start").addEventListener("click", startRun);
  $("mode").addEventListener("change", (e) => write("MODE", +e.target.value));
  $("tr-source").addEventListener("change", () => { $("tr-edge").disabled = $("tr-source").value === "soft"; });
  $("tr-rearm").addEventListener("change", (e) => write(TR + "AUTO_REARM", e.target.checked ? 1 : 0));
  $("tr-arm").addEventListener("click", arm);
  $("tr-abort").addEventListener("click", () => write(TR + "SET_ABORT", 1));
  $("tr-soft").addEventListener("click", () => write("SIG:SOFT_TRIGGER", 1));
  $("run-trigger").addEventListener("change", () => { state.triggerTouched = true; });
  $("stop").addEventListener("click", () => { state.userStopped = true; write("RUN:STOP", 1); });
  connect();
  route();
}

init();
