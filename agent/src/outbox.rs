//! The outbox: one SQLite database on the Pi's disk holding every reading until the server
//! acknowledged it, what was set aside and why, the commands acted on, and the counters `status`
//! shows. A reading is committed here (WAL, `synchronous = FULL`: on disk when `append` returns)
//! before anything is sent, and leaves only when the server said it has it, so a crash, a reboot
//! or a power cut at any moment loses nothing that was taken; a resend after an unclear failure
//! carries the same id, which the server stores once.
//!
//! Bounded: beyond `max_readings` the oldest readings are dropped, counted in `dropped_total`,
//! and the agent reports that count to the server as a reading of its own.

use std::path::Path;

use chrono::{DateTime, TimeZone, Utc};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use crate::clock::Now;
use crate::error::Error;

/// What is kept of what the server refused or what could not be timed, for the operator.
const REJECTED_KEPT: i64 = 10_000;
/// How long a command's outcome is remembered (the server re-sends an unanswered command every
/// 30 s until it expires, at most a day by default; a week is ample).
const COMMANDS_KEPT_DAYS: i64 = 7;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS readings (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL,
    ts_ms INTEGER,              -- NULL while taken on a clock not yet synchronised
    boot_id TEXT NOT NULL,
    boottime_ns INTEGER NOT NULL,
    metrics TEXT NOT NULL       -- a JSON object, name -> number
);
CREATE INDEX IF NOT EXISTS readings_untimed ON readings (boot_id) WHERE ts_ms IS NULL;
CREATE TABLE IF NOT EXISTS set_aside (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL,
    ts_ms INTEGER,
    metrics TEXT NOT NULL,
    reason TEXT NOT NULL,
    at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS commands (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    received_ms INTEGER NOT NULL,
    status TEXT NOT NULL,       -- running, succeeded, failed
    result TEXT,                -- JSON
    answered INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value);
";

/// A reading as taken: its id and (if the clock was trusted) time are fixed now and sent as
/// they are, however often it is sent.
#[derive(Debug, Clone)]
pub struct Taken {
    pub id: String,
    /// The boot it was taken in ([`crate::clock::Clock::boot_id`]).
    pub boot_id: String,
    pub at: Now,
    /// A JSON object of metric name to number.
    pub metrics: serde_json::Map<String, serde_json::Value>,
}

/// A reading waiting to be sent.
#[derive(Debug, Clone)]
pub struct Pending {
    pub seq: i64,
    pub id: String,
    pub ts: DateTime<Utc>,
    pub metrics: serde_json::Value,
}

/// What `status` shows.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    /// Readings waiting to be sent (untimed ones included).
    pub depth: i64,
    /// Of them, waiting for the clock to be synchronised.
    pub untimed_waiting: i64,
    pub oldest_unsent: Option<DateTime<Utc>>,
    pub last_success: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
    pub dropped_total: i64,
    pub rejected_total: i64,
    pub untimed_total: i64,
    pub commands_run_total: i64,
}

/// A command the agent has seen.
#[derive(Debug, Clone)]
pub struct CommandRecord {
    pub status: String,
    pub result: Option<serde_json::Value>,
    pub answered: bool,
}

pub struct Outbox {
    conn: Connection,
    path: String,
    max_readings: i64,
}

