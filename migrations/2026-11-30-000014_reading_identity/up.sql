-- A reading whose id the device chose is identified by (device_id, reading_id), whatever its time:
-- a device that sends an id and no time gets the server's time at each attempt, so a retry or a
-- redelivery carries another `ts`, and the readings table's key, which must hold the time because the
-- table is partitioned by it, cannot see the repeat. This table can: it is not partitioned, and its
-- key is the identity.
--
-- It keeps an identity for the dedupe window after it was first stored (the persister's
-- DEDUPE_WINDOW_DAYS, 7 by default, then deletes it in small batches), which bounds its size by the
-- rate of readings, not by their history. `ts` says where the stored reading is; `ts_assigned` whether
-- that time was the server's.
CREATE TABLE reading_ids (
    device_id   text        NOT NULL,
    reading_id  text        NOT NULL,
    ts          timestamptz NOT NULL,
    ts_assigned boolean     NOT NULL,
    first_seen  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (device_id, reading_id)
);

-- Rows arrive in first_seen order, so a BRIN index finds the expired ones for almost no cost on insert.
CREATE INDEX reading_ids_first_seen ON reading_ids USING brin (first_seen);

-- A reading sent again with the same identity and different content (other metrics, or another
-- time the device chose) is not stored over the first one, and not dropped either: it is kept here
-- with the reason, for an operator (`sensorctl conflicts`). `variant` tells one conflicting content
-- from another, so a redelivery of the same conflicting reading is recorded once.
CREATE TABLE reading_conflicts (
    device_id   text        NOT NULL,
    reading_id  text        NOT NULL,
    variant     text        NOT NULL,
    ts          timestamptz NOT NULL,
    ts_assigned boolean     NOT NULL,
    metrics     jsonb       NOT NULL,
    stored_ts   timestamptz NOT NULL,
    reason      text        NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (device_id, reading_id, variant)
);

CREATE INDEX reading_conflicts_received_at ON reading_conflicts (received_at);
