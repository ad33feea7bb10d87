-- Devices allowed to write: each has one current token (by id; the token itself is never stored).
-- Revoking keeps the row, so the ingest services, which follow this table by updated_at, see it.
CREATE TABLE device_credentials (
    device_id  text        PRIMARY KEY,
    token_id   text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX device_credentials_updated_at ON device_credentials (updated_at);
