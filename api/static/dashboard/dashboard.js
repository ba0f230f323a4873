/* The operators' dashboard (GET /): the fleet at a glance, the vehicles under the alert
 * threshold, one vehicle over time, and the rejections. Everything it loads comes from this
 * daemon (no CDN); its data come from the JSON API, with the operator key as a bearer when
 * keys are configured. Text from devices (ids, payloads, reasons) only ever goes into
 * textContent, never into HTML. */
"use strict";

const KEY_STORE = "energy-ingest.operator-key";
const REFRESH_MS = { summary: 5000, alerts: 30000, silent: 30000, vehicle: 15000, rejections: 15000 };
const RANGES = [
  { id: "24h", label: "24 h", hours: 24, bucket: "15m" },
  { id: "7d", label: "7 days", hours: 24 * 7, bucket: "1h" },
  { id: "30d", label: "30 days", hours: 24 * 30, bucket: "1d" },
];
const ALERTS_PAGE = 50;
const SILENT_PAGE = 50;
const REJECTIONS_PAGE = 50;
const COLORS = { ac: "#1f6feb", dc: "#2da44e", ratio: "#cf222e", limit: "#9a6700", soc: "#8250df", temp: "#bc4c00" };

const state = { keysRequired: false, skewMs: 0, view: null };

class Unauthorized extends Error {}

// -- small helpers ------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

const kwh = (v) => (v === null || v === undefined ? "—" : v.toFixed(3));
const percent = (ratio) => (ratio === null || ratio === undefined ? "—" : (ratio * 100).toFixed(1) + " %");
const count = (v) => (v === null || v === undefined ? "—" : v.toLocaleString("en"));
const when = (iso) => (iso ? new Date(iso).toLocaleString() : "—");
const now = () => Date.now() + state.skewMs;

function ago(iso) {
  if (!iso) return "";
  const s = Math.round((now() - Date.parse(iso)) / 1000);
  if (s < 0) return "in the future";
  if (s < 90) return `${s} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  if (s < 172800) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} days ago`;
}

function duration(startIso, endIso) {
  const s = Math.max(0, ((endIso ? Date.parse(endIso) : now()) - Date.parse(startIso)) / 1000);
  if (s < 3600) return `${Math.round(s / 60)} min`;
  if (s < 172800) return `${(s / 3600).toFixed(1)} h`;
  return `${(s / 86400).toFixed(1)} days`;
}

function vehicleLink(id) {
  return el("a", { href: "#/vehicle/" + encodeURIComponent(id), class: "mono", text: id });
}

function detailOf(body) {
  if (!body || body.detail === undefined) return "";
  if (typeof body.detail === "string") return body.detail;
  return body.detail.map((p) => (p.field ? `${p.field}: ${p.message}` : p.message)).join("; ");
}

function card(label, value, detail, status) {
  return el(
    "div",
    { class: "card" + (status ? " " + status : "") },
    el("div", { class: "label", text: label }),
    el("div", { class: "value", text: value }),
    detail ? el("div", { class: "detail", text: detail }) : null,
  );
}

function table(headers, rows, emptyText) {
  const head = el("tr", {}, ...headers.map(([text, cls]) => el("th", { class: cls, text })));
  const body = rows.length
    ? rows
    : [el("tr", {}, el("td", { class: "empty", colspan: String(headers.length), text: emptyText }))];
  return el("div", { class: "table-wrap" }, el("table", {}, el("thead", {}, head), el("tbody", {}, ...body)));
}

function banner(text, bad) {
  const node = document.getElementById("banner");
  node.hidden = !text;
  node.textContent = text || "";
  node.classList.toggle("bad", Boolean(bad));
}

// -- the API --------------------------------------------------------------------------------

async function request(path, accept = "application/json") {
  const headers = { Accept: accept };
  const key = localStorage.getItem(KEY_STORE);
  if (key) headers.Authorization = "Bearer " + key;
  const response = await fetch(path, { headers, cache: "no-store", credentials: "omit" });
  const date = response.headers.get("Date");
  if (date) state.skewMs = Date.parse(date) - Date.now();
  if (response.status === 401 || response.status === 403) {
    const body = await response.json().catch(() => null);
    throw new Unauthorized(detailOf(body) || response.statusText);
  }
  if (!response.ok) {
    const body = await response.json().catch(() => null);
    const error = new Error(`${response.status}: ${detailOf(body) || response.statusText}`);
    error.status = response.status;
    throw error;
  }
  return response;
}

