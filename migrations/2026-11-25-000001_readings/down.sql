DROP FUNCTION sensorhub_ensure_readings_partition(timestamptz);
DROP TABLE readings;
DROP TABLE devices;
