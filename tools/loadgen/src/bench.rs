//! The benchmark's course: each workload run `runs` times, Sensorhub and the seed design alternating
//! run by run (so drift on a shared machine hits both alike), then the figures.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::http::{self, Body, Endpoint};
use crate::mqtt::{self, Broker, Format};
use crate::progress::Progress;
use crate::report::{Figure, Machine, Report, Resource};
use crate::stats::Summary;
use crate::{Args, Workload, db};
use system::numbers::readable;
use system::procs::{CpuWindow, PeakWindow, Usage, Watched};

/// The name loadgen's own process is shown under.
const LOADGEN: &str = "loadgen (this)";
/// The figure both HTTP workloads report for requests not answered 2xx.
const REFUSED: &str = "refused or failed requests";

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum SideKind {
    Sensorhub,
    Seed,
}

#[derive(Clone)]
struct Side {
    kind: SideKind,
    ingest: String,
    db_url: String,
    table: String,
    reset: Vec<String>,
    mqtt: Option<Broker>,
    format: Format,
    watched: Vec<Watched>,
    /// Device tokens by fleet index, when the fleet was registered (`--keys-dir`).
    tokens: Option<Arc<Vec<String>>>,
}

impl Side {
    fn name(&self) -> &'static str {
        match self.kind {
            SideKind::Sensorhub => "Sensorhub",
            SideKind::Seed => "seed",
        }
    }
}

/// Per-run values of each figure, by side.
#[derive(Default)]
struct Runs(BTreeMap<(String, SideKind), Vec<f64>>);

impl Runs {
    fn push(&mut self, key: &str, side: SideKind, value: f64) {
        self.0
            .entry((key.to_owned(), side))
            .or_default()
            .push(value);
    }

    fn summary(&self, key: &str, side: SideKind) -> Option<Summary> {
        self.0
            .get(&(key.to_owned(), side))
            .and_then(|v| Summary::of(v))
    }
}

/// CPU (percent of one core) of each watched process, by side, over a workload's runs.
#[derive(Default)]
struct CpuRuns(BTreeMap<(SideKind, String), Vec<f64>>);

impl CpuRuns {
    /// Adds one run's CPU, as its `CpuWindow` measured it.
    fn add(&mut self, side: SideKind, usage: Vec<Usage>) {
        for u in usage {
            if let Some(v) = u.cpu_percent {
                self.0.entry((side, u.name)).or_default().push(v);
            }
        }
    }
}

/// What the sides' processes take over all the runs of a workload: peak memory since it began,
/// CPU run by run.
struct Taken {
    peaks: Vec<PeakWindow>,
    cpu: CpuRuns,
}

impl Taken {
    fn start(sides: &[Side]) -> Self {
        Self {
            peaks: sides
                .iter()
                .map(|s| PeakWindow::start(&s.watched))
                .collect(),
            cpu: CpuRuns::default(),
        }
    }
}

pub struct Bench {
    args: Args,
    progress: Progress,
    runs: Runs,
    resources: Vec<Resource>,
    notes: Vec<String>,
    tag_base: String,
    tag_seq: u64,
    started_at: String,
}

impl Bench {
    pub fn new(args: Args) -> Self {
        let now = chrono::Utc::now();
        Self {
            args,
            progress: Progress::start(),
            runs: Runs::default(),
            resources: Vec::new(),
            notes: Vec::new(),
            // short and different every time, so reading ids never repeat across runs
            tag_base: format!("{:x}", now.timestamp() % 0x100_0000),
            tag_seq: 0,
            started_at: now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        }
    }

    fn tag(&mut self, what: &str) -> String {
        self.tag_seq += 1;
        format!("{what}{}x{}", self.tag_base, self.tag_seq)
    }

