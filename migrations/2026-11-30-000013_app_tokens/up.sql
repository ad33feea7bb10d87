-- App tokens (roles reader and admin), recorded when issued so that they can be listed and revoked.
-- The token itself is never stored: its id (the JWT `jti`) is. query-api accepts only tokens
-- recorded here and not revoked. Revoking keeps the row (revoked_at), so query-api, which follows
-- this table by updated_at, sees it.
CREATE TABLE app_tokens (
    id         text        PRIMARY KEY,
    name       text        NOT NULL,
    role       text        NOT NULL CHECK (role IN ('reader', 'admin')),
    issued_at  timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    revoked_at timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX app_tokens_updated_at ON app_tokens (updated_at);

-- Tell the services following these tables that something changed (delivered at commit), so a
-- revocation or a new registration is seen at once rather than at their next periodic read.
CREATE FUNCTION sensorhub_notify_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_ARGV[0], '');
    RETURN NULL;
END
$$;

CREATE TRIGGER app_tokens_changed
    AFTER INSERT OR UPDATE OR DELETE ON app_tokens
    FOR EACH STATEMENT EXECUTE FUNCTION sensorhub_notify_change('sensorhub_app_tokens');

CREATE TRIGGER device_credentials_changed
    AFTER INSERT OR UPDATE OR DELETE ON device_credentials
    FOR EACH STATEMENT EXECUTE FUNCTION sensorhub_notify_change('sensorhub_device_credentials');
