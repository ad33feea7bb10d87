// Readings as they are stored, from GET /v1/live (server-sent events). EventSource cannot send
// an Authorization header, so the stream is read with fetch() and parsed here. After an error
// the feed reconnects with backoff, sending the last event id (Last-Event-ID) so the server
// replays what it still holds; `resync` says it could not, and the page reloads over REST.
// A reading may arrive twice (a replay overlapping what was seen): each is handed on once.

import { api } from "./api.js";

/** Parses a text/event-stream: feed it chunks of text, it answers the complete events. */
export class SseParser {
  constructor() {
    this.buffer = "";
    this.event = { type: "", id: null, data: [] };
    /** The last chunk ended with \r: a \n starting the next one ends no other line. */
    this.afterCr = false;
  }

  /** The events completed by `chunk`: [{type, id, data}] (`data` the joined data lines). */
  push(chunk) {
    if (chunk === "") return [];
    if (this.afterCr && chunk.startsWith("\n")) chunk = chunk.slice(1);
    this.afterCr = false;
    this.buffer += chunk;
    const events = [];
    let end;
    while ((end = this.buffer.search(/\r\n|\r|\n/)) >= 0) {
      const line = this.buffer.slice(0, end);
      const crlf = this.buffer[end] === "\r" && this.buffer[end + 1] === "\n";
      if (this.buffer[end] === "\r" && end + 1 === this.buffer.length) this.afterCr = true;
      this.buffer = this.buffer.slice(end + (crlf ? 2 : 1));
      const done = this.line(line);
      if (done) events.push(done);
    }
    return events;
  }

  line(line) {
    if (line === "") {
      const { type, id, data } = this.event;
      this.event = { type: "", id: null, data: [] };
      if (!data.length && !type) return null;
      return { type: type || "message", id, data: data.join("\n") };
    }
    if (line.startsWith(":")) return null; // a comment: the server's keepalive
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") this.event.type = value;
    else if (field === "data") this.event.data.push(value);
    else if (field === "id" && !value.includes("\0")) this.event.id = value;
    return null;
  }
}

/** A stream open this long before it ended was not a failure: it is resumed without backing off. */
const STREAM_LASTED_MS = 5000;

/** Waits after a failed connection: doubling from 0.5 s to 15 s, each wait drawn between half and all of it. */
class Backoff {
  constructor(first = 500, max = 15000) {
    this.first = first;
    this.max = max;
    this.reset();
  }
  reset() {
    this.next = this.first;
  }
  wait() {
    const ms = this.next / 2 + Math.random() * (this.next / 2);
    this.next = Math.min(this.next * 2, this.max);
    return new Promise((resolve) => setTimeout(resolve, ms));
  }
}

/** The ids of the readings handed on lately, to hand each on once. */
class SeenReadings {
  constructor(capacity = 20000) {
    this.capacity = capacity;
    this.keys = new Set();
  }
  /** True the first time a reading is met. */
  first(deviceId, readingId) {
    const key = `${deviceId}\u0000${readingId}`;
    if (this.keys.has(key)) return false;
    this.keys.add(key);
    if (this.keys.size > this.capacity) this.keys.delete(this.keys.values().next().value);
    return true;
  }
}

/**
 * The feed, while signed in. `onReadings({device_id, readings})` gets readings new to this tab,
 * `onResync()` when events were missed, `onState(state)` one of "connecting", "live",
 * "reconnecting", "unavailable" (no /v1/live on this server) or "stopped".
 */
export class LiveFeed {
  constructor({ onReadings, onResync, onState }) {
    this.onReadings = onReadings;
    this.onResync = onResync;
    this.onState = (state) => {
      if (state !== "connecting") this.markOpened?.();
      onState(state);
    };
    this.lastEventId = null;
    this.seen = new SeenReadings();
    this.backoff = new Backoff();
    this.abort = null;
  }

  /**
   * Starts the feed. Answers when the stream is open (or cannot be had): a page that loads its
   * data after that misses no reading stored in between (the stream starts at its opening).
   */
  start() {
    if (!this.abort) {
      this.abort = new AbortController();
      this.opened = new Promise((resolve) => (this.markOpened = resolve));
      this.run(this.abort.signal);
    }
    return this.opened;
  }

  stop() {
    this.abort?.abort();
    this.abort = null;
    this.onState("stopped");
  }

  async run(signal) {
    let connectedBefore = false;
    while (!signal.aborted) {
      this.onState(connectedBefore ? "reconnecting" : "connecting");
      try {
        const response = await api.live(this.lastEventId, signal);
        this.onState("live");
        if (connectedBefore && !this.lastEventId) this.onResync(); // nothing to replay from
        connectedBefore = true;
        const connectedAt = Date.now();
        await this.read(response.body, signal);
        // a stream that lasted (a proxy closes them after its write timeout) is resumed at once
        if (Date.now() - connectedAt > STREAM_LASTED_MS) this.backoff.reset();
      } catch (error) {
        if (signal.aborted) return;
        if (error.status === 401) return this.onState("stopped");
        if (error.status === 404) return this.onState("unavailable");
      }
      if (signal.aborted) return;
      this.onState("reconnecting");
      await this.backoff.wait();
    }
  }

  async read(body, signal) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    const parser = new SseParser();
    signal.addEventListener("abort", () => reader.cancel().catch(() => {}));
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      for (const event of parser.push(value)) this.dispatch(event);
    }
  }

  dispatch(event) {
    if (event.id !== null) this.lastEventId = event.id;
    if (event.type === "resync") {
      this.onResync();
      return;
    }
    if (event.type !== "readings") return;
    let message;
    try {
      message = JSON.parse(event.data);
    } catch {
      return; // not ours to fail on: the next event is independent
    }
    this.backoff.reset();
    const fresh = (message.readings || []).filter((r) => this.seen.first(message.device_id, r.id));
    if (fresh.length) this.onReadings({ device_id: message.device_id, readings: fresh });
  }
}