async function api(path) {
  return (await request(path)).json();
}

function query(params) {
  const q = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    if (value !== null && value !== undefined) q.set(name, String(value));
  }
  return q.toString();
}

// -- the operator key ---------------------------------------------------------------------

function showAuth() {
  const node = document.getElementById("auth");
  node.replaceChildren();
  if (!state.keysRequired) {
    node.append(el("span", { text: "API open: no operator keys configured" }));
  } else if (localStorage.getItem(KEY_STORE)) {
    node.append(
      el("span", { text: "Operator key set" }),
      el("button", { type: "button", text: "Forget key", onclick: () => askForKey("") }),
    );
  }
}

function askForKey(message) {
  localStorage.removeItem(KEY_STORE);
  stopView();
  showAuth();
  document.getElementById("view").replaceChildren();
  const form = document.getElementById("key-form");
  form.hidden = false;
  document.getElementById("key-error").textContent = message || "";
  document.getElementById("key-input").focus();
}

function keySubmitted(event) {
  event.preventDefault();
  const input = document.getElementById("key-input");
  const key = input.value.trim();
  if (!key) return;
  localStorage.setItem(KEY_STORE, key);
  input.value = "";
  document.getElementById("key-form").hidden = true;
  showAuth();
  route();
}

// -- views: each renders its frame once, then refreshes its parts on timers ---------------

function stopView() {
  if (state.view) for (const timer of state.view.timers) clearTimeout(timer);
  if (state.view && state.view.onStop) state.view.onStop();
  state.view = null;
}

function every(view, ms, refresh) {
  const run = async () => {
    if (state.view !== view) return;
    if (!document.hidden) {
      try {
        await refresh();
        if (state.view === view) {
          banner("");
          document.getElementById("updated").textContent = "Updated " + new Date().toLocaleTimeString();
        }
      } catch (error) {
        if (error instanceof Unauthorized) return askForKey(error.message);
        if (state.view === view) banner("Could not refresh: " + error.message, true);
      }
    }
    if (state.view === view) view.timers.push(setTimeout(run, ms));
  };
  run();
}

