//! `sensorhub-agent status`: what the outbox holds and how sending goes, read from the outbox
//! beside the running agent (SQLite's WAL lets a reader in while it writes).

use crate::config::Config;
use crate::error::Error;
use crate::outbox::{Outbox, Status};

pub fn status(config: &Config) -> Result<Status, Error> {
    if !config.outbox.path.exists() {
        return Err(Error::Config(format!(
            "no outbox at {} yet: has the agent run?",
            config.outbox.path.display()
        )));
    }
    Outbox::open_read_only(&config.outbox.path)?.status()
}

/// For a person: one line per figure.
pub fn render(status: &Status) -> String {
    let time = |t: &Option<chrono::DateTime<chrono::Utc>>| {
        t.map_or_else(
            || "never".to_owned(),
            |t| {
                let ago = chrono::Utc::now()
                    .signed_duration_since(t)
                    .num_seconds()
                    .max(0);
                format!(
                    "{} ({} ago)",
                    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    humantime::format_duration(std::time::Duration::from_secs(ago as u64))
                )
            },
        )
    };
    let mut lines = vec![
        format!("outbox depth:        {} readings waiting", status.depth),
        format!(
            "  waiting for NTP:   {} (taken before the clock was synchronised)",
            status.untimed_waiting
        ),
        format!(
            "oldest unsent:       {}",
            status.oldest_unsent.map_or_else(
                || "none".to_owned(),
                |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            )
        ),
        format!("last success:        {}", time(&status.last_success)),
    ];
    match &status.last_error {
        Some(error) => lines.push(format!(
            "last error:          {} at {}",
            error,
            time(&status.last_error_at)
        )),
        None => lines.push("last error:          none".to_owned()),
    }
    lines.push(format!(
        "dropped (full):      {} readings",
        status.dropped_total
    ));
    lines.push(format!(
        "refused by server:   {} readings",
        status.rejected_total
    ));
    lines.push(format!(
        "untimed, set aside:  {} readings",
        status.untimed_total
    ));
    lines.push(format!(
        "commands run:        {}",
        status.commands_run_total
    ));
    lines.join("\n")
}
