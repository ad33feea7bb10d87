//! Commands to devices: issued by an app, delivered at least once, finished by the device's answer,
//! by expiry or by a cancel. A command's status only moves forward (see [`CommandStatus::may_become`]),
//! and every change is written once to its history (`command_events`, at most one row a status), so
//! a change repeated by a redelivery or a race changes nothing.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::Text;

use crate::StoreError;
use crate::schema::{command_events, commands, device_credentials, devices};

/// The history line of a command that expired: what the sweep records, and what
/// [`Command::history`] tells before the sweep has recorded it.
pub const EXPIRED_DETAIL: &str = "not finished by its expiry";

/// Where a command is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandStatus {
    /// Stored, not yet handed to the device.
    Pending,
    /// Handed to the device (at least once), not yet answered.
    Sent,
    /// The device answered that it did it.
    Succeeded,
    /// The device answered that it could not.
    Failed,
    /// Not finished by its expiry; never delivered afterwards.
    Expired,
    /// Cancelled by an app while not finished.
    Cancelled,
}

impl CommandStatus {
    /// The statuses of a command that is not finished (though it may be past its expiry).
    pub const OPEN: [&'static str; 2] = ["pending", "sent"];

    pub const ALL: [CommandStatus; 6] = [
        Self::Pending,
        Self::Sent,
        Self::Succeeded,
        Self::Failed,
        Self::Expired,
        Self::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Sent => "sent",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Expired => "expired",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// Whether nothing can happen to the command any more.
    pub fn is_finished(self) -> bool {
        !matches!(self, Self::Pending | Self::Sent)
    }

    /// Forward only: pending → sent → a finished status, or pending straight to a finished one.
    pub fn may_become(self, next: CommandStatus) -> bool {
        match self {
            Self::Pending => next != Self::Pending,
            Self::Sent => next.is_finished(),
            _ => false,
        }
    }

    /// The statuses a command may be in to become `next`.
    fn predecessors(next: CommandStatus) -> Vec<&'static str> {
        Self::ALL
            .into_iter()
            .filter(|s| s.may_become(next))
            .map(Self::as_str)
            .collect()
    }
}

impl std::fmt::Display for CommandStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A command as stored.
#[derive(Debug, Clone, PartialEq, Queryable, Selectable)]
#[diesel(table_name = commands)]
pub struct Command {
    /// A UUIDv7: its text sorts by creation time.
    pub id: String,
    pub device_id: String,
    pub name: String,
    pub args: serde_json::Value,
    /// As stored; [`Command::status`] is what it is now.
    #[diesel(column_name = status)]
    pub stored_status: String,
    pub issued_by: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub result: Option<serde_json::Value>,
}

impl Command {
    /// The status now: an unfinished command past its expiry is expired, whether or not the
    /// persister's sweep has recorded it yet, so that what an app reads is exact to the second.
    pub fn status(&self, now: DateTime<Utc>) -> CommandStatus {
        let stored = CommandStatus::parse(&self.stored_status).unwrap_or(CommandStatus::Pending);
        if !stored.is_finished() && self.expires_at <= now {
            CommandStatus::Expired
        } else {
            stored
        }
    }

    /// Its history as of `now`: the recorded changes, and, for a command that expired before the
    /// persister's sweep recorded it, the line the sweep will record.
    pub fn history(
        &self,
        mut recorded: Vec<CommandEvent>,
        now: DateTime<Utc>,
    ) -> Vec<CommandEvent> {
        let expired = CommandStatus::Expired.as_str();
        if self.status(now) == CommandStatus::Expired
            && !recorded.iter().any(|e| e.status == expired)
        {
            recorded.push(CommandEvent {
                status: expired.to_owned(),
                at: self.expires_at,
                detail: EXPIRED_DETAIL.to_owned(),
            });
        }
        recorded
    }

    /// When it finished: an expired command at its expiry.
    pub fn finished_at(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match (self.finished_at, self.status(now)) {
            (Some(at), _) => Some(at),
            (None, CommandStatus::Expired) => Some(self.expires_at),
            (None, _) => None,
        }
    }
}

/// One change of a command's status.
#[derive(Debug, Clone, PartialEq, Queryable, Selectable)]
#[diesel(table_name = command_events)]
pub struct CommandEvent {
    pub status: String,
    pub at: DateTime<Utc>,
    pub detail: String,
}

/// What an app asks for.
#[derive(Debug, Clone)]
pub struct NewCommand<'a> {
    pub id: &'a str,
    pub device_id: &'a str,
    pub name: &'a str,
    pub args: &'a serde_json::Value,
    /// The id (jti) of the app token that issued it.
    pub issued_by: &'a str,
    pub ttl: chrono::Duration,
}