function route() {
  stopView();
  if (state.keysRequired && !localStorage.getItem(KEY_STORE)) return askForKey("");
  const hash = location.hash.replace(/^#\/?/, "");
  const [name, ...rest] = hash.split("/");
  const view = { timers: [], name: name || "fleet" };
  state.view = view;
  for (const link of document.querySelectorAll("nav a[data-view]")) {
    link.classList.toggle("current", link.dataset.view === (view.name === "vehicle" ? "fleet" : view.name));
  }
  const main = document.getElementById("view");
  main.replaceChildren();
  if (view.name === "vehicle" && rest.length) {
    let id = rest.join("/");
    try {
      id = decodeURIComponent(id);
    } catch {
      // a hand-typed address with a stray %: show it as it is
    }
    return vehicleView(view, main, id);
  }
  if (view.name === "rejections") return rejectionsView(view, main);
  return fleetView(view, main);
}

// The fleet: summary cards and the alert list.
function fleetView(view, main) {
  const summary = el("section", { class: "cards", id: "summary" });
  const alerts = el("section", { id: "alerts" });
  const silent = el("section", { id: "silent" });
  main.append(el("h1", { text: "Fleet" }), summary, alerts, silent);
  document.title = "Fleet — Energy Ingestion Engine";
  every(view, REFRESH_MS.summary, async () => renderSummary(summary, await api("/v1/overview")));
  let shown = ALERTS_PAGE;
  const refreshAlerts = async () => renderAlerts(alerts, await alertPages(shown), () => {
    shown += ALERTS_PAGE;
    refreshAlerts().catch((error) => banner("Could not load more: " + error.message, true));
  });
  every(view, REFRESH_MS.alerts, refreshAlerts);
  let silentShown = SILENT_PAGE;
  const refreshSilent = async () => renderSilent(silent, await silentPages(silentShown), () => {
    silentShown += SILENT_PAGE;
    refreshSilent().catch((error) => banner("Could not load more: " + error.message, true));
  });
  every(view, REFRESH_MS.silent, refreshSilent);
}

function renderSummary(node, o) {
  const seen = o.devicesSeen;
  const minutes = Math.round(seen.windowSeconds / 60);
  const rejected = o.rejections.count === null ? "—" : count(o.rejections.count) + (o.rejections.atLeast ? "+" : "");
  const part = (label, p) => card(label, p.ok ? "OK" : "Down", p.detail || null, p.ok ? "ok" : "bad");
  const rejections = card(`Rejections (last ${Math.round(o.rejections.windowSeconds / 3600)} h)`, rejected, "newest first on the Rejections page");
  rejections.querySelector(".value").replaceWith(el("a", { class: "value", href: "#/rejections", text: rejected }));
  node.replaceChildren(
    card(`Devices seen (${minutes} min)`, `${count(seen.meters)} · ${count(seen.vehicles)}`, "meters · vehicles"),
    silentCard(o.silentDevices),
    card("Readings / s now", count(o.storedPerSecond.value), `stored, ${o.storedPerSecond.scope}, last ${o.storedPerSecond.windowSeconds} s`),
    rejections,
    card("Buffer", `${count(o.buffer.depth)} / ${count(o.buffer.max)}`, "readings waiting to be written", o.buffer.depth >= o.buffer.max ? "bad" : null),
    part("Database", o.database),
    part("Broker", o.broker),
    part("Partitions", o.partitions),
  );
  node.dataset.threshold = String(o.alertThreshold);
}

function silentCard(silent) {
  const total = silent.meters === null ? null : silent.meters + silent.vehicles;
  const node = card(`Silent (over ${spanText(silent.silentAfterSeconds)})`, `${count(silent.meters)} · ${count(silent.vehicles)}`, "meters · vehicles", total ? "bad" : total === 0 ? "ok" : null);
  const jump = (event) => {
    event.preventDefault();
    document.getElementById("silent").scrollIntoView();
  };
  node.querySelector(".value").replaceWith(el("a", { class: "value", href: "#/", onclick: jump, text: `${count(silent.meters)} · ${count(silent.vehicles)}` }));
  return node;
}

function spanText(seconds) {
  if (seconds % 86400 === 0) return `${seconds / 86400} d`;
  if (seconds % 3600 === 0) return `${seconds / 3600} h`;
  if (seconds % 60 === 0) return `${seconds / 60} min`;
  return `${seconds} s`;
}

// The first `wanted` items of a paged listing (`items` names them), following its cursor:
// the first page's cursor keeps its question (the fleet's window, the silence's span).
async function firstOf(path, params, items, wanted, most) {
  let page = await api(path + "?" + query({ ...params, limit: Math.min(wanted, most) }));
  const found = page[items].slice();
  while (found.length < wanted && page.next) {
    page = await api(path + "?" + query({ cursor: page.next, limit: Math.min(wanted - found.length, most) }));
    found.push(...page[items]);
  }
  return { ...page, [items]: found };
}

const silentPages = (wanted) => firstOf("/v1/devices", {}, "devices", wanted, 1000);

// Devices that stopped reporting, longest silent first: a vehicle links to its page.
function renderSilent(node, page, more) {
  const rows = page.devices.map((d) =>
    el(
      "tr",
      { "data-device": d.deviceId, "data-stream": d.stream },
      el("td", {}, d.stream === "vehicle" ? vehicleLink(d.deviceId) : el("span", { class: "mono", text: d.deviceId })),
      el("td", { text: d.stream }),
      el("td", {}, d.vehicleId ? vehicleLink(d.vehicleId) : "—"),
      el("td", { class: "num", title: d.lastReadingAt, text: when(d.lastReadingAt) }),
      el("td", { class: "num bad-text", text: ago(d.lastReadingAt) }),
    ),
  );
  const toolbar = el("div", { class: "toolbar" });
  if (page.devices.length < page.total) {
    toolbar.append(el("button", { type: "button", text: `Show ${Math.min(SILENT_PAGE, page.total - page.devices.length)} more`, onclick: more }));
  }
  node.replaceChildren(
    el("h2", { text: `Silent devices: ${count(page.total)} with no reading for over ${spanText(page.silentForSeconds)}` }),
    el("p", { class: "sub", text: "A device is silent when its newest reading is older than that; longest silent first. A vehicle charging on a silent meter is named: its efficiency lacks that meter's AC readings." }),
    table([["Device"], ["Stream"], ["Vehicle on it (meters)"], ["Newest reading", "num"], ["Silent", "num"]], rows, "Every device has reported lately."),
    toolbar,
  );
}

const alertPages = (wanted) => firstOf("/v1/analytics/fleet", { alert: "true" }, "vehicles", wanted, 10000);

function renderAlerts(node, page, more) {
  const threshold = percent(page.alertThreshold);
  const rows = page.vehicles.map((v) =>
    el(
      "tr",
      { "data-vehicle": v.vehicleId },
      el("td", {}, vehicleLink(v.vehicleId)),
      el("td", { class: "num bad-text ratio", title: String(v.efficiencyRatio), text: percent(v.efficiencyRatio) }),
      el("td", { class: "num ac", text: kwh(v.totalAcConsumedKwh) }),
      el("td", { class: "num dc", text: kwh(v.totalDcDeliveredKwh) }),
      el("td", { class: "mono hide-narrow" }, v.meters.map((m) => m.meterId).join(", "), ...v.silentMeters.map((m) =>
        el("span", { class: "badge bad", "data-silent-meter": m.meterId, title: "no reading since " + when(m.lastReadingAt), text: `${m.meterId} silent` }))),
      el("td", { class: "num hide-narrow", text: `${count(v.readings.meter)} / ${count(v.readings.vehicle)}` }),
    ),
  );
  const toolbar = el("div", { class: "toolbar" });
  if (page.vehicles.length < page.total) {
    toolbar.append(el("button", { type: "button", text: `Show ${Math.min(ALERTS_PAGE, page.total - page.vehicles.length)} more`, onclick: more }));
  }
  toolbar.append(el("button", { type: "button", text: "Download the whole fleet (CSV)", onclick: downloadFleet }));
  node.replaceChildren(
    el("h2", { text: `Alerts: ${count(page.total)} vehicles under ${threshold}` }),
    el("p", { class: "sub", text: `Charging efficiency (DC into the battery ÷ AC from the grid) from ${when(page.window.startTime)} to ${when(page.window.endTime)}, worst first.` }),
    table(
      [["Vehicle"], ["Efficiency", "num"], ["AC kWh", "num"], ["DC kWh", "num"], ["Meter(s)", "hide-narrow"], ["Readings (meter / vehicle)", "num hide-narrow"]],
      rows,
      "No vehicle is under the threshold.",
    ),
    toolbar,
  );
}

async function downloadFleet(event) {
  const button = event.currentTarget;
  button.disabled = true;
  try {
    const parts = [];
    let path = "/v1/analytics/fleet?" + query({ format: "csv", limit: 10000 });
    while (path) {
      const response = await request(path, "text/csv");
      const text = await response.text();
      parts.push(parts.length ? text.slice(text.indexOf("\n") + 1) : text);
      const next = /<([^>]+)>;\s*rel="next"/.exec(response.headers.get("Link") || "");
      path = next ? next[1] : null;
    }
    const url = URL.createObjectURL(new Blob(parts, { type: "text/csv" }));
    const a = el("a", { href: url, download: "fleet.csv" });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  } catch (error) {
    if (error instanceof Unauthorized) return askForKey(error.message);
    banner("Could not download: " + error.message, true);
  } finally {
    button.disabled = false;
  }
}

// One vehicle: its figures, charts from the series route, its meters, live status, sessions.
function vehicleView(view, main, vehicleId) {
  document.title = vehicleId + " — Energy Ingestion Engine";
  let range = RANGES[0];
  const buttons = RANGES.map((r) =>
    el("button", {
      type: "button",
      text: r.label,
      "data-range": r.id,
      "aria-pressed": String(r === range),
      onclick: () => {
        range = r;
        for (const b of buttons) b.setAttribute("aria-pressed", String(b.dataset.range === r.id));
        refresh().catch((error) => banner("Could not refresh: " + error.message, true));
      },
    }),
  );
  const figures = el("section", { class: "cards", id: "figures" });
  const efficiencyChart = el("div", { class: "chart", id: "efficiency-chart" });
  const socChart = el("div", { class: "chart", id: "soc-chart" });
  const meters = el("section", { id: "meters" });
  const sessions = el("section", { id: "sessions" });
  main.append(
    el("p", {}, el("a", { href: "#/", text: "← Fleet" })),
    el("h1", {}, "Vehicle ", el("span", { class: "mono", text: vehicleId })),
    el("div", { class: "toolbar" }, el("span", { class: "sub", text: "Window:" }), ...buttons),
    figures,
    el("section", { class: "charts" }, efficiencyChart, socChart),
    meters,
    sessions,
  );
  const plots = [];
  const resize = () => {
    for (const [plot, node] of plots) plot.setSize({ width: chartWidth(node), height: plot.height });
  };
  window.addEventListener("resize", resize);
  view.onStop = () => {
    window.removeEventListener("resize", resize);
    for (const [plot] of plots) plot.destroy();
  };

  const refresh = async () => {
    const id = encodeURIComponent(vehicleId);
    const end = new Date(now());
    const start = new Date(end.getTime() - range.hours * 3600 * 1000);
    const span = { startTime: start.toISOString(), endTime: end.toISOString() };
    let answers;
    try {
      answers = await Promise.all([
        api(`/v1/analytics/performance/${id}?` + query(span)),
        api(`/v1/analytics/performance/${id}/series?` + query({ ...span, bucket: range.bucket })),
        api(`/v1/status/vehicle/${id}`).catch((error) => (error.status === 404 ? null : Promise.reject(error))),
        api("/v1/links?" + query({ vehicleId, limit: 20 })),
      ]);
    } catch (error) {
      if (error.status !== 404) throw error;
      figures.replaceChildren(card("Unknown vehicle", "—", error.message.replace(/^404: /, ""), "bad"));
      return;
    }
    const [performance, series, status, links] = answers;
    const meterIds = [...new Set([...performance.meters.map((m) => m.meterId), ...links.links.slice(0, 1).map((l) => l.meterId)])];
    const meterStatus = await Promise.all(
      meterIds.map((m) => api("/v1/status/meter/" + encodeURIComponent(m)).catch((error) => (error.status === 404 ? null : Promise.reject(error)))),
    );
    renderFigures(figures, performance, status);
    plots.splice(0).forEach(([plot]) => plot.destroy());
    const efficiency = drawEfficiency(efficiencyChart, series, performance.alertThreshold, range);
    const soc = drawSoc(socChart, series, range);
    for (const [plot, node] of [[efficiency, efficiencyChart], [soc, socChart]]) if (plot) plots.push([plot, node]);
    renderMeters(meters, performance, meterIds, meterStatus);
    renderSessions(sessions, links.links);
  };
  every(view, REFRESH_MS.vehicle, refresh);
}

function renderFigures(node, p, status) {
  const alert = p.alert;
  node.replaceChildren(
    card("Efficiency", percent(p.efficiencyRatio), alert ? `under the alert threshold (${percent(p.alertThreshold)})` : `alert under ${percent(p.alertThreshold)}`, alert ? "bad" : p.efficiencyRatio === null ? null : "ok"),
    card("AC from the grid", kwh(p.totalAcConsumedKwh) + " kWh", `${count(p.readings.meter)} meter readings`),
    card("DC into the battery", kwh(p.totalDcDeliveredKwh) + " kWh", `${count(p.readings.vehicle)} vehicle readings`),
    card("Avg battery temperature", p.avgBatteryTemp === null ? "—" : p.avgBatteryTemp.toFixed(1) + " °C", "over the window"),
    status
      ? card("Now: state of charge", status.soc.toFixed(1) + " %", `${status.batteryTemp.toFixed(1)} °C · reading of ${when(status.timestamp)} (${ago(status.timestamp)})`)
      : card("Now", "—", "no reading from this vehicle yet"),
    ...p.silentMeters.map((m) =>
      card("Meter silent", m.meterId, `charging on it, no reading since ${when(m.lastReadingAt)} (${ago(m.lastReadingAt)}): the efficiency lacks its AC`, "bad")),
  );
  node.dataset.ratio = String(p.efficiencyRatio);
}

function chartWidth(node) {
  return Math.max(260, node.clientWidth - 16);
}

function axisColor() {
  return getComputedStyle(document.body).getPropertyValue("--muted").trim() || "#5d6878";
}

function plotIn(node, title, seriesOptions, data, scales, axes) {
  node.replaceChildren();
  const points = data[1].filter((v) => v !== null).length; // of the first series
  node.dataset.points = String(points);
  if (!data[0].length || !points) {
    node.append(el("div", { class: "u-title", text: title }), el("div", { class: "nodata", text: "No readings in this window." }));
    return null;
  }
  const stroke = axisColor();
  return new uPlot(
    {
      title,
      width: chartWidth(node),
      height: 240,
      scales: { x: { time: true }, ...scales },
      series: [{}, ...seriesOptions],
      axes: [{ stroke, grid: { stroke: "rgba(128,128,128,0.15)" } }, ...axes.map((a) => ({ stroke, grid: { stroke: "rgba(128,128,128,0.15)" }, ...a }))],
      legend: { live: true },
    },
    data,
    node,
  );
}

const times = (series) => series.series.map((b) => Date.parse(b.start) / 1000);
const pointsOf = (color) => ({ show: true, size: 5, stroke: color, fill: color });

function drawEfficiency(node, series, threshold, range) {
  const xs = times(series);
  const ratio = series.series.map((b) => (b.efficiencyRatio === null ? null : b.efficiencyRatio * 100));
  const limit = xs.map(() => threshold * 100);
  return plotIn(
    node,
    `Efficiency per ${range.bucket} (DC ÷ AC)`,
    [
      { label: "Efficiency %", stroke: COLORS.ratio, width: 2, scale: "%", points: pointsOf(COLORS.ratio), value: (u, v) => (v === null ? "—" : v.toFixed(1) + " %") },
      { label: "Alert under %", stroke: COLORS.limit, dash: [6, 4], width: 1, scale: "%", points: { show: false } },
    ],
    [xs, ratio, limit],
    { "%": { range: (u, min, max) => [Math.min(50, min ?? 50), Math.max(100, max ?? 100)] } },
    [{ scale: "%", values: (u, ticks) => ticks.map((t) => t + " %") }],
  );
}

function drawSoc(node, series, range) {
  const xs = times(series);
  return plotIn(
    node,
    `State of charge and battery temperature per ${range.bucket}`,
    [
      { label: "SoC % (last)", stroke: COLORS.soc, width: 2, scale: "%", points: pointsOf(COLORS.soc) },
      { label: "Battery °C (avg)", stroke: COLORS.temp, width: 1.5, scale: "°C", points: pointsOf(COLORS.temp) },
    ],
    [xs, series.series.map((b) => b.lastSoc), series.series.map((b) => b.avgBatteryTemp)],
    { "%": { range: [0, 100] }, "°C": { auto: true } },
    [
      { scale: "%", values: (u, ticks) => ticks.map((t) => t + " %") },
      { scale: "°C", side: 1, grid: { show: false }, values: (u, ticks) => ticks.map((t) => t + " °C") },
    ],
  );
}

function renderMeters(node, performance, meterIds, statuses) {
  const shares = new Map(performance.meters.map((m) => [m.meterId, m]));
  const rows = meterIds.map((id, i) => {
    const share = shares.get(id);
    const s = statuses[i];
    return el(
      "tr",
      {},
      el("td", { class: "mono", text: id }),
      el("td", { class: "num", text: share ? kwh(share.acConsumedKwh) : "—" }),
      el("td", { class: "num", text: share ? count(share.readings) : "0" }),
      el("td", { class: "num", text: s ? `${s.voltage.toFixed(1)} V` : "—" }),
      el("td", { text: s ? `${when(s.timestamp)} (${ago(s.timestamp)})` : "no reading yet" }),
    );
  });
  node.replaceChildren(
    el("h2", { text: "Meters" }),
    el("p", { class: "sub", text: "The meters it charged on in the window (AC counted while linked), and the one it is linked to now." }),
    table([["Meter"], ["AC kWh in window", "num"], ["Readings", "num"], ["Voltage now", "num"], ["Latest reading"]], rows, "No meter in this window."),
  );
}

function renderSessions(node, links) {
  const rows = links.map((l) =>
    el(
      "tr",
      {},
      el("td", { class: "mono", text: l.meterId }),
      el("td", { text: when(l.startedAt) }),
      el("td", { text: l.endedAt ? when(l.endedAt) : "open (charging here now)" }),
      el("td", { class: "num", text: duration(l.startedAt, l.endedAt) }),
    ),
  );
  node.replaceChildren(
    el("h2", { text: "Sessions" }),
    el("p", { class: "sub", text: "Links of this vehicle to a meter, newest first." }),
    table([["Meter"], ["Started"], ["Ended"], ["Length", "num"]], rows, "This vehicle was never linked to a meter."),
  );
}

// Rejections, newest first, with their reasons.
function rejectionsView(view, main) {
  document.title = "Rejections — Energy Ingestion Engine";
  let source = null;
  let shown = REJECTIONS_PAGE; // "Older" shows one page more; a refresh re-reads them all
  const filters = [["All", null], ["MQTT", "mqtt"], ["HTTP", "http"]].map(([label, value]) =>
    el("button", {
      type: "button",
      text: label,
      "aria-pressed": String(value === source),
      "data-source": value || "all",
      onclick: (event) => {
        source = value;
        shown = REJECTIONS_PAGE;
        for (const b of filters) b.setAttribute("aria-pressed", String(b === event.currentTarget));
        refresh().catch((error) => banner("Could not refresh: " + error.message, true));
      },
    }),
  );
  const list = el("section", { id: "rejections" });
  main.append(
    el("h1", { text: "Rejections" }),
    el("p", { class: "sub", text: "Messages and readings the daemon refused, newest first, with the reason it gave the sender." }),
    el("div", { class: "toolbar" }, ...filters),
    list,
  );
  const refresh = async () => {
    const items = [];
    let next = null;
    do {
      const page = await api("/v1/rejections?" + query({ limit: REJECTIONS_PAGE, source, before: next }));
      items.push(...page.rejections);
      next = page.next;
    } while (next && items.length < shown);
    renderRejections(list, items, next, () => {
      shown += REJECTIONS_PAGE;
      refresh().catch((error) => banner("Could not load more: " + error.message, true));
    });
  };
  every(view, REFRESH_MS.rejections, refresh);
}

function renderRejections(node, items, next, more) {
  const rows = items.map((r) =>
    el(
      "tr",
      { "data-id": String(r.id) },
      el("td", { text: when(r.receivedAt) }),
      el("td", { text: r.source.toUpperCase() }),
      el("td", { class: "mono topic", text: r.topicOrRoute }),
      el("td", { class: "reason", text: r.reason }),
      el("td", { class: "payload" }, el("code", { text: r.payload.length > 300 ? r.payload.slice(0, 300) + " …" : r.payload })),
    ),
  );
  node.replaceChildren(
    table([["Received"], ["Source"], ["Topic or route"], ["Reason"], ["Payload"]], rows, "Nothing rejected."),
    next ? el("div", { class: "toolbar" }, el("button", { type: "button", text: "Older", onclick: more })) : "",
  );
}

// -- start ----------------------------------------------------------------------------------

async function start() {
  document.getElementById("key-form").addEventListener("submit", keySubmitted);
  window.addEventListener("hashchange", route);
  try {
    const health = await (await fetch("/health", { cache: "no-store" })).json();
    state.keysRequired = !String(health.auth).startsWith("open");
  } catch (error) {
    banner("The daemon does not answer: " + error.message, true);
    state.keysRequired = Boolean(localStorage.getItem(KEY_STORE));
  }
  showAuth();
  route();
}

start();
