DROP TRIGGER device_credentials_changed ON device_credentials;
DROP TABLE app_tokens;
DROP FUNCTION sensorhub_notify_change();
