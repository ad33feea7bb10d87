// The SSE parser of the dashboard's live feed (services/query-api/web/ui/live.js), on what a
// network may do to a stream: events cut anywhere, CRLF line ends, comments, several data lines.
import { test } from "node:test";
import assert from "node:assert/strict";
import { SseParser } from "../../../services/query-api/web/ui/live.js";

const all = (parser, chunks) => chunks.flatMap((chunk) => parser.push(chunk));

test("an event cut anywhere comes out whole, once", () => {
  const text = 'id: 7\nevent: readings\ndata: {"device_id":"a"}\n\n';
  for (let cut = 0; cut <= text.length; cut++) {
    const events = all(new SseParser(), [text.slice(0, cut), text.slice(cut)]);
    assert.deepEqual(events, [{ type: "readings", id: "7", data: '{"device_id":"a"}' }], `cut at ${cut}`);
  }
});

test("CRLF and CR line ends, even with the CRLF cut in two", () => {
  const events = all(new SseParser(), ["event: a\r", "\ndata: 1\r\n\r", "\nevent: b\rdata: 2\r\r"]);
  assert.deepEqual(events, [
    { type: "a", id: null, data: "1" },
    { type: "b", id: null, data: "2" },
  ]);
});

test("keepalive comments are ignored; data lines join with newlines; no space after the colon is fine", () => {
  const events = all(new SseParser(), [": keepalive\n\n", "data:x\ndata: y\n\n", ":\n"]);
  assert.deepEqual(events, [{ type: "message", id: null, data: "x\ny" }]);
});

test("a resync with an empty id, and a blank line alone, which is no event", () => {
  const events = all(new SseParser(), ["\n\nid: \nevent: resync\ndata: {}\n\n"]);
  assert.deepEqual(events, [{ type: "resync", id: "", data: "{}" }]);
});
