DROP TRIGGER commands_notify ON commands;
DROP INDEX commands_due;
ALTER TABLE commands DROP COLUMN deliver_after;
