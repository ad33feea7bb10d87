//! `sensorctl rollups`: the minute, hour and day summaries of the readings.

use anyhow::{Context, bail};
use chrono::{DateTime, NaiveDate, Utc};
use clap::Subcommand;

#[derive(Subcommand)]
pub enum RollupsCommand {
    /// Recompute the summaries from the raw readings, a UTC day at a time (each day one short
    /// transaction; safe while readings are being written): after an upgrade, or after readings
    /// were changed by hand. Days whose raw readings retention has begun to remove are left alone,
    /// since their summaries are all that is left of them. Default: every day that holds readings.
    Rebuild(Days),
    /// Compare the summaries with what the raw readings give (whole UTC days); exits 1 and lists
    /// the first differences if any differ. Only meaningful where retention kept the raw readings.
    /// Default: the last 7 days.
    Verify(Days),
    /// How many deltas wait to be folded into the summaries by the persister.
    Status,
}

/// Whole UTC days of one device's summaries, or of every device's.
#[derive(clap::Args)]
pub struct Days {
    /// Only this device's summaries.
    #[arg(long)]
    device: Option<String>,
    /// From the day holding this time (`2026-11-01`, or an RFC 3339 time).
    #[arg(long, value_parser = parse_time)]
    from: Option<DateTime<Utc>>,
    /// Up to this time (exclusive; the day holding it is taken whole). Default: now.
    #[arg(long, value_parser = parse_time)]
    to: Option<DateTime<Utc>>,
}

impl Days {
    /// The device, checked; `from` (or `default_from`) and `to`, in order.
    fn checked(
        self,
        default_from: DateTime<Utc>,
    ) -> anyhow::Result<(Option<String>, DateTime<Utc>, DateTime<Utc>)> {
        if let Some(device) = &self.device {
            models::DeviceId::parse(device.clone())
                .map_err(|reason| anyhow::anyhow!("--device: {reason}"))?;
        }
        let to = self.to.unwrap_or_else(Utc::now);
        let from = self.from.unwrap_or(default_from);
        if from >= to {
            bail!("--from must be before --to");
        }
        Ok((self.device, from, to))
    }
}

pub fn run(database_url: &str, command: RollupsCommand) -> anyhow::Result<()> {
    let mut conn = crate::connect(database_url)?;
    match command {
        RollupsCommand::Rebuild(days) => rebuild(&mut conn, days),
        RollupsCommand::Verify(days) => verify(&mut conn, days),
        RollupsCommand::Status => status(&mut conn),
    }
}

fn rebuild(conn: &mut store::PgConnection, days: Days) -> anyhow::Result<()> {
    let (device, mut from, to) = days.checked(DateTime::UNIX_EPOCH)?;
    // days whose raw readings retention has begun to remove keep their summaries
    let rebuildable = store::rollups::rebuildable_from(conn, device.as_deref(), Utc::now())?;
    if let Some(first_whole_day) = rebuildable.filter(|day| *day > from) {
        println!(
            "raw readings before {} may have been removed by retention: rebuilding from there",
            first_whole_day.format("%Y-%m-%d")
        );
        from = first_whole_day;
    }
    if from >= to {
        println!("nothing to rebuild");
        return Ok(());
    }
    let days = store::rollups::days_with_readings(conn, device.as_deref(), from, to)
        .context("cannot list the days that hold readings")?;
    let total = days.len();
    println!("rebuilding {total} day(s) that hold readings");
    let mut minutes = 0;
    for (i, day) in days.into_iter().enumerate() {
        let rebuilt = store::rollups::rebuild_day(conn, device.as_deref(), day)
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
    Ok(())
}

fn verify(conn: &mut store::PgConnection, days: Days) -> anyhow::Result<()> {
    let (device, from, to) = days.checked(Utc::now() - chrono::Duration::days(7))?;
    let differences = store::rollups::verify(conn, device.as_deref(), from, to, 20)?;
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
    Ok(())
}

fn status(conn: &mut store::PgConnection) -> anyhow::Result<()> {
    let (deltas, oldest) = store::rollups::backlog(conn)?;
    match oldest {
        Some(oldest) => println!(
            "{deltas} deltas wait to be folded (the oldest of the minute {})",
            oldest.format("%Y-%m-%dT%H:%MZ")
        ),
        None => println!("no deltas wait to be folded"),
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
