//! `sensorctl rollups`: the minute, hour and day summaries of the readings.

use anyhow::{Context, bail};
use chrono::{DateTime, NaiveDate, Utc};
use clap::Subcommand;

#[derive(Subcommand)]
pub enum RollupsCommand {
    /// Recompute the summaries from the raw readings, a UTC day at a time (each day one short
    /// transaction; safe while readings are being written): after an upgrade, or after readings
    /// were changed by hand. Days whose raw readings retention has removed are left alone, since
    /// their summaries are all that is left of them.
    Rebuild {
        /// Only this device's summaries.
        #[arg(long)]
        device: Option<String>,
        /// The first day (`2026-11-01` or an RFC 3339 time; its whole UTC day is rebuilt). Default:
        /// the oldest raw reading's.
        #[arg(long, value_parser = parse_time)]
        from: Option<DateTime<Utc>>,
        /// Up to this time (exclusive; the day holding it is rebuilt whole). Default: now.
        #[arg(long, value_parser = parse_time)]
        to: Option<DateTime<Utc>>,
    },
    /// Compare the summaries with what the raw readings give (whole UTC days); exits 1 and lists
    /// the first differences if any differ. Only meaningful where retention kept the raw readings.
    Verify {
        /// Only this device's summaries.
        #[arg(long)]
        device: Option<String>,
        /// From this day (default: a week ago).
        #[arg(long, value_parser = parse_time)]
        from: Option<DateTime<Utc>>,
        /// Up to this time (default: now).
        #[arg(long, value_parser = parse_time)]
        to: Option<DateTime<Utc>>,
    },
    /// How many deltas wait to be folded into the summaries by the persister.
    Status,
}

pub fn run(database_url: &str, command: RollupsCommand) -> anyhow::Result<()> {
    let mut conn = crate::connect(database_url)?;
    match command {
        RollupsCommand::Rebuild { device, from, to } => {
            if let Some(device) = &device {
                models::DeviceId::parse(device.clone())
                    .map_err(|reason| anyhow::anyhow!("--device: {reason}"))?;
            }
            let to = to.unwrap_or_else(Utc::now);
            let mut from = from.unwrap_or(DateTime::UNIX_EPOCH);
            if from >= to {
                bail!("--from must be before --to");
            }
            // days whose raw readings retention has begun to remove keep their summaries
            if let Some(kept) =
                store::rollups::raw_complete_from(&mut conn, device.as_deref(), Utc::now())?
            {
                let first_whole_day = kept
                    .date_naive()
                    .succ_opt()
                    .map(|d| d.and_time(chrono::NaiveTime::MIN).and_utc())
                    .unwrap_or(kept);
                if first_whole_day > from {
                    println!(
                        "raw readings before {} may have been removed by retention: rebuilding from {}",
                        kept.format("%Y-%m-%dT%H:%MZ"),
                        first_whole_day.format("%Y-%m-%d")
                    );
                    from = first_whole_day;
                }
            }
            if from >= to {
                println!("nothing to rebuild");
                return Ok(());
            }
            let days = store::rollups::days_with_readings(&mut conn, device.as_deref(), from, to)
                .context("cannot list the days that hold readings")?;
            let total = days.len();
            println!("rebuilding {total} day(s) that hold readings");
            let mut minutes = 0;
            for (i, day) in days.into_iter().enumerate() {
                let rebuilt = store::rollups::rebuild_day(&mut conn, device.as_deref(), day)
                    .with_context(|| format!("rebuilding {}", day.format("%Y-%m-%d")))?;
                minutes += rebuilt.minutes;
                println!(
                    "[{}/{total}] {}: {} minute summaries",
                    i + 1,
                    day.format("%Y-%m-%d"),
                    rebuilt.minutes
                );
            }
            println!("rebuilt {total} day(s), {minutes} minute summaries");
        }
        RollupsCommand::Verify { device, from, to } => {
            let to = to.unwrap_or_else(Utc::now);
            let from = from.unwrap_or(to - chrono::Duration::days(7));
            let differences = store::rollups::verify(&mut conn, device.as_deref(), from, to, 20)?;
            if differences.is_empty() {
                println!("every summary equals what the raw readings give");
            } else {
                for d in &differences {
                    println!(
                        "{} {} {} {}: summary [{}] raw [{}]",
                        d.table,
                        d.device_id,
                        d.metric,
                        d.bucket.format("%Y-%m-%dT%H:%MZ"),
                        d.summary.as_deref().unwrap_or("none"),
                        d.raw.as_deref().unwrap_or("none")
                    );
                }
                bail!(
                    "{} summaries differ from the raw readings (at most 20 per table shown)",
                    differences.len()
                );
            }
        }
        RollupsCommand::Status => {
            let (deltas, oldest) = store::rollups::backlog(&mut conn)?;
            match oldest {
                Some(oldest) => println!(
                    "{deltas} deltas wait to be folded (the oldest of the minute {})",
                    oldest.format("%Y-%m-%dT%H:%MZ")
                ),
                None => println!("no deltas wait to be folded"),
            }
        }
    }
    Ok(())
}

/// A UTC date (`2026-11-01`) or an RFC 3339 time.
fn parse_time(text: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(date) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(date.and_time(chrono::NaiveTime::MIN).and_utc());
    }
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| format!("`{text}` is neither a date (2026-11-01) nor an RFC 3339 time"))
}
