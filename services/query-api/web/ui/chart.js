// A metric's chart: the average of each time bucket as a line, its minimum and maximum as a
// band around it, drawn by uPlot (vendored; loaded with the first chart, so the fleet page does
// not pay for it). The bucket is picked from the range so a chart has at most about 500 of them.

import { h } from "./dom.js";

/** Widths /series takes ("a whole number and s, m, h, d or w"), narrowest first, in seconds. */
const BUCKETS = [
  [10, "10s"], [30, "30s"], [60, "1m"], [300, "5m"], [600, "10m"], [900, "15m"], [1800, "30m"],
  [3600, "1h"], [7200, "2h"], [10800, "3h"], [21600, "6h"], [43200, "12h"], [86400, "1d"],
  [172800, "2d"], [604800, "1w"],
];
export const MAX_BUCKETS = 500;

/** The narrowest bucket that cuts `spanSecs` into at most MAX_BUCKETS: {secs, name}. */
export function pickBucket(spanSecs) {
  for (const [secs, name] of BUCKETS) {
    if (spanSecs / secs <= MAX_BUCKETS) return { secs, name };
  }
  const weeks = Math.ceil(spanSecs / MAX_BUCKETS / 604800);
  return { secs: weeks * 604800, name: `${weeks}w` };
}

/** Where the server's buckets start: Monday 2000-01-03T00:00:00Z, in seconds. */
const BUCKET_ORIGIN = Date.UTC(2000, 0, 3) / 1000;

/** The start of the bucket holding `secs`. */
export function bucketStart(secs, bucketSecs) {
  return BUCKET_ORIGIN + Math.floor((secs - BUCKET_ORIGIN) / bucketSecs) * bucketSecs;
}

let uplot = null;
/** Where this module was loaded from (/ui/<version>), where the vendored files are too. */
const UI = new URL(".", import.meta.url).pathname.replace(/\/$/, "");

/** uPlot's script and stylesheet, added to the page once. */
export function loadUPlot() {
  uplot ??= new Promise((resolve, reject) => {
    document.head.append(h("link", { rel: "stylesheet", href: `${UI}/vendor/uplot/uPlot.min.css` }));
    const script = h("script", { src: `${UI}/vendor/uplot/uPlot.iife.min.js` });
    script.addEventListener("load", () => resolve(window.uPlot));
    script.addEventListener("error", () => reject(new Error("could not load the chart library")));
    document.head.append(script);
  });
  return uplot;
}

const css = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();

/** What a chart asks /series for: the band and the line, from one pass over the readings. */
export const BAND = "min,max,avg";

/**
 * A /series answer for `agg=min,max,avg` as uPlot's columns [x, min, max, avg]
 * (x in seconds, oldest first; null where an aggregate has no value).
 */
export function columns(answer) {
  const rows = answer.points
    .map((p) => [new Date(p.ts).getTime() / 1000, p.values?.min ?? null, p.values?.max ?? null, p.values?.avg ?? null])
    .sort((a, b) => a[0] - b[0]);
  return [0, 1, 2, 3].map((i) => rows.map((row) => row[i]));
}

export class MetricChart {
  /**
   * In `container`, for `metric` over [fromSecs, toSecs) in buckets of `bucketSecs`;
   * `data` from `columns`.
   */
  constructor(UPlot, container, { metric, fromSecs, toSecs, bucketSecs, data }) {
    this.UPlot = UPlot;
    this.container = container;
    this.metric = metric;
    this.fromSecs = fromSecs;
    this.toSecs = toSecs;
    this.bucketSecs = bucketSecs;
    this.data = data;
    this.draw();
    this.resize = new ResizeObserver(() => this.plot?.setSize(this.size()));
    this.resize.observe(container);
    this.recolour = () => this.draw();
    window.addEventListener("themechange", this.recolour);
  }

  size() {
    const width = Math.max(this.container.clientWidth, 280);
    return { width, height: width < 500 ? 180 : 220 };
  }

  draw() {
    this.plot?.destroy();
    const line = css("--chart-line") || "#2563eb";
    const band = css("--chart-band") || "rgba(37, 99, 235, 0.15)";
    const axis = { stroke: css("--muted") || "#666", grid: { stroke: css("--grid") || "#ddd", width: 1 }, ticks: { stroke: css("--grid") || "#ddd" } };
    const chart = this;
    this.plot = new this.UPlot({
      ...this.size(),
      title: undefined,
      cursor: { drag: { x: true, y: false } },
      scales: {
        x: { time: true, range: (u, min, max) => [chart.fromSecs, Math.max(chart.toSecs, max ?? chart.toSecs)] },
      },
      axes: [{ ...axis }, { ...axis, size: 60 }],
      series: [
        {},
        { label: "min", stroke: band, width: 1, points: { show: false } },
        { label: "max", stroke: band, width: 1, points: { show: false } },
        { label: "avg", stroke: line, width: 2, points: { show: (u) => u.data[0].length < 60 } },
      ],
      bands: [{ series: [2, 1], fill: band }],
      legend: { live: true },
    }, this.data, this.container);
    this.container.dataset.points = String(this.points);
  }

  /** The number of buckets drawn. */
  get points() {
    return this.data[0].length;
  }

  /**
   * A live reading: its bucket takes the value into its min and max (and, as a first guess until
   * `replaceBucket`, its average). Answers the bucket's start.
   */
  addReading(secs, value) {
    const start = bucketStart(secs, this.bucketSecs);
    const [xs, mins, maxs, avgs] = this.data;
    let i = xs.findIndex((x) => x >= start);
    if (i >= 0 && xs[i] === start) {
      mins[i] = mins[i] === null ? value : Math.min(mins[i], value);
      maxs[i] = maxs[i] === null ? value : Math.max(maxs[i], value);
      avgs[i] = avgs[i] ?? value;
    } else {
      if (i < 0) i = xs.length;
      xs.splice(i, 0, start);
      mins.splice(i, 0, value);
      maxs.splice(i, 0, value);
      avgs.splice(i, 0, value);
    }
    this.plot.setData(this.data);
    this.container.dataset.points = String(this.points);
    return start;
  }

  /** The server's exact aggregates for the bucket at `start`. */
  replaceBucket(start, { min, max, avg }) {
    const i = this.data[0].indexOf(start);
    if (i < 0) return;
    if (min !== undefined) this.data[1][i] = min;
    if (max !== undefined) this.data[2][i] = max;
    if (avg !== undefined) this.data[3][i] = avg;
    this.plot.setData(this.data);
  }

  destroy() {
    this.resize.disconnect();
    window.removeEventListener("themechange", this.recolour);
    this.plot?.destroy();
  }
}
