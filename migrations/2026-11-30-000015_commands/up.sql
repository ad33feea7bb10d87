-- Commands to devices ("led on"), issued by an app through query-api and delivered at least once,
-- the device deduplicating by id. A command's status only moves forward:
--   pending -> sent -> succeeded | failed | expired | cancelled
-- (a pending command can also end directly). Every change is a row in command_events, at most one
-- per status, so a change repeated by a redelivery is recorded once.
CREATE TABLE commands (
    -- a UUIDv7, whose text sorts by creation time: the device's list pages by it
    id          text        PRIMARY KEY,
    device_id   text        NOT NULL,
    name        text        NOT NULL,
    args        jsonb       NOT NULL,
    status      text        NOT NULL DEFAULT 'pending'
                CHECK (status IN ('pending', 'sent', 'succeeded', 'failed', 'expired', 'cancelled')),
    -- the id (jti) of the app token that issued it
    issued_by   text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    -- not finished by then, it expires, and it is never delivered afterwards
    expires_at  timestamptz NOT NULL,
    sent_at     timestamptz,
    finished_at timestamptz,
    -- what the device answered (succeeded or failed)
    result      jsonb,
    CHECK (expires_at > created_at)
);

CREATE INDEX commands_device ON commands (device_id, id);
-- the unfinished ones: what a device is still owed, and what expiry looks at
CREATE INDEX commands_open ON commands (device_id, expires_at) WHERE status IN ('pending', 'sent');

CREATE TABLE command_events (
    command_id text        NOT NULL REFERENCES commands (id) ON DELETE CASCADE,
    status     text        NOT NULL,
    at         timestamptz NOT NULL DEFAULT now(),
    -- who or what moved it: "issued by <token id>", "cancelled by <token id>", "expired"
    detail     text        NOT NULL,
    PRIMARY KEY (command_id, status)
);

-- `operator`: reads, and commands devices, but does not manage devices or tokens
ALTER TABLE app_tokens DROP CONSTRAINT app_tokens_role_check;
ALTER TABLE app_tokens ADD CONSTRAINT app_tokens_role_check CHECK (role IN ('reader', 'operator', 'admin'));