/// How issuing a command went.
#[derive(Debug)]
pub enum Issued {
    Issued(Box<Command>),
    /// Neither registered nor ever seen.
    UnknownDevice,
    /// Its credentials are revoked: it can no longer connect to receive anything.
    RevokedDevice,
    /// It already has this many unfinished commands, the most allowed.
    TooManyOpen(i64),
}

/// Stores a new pending command for a device that is registered (or, with anonymous devices, has
/// sent readings) and has fewer than `max_open` unfinished ones. One device's commands are issued
/// one at a time (a transaction-scoped advisory lock), so two apps at once cannot both pass the limit.
pub fn issue_command(
    conn: &mut PgConnection,
    new: &NewCommand<'_>,
    max_open: i64,
) -> Result<Issued, StoreError> {
    conn.transaction(|conn| {
        diesel::sql_query("SELECT pg_advisory_xact_lock(hashtextextended('commands:' || $1, 0))")
            .bind::<Text, _>(new.device_id)
            .execute(conn)?;
        let credentials: Option<Option<DateTime<Utc>>> = device_credentials::table
            .find(new.device_id)
            .select(device_credentials::revoked_at)
            .first(conn)
            .optional()?;
        match credentials {
            Some(Some(_revoked)) => return Ok(Issued::RevokedDevice),
            Some(None) => {}
            None => {
                let seen: i64 = devices::table
                    .filter(devices::device_id.eq(new.device_id))
                    .count()
                    .get_result(conn)?;
                if seen == 0 {
                    return Ok(Issued::UnknownDevice);
                }
            }
        }
        let open = open_commands(conn, new.device_id)?;
        if open >= max_open {
            return Ok(Issued::TooManyOpen(open));
        }
        let now = Utc::now();
        let command: Command = diesel::insert_into(commands::table)
            .values((
                commands::id.eq(new.id),
                commands::device_id.eq(new.device_id),
                commands::name.eq(new.name),
                commands::args.eq(new.args),
                commands::status.eq(CommandStatus::Pending.as_str()),
                commands::issued_by.eq(new.issued_by),
                commands::created_at.eq(now),
                commands::expires_at.eq(now + new.ttl),
            ))
            .returning(Command::as_returning())
            .get_result(conn)?;
        record_event(
            conn,
            &command.id,
            CommandStatus::Pending,
            now,
            &format!("issued by token {}", new.issued_by),
        )?;
        Ok(Issued::Issued(Box::new(command)))
    })
}

/// How many of a device's commands are unfinished and not past their expiry.
fn open_commands(conn: &mut PgConnection, device_id: &str) -> Result<i64, StoreError> {
    use commands::dsl as c;
    Ok(c::commands
        .filter(c::device_id.eq(device_id))
        .filter(c::status.eq_any(CommandStatus::OPEN))
        .filter(c::expires_at.gt(diesel::dsl::now))
        .count()
        .get_result(conn)?)
}

/// A command and its history, oldest change first.
pub fn command(
    conn: &mut PgConnection,
    id: &str,
) -> Result<Option<(Command, Vec<CommandEvent>)>, StoreError> {
    let Some(command) = commands::table
        .find(id)
        .select(Command::as_select())
        .first(conn)
        .optional()?
    else {
        return Ok(None);
    };
    let history = command_events::table
        .filter(command_events::command_id.eq(id))
        .select(CommandEvent::as_select())
        .order((command_events::at, command_events::status))
        .load(conn)?;
    Ok(Some((command, history)))
}

