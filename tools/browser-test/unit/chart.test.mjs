// How the dashboard's charts pick their buckets and merge /series answers
// (services/query-api/web/ui/chart.js).
import { test } from "node:test";
import assert from "node:assert/strict";
import { MAX_BUCKETS, bucketStart, columns, pickBucket } from "../../../services/query-api/web/ui/chart.js";

test("each range gets the narrowest bucket that keeps it within 500 buckets", () => {
  const day = 86400;
  const cases = [[3600, "10s"], [day, "5m"], [7 * day, "30m"], [30 * day, "2h"], [365 * day, "1d"], [3650 * day, "2w"]];
  for (const [span, name] of cases) {
    const bucket = pickBucket(span);
    assert.equal(bucket.name, name, `${span} s`);
    assert.ok(span / bucket.secs <= MAX_BUCKETS);
  }
});

test("buckets start where the server's do: Monday 2000-01-03, UTC", () => {
  const monday = Date.UTC(2026, 10, 30) / 1000; // 2026-11-30 is a Monday
  assert.equal(bucketStart(monday + 3 * 86400 + 5, 604800), monday);
  assert.equal(bucketStart(monday + 7201, 3600), monday + 7200);
});

test("a min,max,avg answer becomes uPlot's columns, by time", () => {
  const p = (ts, values) => ({ ts, value: values.min, values });
  const [x, min, max, avg] = columns({
    points: [
      p("2026-11-30T01:00:00Z", { min: 1, max: null, avg: 1 }),
      p("2026-11-30T00:00:00Z", { min: 0, max: 2, avg: 1.5 }),
    ],
  });
  const t0 = Date.UTC(2026, 10, 30) / 1000;
  assert.deepEqual(x, [t0, t0 + 3600]);
  assert.deepEqual(min, [0, 1]);
  assert.deepEqual(max, [2, null]);
  assert.deepEqual(avg, [1.5, 1]);
});
