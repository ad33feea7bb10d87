-- Rollups: every metric of every device summarised per minute, hour and day (count, exact sum, min,
-- max, first and last reading time), so a chart of a year reads a few hundred rows, not half a
-- million readings.
--
-- Exactly once, by construction: a statement-level trigger on `readings` turns the rows a statement
-- actually inserted (its transition table, which leaves out what ON CONFLICT DO NOTHING skipped and
-- what a rolled-back transaction wrote) into per-minute deltas, in the same transaction. A redelivered
-- or conflicting reading is never inserted, so it is never counted; a late or backfilled reading is
-- counted in its own minute, however old. The writers only append deltas, which takes no row lock:
-- two persisters storing the same device's readings at once never wait for each other (updating the
-- summary rows in the trigger did, and cost two thirds of the write path's speed). The persister folds
-- the deltas into the three rollup tables a moment later, one folder at a time; readers add the deltas
-- not folded yet, so every answer is exact at any moment.
--
-- `sum` is numeric, summed from the jsonb numbers as stored, as the raw series computes it: the same
-- sum and average to the last digit whichever table answers. min and max are float8, as on raw data.
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
-- readers find a device's unfolded deltas by it
CREATE INDEX rollup_deltas_key ON rollup_deltas (device_id, metric, bucket);

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

CREATE FUNCTION sensorhub_rollup_deltas() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO rollup_deltas
    SELECT r.device_id, m.key, date_trunc('minute', r.ts, 'UTC'), count(*), sum(m.value::numeric),
           min(m.value::float8), max(m.value::float8), min(r.ts), max(r.ts)
    FROM inserted r, jsonb_each(r.metrics) AS m
    GROUP BY 1, 2, 3;
    RETURN NULL;
END
$$;

CREATE TRIGGER readings_rollup_deltas AFTER INSERT ON readings
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION sensorhub_rollup_deltas();

-- The readings stored before this release, summarised once (readings stored from here on go
-- through the trigger). On a large table this takes a while; services wait for migrations.
INSERT INTO rollup_deltas
SELECT r.device_id, m.key, date_trunc('minute', r.ts, 'UTC'), count(*), sum(m.value::numeric),
       min(m.value::float8), max(m.value::float8), min(r.ts), max(r.ts)
FROM readings r, jsonb_each(r.metrics) AS m
GROUP BY 1, 2, 3;
