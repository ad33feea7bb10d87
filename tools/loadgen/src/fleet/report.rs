//! What a fleet run found: the step table, the targets compared, and where the path's CPU went.

use serde::Serialize;

use super::send::ConnectionMode;
use super::{Role, StepResult, Target};
use crate::report::Machine;
use system::numbers::readable;

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub started_at: String,
    pub machine: Machine,
    pub devices: usize,
    pub hold_secs: f64,
    pub p99_bound_ms: f64,
    pub targets: Vec<Target>,
    pub steps: Vec<StepResult>,
}

impl Report {
    /// The highest held rate of a target in a mode, and its step.
    pub fn best(&self, target: &str, mode: ConnectionMode) -> Option<&StepResult> {
        self.steps
            .iter()
            .filter(|s| s.target == target && s.mode == mode && s.held)
            .max_by(|a, b| a.offered.total_cmp(&b.offered))
    }

    fn best_of(&self, role: Role, mode: ConnectionMode) -> Option<&StepResult> {
        let target = self.targets.iter().find(|t| t.role == role)?;
        self.best(&target.name, mode)
    }

    pub(super) fn modes(&self) -> Vec<ConnectionMode> {
        let mut modes: Vec<ConnectionMode> = self.steps.iter().map(|s| s.mode).collect();
        modes.sort();
        modes.dedup();
        modes
    }

    pub fn markdown(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let m = &self.machine;
        // Writing to a String cannot fail.
        let _ = writeln!(
            out,
            "Fleet benchmark, {} — {} devices, open loop, {} s per step, bound p99 < {} ms; {} cores ({}), {:.1} GiB, Linux {}\n",
            self.started_at,
            readable(self.devices as f64),
            readable(self.hold_secs),
            readable(self.p99_bound_ms),
            m.nproc,
            m.cpu_model,
            m.memory_gib,
            m.kernel
        );
        let _ = writeln!(
            out,
            "| target | connections | highest rate held (readings/s) | p99 there (ms) | path CPU per 1,000 stored (core-ms) | loadgen CPU there |\n|---|---|---|---|---|---|"
        );
        for mode in self.modes() {
            // a target not run in a mode (no MQTT broker) has no row there, rather than "none"
            for t in self.targets.iter().filter(|t| {
                self.steps
                    .iter()
                    .any(|s| s.target == t.name && s.mode == mode)
            }) {
                let best = self.best(&t.name, mode);
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} | {} |",
                    t.name,
                    mode.label(),
                    best.map_or("none".into(), |b| readable(b.offered)),
                    ms(best.and_then(|b| b.p99_ms)),
                    ms(best.and_then(|b| b.cpu_ms_per_1000)),
                    best.and_then(|b| b.loadgen_cpu_percent)
                        .map_or("–".into(), |c| format!("{}%", readable(c)))
                );
            }
        }
        let _ = writeln!(out, "\n{}", self.comparisons().join("\n"));
        let _ = writeln!(
            out,
            "\n| target | connections | offered/s | acked/s | p50 | p50 from send | p90 | p99 | max (ms) | refused | failed | conns opened | stored | stored by last answer | path CPU ms/1,000 | loadgen CPU | send lag p99 (ms) | load avg | held |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for s in &self.steps {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {}{} | {} | {} | {} | {} | {} | {}{} |",
                s.target,
                s.mode.label(),
                readable(s.offered),
                readable(s.achieved),
                ms(s.p50_ms),
                ms(s.p50_from_send_ms),
                ms(s.p90_ms),
                ms(s.p99_ms),
                ms(s.max_ms),
                s.refused,
                s.failed,
                readable(s.connections_opened as f64),
                s.stored.map_or("–".into(), |n| readable(n as f64)),
                if s.all_stored { "" } else { " (NOT ALL)" },
                s.stored_by_last_answer
                    .map_or("–".into(), |n| readable(n as f64)),
                ms(s.cpu_ms_per_1000),
                s.loadgen_cpu_percent
                    .map_or("–".into(), |c| format!("{}%", readable(c))),
                ms(s.send_lag_p99_ms),
                s.load_average,
                if s.held { "yes" } else { "no" },
                if s.loadgen_limited {
                    " (loadgen limited)"
                } else {
                    ""
                }
            );
        }
        out
    }

    /// The targets, measured: Sensorhub against the seed, and through Traefik against
    /// Traefik's own ceiling.
    fn comparisons(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for mode in self.modes() {
            let ours = self.best_of(Role::Sensorhub, mode);
            let seed = self.best_of(Role::Seed, mode);
            let red = self.best_of(Role::NodeRed, mode);
            let via = self.best_of(Role::SensorhubTraefik, mode);
            let ceiling = self.best_of(Role::TraefikCeiling, mode);
            let rate = |s: Option<&StepResult>| s.map(|s| s.offered);
            let cpu = |s: Option<&StepResult>| s.and_then(|s| s.cpu_ms_per_1000);
            let limited = |s: Option<&StepResult>| s.is_some_and(|s| s.loadgen_limited);
            let mut say = |what: String| lines.push(format!("- {}: {what}", mode.label()));
            for (peer, name) in [(seed, "the seed"), (red, "Node-RED")] {
                if let (Some(a), Some(b)) = (rate(ours), rate(peer)) {
                    say(format!(
                        "Sensorhub held {}× the rate {name} held ({} vs {} readings/s; target ≥ 10× the seed){}",
                        readable(a / b),
                        readable(a),
                        readable(b),
                        if limited(ours) {
                            "; loadgen was near its limit at Sensorhub's step"
                        } else {
                            ""
                        }
                    ));
                }
                if let (Some(a), Some(b)) = (cpu(ours), cpu(peer)) {
                    say(format!(
                        "path CPU per stored reading, Sensorhub / {name}: {} ({} vs {} core-ms per 1,000, each at its highest held rate; target ≤ 0.1 of the seed's)",
                        readable(a / b),
                        readable(a),
                        readable(b)
                    ));
                }
            }
            if let (Some(a), Some(b)) = (rate(via), rate(ceiling)) {
                say(format!(
                    "Sensorhub through Traefik (TLS) held {}% of Traefik's own ceiling in front of a do-nothing responder ({} vs {} readings/s; target ≥ 80%)",
                    readable(a / b * 100.0),
                    readable(a),
                    readable(b)
                ));
            }
        }
        if lines.is_empty() {
            lines.push("- (no comparison: a target held no rate)".into());
        }
        lines
    }
}

pub(super) fn ms(v: Option<f64>) -> String {
    v.map_or("–".into(), readable)
}