/// A device's commands, newest first, those with `status` (as [`Command::status`] tells it now)
/// only when given; after the id `before` (the previous page's last), at most `limit`.
pub fn device_commands(
    conn: &mut PgConnection,
    device_id: &str,
    status: Option<CommandStatus>,
    before: Option<&str>,
    limit: i64,
) -> Result<Vec<Command>, StoreError> {
    use commands::dsl as c;
    let mut query = c::commands
        .filter(c::device_id.eq(device_id))
        .select(Command::as_select())
        .order(c::id.desc())
        .limit(limit)
        .into_boxed();
    if let Some(before) = before {
        query = query.filter(c::id.lt(before.to_owned()));
    }
    query = match status {
        None => query,
        Some(s @ (CommandStatus::Pending | CommandStatus::Sent)) => query
            .filter(c::status.eq(s.as_str()))
            .filter(c::expires_at.gt(diesel::dsl::now)),
        Some(CommandStatus::Expired) => query.filter(
            c::status.eq(CommandStatus::Expired.as_str()).or(c::status
                .eq_any(CommandStatus::OPEN)
                .and(c::expires_at.le(diesel::dsl::now))),
        ),
        Some(s) => query.filter(c::status.eq(s.as_str())),
    };
    Ok(query.load(conn)?)
}

/// How a status change went.
#[derive(Debug)]
pub enum Change {
    /// Made; the command as it is now.
    Made(Box<Command>),
    /// Not made: the command is already past it (finished, or expired); as it is.
    TooLate(Box<Command>),
    NoSuchCommand,
}

/// Cancels a command that is not finished (nor past its expiry).
pub fn cancel_command(conn: &mut PgConnection, id: &str, by: &str) -> Result<Change, StoreError> {
    finish(
        conn,
        id,
        CommandStatus::Cancelled,
        &format!("cancelled by token {by}"),
    )
}

/// Finishes command `id` as `next` when it may (see [`CommandStatus::may_become`]) and has not
/// expired, recording the change; otherwise changes nothing and says why.
fn finish(
    conn: &mut PgConnection,
    id: &str,
    next: CommandStatus,
    detail: &str,
) -> Result<Change, StoreError> {
    use commands::dsl as c;
    conn.transaction(|conn| {
        let now = Utc::now();
        let target = c::commands
            .filter(c::id.eq(id))
            .filter(c::status.eq_any(CommandStatus::predecessors(next)))
            .filter(c::expires_at.gt(now));
        let changed: Option<Command> = diesel::update(target)
            .set((c::status.eq(next.as_str()), c::finished_at.eq(now)))
            .returning(Command::as_returning())
            .get_result(conn)
            .optional()?;
        match changed {
            Some(command) => {
                record_event(conn, id, next, now, detail)?;
                Ok(Change::Made(Box::new(command)))
            }
            None => Ok(
                match c::commands
                    .find(id)
                    .select(Command::as_select())
                    .first(conn)
                    .optional()?
                {
                    Some(command) => Change::TooLate(Box::new(command)),
                    None => Change::NoSuchCommand,
                },
            ),
        }
    })
}

/// Records that unfinished commands past their expiry expired (at their expiry), at most `limit`
/// of them, the oldest first; how many. Concurrent sweeps (several persisters) skip each other's rows.
pub fn expire_due(conn: &mut PgConnection, limit: i64) -> Result<usize, StoreError> {
    use commands::dsl as c;
    conn.transaction(|conn| {
        let due: Vec<(String, DateTime<Utc>)> = c::commands
            .filter(c::status.eq_any(CommandStatus::OPEN))
            .filter(c::expires_at.le(diesel::dsl::now))
            .order(c::expires_at)
            .limit(limit)
            .select((c::id, c::expires_at))
            .for_update()
            .skip_locked()
            .load(conn)?;
        for (id, expires_at) in &due {
            diesel::update(c::commands.find(id))
                .set((
                    c::status.eq(CommandStatus::Expired.as_str()),
                    c::finished_at.eq(expires_at),
                ))
                .execute(conn)?;
            record_event(
                conn,
                id,
                CommandStatus::Expired,
                *expires_at,
                EXPIRED_DETAIL,
            )?;
        }
        Ok(due.len())
    })
}

