DROP TABLE device_credentials;
