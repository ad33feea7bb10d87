-- Delivering commands. The commands table is its own outbox: deliver_after is when a command is next
-- due to be published on RabbitMQ. A new command is due at once; the persister claims what is due
-- (moving deliver_after on by the re-send interval, so concurrent persisters never publish the same
-- claim twice), publishes it, and hands it back (due at once again) when the publish failed. A
-- command not yet answered is thus re-sent every interval until it is answered or expires, which is
-- what delivers it to a device that was offline when it was first sent. A query-api killed between
-- storing a command and anything else loses nothing: there is nothing else.
ALTER TABLE commands ADD COLUMN deliver_after timestamptz;
UPDATE commands SET deliver_after = created_at;
ALTER TABLE commands ALTER COLUMN deliver_after SET NOT NULL;
ALTER TABLE commands ALTER COLUMN deliver_after SET DEFAULT now();

CREATE INDEX commands_due ON commands (deliver_after) WHERE status IN ('pending', 'sent');

-- a new command wakes the persisters' dispatchers at once (after the commit, as NOTIFY is)
CREATE TRIGGER commands_notify AFTER INSERT ON commands
    FOR EACH STATEMENT EXECUTE FUNCTION sensorhub_notify_change('sensorhub_commands');