/// Claims at most `limit` unfinished, unexpired commands that are due for publishing (the oldest
/// due first), and makes each due again `resend_after` from now: until then no other claim takes
/// it, and if it is still unanswered then, it is published again. Concurrent claims (several
/// persisters) skip each other's rows.
pub fn claim_due(
    conn: &mut PgConnection,
    resend_after: chrono::Duration,
    limit: i64,
) -> Result<Vec<Command>, StoreError> {
    use commands::dsl as c;
    conn.transaction(|conn| {
        let now = Utc::now();
        let due: Vec<String> = c::commands
            .filter(c::status.eq_any(CommandStatus::OPEN))
            .filter(c::deliver_after.le(now))
            .filter(c::expires_at.gt(now))
            .order(c::deliver_after)
            .limit(limit)
            .select(c::id)
            .for_update()
            .skip_locked()
            .load(conn)?;
        if due.is_empty() {
            return Ok(Vec::new());
        }
        Ok(diesel::update(c::commands.filter(c::id.eq_any(&due)))
            .set(c::deliver_after.eq(now + resend_after))
            .returning(Command::as_returning())
            .load(conn)?)
    })
}

/// Makes claimed commands due again now: their publishing failed.
pub fn release(conn: &mut PgConnection, ids: &[String]) -> Result<usize, StoreError> {
    use commands::dsl as c;
    Ok(diesel::update(
        c::commands
            .filter(c::id.eq_any(ids))
            .filter(c::status.eq_any(CommandStatus::OPEN)),
    )
    .set(c::deliver_after.eq(diesel::dsl::now))
    .execute(conn)?)
}

/// What a device's long-poll gets: its oldest unfinished, unexpired command that was never handed
/// to it, or whose re-send is due.
pub fn next_for_device(
    conn: &mut PgConnection,
    device_id: &str,
) -> Result<Option<Command>, StoreError> {
    Ok(due_for_device(conn, device_id, 1)?.into_iter().next())
}

/// What a device's new WebSocket gets: up to `limit` of the commands [`next_for_device`] would
/// hand out one by one, oldest first.
pub fn due_for_device(
    conn: &mut PgConnection,
    device_id: &str,
    limit: i64,
) -> Result<Vec<Command>, StoreError> {
    use commands::dsl as c;
    let now = Utc::now();
    Ok(c::commands
        .filter(c::device_id.eq(device_id))
        .filter(c::expires_at.gt(now))
        .filter(
            c::status.eq(CommandStatus::Pending.as_str()).or(c::status
                .eq(CommandStatus::Sent.as_str())
                .and(c::deliver_after.le(now))),
        )
        .order(c::id)
        .limit(limit)
        .select(Command::as_select())
        .load(conn)?)
}

/// Why a report about a command is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    NoSuchCommand,
    /// The command is another device's.
    NotTheDevices,
    /// Finished already (answered otherwise, cancelled, expired), or past its expiry when the
    /// answer came.
    Finished(CommandStatus),
}

impl Refusal {
    /// A short label, for metrics and logs.
    pub fn reason(self) -> &'static str {
        match self {
            Self::NoSuchCommand => "no_such_command",
            Self::NotTheDevices => "not_the_devices",
            Self::Finished(CommandStatus::Expired) => "expired",
            Self::Finished(_) => "finished",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoSuchCommand => f.write_str("no such command"),
            Self::NotTheDevices => f.write_str("the command is not this device's"),
            Self::Finished(CommandStatus::Expired) => f.write_str("the command has expired"),
            Self::Finished(status) => write!(f, "the command is already {status}"),
        }
    }
}

/// Whether `device` may answer `command` at `at`: its own, and neither finished nor expired.
pub fn answerable(command: &Command, device: &str, at: DateTime<Utc>) -> Result<(), Refusal> {
    if command.device_id != device {
        return Err(Refusal::NotTheDevices);
    }
    match command.status(at) {
        status if status.is_finished() => Err(Refusal::Finished(status)),
        _ => Ok(()),
    }
}

/// How recording a report went.
#[derive(Debug)]
pub enum Reported {
    /// The command moved on; as it is now.
    Recorded(Box<Command>),
    /// Nothing to change: a repeat of what is recorded (a redelivered report, a re-send), or a
    /// `sent` that came after the command finished.
    Unchanged,
    Refused(Refusal),
}