    fn sides(&self) -> anyhow::Result<Vec<Side>> {
        // loadgen shares the machine's cores with what it measures: show what it takes
        let me = Watched {
            name: LOADGEN.into(),
            pid: std::process::id(),
            tree: false,
        };
        let mut watched = self.args.pids.clone();
        watched.extend(self.args.pid_trees.iter().cloned());
        watched.extend(self.args.shared_pid_trees.iter().cloned());
        watched.push(me.clone());
        let mqtt = if self.args.mqtt_url.is_empty() {
            None
        } else {
            Some(Broker::parse(&self.args.mqtt_url)?)
        };
        let mut sides = vec![Side {
            kind: SideKind::Sensorhub,
            ingest: self.args.ingest_url.clone(),
            db_url: self.args.database_url.clone(),
            table: "readings".into(),
            reset: vec![
                "readings".into(),
                "devices".into(),
                "reading_ids".into(),
                "reading_conflicts".into(),
                "rollup_deltas".into(),
                "rollups_1m".into(),
                "rollups_1h".into(),
                "rollups_1d".into(),
            ],
            mqtt,
            format: Format::DeviceTopic,
            watched,
            tokens: None,
        }];
        if let Some(peer) = &self.args.peer_url {
            let mut watched = self.args.peer_pids.clone();
            watched.extend(self.args.peer_pid_trees.iter().cloned());
            watched.extend(self.args.shared_pid_trees.iter().cloned());
            watched.push(me);
            sides.push(Side {
                kind: SideKind::Seed,
                ingest: peer.clone(),
                db_url: self.args.peer_database_url.clone(),
                table: self.args.peer_table.clone(),
                reset: vec![self.args.peer_table.clone()],
                mqtt: self
                    .args
                    .peer_mqtt_url
                    .as_deref()
                    .map(Broker::parse)
                    .transpose()?,
                format: Format::Seed,
                watched,
                tokens: None,
            });
        }
        Ok(sides)
    }