impl Outbox {
    /// Opens (creating if need be) the outbox at `path`, keeping at most `max_readings`.
    pub fn open(path: &Path, max_readings: u64) -> Result<Self, Error> {
        let shown = path.display().to_string();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                Error::Config(format!(
                    "cannot create the outbox's folder {}: {e}",
                    dir.display()
                ))
            })?;
        }
        let conn = Connection::open(path).map_err(|source| Error::Outbox {
            path: shown.clone(),
            source,
        })?;
        let mut outbox = Self {
            conn,
            path: shown,
            max_readings: i64::try_from(max_readings).unwrap_or(i64::MAX),
        };
        outbox.prepare()?;
        Ok(outbox)
    }

    /// Opens an existing outbox to read it only (`status`, beside a running agent).
    pub fn open_read_only(path: &Path) -> Result<Self, Error> {
        let shown = path.display().to_string();
        let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(
            |source| Error::Outbox {
                path: shown.clone(),
                source,
            },
        )?;
        // the running agent may hold the write lock for a moment
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(outbox_error(&shown))?;
        Ok(Self {
            conn,
            path: shown,
            max_readings: 0,
        })
    }

    fn prepare(&mut self) -> Result<(), Error> {
        let wrap = outbox_error(&self.path);
        // WAL lets `status` read beside the writer; FULL makes each commit durable before it
        // returns, which is the outbox's whole point. 5 s of patience for a concurrent reader.
        // A 512 KiB page cache (SQLite's default is 2 MiB): the agent reads the oldest pages and
        // appends to the newest, and its memory stays small whatever the outbox holds.
        self.conn
            .execute_batch(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA busy_timeout = 5000; \
                 PRAGMA cache_size = -512;",
            )
            .map_err(wrap)?;
        self.conn
            .execute_batch(SCHEMA)
            .map_err(outbox_error(&self.path))?;
        // the depth is kept as a counter (a count(*) walks the table, a million rows on an SD
        // card); set it right once at each start
        let tx = self.conn.transaction().map_err(outbox_error(&self.path))?;
        let depth: i64 = tx
            .query_row("SELECT count(*) FROM readings", [], |r| r.get(0))
            .map_err(wrap)?;
        set_counter(&tx, "depth", depth).map_err(wrap)?;
        tx.commit().map_err(wrap)
    }

    /// Keeps `reading` on disk. When the outbox is full, the oldest readings go to make room;
    /// answers how many.
    pub fn append(&mut self, reading: &Taken) -> Result<i64, Error> {
        let wrap = outbox_error(&self.path);
        let max = self.max_readings;
        let tx = self.conn.transaction().map_err(wrap)?;
        let ts_ms = reading
            .at
            .synced
            .then(|| reading.at.wall.timestamp_millis());
        tx.execute(
            "INSERT INTO readings (id, ts_ms, boot_id, boottime_ns, metrics) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                reading.id,
                ts_ms,
                reading.boot_id,
                reading.at.boottime_ns,
                serde_json::Value::Object(reading.metrics.clone()).to_string()
            ],
        )
        .map_err(wrap)?;
        let depth = counter(&tx, "depth").map_err(wrap)? + 1;
        let dropped = (depth - max).max(0);
        if dropped > 0 {
            tx.execute(
                "DELETE FROM readings WHERE seq IN (SELECT seq FROM readings ORDER BY seq LIMIT ?1)",
                [dropped],
            )
            .map_err(wrap)?;
            add_counter(&tx, "dropped_total", dropped).map_err(wrap)?;
        }
        set_counter(&tx, "depth", depth - dropped).map_err(wrap)?;
        tx.commit().map_err(wrap)?;
        Ok(dropped)
    }

    /// Gives the untimed readings of this boot their true time, once `now` is synchronised; sets
    /// aside those of earlier boots, which can never be timed. Answers (stamped, set aside).
    pub fn stamp(&mut self, now: &Now, boot_id: &str) -> Result<(usize, usize), Error> {
        let wrap = outbox_error(&self.path);
        let tx = self.conn.transaction().map_err(wrap)?;
        let stamped = if now.synced {
            // ts = wall now − (boot time now − boot time then), in milliseconds
            tx.execute(
                "UPDATE readings SET ts_ms = ?1 - (?2 - boottime_ns) / 1000000 \
                 WHERE ts_ms IS NULL AND boot_id = ?3",
                params![now.wall.timestamp_millis(), now.boottime_ns, boot_id],
            )
            .map_err(wrap)?
        } else {
            0
        };
        let set_aside = tx
            .execute(
                "INSERT INTO set_aside (id, ts_ms, metrics, reason, at_ms) \
                 SELECT id, NULL, metrics, 'untimed: taken before the clock was synchronised, \
                 in a boot that ended before it was', ?1 \
                 FROM readings WHERE ts_ms IS NULL AND boot_id <> ?2 ORDER BY seq",
                params![Utc::now().timestamp_millis(), boot_id],
            )
            .map_err(wrap)?;
        if set_aside > 0 {
            let gone = tx
                .execute(
                    "DELETE FROM readings WHERE ts_ms IS NULL AND boot_id <> ?1",
                    [boot_id],
                )
                .map_err(wrap)?;
            add_counter(&tx, "depth", -(gone as i64)).map_err(wrap)?;
            add_counter(&tx, "untimed_total", gone as i64).map_err(wrap)?;
            trim_set_aside(&tx).map_err(wrap)?;
        }
        tx.commit().map_err(wrap)?;
        Ok((stamped, set_aside))
    }

    /// The `n` oldest readings that have a time, oldest first.
    pub fn oldest(&self, n: usize) -> Result<Vec<Pending>, Error> {
        let wrap = outbox_error(&self.path);
        let mut statement = self
            .conn
            .prepare_cached(
                "SELECT seq, id, ts_ms, metrics FROM readings WHERE ts_ms IS NOT NULL \
                 ORDER BY seq LIMIT ?1",
            )
            .map_err(wrap)?;
        let rows = statement
            .query_map([n as i64], |row| {
                let metrics: String = row.get(3)?;
                Ok(Pending {
                    seq: row.get(0)?,
                    id: row.get(1)?,
                    ts: millis(row.get(2)?),
                    metrics: serde_json::from_str(&metrics).unwrap_or(serde_json::Value::Null),
                })
            })
            .map_err(wrap)?;
        rows.collect::<Result<_, _>>().map_err(wrap)
    }

    /// The server has these: they leave the outbox.
    pub fn remove(&mut self, sent: &[Pending]) -> Result<(), Error> {
        let wrap = outbox_error(&self.path);
        let tx = self.conn.transaction().map_err(wrap)?;
        let mut gone = 0;
        {
            let mut delete = tx
                .prepare_cached("DELETE FROM readings WHERE seq = ?1")
                .map_err(wrap)?;
            for reading in sent {
                gone += delete.execute([reading.seq]).map_err(wrap)?;
            }
        }
        add_counter(&tx, "depth", -(gone as i64)).map_err(wrap)?;
        set_text(&tx, "last_success", &Utc::now().to_rfc3339()).map_err(wrap)?;
        tx.commit().map_err(wrap)
    }

    /// The server refused `reading` for good (`reason` is its answer): kept aside, counted.
    pub fn reject(&mut self, reading: &Pending, reason: &str) -> Result<(), Error> {
        let wrap = outbox_error(&self.path);
        let tx = self.conn.transaction().map_err(wrap)?;
        tx.execute(
            "INSERT INTO set_aside (id, ts_ms, metrics, reason, at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                reading.id,
                reading.ts.timestamp_millis(),
                reading.metrics.to_string(),
                reason,
                Utc::now().timestamp_millis()
            ],
        )
        .map_err(wrap)?;
        let gone = tx
            .execute("DELETE FROM readings WHERE seq = ?1", [reading.seq])
            .map_err(wrap)?;
        add_counter(&tx, "depth", -(gone as i64)).map_err(wrap)?;
        add_counter(&tx, "rejected_total", 1).map_err(wrap)?;
        trim_set_aside(&tx).map_err(wrap)?;
        tx.commit().map_err(wrap)
    }

    /// Remembers the last failure to reach the server, for `status`.
    pub fn note_error(&mut self, error: &str) -> Result<(), Error> {
        let wrap = outbox_error(&self.path);
        let tx = self.conn.transaction().map_err(wrap)?;
        set_text(&tx, "last_error", error).map_err(wrap)?;
        set_text(&tx, "last_error_at", &Utc::now().to_rfc3339()).map_err(wrap)?;
        tx.commit().map_err(wrap)
    }

    /// How many readings were dropped because the outbox was full, since it was made.
    pub fn dropped_total(&self) -> Result<i64, Error> {
        counter(&self.conn, "dropped_total").map_err(outbox_error(&self.path))
    }

    pub fn status(&self) -> Result<Status, Error> {
        let wrap = outbox_error(&self.path);
        let conn = &self.conn;
        let untimed_waiting: i64 = conn
            .query_row(
                "SELECT count(*) FROM readings WHERE ts_ms IS NULL",
                [],
                |r| r.get(0),
            )
            .map_err(wrap)?;
        let oldest: Option<i64> = conn
            .query_row(
                "SELECT ts_ms FROM readings WHERE ts_ms IS NOT NULL ORDER BY seq LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(wrap)?;
        let time = |key: &str| -> Result<Option<DateTime<Utc>>, Error> {
            Ok(text(conn, key)
                .map_err(wrap)?
                .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
                .map(|t| t.with_timezone(&Utc)))
        };
        Ok(Status {
            depth: counter(conn, "depth").map_err(wrap)?,
            untimed_waiting,
            oldest_unsent: oldest.map(millis),
            last_success: time("last_success")?,
            last_error: text(conn, "last_error").map_err(wrap)?,
            last_error_at: time("last_error_at")?,
            dropped_total: counter(conn, "dropped_total").map_err(wrap)?,
            rejected_total: counter(conn, "rejected_total").map_err(wrap)?,
            untimed_total: counter(conn, "untimed_total").map_err(wrap)?,
            commands_run_total: counter(conn, "commands_run_total").map_err(wrap)?,
        })
    }

    /// What the agent knows of command `id`.
    pub fn command(&self, id: &str) -> Result<Option<CommandRecord>, Error> {
        self.conn
            .query_row(
                "SELECT status, result, answered FROM commands WHERE id = ?1",
                [id],
                |row| {
                    let result: Option<String> = row.get(1)?;
                    Ok(CommandRecord {
                        status: row.get(0)?,
                        result: result.and_then(|r| serde_json::from_str(&r).ok()),
                        answered: row.get(2)?,
                    })
                },
            )
            .optional()
            .map_err(outbox_error(&self.path))
    }

    /// Command `id` is about to run: recorded first, so a crash while it runs is not followed
    /// by running it a second time when the server sends it again.
    pub fn command_started(&mut self, id: &str, name: &str) -> Result<(), Error> {
        let wrap = outbox_error(&self.path);
        let tx = self.conn.transaction().map_err(wrap)?;
        let now = Utc::now().timestamp_millis();
        tx.execute(
            "INSERT OR IGNORE INTO commands (id, name, received_ms, status) VALUES (?1, ?2, ?3, 'running')",
            params![id, name, now],
        )
        .map_err(wrap)?;
        tx.execute(
            "DELETE FROM commands WHERE received_ms < ?1",
            [now - COMMANDS_KEPT_DAYS * 86_400_000],
        )
        .map_err(wrap)?;
        add_counter(&tx, "commands_run_total", 1).map_err(wrap)?;
        tx.commit().map_err(wrap)
    }

    /// Command `id` ended `status` (`succeeded` or `failed`) with `result`.
    pub fn command_finished(
        &mut self,
        id: &str,
        status: &str,
        result: &serde_json::Value,
    ) -> Result<(), Error> {
        self.conn
            .execute(
                "UPDATE commands SET status = ?2, result = ?3 WHERE id = ?1",
                params![id, status, result.to_string()],
            )
            .map(drop)
            .map_err(outbox_error(&self.path))
    }

    /// The server has command `id`'s answer.
    pub fn command_answered(&mut self, id: &str) -> Result<(), Error> {
        self.conn
            .execute("UPDATE commands SET answered = 1 WHERE id = ?1", [id])
            .map(drop)
            .map_err(outbox_error(&self.path))
    }

    /// Finished commands whose answer the server has not acknowledged yet: (id, status, result).
    pub fn unanswered(&self) -> Result<Vec<(String, String, serde_json::Value)>, Error> {
        let wrap = outbox_error(&self.path);
        let mut statement = self
            .conn
            .prepare_cached(
                "SELECT id, status, result FROM commands WHERE answered = 0 AND status <> 'running' \
                 ORDER BY received_ms",
            )
            .map_err(wrap)?;
        let rows = statement
            .query_map([], |row| {
                let result: Option<String> = row.get(2)?;
                Ok((
                    row.get(0)?,
                    row.get(1)?,
                    result
                        .and_then(|r| serde_json::from_str(&r).ok())
                        .unwrap_or(serde_json::Value::Null),
                ))
            })
            .map_err(wrap)?;
        rows.collect::<Result<_, _>>().map_err(wrap)
    }
}

