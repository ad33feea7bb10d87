// A device: its latest values, a chart per metric over a chosen range (buckets picked from the
// range: min–max band and average from /series), its readings a page at a time, the shown
// range as a CSV download, and (operators and admins) its commands. Live readings update the
// values, the charts and the first page of readings.

import { api } from "./api.js";
import { agoElement, debounce, fill, formatTime, formatValue, h } from "./dom.js";
import { BAND, MetricChart, bucketStart, columns, loadUPlot, pickBucket } from "./chart.js";
import { online, session } from "./state.js";

const RANGES = [
  ["hour", "Last hour", 3600],
  ["day", "Last day", 86400],
  ["week", "Last week", 7 * 86400],
  ["month", "Last month", 30 * 86400],
  ["year", "Last year", 365 * 86400],
  ["custom", "Custom", null],
];
const PAGE_SIZE = 50;

/** A datetime-local input's value (local time, minutes) for a Date. */
function localInput(date) {
  const pad = (n) => String(n).padStart(2, "0");
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())}T${pad(date.getHours())}:${pad(date.getMinutes())}`;
}

export function mount(root, deviceId, params) {
  const abort = new AbortController();
  const signal = abort.signal;
  const state = {
    device: null,
    latest: new Map(),
    range: RANGES.some(([key]) => key === params.get("range")) ? params.get("range") : "day",
    from: params.get("from") ? new Date(params.get("from")) : null,
    to: params.get("to") ? new Date(params.get("to")) : null,
    bucket: null,
    charts: new Map(),
    chartLoad: null,
    cursors: [null],
    next: null,
    shownReadings: new Set(),
  };

  // ---- the page's skeleton
  const title = h("h1", { id: "device-title" }, deviceId);
  const badge = h("span", { class: "badge" }, "…");
  const seen = h("p", { class: "muted", id: "device-seen" });
  const latestList = h("dl", { class: "latest", id: "latest" });
  const rangeFieldset = h("fieldset", { class: "ranges" },
    h("legend", {}, "Range"),
    RANGES.map(([key, label]) =>
      h("label", { class: "range" },
        h("input", { type: "radio", name: "range", value: key, checked: key === state.range, onchange: () => chooseRange(key) }),
        h("span", {}, label))),
  );
  const fromInput = h("input", { type: "datetime-local", id: "range-from", required: true });
  const toInput = h("input", { type: "datetime-local", id: "range-to", required: true });
  const customForm = h("form", { class: "custom-range", hidden: state.range !== "custom", onsubmit: applyCustom },
    h("label", { for: "range-from" }, "From"), fromInput,
    h("label", { for: "range-to" }, "To"), toInput,
    h("button", { type: "submit" }, "Show"));
  const chartNote = h("p", { class: "muted", id: "chart-note", role: "status" });
  const chartsBox = h("div", { class: "charts", id: "charts" });
  const readingsHead = h("tr");
  const readingsBody = h("tbody");
  const readingsStatus = h("p", { class: "muted", role: "status" });
  const previous = h("button", { type: "button", disabled: true, onclick: () => turnPage(-1) }, "← Newer");
  const next = h("button", { type: "button", disabled: true, onclick: () => turnPage(1) }, "Older →");
  const csvButton = h("button", { type: "button", id: "csv-download", onclick: downloadCsv }, "Download CSV");
  const csvStatus = h("span", { class: "muted", role: "status", id: "csv-status" });
  const commandsSection = h("section", { class: "card", id: "commands", "aria-labelledby": "commands-title", hidden: !session.canCommand });

  root.append(
    h("div", { class: "device" },
      h("p", {}, h("a", { href: "#/" }, "← Fleet")),
      h("div", { class: "page-head" }, title, badge),
      seen,
      h("section", { class: "card", "aria-labelledby": "latest-title" },
        h("h2", { id: "latest-title" }, "Latest values"), latestList),
      h("section", { class: "card", "aria-labelledby": "charts-title" },
        h("h2", { id: "charts-title" }, "Charts"), rangeFieldset, customForm, chartNote, chartsBox),
      h("section", { class: "card", "aria-labelledby": "readings-title" },
        h("div", { class: "section-head" },
          h("h2", { id: "readings-title" }, "Readings"),
          h("div", { class: "csv" }, csvButton, " ", csvStatus)),
        readingsStatus,
        h("div", { class: "table-wrap" },
          h("table", { class: "readings-table", id: "readings-table" },
            h("caption", { class: "visually-hidden" }, "Readings in the range, newest first"),
            h("thead", {}, readingsHead), readingsBody)),
        h("nav", { class: "pager", "aria-label": "Pages of readings" }, previous, next)),
      commandsSection,
    ),
  );

  // ---- the range
  /** [from, to) of what is shown, as Dates. */
  function span() {
    if (state.range === "custom" && state.from && state.to) return [state.from, state.to];
    const secs = (RANGES.find(([key]) => key === state.range) || RANGES[1])[2] || 86400;
    const to = new Date();
    return [new Date(to.getTime() - secs * 1000), to];
  }

  function chooseRange(key) {
    state.range = key;
    customForm.hidden = key !== "custom";
    if (key === "custom") {
      const [from, to] = span();
      fromInput.value = localInput(state.from || from);
      toInput.value = localInput(state.to || to);
      fromInput.focus();
      return;
    }
    remember();
    reloadRange();
  }

  function applyCustom(event) {
    event.preventDefault();
    const from = new Date(fromInput.value);
    const to = new Date(toInput.value);
    if (!(from < to)) {
      chartNote.textContent = "“From” must be before “To”.";
      return;
    }
    state.from = from;
    state.to = to;
    remember();
    reloadRange();
  }

  /** The range in the fragment, so a reload or a shared link shows the same. */
  function remember() {
    const q = new URLSearchParams({ range: state.range });
    if (state.range === "custom") {
      q.set("from", state.from.toISOString());
      q.set("to", state.to.toISOString());
    }
    history.replaceState(null, "", `#/devices/${encodeURIComponent(deviceId)}?${q}`);
  }

  function reloadRange() {
    state.cursors = [null];
    loadCharts();
    loadReadings();
  }

  // ---- the device and its latest values
  function renderHead() {
    const { device } = state;
    const up = online(device);
    badge.className = `badge ${up ? "online" : "offline"}`;
    badge.textContent = up ? "online" : "offline";
    fill(seen, "Last seen ", agoElement(device.last_seen), " · first seen ", formatTime(device.first_seen));
  }

  function renderLatest() {
    const entries = [...state.latest.entries()].sort(([a], [b]) => a.localeCompare(b));
    fill(latestList, entries.length ? entries.map(([metric, { value, ts }]) =>
      h("div", { class: "latest-item", "data-metric": metric },
        h("dt", {}, metric),
        h("dd", {}, h("span", { class: "value" }, formatValue(value)), " ", h("small", {}, agoElement(ts))))) :
      h("p", { class: "muted" }, "No values yet."));
  }

  async function loadDevice() {
    try {
      const [device, latest] = await Promise.all([api.device(deviceId, signal), api.latest(deviceId, signal)]);
      state.device = device;
      for (const [metric, v] of Object.entries(latest.metrics)) state.latest.set(metric, v);
    } catch (error) {
      if (signal.aborted) return false;
      fill(root.querySelector(".device"), h("p", {}, h("a", { href: "#/" }, "← Fleet")),
        h("h1", {}, deviceId),
        h("p", { class: "error", role: "alert" }, error.status === 404 ? "No readings of this device are stored." : `Could not load the device: ${error.message}`));
      return false;
    }
    renderHead();
    renderLatest();
    return true;
  }

  // ---- the charts
  async function loadCharts() {
    const turn = (state.chartLoad = {});
    const started = performance.now();
    chartsBox.dataset.state = "loading";
    chartsBox.dataset.range = state.range;
    const [from, to] = span();
    const bucket = pickBucket((to - from) / 1000);
    state.bucket = bucket;
    const metrics = [...state.device.metrics].sort();
    chartNote.textContent = `Loading ${metrics.length} chart${metrics.length === 1 ? "" : "s"}…`;
    const fromIso = from.toISOString();
    const toIso = to.toISOString();
    const [UPlot, series] = await Promise.all([
      loadUPlot(),
      Promise.all(metrics.map((metric) =>
        api.series(deviceId, { metric, from: fromIso, to: toIso, bucket: bucket.name, agg: BAND }, signal)
          .then(columns))),
    ]).catch((error) => {
      if (!signal.aborted && turn === state.chartLoad) chartNote.textContent = `Could not load the charts: ${error.message}`;
      return [];
    });
    if (!UPlot || turn !== state.chartLoad) return;
    for (const chart of state.charts.values()) chart.destroy();
    state.charts.clear();
    chartsBox.replaceChildren();
    metrics.forEach((metric, i) => {
      const plot = h("div", { class: "plot" });
      chartsBox.append(h("figure", { class: "chart", "data-metric": metric },
        h("figcaption", {}, metric), plot));
      state.charts.set(metric, new MetricChart(UPlot, plot, {
        metric,
        fromSecs: from.getTime() / 1000,
        toSecs: to.getTime() / 1000,
        bucketSecs: bucket.secs,
        data: series[i],
      }));
    });
    const ms = Math.round(performance.now() - started);
    chartNote.textContent = metrics.length
      ? `${formatTime(from)} – ${formatTime(to)}, in buckets of ${bucket.name}: the line is the average, the band the minimum to maximum. Drawn in ${ms} ms.`
      : "This device has no metrics yet.";
    chartsBox.dataset.ms = String(ms);
    chartsBox.dataset.state = "ready";
  }

  /** The exact aggregates of the buckets live readings touched, asked for once they settle. */
  const touched = new Map();
  const refreshBuckets = debounce(async () => {
    const work = [...touched.entries()];
    touched.clear();
    for (const [key, start] of work) {
      const metric = key.slice(0, key.lastIndexOf("@"));
      const chart = state.charts.get(metric);
      if (!chart) continue;
      const bucket = state.bucket;
      const from = new Date(start * 1000).toISOString();
      const to = new Date((start + bucket.secs) * 1000).toISOString();
      try {
        const answer = await api.series(deviceId, { metric, from, to, bucket: bucket.name, agg: BAND }, signal);
        const values = answer.points[0]?.values ?? {};
        chart.replaceBucket(start, { min: values.min, max: values.max, avg: values.avg });
      } catch {
        // the first guess stays; the next range load is exact
      }
    }
  }, 1000);

  // ---- the readings
  function renderReadingsHead() {
    fill(readingsHead,
      h("th", { scope: "col" }, "Time"),
      h("th", { scope: "col" }, "Id"),
      [...state.device.metrics].sort().map((m) => h("th", { scope: "col", class: "num" }, m)));
  }

  function readingRow(reading) {
    return h("tr", { "data-id": reading.id },
      h("td", { "data-label": "Time" }, h("time", { datetime: reading.ts }, formatTime(reading.ts))),
      h("td", { "data-label": "Id", class: "id" }, reading.id),
      [...state.device.metrics].sort().map((m) =>
        h("td", { class: "num", "data-label": m }, formatValue(reading.metrics[m]))));
  }

  let readingsTurn = null;
  async function loadReadings() {
    const turn = (readingsTurn = {});
    const [from, to] = span();
    const cursor = state.cursors[state.cursors.length - 1];
    readingsStatus.textContent = "Loading…";
    let page;
    try {
      page = await api.readings(deviceId, { from: from.toISOString(), to: to.toISOString(), limit: PAGE_SIZE, cursor }, signal);
    } catch (error) {
      if (!signal.aborted && turn === readingsTurn) readingsStatus.textContent = `Could not load the readings: ${error.message}`;
      return;
    }
    if (turn !== readingsTurn) return;
    renderReadingsHead();
    state.shownReadings = new Set(page.readings.map((r) => r.id));
    fill(readingsBody, page.readings.map(readingRow));
    state.next = page.next_cursor;
    previous.disabled = state.cursors.length === 1;
    next.disabled = !state.next;
    readingsStatus.textContent = page.readings.length
      ? `Page ${state.cursors.length}, newest first.`
      : "No readings in this range.";
  }

  function turnPage(step) {
    if (step > 0 && state.next) state.cursors.push(state.next);
    if (step < 0 && state.cursors.length > 1) state.cursors.pop();
    loadReadings();
  }

  // ---- CSV of the shown range
  async function downloadCsv() {
    const [from, to] = span();
    csvButton.disabled = true;
    csvStatus.textContent = "Preparing the download…";
    try {
      const blob = await api.readingsCsv(deviceId, { from: from.toISOString(), to: to.toISOString() }, signal);
      const url = URL.createObjectURL(blob);
      const stamp = (d) => d.toISOString().replace(/[:.]/g, "-");
      const link = h("a", { href: url, download: `${deviceId}_${stamp(from)}_${stamp(to)}.csv`, hidden: true });
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60000);
      csvStatus.textContent = `Downloaded (${Math.max(1, Math.round(blob.size / 1024))} KB).`;
    } catch (error) {
      if (!signal.aborted) csvStatus.textContent = `Could not download: ${error.message}`;
    } finally {
      csvButton.disabled = false;
    }
  }

  // ---- live readings
  function onReadings({ device_id, readings }) {
    if (device_id !== deviceId || !state.device) return;
    const [from, to] = span();
    const relative = state.range !== "custom";
    let newMetric = false;
    for (const reading of readings) {
      const ts = new Date(reading.ts);
      if (ts > new Date(state.device.last_seen)) state.device.last_seen = reading.ts;
      state.device.online = true;
      for (const [metric, value] of Object.entries(reading.metrics)) {
        const before = state.latest.get(metric);
        if (!before || new Date(before.ts) <= ts) state.latest.set(metric, { value, ts: reading.ts });
        if (!state.device.metrics.includes(metric)) {
          state.device.metrics.push(metric);
          newMetric = true;
        }
        const chart = state.charts.get(metric);
        const inRange = ts >= from && (relative || ts < to);
        if (chart && inRange) {
          const start = chart.addReading(ts.getTime() / 1000, value);
          touched.set(`${metric}@${start}`, start);
        }
      }
      const firstPage = state.cursors.length === 1;
      if (firstPage && relative && ts >= from && !state.shownReadings.has(reading.id)) {
        state.shownReadings.add(reading.id);
        const newest = readingsBody.firstElementChild?.querySelector("time")?.getAttribute("datetime");
        const row = readingRow(reading);
        row.classList.add("flash");
        if (!newest || ts >= new Date(newest)) readingsBody.prepend(row);
        else loadReadings();
        readingsStatus.textContent = `Page 1, newest first.`;
      }
    }
    renderHead();
    renderLatest();
    if (touched.size) refreshBuckets();
    if (newMetric) loadCharts();
  }

  const tick = setInterval(() => state.device && (renderHead(), renderLatest()), 30000);

  loadDevice().then(async (found) => {
    if (!found) return;
    if (state.range === "custom" && !(state.from && state.to)) state.range = "day";
    loadCharts();
    loadReadings();
    if (session.canCommand) {
      const { mount: mountCommands } = await import("./commands.js");
      if (!signal.aborted) state.commands = mountCommands(commandsSection, deviceId);
    }
  });

  return {
    onReadings,
    onResync: () => {
      state.latest.clear();
      loadDevice().then((found) => found && reloadRange());
    },
    unmount() {
      abort.abort();
      clearInterval(tick);
      state.commands?.unmount();
      for (const chart of state.charts.values()) chart.destroy();
    },
  };
}