    pub async fn run(mut self) -> anyhow::Result<()> {
        let mut sides = self.sides()?;
        if let Some(keys) = self.args.keys_dir.clone() {
            let (url, fleet) = (self.args.database_url.clone(), self.args.fleet);
            let tokens = blocking(move || db::register_fleet(&url, &keys, fleet))
                .await
                .context("registering the fleet's devices")?;
            // ingest-http re-reads its device registry every AUTH_REFRESH_MS (2 s by default): one
            // re-read that has the last device registered has them all
            if let Some(last) = tokens.last() {
                system::service::wait_token_accepted(
                    &self.args.ingest_url,
                    last,
                    Duration::from_secs(60),
                )
                .await
                .context("ingest-http to let the fleet in")?;
            }
            sides[0].tokens = Some(Arc::new(tokens));
        }
        let only = self.args.only.clone();
        let started = Instant::now();
        // Fail early on a wrong URL rather than after minutes of load.
        for side in &sides {
            let (url, table) = (side.db_url.clone(), side.table.clone());
            blocking(move || db::count_rows(&mut db::connect(&url)?, &table))
                .await
                .with_context(|| format!("{}: its database", side.name()))?;
        }

        if only.contains(&Workload::Copy) {
            self.copy_ceiling().await?;
        }
        if only.contains(&Workload::Writer) {
            if self.args.reset_db {
                self.write_path(&sides[0]).await?;
            } else {
                self.notes
                    .push("The writer workload needs --reset-db (it writes test rows).".into());
            }
        }
        if only.contains(&Workload::Http) {
            for connections in self.args.connections.clone() {
                let label = format!("HTTP POST /data, {connections} conn");
                self.http_workload(&sides, &label, Body::Seed, connections)
                    .await?;
            }
        }
        if only.contains(&Workload::Batch) {
            let label = format!(
                "HTTP POST /v1/readings ×{}, {} conn",
                self.args.batch_size, self.args.batch_connections
            );
            // the seed design has no batch endpoint
            self.http_workload(
                &sides[..1],
                &label,
                Body::Batch(self.args.batch_size),
                self.args.batch_connections,
            )
            .await?;
        }
        if only.contains(&Workload::Mqtt) {
            self.mqtt_workload(&sides).await?;
        }
        if only.contains(&Workload::Series) {
            if self.args.reset_db {
                self.year_series(&sides[0]).await?;
            } else {
                self.notes.push(
                    "The series workload needs --reset-db (it writes a year of readings).".into(),
                );
            }
        }
        if only.contains(&Workload::E2e) {
            self.half_load(&sides[0]).await?;
        }
        self.progress.done();

        let report = self.report(&sides);
        let markdown = report.markdown();
        println!("{markdown}");
        let written = write_json(&self.args.out, &report)?;
        eprintln!(
            "figures written to {} ({:.0} s in all)",
            written.display(),
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }

    async fn copy_ceiling(&mut self) -> anyhow::Result<()> {
        let url = self
            .args
            .copy_database_url
            .clone()
            .unwrap_or_else(|| self.args.database_url.clone());
        let setup_url = url.clone();
        blocking(move || db::create_copy_table(&mut db::connect(&setup_url)?)).await?;
        for connections in [1usize, 2] {
            for run in 1..=self.args.runs {
                let reset_url = url.clone();
                blocking(move || db::truncate_copy_table(&mut db::connect(&reset_url)?)).await?;
                let phase = format!(
                    "COPY ceiling, {connections} conn, run {run}/{}",
                    self.args.runs
                );
                let (url, rows, fleet) = (url.clone(), self.args.copy_rows.max(1), self.args.fleet);
                let rate = self
                    .timed_run(phase, &format!("copy{connections}"), connections, {
                        move |worker, deadline| db::copy_until(&url, worker, rows, fleet, deadline)
                    })
                    .await
                    .context("a COPY worker failed")?;
                self.say(format!(
                    "COPY ceiling, {connections} conn, run {run}: {} rows/s",
                    readable(rate)
                ));
            }
        }
        blocking(move || db::drop_copy_table(&mut db::connect(&url)?)).await?;
        Ok(())
    }

    /// The persister's write path alone, 2 connections as the persister's default `db_writers`;
    /// each run with rollups kept (as deployed) and again without, to show what keeping them costs.
    async fn write_path(&mut self, side: &Side) -> anyhow::Result<()> {
        for batch in self.args.write_batches.clone() {
            for run in 1..=self.args.runs {
                for rollups in [true, false] {
                    self.prepare(side).await?;
                    let kept = if rollups { "rollups on" } else { "rollups off" };
                    let phase = format!(
                        "persister write path, batches of {batch}, {kept}, 2 conn, run {run}/{}",
                        self.args.runs
                    );
                    let (url, fleet) = (side.db_url.clone(), self.args.fleet);
                    let key = if rollups {
                        format!("writer{batch}")
                    } else {
                        format!("writer{batch}|off")
                    };
                    let rate = self
                        .timed_run(phase, &key, 2, move |worker, deadline| {
                            db::write_path_until(&url, worker, batch, fleet, rollups, deadline)
                        })
                        .await
                        .context("a writer failed")?;
                    self.say(format!(
                        "persister write path, batches of {batch}, {kept}, run {run}: {} readings/s",
                        readable(rate)
                    ));
                }
            }
        }
        Ok(())
    }

    /// A year of one device's readings, one a minute (525,600), then the one-year chart's series
    /// (daily buckets; min, max and average) answered from the summaries and from the raw readings.
    async fn year_series(&mut self, side: &Side) -> anyhow::Result<()> {
        self.prepare(side).await?;
        let counter = self
            .progress
            .phase("series: writing a year of one-minute readings");
        let url = side.db_url.clone();
        blocking(move || db::write_year(&url, &counter)).await?;
        let counter = self.progress.phase("series: folding the rollups");
        let url = side.db_url.clone();
        blocking(move || db::fold_rollups(&url, &counter)).await?;
        for (key, from_summaries) in [("series|rollups", true), ("series|raw", false)] {
            let times = if from_summaries { 50 } else { 5 };
            let counter = self.progress.phase(format!(
                "series: one year in days, from {}, {times} times",
                if from_summaries {
                    "the summaries"
                } else {
                    "raw readings"
                }
            ));
            let url = side.db_url.clone();
            let timings =
                blocking(move || db::time_year_series(&url, from_summaries, times, &counter))
                    .await?;
            for ms in timings {
                self.runs.push(key, SideKind::Sensorhub, ms);
            }
        }
        Ok(())
    }

    /// `work(worker, deadline)` on `workers` blocking threads for `--copy-secs`, shown as `phase`:
    /// what they counted per second, recorded as Sensorhub's `key`.
    async fn timed_run(
        &mut self,
        phase: String,
        key: &str,
        workers: usize,
        work: impl Fn(usize, std::time::Instant) -> anyhow::Result<u64> + Clone + Send + 'static,
    ) -> anyhow::Result<f64> {
        let counter = self.progress.phase(phase);
        let (counted, rate) = until_deadline(workers, self.args.copy_secs, work).await?;
        counter.store(counted, std::sync::atomic::Ordering::Relaxed);
        self.runs.push(key, SideKind::Sensorhub, rate);
        Ok(rate)
    }

    async fn http_workload(
        &mut self,
        sides: &[Side],
        label: &str,
        body: Body,
        connections: usize,
    ) -> anyhow::Result<()> {
        let mut taken = Taken::start(sides);
        for run in 1..=self.args.runs {
            for side in sides {
                let phase = format!("{label}, {}, run {run}/{}", side.name(), self.args.runs);
                let r = self
                    .http_run(
                        side,
                        &phase,
                        body,
                        connections,
                        Duration::from_secs_f64(self.args.duration_secs),
                        None,
                    )
                    .await?;
                let key = |f: &str| format!("{label}|{f}");
                let k = side.kind;
                self.runs.push(&key("accepted"), k, r.accepted_per_s);
                if let Some(v) = r.p50 {
                    self.runs.push(&key("p50"), k, v);
                }
                if let Some(v) = r.p99 {
                    self.runs.push(&key("p99"), k, v);
                }
                self.runs.push(&key("persisted"), k, r.persisted_per_s);
                self.runs.push(&key("refused"), k, r.refused as f64);
                taken.cpu.add(k, r.cpu);
                self.say(format!(
                    "{phase}: accepted {}/s, ack p50 {} ms p99 {} ms, persisted {}/s{}{}",
                    readable(r.accepted_per_s),
                    r.p50.map_or("–".into(), readable),
                    r.p99.map_or("–".into(), readable),
                    readable(r.persisted_per_s),
                    if r.refused > 0 {
                        format!(", {} refused or failed", r.refused)
                    } else {
                        String::new()
                    },
                    if r.complete {
                        String::new()
                    } else {
                        format!(", NOT ALL STORED ({} of {})", r.stored, r.acked)
                    }
                ));
                if !r.complete {
                    self.notes.push(format!(
                        "{phase}: only {} of {} acknowledged readings were stored when the wait ended.",
                        r.stored, r.acked
                    ));
                }
            }
        }
        self.record_resources(label, sides, taken);
        Ok(())
    }

    async fn http_run(
        &mut self,
        side: &Side,
        phase: &str,
        body: Body,
        connections: usize,
        duration: Duration,
        rate: Option<f64>,
    ) -> anyhow::Result<HttpRun> {
        let path = match body {
            Body::Seed => "/data",
            Body::Batch(_) => "/v1/readings",
        };
        let before = self.prepare(side).await?;
        let counter = self.progress.phase(phase);
        let cpu = CpuWindow::start(&side.watched);
        let plan = http::Plan {
            endpoint: Endpoint::parse(&side.ingest, path)?,
            body,
            connections,
            duration,
            rate,
            fleet: self.args.fleet,
            run_tag: self.tag("h"),
            sample_every: 0,
            tokens: side.tokens.clone(),
        };
        let started = Instant::now();
        let mut outcome = http::run(plan, counter, None).await;
        let drained = self
            .drain(side, phase, before, outcome.ok_readings as i64)
            .await?;
        let cpu = cpu.finish();
        let persisted_time = (drained.last_growth - started).as_secs_f64().max(1e-3);
        Ok(HttpRun {
            accepted_per_s: outcome.ok_readings as f64 / outcome.elapsed.as_secs_f64(),
            p50: outcome.latencies.percentile_ms(50.0),
            p99: outcome.latencies.percentile_ms(99.0),
            persisted_per_s: drained.stored as f64 / persisted_time,
            refused: outcome.refused + outcome.failures,
            acked: outcome.ok_readings as i64,
            stored: drained.stored,
            complete: drained.complete,
            cpu,
        })
    }

    /// Empties the side's tables when allowed, and returns the rows there now.
    async fn prepare(&self, side: &Side) -> anyhow::Result<i64> {
        let (url, table, reset) = (
            side.db_url.clone(),
            side.table.clone(),
            self.args.reset_db.then(|| side.reset.clone()),
        );
        blocking(move || {
            let mut conn = db::connect(&url)?;
            if let Some(tables) = reset {
                let tables: Vec<&str> = tables.iter().map(String::as_str).collect();
                db::truncate(&mut conn, &tables)?;
            }
            db::count_rows(&mut conn, &table)
        })
        .await
    }

    async fn drain(
        &self,
        side: &Side,
        phase: &str,
        before: i64,
        expected: i64,
    ) -> anyhow::Result<db::Drained> {
        let counter = self
            .progress
            .phase(format!("{phase}: waiting for PostgreSQL"));
        let (url, table) = (side.db_url.clone(), side.table.clone());
        let (stall, timeout) = (
            Duration::from_secs_f64(self.args.stall_secs),
            Duration::from_secs_f64(self.args.drain_timeout_secs),
        );
        blocking(move || {
            db::wait_stored(
                &mut db::connect(&url)?,
                &table,
                before,
                expected,
                stall,
                timeout,
                |n| counter.store(n.max(0) as u64, std::sync::atomic::Ordering::Relaxed),
            )
        })
        .await
    }

    async fn mqtt_workload(&mut self, sides: &[Side]) -> anyhow::Result<()> {
        let sides: Vec<Side> = sides.iter().filter(|s| s.mqtt.is_some()).cloned().collect();
        if sides.is_empty() {
            return Ok(());
        }
        let label = format!(
            "MQTT QoS 1 ({}), {} devices",
            self.args.mqtt_broker, self.args.mqtt_devices
        );
        let mut taken = Taken::start(&sides);
        for run in 1..=self.args.runs {
            for side in &sides {
                let Some(broker) = side.mqtt.clone() else {
                    continue;
                };
                let messages = match side.kind {
                    SideKind::Sensorhub => self.args.mqtt_messages,
                    SideKind::Seed => self
                        .args
                        .peer_mqtt_messages
                        .unwrap_or(self.args.mqtt_messages),
                };
                let phase = format!(
                    "{label}, burst of {}, {}, run {run}/{}",
                    readable(messages as f64),
                    side.name(),
                    self.args.runs
                );
                let before = self.prepare(side).await?;
                let counter = self.progress.phase(&phase);
                let window = CpuWindow::start(&side.watched);
                let plan = mqtt::Plan {
                    broker,
                    format: side.format,
                    devices: self.args.mqtt_devices,
                    messages,
                    inflight: self.args.mqtt_inflight,
                    run_tag: self.tag("m"),
                    timeout: Duration::from_secs_f64(self.args.drain_timeout_secs),
                    logins: match side.kind {
                        SideKind::Sensorhub if self.args.mqtt_device_logins => {
                            let tokens = side.tokens.clone().context(
                                "--mqtt-device-logins needs the fleet's tokens (--keys-dir)",
                            )?;
                            anyhow::ensure!(
                                self.args.mqtt_devices <= tokens.len(),
                                "--mqtt-device-logins: --mqtt-devices must be at most --fleet (one login per device)"
                            );
                            Some(tokens)
                        }
                        _ => None,
                    },
                };
                let started = Instant::now();
                let outcome = mqtt::run(plan, counter).await;
                let drained = self
                    .drain(side, &phase, before, outcome.acked as i64)
                    .await?;
                taken.cpu.add(side.kind, window.finish());
                let acked_per_s = outcome.acked as f64 / outcome.elapsed.as_secs_f64().max(1e-3);
                let persisted_per_s =
                    drained.stored as f64 / (drained.last_growth - started).as_secs_f64().max(1e-3);
                let lost = (outcome.acked as i64 - drained.stored).max(0);
                let k = side.kind;
                self.runs.push("mqtt|acked", k, acked_per_s);
                self.runs.push("mqtt|persisted", k, persisted_per_s);
                self.runs.push("mqtt|lost", k, lost as f64);
                self.runs.push(
                    "mqtt|lost_pct",
                    k,
                    100.0 * lost as f64 / (outcome.acked.max(1)) as f64,
                );
                self.say(format!(
                    "{phase}: {} published, {} PUBACKed ({}/s), {} stored ({}/s), lost {lost}{}",
                    outcome.published,
                    outcome.acked,
                    readable(acked_per_s),
                    drained.stored,
                    readable(persisted_per_s),
                    if outcome.failed_devices > 0 {
                        format!(", {} devices failed", outcome.failed_devices)
                    } else {
                        String::new()
                    }
                ));
                if outcome.failed_devices > 0 || outcome.acked < messages as u64 {
                    self.notes.push(format!(
                        "{phase}: {} of {messages} messages PUBACKed, {} device clients failed.",
                        outcome.acked, outcome.failed_devices
                    ));
                }
            }
        }
        self.record_resources(&label, &sides, taken);
        Ok(())
    }

    /// Ack and ack-to-queryable latency at half the peak: an open-loop rate over 64 connections, a
    /// sample of readings looked up in the database until each is visible.
    async fn half_load(&mut self, side: &Side) -> anyhow::Result<()> {
        let first = self
            .args
            .connections
            .first()
            .map(|c| format!("HTTP POST /data, {c} conn|persisted"));
        let peak = first
            .as_deref()
            .and_then(|k| self.runs.summary(k, SideKind::Sensorhub))
            .map(|s| s.median);
        let Some(rate) = self.args.e2e_rate.or(peak.map(|p| p / 2.0)) else {
            self.notes.push(
                "Half load skipped: no peak measured (run the http workload or give --e2e-rate)."
                    .into(),
            );
            return Ok(());
        };
        let connections = 64;
        let label = format!(
            "half load: {} req/s POST /data, {connections} conn",
            readable(rate)
        );
        let sides = std::slice::from_ref(side);
        let mut taken = Taken::start(sides);
        for run in 1..=self.args.runs {
            let phase = format!("{label}, run {run}/{}", self.args.runs);
            let before = self.prepare(side).await?;
            let counter = self.progress.phase(&phase);
            let window = CpuWindow::start(&side.watched);
            let (tx, rx) = mpsc::unbounded_channel();
            let url = side.db_url.clone();
            let wait = Duration::from_secs(30);
            let watcher = tokio::task::spawn_blocking(move || {
                db::watch_visibility(&mut db::connect(&url)?, rx, wait)
            });
            let plan = http::Plan {
                endpoint: Endpoint::parse(&side.ingest, "/data")?,
                body: Body::Seed,
                connections,
                duration: Duration::from_secs_f64(self.args.e2e_secs),
                rate: Some(rate),
                fleet: self.args.fleet,
                run_tag: self.tag("e"),
                // about 200 sampled readings a second
                sample_every: (rate / 200.0).max(1.0) as u64,
                tokens: side.tokens.clone(),
            };
            let mut outcome = http::run(plan, counter, Some(tx)).await;
            let mut visible = watcher.await.context("the visibility watcher failed")??;
            let drained = self
                .drain(side, &phase, before, outcome.ok_readings as i64)
                .await?;
            taken.cpu.add(side.kind, window.finish());
            let k = side.kind;
            let achieved = outcome.ok_requests as f64 / outcome.elapsed.as_secs_f64();
            self.runs.push("e2e|rate", k, achieved);
            let (p50, p99) = (
                outcome.latencies.percentile_ms(50.0),
                outcome.latencies.percentile_ms(99.0),
            );
            let (v50, v99) = (
                visible.latencies.percentile_ms(50.0),
                visible.latencies.percentile_ms(99.0),
            );
            for (key, value) in [
                ("e2e|p50", p50),
                ("e2e|p99", p99),
                ("e2e|v50", v50),
                ("e2e|v99", v99),
            ] {
                if let Some(v) = value {
                    self.runs.push(key, k, v);
                }
            }
            self.runs.push("e2e|unseen", k, visible.unseen as f64);
            self.say(format!(
                "{phase}: {} req/s, ack p50 {} p99 {} ms; queryable p50 {} p99 {} ms ({} samples, {} never seen){}",
                readable(achieved),
                p50.map_or("–".into(), readable),
                p99.map_or("–".into(), readable),
                v50.map_or("–".into(), readable),
                v99.map_or("–".into(), readable),
                visible.latencies.len(),
                visible.unseen,
                if drained.complete { "" } else { ", NOT ALL STORED" }
            ));
        }
        self.record_resources(&label, sides, taken);
        Ok(())
    }

    fn record_resources(&mut self, label: &str, sides: &[Side], Taken { peaks, cpu }: Taken) {
        for (side, peak) in sides.iter().zip(peaks) {
            let peaks = peak.finish();
            for w in &side.watched {
                // a process both sides use (PostgreSQL) is shown under each, for that side's runs
                let peak = peaks.iter().find(|p| p.name == w.name);
                self.resources.push(Resource {
                    workload: format!("{label}, {}", side.name()),
                    process: if w.tree {
                        format!("{} (all processes)", w.name)
                    } else {
                        w.name.clone()
                    },
                    cpu_percent: cpu
                        .0
                        .get(&(side.kind, w.name.clone()))
                        .and_then(|v| Summary::of(v)),
                    peak_rss_mib: peak.and_then(|p| p.peak_mib),
                    peak_since_workload_start: peak.is_some_and(|p| p.since_reset),
                });
            }
        }
    }

    fn say(&self, text: String) {
        self.progress.say(&text);
    }

    fn report(&self, sides: &[Side]) -> Report {
        use SideKind::{Seed, Sensorhub};
        let s = |key: &str, side| self.runs.summary(key, side);
        let both = |key: &str| (s(key, Sensorhub), s(key, Seed));
        let ours = |key: &str| (s(key, Sensorhub), None);
        let mut figures = Vec::new();
        // a figure neither side has runs of (its workload did not run) is left out
        let mut add = |figure: Figure| {
            if figure.sensorhub.is_some() || figure.seed.is_some() {
                figures.push(figure);
            }
        };

        let copy2 = s("copy2", Sensorhub);
        for (i, c) in self.args.connections.iter().enumerate() {
            let w = format!("HTTP POST /data, {c} conn");
            let k = |f: &str| both(&format!("{w}|{f}"));
            add(Figure::new(&w, "accepted", "readings/s", k("accepted")).vs_seed());
            add(Figure::new(&w, "ack latency p50", "ms", k("p50")));
            add(Figure::new(&w, "ack latency p99", "ms", k("p99")));
            add(Figure::new(&w, "persisted", "readings/s", k("persisted"))
                .vs_seed()
                .target("≥ 10× seed", |f| {
                    f.ratio.filter(|_| i == 0).map(|r| r >= 10.0)
                }));
            add(Figure::new(&w, REFUSED, "", k("refused")));
        }
        let w = format!(
            "HTTP POST /v1/readings ×{}, {} conn",
            self.args.batch_size, self.args.batch_connections
        );
        let k = |f: &str| ours(&format!("{w}|{f}"));
        add(Figure::new(&w, "accepted", "readings/s", k("accepted")));
        add(Figure::new(&w, "persisted", "readings/s", k("persisted"))
            .vs("COPY, 2 conn", copy2.as_ref())
            .target("≥ 50% of COPY, 2 conn", |f| f.ratio.map(|r| r >= 0.5)));
        add(Figure::new(&w, "ack latency p99", "ms", k("p99")));
        add(Figure::new(&w, REFUSED, "", k("refused")));

        let w = format!(
            "MQTT QoS 1 ({}), {} devices, bursts of {} (seed: {})",
            self.args.mqtt_broker,
            self.args.mqtt_devices,
            readable(self.args.mqtt_messages as f64),
            readable(
                self.args
                    .peer_mqtt_messages
                    .unwrap_or(self.args.mqtt_messages) as f64
            )
        );
        add(Figure::new(&w, "PUBACKed", "msgs/s", both("mqtt|acked")).vs_seed());
        add(
            Figure::new(&w, "persisted", "readings/s", both("mqtt|persisted"))
                .vs_seed()
                .target("≥ 10× seed", |f| f.ratio.map(|r| r >= 10.0)),
        );
        add(Figure::new(
            &w,
            "lost (PUBACKed, not stored)",
            "readings",
            both("mqtt|lost"),
        )
        .target("0", |f| f.sensorhub.as_ref().map(|l| l.max == 0.0)));
        add(Figure::new(&w, "lost", "%", both("mqtt|lost_pct")));

        if let Some(rate) = s("e2e|rate", Sensorhub) {
            let w = format!(
                "half load: {} req/s POST /data, 64 conn",
                readable(rate.median)
            );
            let at_most = |ms: f64| move |f: &Figure| f.sensorhub.as_ref().map(|p| p.median <= ms);
            add(Figure::new(&w, "ack latency p50", "ms", ours("e2e|p50")));
            add(Figure::new(&w, "ack latency p99", "ms", ours("e2e|p99"))
                .target("≤ 20 ms", at_most(20.0)));
            add(Figure::new(
                &w,
                "ack → queryable p50",
                "ms",
                ours("e2e|v50"),
            ));
            add(
                Figure::new(&w, "ack → queryable p99", "ms", ours("e2e|v99"))
                    .target("≤ 1,000 ms", at_most(1000.0)),
            );
            add(Figure::new(
                &w,
                "samples never seen",
                "",
                ours("e2e|unseen"),
            ));
        }
        let w = format!(
            "ceiling: PostgreSQL binary COPY, {} rows per COPY",
            readable(self.args.copy_rows as f64)
        );
        add(Figure::new(&w, "1 connection", "rows/s", ours("copy1")));
        add(Figure::new(
            &w,
            "2 connections",
            "rows/s",
            (copy2.clone(), None),
        ));
        for batch in &self.args.write_batches {
            let w = "persister write path alone (store::write_readings, 2 conn)";
            let (on, off) = (format!("writer{batch}"), format!("writer{batch}|off"));
            add(
                Figure::new(w, &format!("batches of {batch}"), "readings/s", ours(&on))
                    .vs("COPY, 2 conn", copy2.as_ref()),
            );
            let without = s(&off, Sensorhub);
            add(Figure::new(
                w,
                &format!("batches of {batch}, rollups off"),
                "readings/s",
                (without.clone(), None),
            ));
            add(Figure::new(
                w,
                &format!("batches of {batch}, rollups on"),
                "readings/s",
                ours(&on),
            )
            .vs("rollups off", without.as_ref())
            .target("≥ 0.85× off", |f| f.ratio.map(|r| r >= 0.85)));
        }
        let w = "one-year chart of one device (525,600 one-minute readings; daily min, max, avg)";
        add(
            Figure::new(w, "from the summaries (1d)", "ms", ours("series|rollups"))
                .vs("raw", s("series|raw", Sensorhub).as_ref())
                .target("< 50 ms", |f| f.sensorhub.as_ref().map(|p| p.median < 50.0)),
        );
        add(Figure::new(
            w,
            "from the raw readings",
            "ms",
            ours("series|raw"),
        ));

        // the memory target, over every workload
        let ours: Vec<&str> = sides
            .first()
            .map(|s| {
                s.watched
                    .iter()
                    .filter(|w| !w.tree && w.name != LOADGEN)
                    .map(|w| w.name.as_str())
                    .collect()
            })
            .unwrap_or_default();
        let peak = self
            .resources
            .iter()
            .filter(|r| ours.contains(&r.process.as_str()))
            .filter_map(|r| r.peak_rss_mib.map(|p| (p, r.process.clone())))
            .max_by(|a, b| a.0.total_cmp(&b.0));
        if let Some((peak, process)) = peak {
            add(Figure::new(
                "memory",
                &format!("largest peak RSS of a Sensorhub service ({process})"),
                "MiB",
                (Summary::of(&[peak]), None),
            )
            .target("≤ 64 MiB", |_| Some(peak <= 64.0)));
        }

        Report {
            started_at: self.started_at.clone(),
            machine: Machine::here(),
            settings: serde_json::json!({
                "runs": self.args.runs,
                "duration_secs": self.args.duration_secs,
                "connections": self.args.connections,
                "batch_connections": self.args.batch_connections,
                "batch_size": self.args.batch_size,
                "fleet": self.args.fleet,
                "mqtt_devices": self.args.mqtt_devices,
                "mqtt_messages": self.args.mqtt_messages,
                "peer_mqtt_messages": self.args.peer_mqtt_messages.unwrap_or(self.args.mqtt_messages),
                "mqtt_inflight": self.args.mqtt_inflight,
                "copy_secs": self.args.copy_secs,
                "copy_rows": self.args.copy_rows,
                "e2e_secs": self.args.e2e_secs,
                "ingest_url": self.args.ingest_url,
                "peer_url": self.args.peer_url,
                "quick": self.args.quick,
                "workloads": self.args.only,
            }),
            figures,
            resources: self.resources.clone(),
            notes: self.notes.clone(),
        }
    }
}

struct HttpRun {
    accepted_per_s: f64,
    p50: Option<f64>,
    p99: Option<f64>,
    persisted_per_s: f64,
    refused: u64,
    acked: i64,
    stored: i64,
    complete: bool,
    cpu: Vec<Usage>,
}

/// `work(worker, deadline)` on `workers` blocking threads at once, each until `secs` from now: the
/// sum of what they counted, and that per second of the whole.
async fn until_deadline(
    workers: usize,
    secs: f64,
    work: impl Fn(usize, std::time::Instant) -> anyhow::Result<u64> + Clone + Send + 'static,
) -> anyhow::Result<(u64, f64)> {
    let started = std::time::Instant::now();
    let deadline = started + Duration::from_secs_f64(secs);
    let tasks: Vec<_> = (0..workers)
        .map(|worker| {
            let work = work.clone();
            tokio::task::spawn_blocking(move || work(worker, deadline))
        })
        .collect();
    let mut counted = 0u64;
    for task in tasks {
        counted += task.await??;
    }
    Ok((counted, counted as f64 / started.elapsed().as_secs_f64()))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .context("a database task failed")?
}

fn write_json(dir: &std::path::Path, report: &Report) -> anyhow::Result<std::path::PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = serde_json::to_string_pretty(report)?;
    let stamp = report.started_at.replace(':', "");
    let path = dir.join(format!("bench-{stamp}.json"));
    std::fs::write(&path, &json).with_context(|| format!("writing {}", path.display()))?;
    std::fs::write(dir.join("latest.json"), &json)?;
    std::fs::write(dir.join("latest.md"), report.markdown())?;
    Ok(path)
}