/// An SQLite error as the agent's, naming the outbox.
fn outbox_error(path: &str) -> impl Fn(rusqlite::Error) -> Error + Copy + '_ {
    move |source| Error::Outbox {
        path: path.to_owned(),
        source,
    }
}

fn millis(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

fn counter(conn: &Connection, key: &str) -> rusqlite::Result<i64> {
    conn.query_row("SELECT value FROM state WHERE key = ?1", [key], |r| {
        r.get::<_, i64>(0)
    })
    .optional()
    .map(Option::unwrap_or_default)
}

fn set_counter(conn: &Connection, key: &str, value: i64) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO state (key, value) VALUES (?1, ?2) \
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        params![key, value],
    )
    .map(drop)
}

fn add_counter(conn: &Connection, key: &str, by: i64) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO state (key, value) VALUES (?1, ?2) \
         ON CONFLICT (key) DO UPDATE SET value = value + excluded.value",
        params![key, by],
    )
    .map(drop)
}

fn text(conn: &Connection, key: &str) -> rusqlite::Result<Option<String>> {
    conn.query_row("SELECT value FROM state WHERE key = ?1", [key], |r| {
        r.get(0)
    })
    .optional()
}

fn set_text(conn: &Connection, key: &str, value: &str) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO state (key, value) VALUES (?1, ?2) \
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        params![key, value],
    )
    .map(drop)
}

