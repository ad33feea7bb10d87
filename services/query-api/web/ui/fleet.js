// The fleet: every device with its last reading time, online or offline, and its metrics'
// latest values; searched by id and paged by the server's cursor (a page of 50 rows, so the
// page stays small whatever the fleet's size). Live readings update the rows they concern, and
// a device new to the first page brings it in.

import { api } from "./api.js";
import { agoElement, debounce, fill, formatTime, formatValue, h } from "./dom.js";
import { offline, online } from "./state.js";

const PAGE_SIZE = 50;
export function mount(root, params) {
  const state = {
    q: params.get("q") || "",
    /** The cursors of the pages walked through: [null, page 2's, ...]. */
    cursors: [null],
    next: null,
    /** device_id → {device, row}. */
    rows: new Map(),
    abort: null,
  };

  const search = h("input", {
    id: "fleet-search",
    type: "search",
    value: state.q,
    placeholder: "raspi-",
    autocomplete: "off",
    spellcheck: "false",
  });
  const status = h("p", { class: "muted", role: "status", id: "fleet-status" }, "Loading…");
  const body = h("tbody");
  const previous = h("button", { type: "button", disabled: true, onclick: () => turn(-1) }, "← Previous");
  const next = h("button", { type: "button", disabled: true, onclick: () => turn(1) }, "Next →");

  const section = h("section", { class: "fleet", id: "fleet", "aria-labelledby": "fleet-title" },
    h("div", { class: "page-head" },
      h("h1", { id: "fleet-title" }, "Fleet"),
      h("form", { class: "search", role: "search", onsubmit: (e) => { e.preventDefault(); find(); } },
        h("label", { for: "fleet-search" }, "Search by device id"),
        search,
      ),
    ),
    status,
    h("div", { class: "table-wrap" },
      h("table", { class: "fleet-table", id: "fleet-table" },
        h("caption", { class: "visually-hidden" }, "Devices, by id"),
        h("thead", {}, h("tr", {},
          h("th", { scope: "col" }, "Device"),
          h("th", { scope: "col" }, "Status"),
          h("th", { scope: "col" }, "Last seen"),
          h("th", { scope: "col" }, "Latest values"),
        )),
        body,
      ),
    ),
    h("nav", { class: "pager", "aria-label": "Pages of devices" }, previous, next),
  );
  root.append(section);

  const find = () => {
    state.q = search.value.trim();
    state.cursors = [null];
    const hash = state.q ? `#/?q=${encodeURIComponent(state.q)}` : "#/";
    if (location.hash !== hash) history.replaceState(null, "", hash);
    load();
  };
  search.addEventListener("input", debounce(find, 250));

  function turn(step) {
    if (step > 0 && state.next) state.cursors.push(state.next);
    if (step < 0 && state.cursors.length > 1) state.cursors.pop();
    load().then(() => body.querySelector("a")?.focus());
  }

  async function load() {
    state.abort?.abort();
    const abort = (state.abort = new AbortController());
    const cursor = state.cursors[state.cursors.length - 1];
    status.textContent = "Loading…";
    let page;
    try {
      page = await api.devices({ q: state.q, limit: PAGE_SIZE, cursor }, abort.signal);
    } catch (error) {
      if (abort.signal.aborted) return;
      status.textContent = `Could not load the devices: ${error.message}`;
      return;
    }
    offline.afterSecs = page.offline_after_secs ?? offline.afterSecs;
    state.next = page.next_cursor;
    state.rows.clear();
    fill(body, page.devices.map((device) => {
      const row = h("tr");
      state.rows.set(device.device_id, { device, row });
      renderRow(device, row);
      return row;
    }));
    const first = state.cursors.length === 1;
    const count = page.devices.length;
    status.textContent = count === 0
      ? state.q ? `No device id contains “${state.q}”.` : "No device has sent a reading yet."
      : `Page ${state.cursors.length}: ${count} device${count === 1 ? "" : "s"}${state.q ? ` matching “${state.q}”` : ""}${!first || state.next ? "" : ", all of them"}.`;
    previous.disabled = first;
    next.disabled = !state.next;
    section.dataset.loaded = String(performance.now());
  }

  function renderRow(device, row) {
    const up = online(device);
    const latest = (device.latest || []).slice().sort((a, b) => a.metric.localeCompare(b.metric));
    const shown = latest.length ? latest : (device.metrics || []).map((metric) => ({ metric }));
    row.dataset.device = device.device_id;
    fill(row,
      h("th", { scope: "row", "data-label": "Device" },
        h("a", { href: `#/devices/${encodeURIComponent(device.device_id)}` }, device.device_id)),
      h("td", { "data-label": "Status" },
        h("span", { class: `badge ${up ? "online" : "offline"}` }, up ? "online" : "offline")),
      h("td", { "data-label": "Last seen" }, agoElement(device.last_seen)),
      h("td", { "data-label": "Latest values" },
        h("ul", { class: "values" }, shown.map((v) =>
          h("li", { title: v.ts ? formatTime(v.ts) : false, "data-metric": v.metric },
            h("span", { class: "metric" }, v.metric), " ", h("span", { class: "value" }, formatValue(v.value)))))),
    );
  }

  /** Shows readings of devices on this page; a device new to it reloads the page. */
  const reload = debounce(() => load(), 150);
  function onReadings({ device_id, readings }) {
    const known = state.rows.get(device_id);
    if (!known) {
      const onFirstPage = state.cursors.length === 1;
      const matches = !state.q || device_id.toLowerCase().includes(state.q.toLowerCase());
      const ids = [...state.rows.keys()];
      const fits = ids.length < PAGE_SIZE || device_id < ids[ids.length - 1];
      if (onFirstPage && matches && fits) reload();
      return;
    }
    const { device, row } = known;
    const latest = new Map((device.latest || []).map((v) => [v.metric, v]));
    for (const reading of readings) {
      if (new Date(reading.ts) > new Date(device.last_seen)) device.last_seen = reading.ts;
      for (const [metric, value] of Object.entries(reading.metrics)) {
        const before = latest.get(metric);
        if (!before || !before.ts || new Date(reading.ts) >= new Date(before.ts)) {
          latest.set(metric, { metric, ts: reading.ts, value });
        }
      }
    }
    device.latest = [...latest.values()];
    device.online = true;
    renderRow(device, row);
    row.classList.remove("flash");
    void row.offsetWidth; // restart the highlight
    row.classList.add("flash");
  }

  // "3 minutes ago" and online/offline move on with the clock, without asking the server
  const tick = setInterval(() => {
    for (const { device, row } of state.rows.values()) renderRow(device, row);
  }, 30000);

  load();
  return {
    onReadings,
    onResync: () => load(),
    unmount() {
      clearInterval(tick);
      state.abort?.abort();
    },
  };
}
