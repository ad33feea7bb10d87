-- Back to creating any month's partition on demand; the default partition's readings move into
-- monthly partitions rather than being dropped with it.
ALTER TABLE readings DETACH PARTITION readings_default;

DROP FUNCTION sensorhub_ensure_readings_partition(timestamptz, interval);

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

SELECT sensorhub_ensure_readings_partition(month)
FROM (SELECT DISTINCT date_trunc('month', ts AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS month
      FROM readings_default) AS months;

INSERT INTO readings SELECT * FROM readings_default ON CONFLICT DO NOTHING;

DROP TABLE readings_default;