fn trim_set_aside(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute(
        "DELETE FROM set_aside WHERE seq <= (SELECT max(seq) FROM set_aside) - ?1",
        [REJECTED_KEPT],
    )
    .map(drop)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a test stops at the first surprise")]
    use super::*;
    use serde_json::json;

    fn outbox(max: u64) -> (Outbox, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!("agent-outbox-{}.db", uuid::Uuid::new_v4()));
        (Outbox::open(&path, max).unwrap(), path)
    }

    fn taken(n: i64, boot: &str, boottime_s: i64, synced: bool) -> Taken {
        let mut metrics = serde_json::Map::new();
        metrics.insert("n".into(), json!(n));
        Taken {
            id: format!("r{n}"),
            boot_id: boot.into(),
            at: Now {
                wall: Utc.timestamp_opt(1_000 + boottime_s, 0).unwrap(),
                boottime_ns: boottime_s * 1_000_000_000,
                synced,
            },
            metrics,
        }
    }

    #[test]
    fn untimed_readings_get_their_boot_time_mapped_and_an_earlier_boots_are_set_aside() {
        let (mut outbox, path) = outbox(100);
        outbox.append(&taken(1, "old", 5, false)).unwrap();
        outbox.append(&taken(2, "now", 10, false)).unwrap();
        outbox.append(&taken(3, "now", 20, false)).unwrap();
        assert!(
            outbox.oldest(10).unwrap().is_empty(),
            "nothing has a time yet"
        );
        // synchronised at boot time 30 s: the wall clock says 1,800,000,000
        let synced = Now {
            wall: Utc.timestamp_opt(1_800_000_000, 0).unwrap(),
            boottime_ns: 30_000_000_000,
            synced: true,
        };
        assert_eq!(outbox.stamp(&synced, "now").unwrap(), (2, 1));
        let pending = outbox.oldest(10).unwrap();
        let times: Vec<i64> = pending.iter().map(|p| p.ts.timestamp()).collect();
        assert_eq!(times, [1_799_999_980, 1_799_999_990]);
        let status = outbox.status().unwrap();
        assert_eq!((status.depth, status.untimed_total), (2, 1));
        outbox.remove(&pending).unwrap();
        assert_eq!(outbox.status().unwrap().depth, 0);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_full_outbox_drops_its_oldest_and_counts_them() {
        let (mut outbox, path) = outbox(3);
        for n in 1..=5 {
            let dropped = outbox.append(&taken(n, "b", n, true)).unwrap();
            assert_eq!(dropped, i64::from(n > 3));
        }
        let ids: Vec<String> = outbox
            .oldest(10)
            .unwrap()
            .into_iter()
            .map(|p| p.id)
            .collect();
        assert_eq!(ids, ["r3", "r4", "r5"]);
        let pending = outbox.oldest(1).unwrap();
        outbox.reject(&pending[0], "400: no").unwrap();
        let status = outbox.status().unwrap();
        assert_eq!(
            (status.depth, status.dropped_total, status.rejected_total),
            (2, 2, 1)
        );
        // the counters survive a restart, and the depth is recounted
        drop(outbox);
        let reopened = Outbox::open(&path, 3).unwrap();
        assert_eq!(reopened.status().unwrap().depth, 2);
        assert_eq!(reopened.dropped_total().unwrap(), 2);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_command_is_recorded_before_it_runs_and_answered_once() {
        let (mut outbox, path) = outbox(3);
        assert!(outbox.command("c1").unwrap().is_none());
        outbox.command_started("c1", "led").unwrap();
        assert_eq!(outbox.command("c1").unwrap().unwrap().status, "running");
        assert!(outbox.unanswered().unwrap().is_empty(), "not finished yet");
        outbox
            .command_finished("c1", "succeeded", &json!({"led": "on"}))
            .unwrap();
        assert_eq!(
            outbox.unanswered().unwrap(),
            [(
                "c1".to_owned(),
                "succeeded".to_owned(),
                json!({"led": "on"})
            )]
        );
        outbox.command_answered("c1").unwrap();
        assert!(outbox.unanswered().unwrap().is_empty());
        assert!(outbox.command("c1").unwrap().unwrap().answered);
        std::fs::remove_file(path).unwrap();
    }
}
