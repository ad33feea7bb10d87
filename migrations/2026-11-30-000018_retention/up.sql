-- Retention: raw readings kept for days or weeks, rollups for years, each as the operator sets it.
--
-- New partitions of `readings` hold one UTC day (`readings_YYYY_MM_DD`), so retention drops whole
-- days instead of deleting rows. The monthly partitions made before this (`readings_YYYY_MM`) keep
-- working: a month that has one keeps writing there (no day of it gets an overlapping partition),
-- and retention drops it whole once its last day is past. Days are created only from `horizon` ago
-- to tomorrow (readings may be stamped 5 minutes ahead), as months were (see `bounded_partitions`);
-- readings of other days go to readings_default.
CREATE OR REPLACE FUNCTION sensorhub_ensure_readings_partition(
    at timestamptz,
    horizon interval DEFAULT interval '365 days'
) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    month_name text := 'readings_' || to_char(at AT TIME ZONE 'UTC', 'YYYY_MM');
    day_start timestamp := date_trunc('day', at AT TIME ZONE 'UTC');
    partition_name text := 'readings_' || to_char(day_start, 'YYYY_MM_DD');
    now_utc timestamp := now() AT TIME ZONE 'UTC';
BEGIN
    IF to_regclass(month_name) IS NOT NULL THEN
        RETURN month_name;
    END IF;
    IF to_regclass(partition_name) IS NOT NULL THEN
        RETURN partition_name;
    END IF;
    -- written so that a NULL anywhere refuses (NULL is not true)
    IF NOT coalesce(
        day_start >= date_trunc('day', now_utc - horizon)
            AND day_start <= date_trunc('day', now_utc) + interval '1 day',
        false
    ) THEN
        RETURN 'readings_default';
    END IF;
    BEGIN
        EXECUTE format(
            'CREATE TABLE IF NOT EXISTS %I PARTITION OF readings FOR VALUES FROM (%L) TO (%L)',
            partition_name,
            day_start AT TIME ZONE 'UTC',
            (day_start + interval '1 day') AT TIME ZONE 'UTC'
        );
    EXCEPTION
        WHEN duplicate_table OR unique_violation THEN
            NULL; -- a concurrent writer created it first
        WHEN check_violation THEN
            -- the default partition already holds readings of this day (stored while the day was
            -- outside the horizon): they stay there, and so do the day's new ones
            RETURN 'readings_default';
        WHEN invalid_object_definition THEN
            -- another partition overlaps the day (a monthly one made by hand after the check above)
            RETURN 'readings_default';
    END;
    RETURN partition_name;
END
$$;

-- How long each table keeps what it holds: `raw` (readings), `1m`, `1h`, `1d` (the rollups). One
-- global row per table (device_id and metric ''), and overrides per device, per metric or per
-- device and metric; the most specific applies (device and metric, then device, then metric, then
-- global). keep_hours NULL keeps forever. A raw row holds every metric of one reading, so raw takes
-- no per-metric override.
CREATE TABLE retention_policy (
    table_name text        NOT NULL CHECK (table_name IN ('raw', '1m', '1h', '1d')),
    device_id  text        NOT NULL DEFAULT '',
    metric     text        NOT NULL DEFAULT '',
    keep_hours integer     CHECK (keep_hours > 0),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (table_name, device_id, metric),
    CHECK (table_name <> 'raw' OR metric = '')
);

-- Everything is kept until an operator says otherwise: an upgrade never deletes anyone's data.
INSERT INTO retention_policy (table_name) VALUES ('raw'), ('1m'), ('1h'), ('1d');
