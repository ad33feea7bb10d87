DELETE FROM app_tokens WHERE role = 'operator';
ALTER TABLE app_tokens DROP CONSTRAINT app_tokens_role_check;
ALTER TABLE app_tokens ADD CONSTRAINT app_tokens_role_check CHECK (role IN ('reader', 'admin'));
DROP TABLE command_events;
DROP TABLE commands;
