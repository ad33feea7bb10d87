-- Every device that has sent a reading: when it was first and last seen (by reading time), and the
-- names of the metrics it has sent, so the read API can list them without scanning readings.
CREATE TABLE devices (
    device_id  text        PRIMARY KEY,
    first_seen timestamptz NOT NULL,
    last_seen  timestamptz NOT NULL,
    metrics    text[]      NOT NULL DEFAULT '{}'
);

-- One row per reading. Partitioned by month of the reading's time, so retention drops whole
-- partitions instead of deleting rows. The key is (device_id, ts, reading_id): a partitioned table's
-- unique keys must hold the partition column, and the same order serves "this device, newest first".
-- A redelivered reading carries the same device, time and id, so ON CONFLICT DO NOTHING stores it once.
CREATE TABLE readings (
    device_id  text        NOT NULL,
    ts         timestamptz NOT NULL,
    reading_id text        NOT NULL,
    metrics    jsonb       NOT NULL,
    PRIMARY KEY (device_id, ts, reading_id)
) PARTITION BY RANGE (ts);

-- Creates the month's partition holding `at` if it does not exist. Writers call it before writing a
-- month for the first time; several writers may race, and the loser's error is swallowed.
CREATE FUNCTION sensorhub_ensure_readings_partition(at timestamptz) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    month_start timestamp := date_trunc('month', at AT TIME ZONE 'UTC');
    partition_name text := 'readings_' || to_char(month_start, 'YYYY_MM');
BEGIN
    IF to_regclass(partition_name) IS NULL THEN
        BEGIN
            EXECUTE format(
                'CREATE TABLE IF NOT EXISTS %I PARTITION OF readings FOR VALUES FROM (%L) TO (%L)',
                partition_name,
                month_start AT TIME ZONE 'UTC',
                (month_start + interval '1 month') AT TIME ZONE 'UTC'
            );
        EXCEPTION WHEN duplicate_table OR unique_violation THEN
            NULL; -- a concurrent writer created it first
        END;
    END IF;
    RETURN partition_name;
END
$$;

SELECT sensorhub_ensure_readings_partition(now());
