-- Monthly partitions are created only for months a reading may still be accepted for: from the
-- month `horizon` ago (the ingest services' backfill horizon, passed by the persister) to next month
-- (readings may be stamped 5 minutes ahead). Before this, one request could make the database create
-- a table for every month since 2000.
--
-- A reading the persister must still store outside those months (queued before ingest refused such
-- readings, or accepted under a longer horizon) lands in the default partition, so nothing accepted
-- is lost and partition creation stays bounded. Creating a partition scans the default partition, so
-- it must stay small: it only ever holds those stragglers.
CREATE TABLE readings_default PARTITION OF readings DEFAULT;

DROP FUNCTION sensorhub_ensure_readings_partition(timestamptz);

-- Returns the partition that holds `at`'s readings: the month's (created if missing and allowed),
-- or readings_default. `horizon` has a default so that a persister of the previous release, which
-- passes `at` alone, keeps working during an upgrade, bounded as well.
CREATE FUNCTION sensorhub_ensure_readings_partition(
    at timestamptz,
    horizon interval DEFAULT interval '365 days'
) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    month_start timestamp := date_trunc('month', at AT TIME ZONE 'UTC');
    partition_name text := 'readings_' || to_char(month_start, 'YYYY_MM');
    now_utc timestamp := now() AT TIME ZONE 'UTC';
BEGIN
    IF to_regclass(partition_name) IS NOT NULL THEN
        RETURN partition_name;
    END IF;
    -- written so that a NULL anywhere refuses (NULL is not true)
    IF NOT coalesce(
        month_start >= date_trunc('month', now_utc - horizon)
            AND month_start <= date_trunc('month', now_utc) + interval '1 month',
        false
    ) THEN
        RETURN 'readings_default';
    END IF;
    BEGIN
        EXECUTE format(
            'CREATE TABLE IF NOT EXISTS %I PARTITION OF readings FOR VALUES FROM (%L) TO (%L)',
            partition_name,
            month_start AT TIME ZONE 'UTC',
            (month_start + interval '1 month') AT TIME ZONE 'UTC'
        );
    EXCEPTION
        WHEN duplicate_table OR unique_violation THEN
            NULL; -- a concurrent writer created it first
        WHEN check_violation THEN
            -- the default partition already holds readings of this month (stored while the month
            -- was outside the horizon): they stay there, and so do the month's new ones
            RETURN 'readings_default';
    END;
    RETURN partition_name;
END
$$;
