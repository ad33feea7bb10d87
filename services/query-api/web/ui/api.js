// The one module that talks to query-api: the bearer header, the error shape
// ({"error", "message", "field"}), and retries of what the server asks to be retried
// (429 and 503 with Retry-After). Pages call the functions of `api`; nothing else calls fetch.

/** An answer other than 2xx, with the server's error body. */
export class ApiError extends Error {
  constructor(status, body, fallback) {
    super((body && body.message) || fallback || `HTTP ${status}`);
    this.status = status;
    this.code = body && body.error;
    this.field = body && body.field;
  }
}

let token = null;
let unauthorized = () => {};

/** The app token sent with every request (null: none). */
export function setToken(value) {
  token = value;
}

/** Called when a signed-in session meets a 401: the token expired or was revoked. */
export function onUnauthorized(handler) {
  unauthorized = handler;
}

/** GETs that met a 429 or 503 are tried again this often, waiting what Retry-After says. */
const RETRIES = 2;
const MAX_RETRY_WAIT_MS = 5000;

const sleep = (ms, signal) =>
  new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(timer);
      reject(signal.reason);
    });
  });

/**
 * A request to the API. Answers the parsed JSON, or the Response itself with `raw`.
 * Throws ApiError for any answer other than 2xx.
 */
async function request(path, { method = "GET", body, accept = "application/json", signal, raw = false, quiet = false } = {}) {
  const headers = { Accept: accept };
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  for (let attempt = 0; ; attempt++) {
    const response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      cache: "no-store",
    });
    if (response.ok) {
      if (raw) return response;
      return response.status === 204 ? null : response.json();
    }
    const retryable = method === "GET" && (response.status === 429 || response.status === 503);
    if (retryable && attempt < RETRIES) {
      const seconds = Number(response.headers.get("Retry-After")) || 1;
      await sleep(Math.min(seconds * 1000, MAX_RETRY_WAIT_MS), signal);
      continue;
    }
    const error = new ApiError(response.status, await response.json().catch(() => null), response.statusText);
    if (response.status === 401 && !quiet) unauthorized(error);
    throw error;
  }
}

const enc = encodeURIComponent;

/** `?a=1&b=2` of the defined values. */
function query(params) {
  const pairs = Object.entries(params).filter(([, v]) => v !== undefined && v !== null && v !== "");
  return pairs.length ? "?" + pairs.map(([k, v]) => `${enc(k)}=${enc(v)}`).join("&") : "";
}

export const api = {
  /** Who the token is: {name, role, token_id, expires_at}. A 401 is the caller's to tell. */
  me: () => request("/v1/me", { quiet: true }),

  /** A page of devices with their latest values: {devices, next_cursor, offline_after_secs}. */
  devices: ({ q, limit, cursor }, signal) =>
    request(`/v1/devices${query({ q, latest: true, limit, cursor })}`, { signal }),

  device: (id, signal) => request(`/v1/devices/${enc(id)}`, { signal }),

  latest: (id, signal) => request(`/v1/devices/${enc(id)}/latest`, { signal }),

  /** One metric in buckets: {points: [{ts, value}]}. */
  series: (id, { metric, from, to, bucket, agg }, signal) =>
    request(`/v1/devices/${enc(id)}/series${query({ metric, from, to, bucket, agg })}`, { signal }),

  /** A page of readings, newest first: {readings, next_cursor}. */
  readings: (id, { from, to, limit, cursor }, signal) =>
    request(`/v1/devices/${enc(id)}/readings${query({ from, to, limit, cursor })}`, { signal }),

  /** The range as CSV, in a Blob. */
  readingsCsv: async (id, { from, to }, signal) => {
    const response = await request(`/v1/devices/${enc(id)}/readings${query({ from, to })}`, {
      accept: "text/csv",
      raw: true,
      signal,
    });
    return response.blob();
  },

  deviceCommands: (id, { limit }, signal) =>
    request(`/v1/devices/${enc(id)}/commands${query({ limit })}`, { signal }),

  command: (commandId, signal) => request(`/v1/commands/${enc(commandId)}`, { signal }),

  issueCommand: (id, { name, args, ttl_s }) =>
    request(`/v1/devices/${enc(id)}/commands`, { method: "POST", body: { name, args, ttl_s } }),

  cancelCommand: (commandId) => request(`/v1/commands/${enc(commandId)}`, { method: "DELETE" }),

  /** The live stream of stored readings (server-sent events), as a Response to read. */
  live: async (lastEventId, signal) => {
    const headers = { Accept: "text/event-stream", Authorization: `Bearer ${token}` };
    if (lastEventId) headers["Last-Event-ID"] = lastEventId;
    const response = await fetch("/v1/live", { headers, signal, cache: "no-store" });
    if (!response.ok) {
      const error = new ApiError(response.status, await response.json().catch(() => null), response.statusText);
      if (response.status === 401) unauthorized(error);
      throw error;
    }
    return response;
  },
};
