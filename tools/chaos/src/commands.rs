//! Commands through the faults: in each step an app issues commands to two simulated Pis (one on
//! MQTT, one by long-poll) before the fault and after it; each must end `succeeded`, with one
//! answer recorded, however often it was delivered meanwhile.

use std::time::Duration;

use diesel::PgConnection;
use serde::Serialize;
use system::commanded::{CommandedDevice, CommandedDevices, Listening};
use system::devices::MqttLogin;
use tokio::time::Instant;

/// How many commands, and to whom.
#[derive(Debug, Clone, Copy)]
pub struct CommandPlan {
    /// Commands issued to each commanded device before the fault, and as many after it; 0: none.
    pub per_device: usize,
    /// Whether one of the devices listens over MQTT (else both poll).
    pub mqtt: bool,
}

impl CommandPlan {
    pub fn enabled(&self) -> bool {
        self.per_device > 0
    }

    /// The commanded devices of a step: `<step>-cm` (MQTT) and `<step>-cp` (long-poll).
    pub fn devices(&self, step_tag: &str) -> Vec<String> {
        if !self.enabled() {
            return Vec::new();
        }
        let mut devices = vec![format!("{step_tag}-cp")];
        if self.mqtt {
            devices.push(format!("{step_tag}-cm"));
        }
        devices
    }
}

/// What became of a step's commands.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CommandOutcome {
    pub issued: usize,
    pub succeeded: usize,
    /// Issued and not succeeded by the end of the wait: lost, or a system that did not recover.
    pub unfinished: usize,
    /// Deliveries the devices saw in all (more than `issued`: re-sends, redeliveries).
    pub deliveries: u32,
    /// From the end of the load until every command had succeeded; None: never.
    pub finished_in_secs: Option<f64>,
}

/// A step's commands under way.
pub struct StepCommands {
    devices: Vec<String>,
    running: CommandedDevices,
    issued: Vec<String>,
    database_url: String,
    per_device: usize,
}

/// Where the commanded devices reach the system.
pub struct Reach {
    pub database_url: String,
    pub ingest_url: String,
    pub mqtt_port: u16,
    pub mqtt_login: MqttLogin,
}

impl StepCommands {
    /// Starts the step's commanded devices (registered with `tokens` beforehand).
    pub fn start(
        plan: &CommandPlan,
        step_tag: &str,
        tokens: &std::collections::HashMap<String, String>,
        reach: Reach,
    ) -> anyhow::Result<Self> {
        let devices = plan.devices(step_tag);
        let commanded = devices
            .iter()
            .map(|id| CommandedDevice {
                id: id.clone(),
                token: tokens.get(id).cloned().unwrap_or_default(),
                channel: if id.ends_with("-cm") {
                    Listening::Mqtt {
                        port: reach.mqtt_port,
                        login: reach.mqtt_login,
                    }
                } else {
                    Listening::LongPoll {
                        ingest_url: reach.ingest_url.clone(),
                    }
                },
            })
            .collect();
        Ok(Self {
            devices,
            running: CommandedDevices::start(commanded)?,
            issued: Vec::new(),
            database_url: reach.database_url,
            per_device: plan.per_device,
        })
    }

    /// Issues `per_device` commands to each device, as query-api does (retrying while PostgreSQL
    /// is not back yet, for up to a minute).
    pub async fn issue(&mut self) -> anyhow::Result<()> {
        let (url, devices, n) = (
            self.database_url.clone(),
            self.devices.clone(),
            self.per_device,
        );
        let issued = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<String>> {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            let mut conn = loop {
                match store::connect(&url) {
                    Ok(conn) => break conn,
                    Err(_) if std::time::Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            let mut issued = Vec::new();
            for device in &devices {
                for _ in 0..n {
                    issued.push(issue_one(&mut conn, device)?);
                }
            }
            Ok(issued)
        })
        .await??;
        self.issued.extend(issued);
        Ok(())
    }

    /// Waits (up to `timeout`) for every issued command to succeed, then stops the devices.
    pub async fn finish(self, since: Instant, timeout: Duration) -> CommandOutcome {
        let deadline = Instant::now() + timeout;
        let issued = self.issued.len();
        let mut succeeded = 0;
        let mut finished_in = None;
        while Instant::now() < deadline {
            let (url, ids) = (self.database_url.clone(), self.issued.clone());
            if let Ok(Ok(n)) =
                tokio::task::spawn_blocking(move || count_succeeded(&url, &ids)).await
            {
                succeeded = n;
                if n == issued {
                    finished_in = Some(since.elapsed().as_secs_f64());
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let (deliveries, _) = self.running.stop().await.counts();
        CommandOutcome {
            issued,
            succeeded,
            unfinished: issued - succeeded,
            deliveries,
            finished_in_secs: finished_in,
        }
    }
}

fn issue_one(conn: &mut PgConnection, device: &str) -> anyhow::Result<String> {
    let id = uuid::Uuid::now_v7().to_string();
    let args = serde_json::json!({"on": true});
    let issued = store::commands::issue_command(
        conn,
        &store::commands::NewCommand {
            id: &id,
            device_id: device,
            name: "led",
            args: &args,
            issued_by: "chaos",
            ttl: chrono::Duration::minutes(30),
        },
        1_000,
    )?;
    match issued {
        store::commands::Issued::Issued(_) => Ok(id),
        other => anyhow::bail!("command to {device} not issued: {other:?}"),
    }
}

/// How many of `ids` have succeeded, each with exactly one answer in its history.
fn count_succeeded(url: &str, ids: &[String]) -> anyhow::Result<usize> {
    let mut conn = store::connect(url)?;
    let mut succeeded = 0;
    for id in ids {
        if let Some((command, history)) = store::commands::command(&mut conn, id)? {
            let answers = history
                .iter()
                .filter(|e| e.status == "succeeded" || e.status == "failed")
                .count();
            if command.stored_status == "succeeded" && answers == 1 {
                succeeded += 1;
            }
        }
    }
    Ok(succeeded)
}