/// Records what an ingest service saw happen to a command: handed to its device (`sent`, which
/// also puts its next re-send `resend_after` later) or answered (`succeeded` / `failed`, with the
/// device's result; a command answered while still `pending` gets its `sent` line too). Repeats
/// change nothing; an answer from another device, or for a finished or expired command, is refused.
pub fn record_report(
    conn: &mut PgConnection,
    report: &models::CommandReport,
    resend_after: chrono::Duration,
) -> Result<Reported, StoreError> {
    use commands::dsl as c;
    let device = report.device_id.as_str();
    conn.transaction(|conn| {
        let Some(command) = c::commands
            .find(&report.command_id)
            .select(Command::as_select())
            .for_update()
            .first(conn)
            .optional()?
        else {
            return Ok(Reported::Refused(Refusal::NoSuchCommand));
        };
        let at = report.at;
        let via = report.via.as_str();
        let stored = command.status(at);
        match &report.kind {
            models::ReportKind::Sent => {
                if command.device_id != device {
                    return Ok(Reported::Refused(Refusal::NotTheDevices));
                }
                if stored != CommandStatus::Pending {
                    return Ok(Reported::Unchanged);
                }
                let claimed_until: DateTime<Utc> = c::commands
                    .find(&command.id)
                    .select(c::deliver_after)
                    .first(conn)?;
                let changed = diesel::update(c::commands.find(&command.id))
                    .set((
                        c::status.eq(CommandStatus::Sent.as_str()),
                        c::sent_at.eq(at),
                        c::deliver_after.eq(claimed_until.max(at + resend_after)),
                    ))
                    .returning(Command::as_returning())
                    .get_result(conn)?;
                record_event(
                    conn,
                    &command.id,
                    CommandStatus::Sent,
                    at,
                    &format!("sent via {via}"),
                )?;
                Ok(Reported::Recorded(Box::new(changed)))
            }
            models::ReportKind::Answered { outcome, result } => {
                let next = match outcome {
                    models::Outcome::Succeeded => CommandStatus::Succeeded,
                    models::Outcome::Failed => CommandStatus::Failed,
                };
                if command.device_id == device && stored == next {
                    return Ok(Reported::Unchanged);
                }
                if let Err(refusal) = answerable(&command, device, at) {
                    return Ok(Reported::Refused(refusal));
                }
                let changed = diesel::update(c::commands.find(&command.id))
                    .set((
                        c::status.eq(next.as_str()),
                        c::sent_at.eq(command.sent_at.unwrap_or(at)),
                        c::finished_at.eq(at),
                        c::result.eq(result),
                    ))
                    .returning(Command::as_returning())
                    .get_result(conn)?;
                if command.sent_at.is_none() {
                    record_event(
                        conn,
                        &command.id,
                        CommandStatus::Sent,
                        at,
                        "implied by the answer",
                    )?;
                }
                record_event(conn, &command.id, next, at, &format!("answered via {via}"))?;
                Ok(Reported::Recorded(Box::new(changed)))
            }
        }
    })
}

/// Writes a status change to the history once: a repeat of the same change is no change.
fn record_event(
    conn: &mut PgConnection,
    id: &str,
    status: CommandStatus,
    at: DateTime<Utc>,
    detail: &str,
) -> Result<(), StoreError> {
    diesel::insert_into(command_events::table)
        .values((
            command_events::command_id.eq(id),
            command_events::status.eq(status.as_str()),
            command_events::at.eq(at),
            command_events::detail.eq(detail),
        ))
        .on_conflict_do_nothing()
        .execute(conn)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::CommandStatus::*;

    #[test]
    fn statuses_only_move_forward() {
        assert!(Pending.may_become(Sent));
        assert!(Pending.may_become(Cancelled));
        assert!(Pending.may_become(Expired));
        assert!(Sent.may_become(Succeeded));
        assert!(Sent.may_become(Failed));
        assert!(!Sent.may_become(Pending));
        assert!(!Sent.may_become(Sent));
        for finished in [Succeeded, Failed, Expired, Cancelled] {
            for next in super::CommandStatus::ALL {
                assert!(!finished.may_become(next), "{finished} -> {next}");
            }
        }
    }

    #[test]
    fn the_open_statuses_are_the_unfinished_ones() {
        let open: Vec<_> = super::CommandStatus::ALL
            .into_iter()
            .filter(|s| !s.is_finished())
            .map(super::CommandStatus::as_str)
            .collect();
        assert_eq!(open, super::CommandStatus::OPEN);
    }

    #[test]
    fn names_round_trip() {
        for status in super::CommandStatus::ALL {
            assert_eq!(super::CommandStatus::parse(status.as_str()), Some(status));
        }
        assert_eq!(super::CommandStatus::parse("done"), None);
    }
}
