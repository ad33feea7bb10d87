// Building DOM without a framework, and the formats every page shares.

/**
 * An element: h("a", {href: "#/", class: "x", onclick: fn}, "text", child...).
 * Attributes named on* become listeners; `false`, null and undefined values are left out.
 * Children are nodes or strings (always text, never HTML).
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === false || value === null || value === undefined) continue;
    if (name.startsWith("on") && typeof value === "function") {
      el.addEventListener(name.slice(2), value);
    } else if (name === "class") {
      el.className = value;
    } else if (value === true) {
      el.setAttribute(name, "");
    } else {
      el.setAttribute(name, value);
    }
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
}

/** Replaces an element's children. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

const dateTime = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });
const relative = new Intl.RelativeTimeFormat(undefined, { numeric: "auto" });
const number = new Intl.NumberFormat(undefined, { maximumFractionDigits: 3 });

/** A time for people, in their zone. */
export function formatTime(ts) {
  return ts ? dateTime.format(new Date(ts)) : "–";
}

/** "3 minutes ago". */
export function formatAgo(ts, now = Date.now()) {
  if (!ts) return "never";
  const seconds = Math.round((new Date(ts).getTime() - now) / 1000);
  const abs = Math.abs(seconds);
  if (abs < 60) return relative.format(seconds, "second");
  if (abs < 3600) return relative.format(Math.round(seconds / 60), "minute");
  if (abs < 86400) return relative.format(Math.round(seconds / 3600), "hour");
  return relative.format(Math.round(seconds / 86400), "day");
}

export function formatValue(value) {
  return value === null || value === undefined ? "–" : number.format(value);
}

/** A <time> element showing "3 minutes ago", the exact time in its title. */
export function agoElement(ts) {
  return h("time", { datetime: ts || false, title: ts ? formatTime(ts) : false }, formatAgo(ts));
}

/** Calls `fn` once `ms` after the last call. */
export function debounce(fn, ms) {
  let timer;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}
