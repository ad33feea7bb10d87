-- Rollups: every metric of every device summarised per minute, hour and day (count, exact sum, min,
-- max, first and last reading time), so a chart of a year reads a few hundred rows, not half a
-- million readings.
--
-- Exactly once: the persister appends, in the transaction that stores a batch, the per-minute
-- summary of the readings it actually inserted (never a redelivered or conflicting one; a late or
-- backfilled reading in its own minute, however old) to `rollup_deltas`, with COPY. Appending
-- takes no row lock: two persisters storing the same device's readings never wait for each other
-- (updating the summary rows in the writers' transactions did, and cost two thirds of the write
-- path's speed). The persister folds the deltas into the three rollup tables a moment later, one
-- folder at a time; readers add the deltas not folded yet, so every answer is exact at any moment.
-- The table has no index, so appending costs next to nothing: it holds about a second of writes,
-- which readers scan.
--
-- `sum` is numeric, exactly the sum of the numbers as stored in the readings' jsonb (so with their
-- scale), as the raw series computes it: the same sum and average to the last digit whichever table
-- answers. min and max are float8, as on raw data.
CREATE TABLE rollup_deltas (
    device_id text        NOT NULL,
    metric    text        NOT NULL,
    bucket    timestamptz NOT NULL, -- the minute
    count     bigint      NOT NULL,
    sum       numeric     NOT NULL,
    min       float8      NOT NULL,
    max       float8      NOT NULL,
    first_ts  timestamptz NOT NULL,
    last_ts   timestamptz NOT NULL
);
-- a queue: rows arrive and leave every second, so vacuum it by the number of dead rows
ALTER TABLE rollup_deltas SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 10000);

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

-- The readings stored before this release, summarised once. On a large table this takes a while;
-- services wait for migrations.
INSERT INTO rollup_deltas
SELECT r.device_id, m.key, date_trunc('minute', r.ts, 'UTC'), count(*), sum(m.value::numeric),
       min(m.value::float8), max(m.value::float8), min(r.ts), max(r.ts)
FROM readings r, jsonb_each(r.metrics) AS m
GROUP BY 1, 2, 3;
