-- Rollups: every metric of every device summarised per minute, hour and day (count, exact sum, min,
-- max, first and last reading time), so a chart of a year reads a few hundred rows, not half a
-- million readings.
--
-- Exactly once: the persister appends, in the transaction that stores a batch, the per-minute
-- summary of the readings it actually inserted (never a redelivered or conflicting one; a late or
-- backfilled reading in its own minute, however old) to `rollup_deltas`: one row per transaction,
-- its entries in parallel arrays (device, metric, minute, count, sum, min, max, first and last
-- time). Appending one row takes no row lock and costs one row whatever the batch holds: two
-- persisters storing the same device's readings never wait for each other (updating the summary
-- rows in the writers' transactions did, and cost two thirds of the write path's speed; a delta row
-- per entry cost half of it on small batches). The persister folds the deltas into the three rollup
-- tables a fraction of a second later, one folder at a time; readers add the entries not folded yet,
-- so every answer is exact at any moment.
--
-- `sum` is numeric, exactly the sum of the numbers as stored in the readings' jsonb (so with their
-- scale), as the raw series computes it: the same sum and average to the last digit whichever table
-- answers. min and max are float8, as on raw data.
CREATE TABLE rollup_deltas (
    device_ids text[]        NOT NULL,
    metrics    text[]        NOT NULL,
    buckets    timestamptz[] NOT NULL, -- the minutes
    counts     bigint[]      NOT NULL,
    sums       numeric[]     NOT NULL,
    mins       float8[]      NOT NULL,
    maxs       float8[]      NOT NULL,
    first_ts   timestamptz[] NOT NULL,
    last_ts    timestamptz[] NOT NULL
);
-- a queue: rows arrive and leave all the time, so vacuum it by the number of dead rows
ALTER TABLE rollup_deltas SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000);

CREATE TABLE rollups_1m (
    device_id text        NOT NULL,
    metric    text        NOT NULL,
    bucket    timestamptz NOT NULL,
    count     bigint      NOT NULL,
    sum       numeric     NOT NULL,
    min       float8      NOT NULL,
    max       float8      NOT NULL,
    first_ts  timestamptz NOT NULL,
    last_ts   timestamptz NOT NULL,
    PRIMARY KEY (device_id, metric, bucket)
);
CREATE TABLE rollups_1h (LIKE rollups_1m INCLUDING ALL);
CREATE TABLE rollups_1d (LIKE rollups_1m INCLUDING ALL);
-- retention deletes by age across devices
CREATE INDEX rollups_1m_bucket ON rollups_1m (bucket);
CREATE INDEX rollups_1h_bucket ON rollups_1h (bucket);
CREATE INDEX rollups_1d_bucket ON rollups_1d (bucket);

-- The folder updates the same rows again and again (this minute's, hour's and day's): room on each
-- page lets PostgreSQL update them in place (HOT: no index entry per update).
ALTER TABLE rollups_1m SET (fillfactor = 80);
ALTER TABLE rollups_1h SET (fillfactor = 80);
ALTER TABLE rollups_1d SET (fillfactor = 80);

-- The readings stored before this release, summarised once. On a large table this takes a while;
-- services wait for migrations.
INSERT INTO rollups_1m (device_id, metric, bucket, count, sum, min, max, first_ts, last_ts)
SELECT r.device_id, m.key, date_trunc('minute', r.ts, 'UTC'), count(*), sum(m.value::numeric),
       min(m.value::float8), max(m.value::float8), min(r.ts), max(r.ts)
FROM readings r, jsonb_each(r.metrics) AS m
GROUP BY 1, 2, 3;
INSERT INTO rollups_1h (device_id, metric, bucket, count, sum, min, max, first_ts, last_ts)
SELECT device_id, metric, date_trunc('hour', bucket, 'UTC'), sum(count), sum(sum), min(min),
       max(max), min(first_ts), max(last_ts)
FROM rollups_1m
GROUP BY 1, 2, 3;
INSERT INTO rollups_1d (device_id, metric, bucket, count, sum, min, max, first_ts, last_ts)
SELECT device_id, metric, date_trunc('day', bucket, 'UTC'), sum(count), sum(sum), min(min),
       max(max), min(first_ts), max(last_ts)
FROM rollups_1h
GROUP BY 1, 2, 3;
