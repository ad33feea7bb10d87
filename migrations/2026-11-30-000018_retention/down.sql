DROP TABLE retention_policy;

-- Back to monthly partitions for new months; the daily partitions made meanwhile stay as they are
-- (their ranges are valid partitions of `readings` either way), and a month with a day partition
-- gets no monthly one (its readings of other days go to readings_default).
CREATE OR REPLACE FUNCTION sensorhub_ensure_readings_partition(
    at timestamptz,
    horizon interval DEFAULT interval '365 days'
) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    month_start timestamp := date_trunc('month', at AT TIME ZONE 'UTC');
    partition_name text := 'readings_' || to_char(month_start, 'YYYY_MM');
    day_name text := 'readings_' || to_char(at AT TIME ZONE 'UTC', 'YYYY_MM_DD');
    now_utc timestamp := now() AT TIME ZONE 'UTC';
BEGIN
    IF to_regclass(partition_name) IS NOT NULL THEN
        RETURN partition_name;
    END IF;
    IF to_regclass(day_name) IS NOT NULL THEN
        RETURN day_name;
    END IF;
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
            NULL;
        WHEN check_violation OR invalid_object_definition THEN
            RETURN 'readings_default';
    END;
    RETURN partition_name;
END
$$;
