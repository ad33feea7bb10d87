//! What a fleet run found: the step table, the targets compared, and where the path's CPU went.

use serde::{Deserialize, Serialize};

use super::send::ConnectionMode;
use super::{Role, StepResult, Target};
use crate::report::Machine;
use system::numbers::readable;

#[derive(Debug, Clone, Deserialize, Serialize)]
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
        out.push_str(&self.cpu_table());
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

impl StepResult {
    /// The path's CPU per 1,000 readings counted, split by process, largest first.
    pub fn cpu_split(&self) -> Vec<(&str, f64)> {
        let total: f64 = self.cpu_seconds.iter().map(|(_, s)| s).sum();
        let (Some(per_1000), true) = (self.cpu_ms_per_1000, total > 0.0) else {
            return Vec::new();
        };
        let mut split: Vec<(&str, f64)> = self
            .cpu_seconds
            .iter()
            .map(|(name, s)| (name.as_str(), s / total * per_1000))
            .collect();
        split.sort_by(|a, b| b.1.total_cmp(&a.1));
        split
    }

    /// The named processes' share of [`Self::cpu_split`], core-ms per 1,000 readings.
    fn cpu_of(&self, names: &[&str]) -> f64 {
        self.cpu_split()
            .into_iter()
            .filter(|(name, _)| names.contains(name))
            .map(|(_, ms)| ms)
            .sum()
    }

    /// loadgen's own CPU per 1,000 answers, core-ms: on a machine whose cores every process
    /// shares, loadgen's cost per reading takes from the rate as much as the server's does.
    fn loadgen_ms_per_1000(&self) -> Option<f64> {
        let cores = self.loadgen_cpu_percent? / 100.0;
        (self.achieved > 0.0).then(|| cores / self.achieved * 1e6)
    }

    /// What a reading cost the whole machine: the path and loadgen, core-ms per 1,000.
    fn machine_ms_per_1000(&self) -> Option<f64> {
        Some(self.cpu_ms_per_1000? + self.loadgen_ms_per_1000()?)
    }
}

/// The shared engines the design fixes: Sensorhub cannot run without them, whatever its own
/// services cost.
const ENGINES: [&str; 2] = ["rabbitmq", "postgresql"];

impl Report {
    /// Where the path's CPU went at each target's highest held rate, and what that says about
    /// the CPU and Traefik targets.
    fn cpu_table(&self) -> String {
        use std::fmt::Write as _;
        if !self.steps.iter().any(|s| s.held) {
            return String::new();
        }
        let mut out = String::from(
            "\nWhere the CPU went at each target's highest held rate, core-ms per 1,000 readings stored (answered, for the ceiling); the databases are the machine's shared instances, background included:\n\n| target | connections | rate | path, by process | loadgen | whole machine |\n|---|---|---|---|---|---|\n",
        );
        for mode in self.modes() {
            for t in &self.targets {
                let Some(best) = self.best(&t.name, mode) else {
                    continue;
                };
                let split = best
                    .cpu_split()
                    .iter()
                    .map(|(name, ms)| format!("{name} {}", readable(*ms)))
                    .collect::<Vec<_>>()
                    .join(" · ");
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} | {} |",
                    t.name,
                    mode.label(),
                    readable(best.offered),
                    if split.is_empty() {
                        "–".into()
                    } else {
                        split
                    },
                    ms(best.loadgen_ms_per_1000()),
                    ms(best.machine_ms_per_1000()),
                );
            }
        }
        let explained = self.cpu_explained();
        if !explained.is_empty() {
            let _ = writeln!(out, "\n{}", explained.join("\n"));
        }
        out
    }

    /// The CPU and Traefik targets against what the split shows: what the engines alone cost
    /// beside a tenth of the seed's path, and the rate Traefik leaves Sensorhub when both share
    /// the machine's cores.
    fn cpu_explained(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for mode in self.modes() {
            let ours = self.best_of(Role::Sensorhub, mode);
            let seed = self.best_of(Role::Seed, mode);
            let via = self.best_of(Role::SensorhubTraefik, mode);
            let ceiling = self.best_of(Role::TraefikCeiling, mode);
            let mut say = |what: String| lines.push(format!("- {}: {what}", mode.label()));
            if let (Some(ours), Some(seed_ms)) = (ours, seed.and_then(|s| s.cpu_ms_per_1000)) {
                let budget = seed_ms / 10.0;
                let engines = ours.cpu_of(&ENGINES);
                let own = ours.cpu_ms_per_1000.unwrap_or(0.0) - engines;
                say(format!(
                    "a tenth of the seed's path is {} core-ms per 1,000; RabbitMQ and PostgreSQL alone took {} of Sensorhub's ({}% of that budget), its own services {}",
                    readable(budget),
                    readable(engines),
                    readable(engines / budget * 100.0),
                    readable(own)
                ));
                if let (Some(ours_ms), Some(seed_ms), Some(loadgen_ms)) = (
                    ours.machine_ms_per_1000(),
                    seed.and_then(StepResult::machine_ms_per_1000),
                    ours.loadgen_ms_per_1000(),
                ) {
                    say(format!(
                        "with loadgen on the same cores, 10× the seed's rate needs a reading to cost the machine at most {} core-ms per 1,000 (a tenth of the seed's {}); Sensorhub's cost {}, loadgen's part of it {}",
                        readable(seed_ms / 10.0),
                        readable(seed_ms),
                        readable(ours_ms),
                        readable(loadgen_ms)
                    ));
                }
            }
            if let (Some(via), Some(ceiling)) = (via, ceiling) {
                let traefik = via.cpu_of(&["traefik"]);
                let (Some(via_ms), Some(ceiling_ms), Some(loadgen_via)) = (
                    via.machine_ms_per_1000(),
                    ceiling.machine_ms_per_1000(),
                    via.loadgen_ms_per_1000(),
                ) else {
                    continue;
                };
                // both bounded by the same cores: the held rates go as the inverse of what a
                // reading costs the machine, so 80% needs a reading through Traefik to cost at
                // most 1/0.8 of one through the ceiling
                let sensorhub_allowed = ceiling_ms / 0.8 - traefik - loadgen_via;
                say(format!(
                    "through Traefik a reading cost the machine {} core-ms per 1,000 (Traefik {}, loadgen {}, Sensorhub {}), through the ceiling {}: with both bound by the same cores, that predicts {}% of the ceiling (measured {}%); 80% would need Sensorhub's path at most {}",
                    readable(via_ms),
                    readable(traefik),
                    readable(loadgen_via),
                    readable(via.cpu_ms_per_1000.unwrap_or(0.0) - traefik),
                    readable(ceiling_ms),
                    readable(ceiling_ms / via_ms * 100.0),
                    readable(via.offered / ceiling.offered * 100.0),
                    if sensorhub_allowed > 0.0 {
                        readable(sensorhub_allowed)
                    } else {
                        "nothing at all".into()
                    }
                ));
            }
        }
        lines
    }
}

pub(super) fn ms(v: Option<f64>) -> String {
    v.map_or("–".into(), readable)
}

#[cfg(test)]
mod tests {
    use super::super::send::ConnectionMode;
    use super::super::{Role, StepResult, Target};
    use super::Report;
    use crate::report::Machine;

    fn target(name: &str, role: Role) -> Target {
        Target {
            name: name.into(),
            role,
            url: "http://127.0.0.1:1".into(),
            ca_file: None,
            database_url: None,
            table: None,
            reset: Vec::new(),
            tokens: false,
            processes: Vec::new(),
            mqtt: None,
        }
    }

    /// A held step at `offered` readings/s whose path spent `cpu` (process, core-seconds) on
    /// `offered × 10` readings (a 10-second step), loadgen at `loadgen_percent` of a core.
    fn held(name: &str, offered: f64, cpu: &[(&str, f64)], loadgen_percent: f64) -> StepResult {
        let counted = offered * 10.0;
        let total: f64 = cpu.iter().map(|(_, s)| s).sum();
        StepResult {
            target: name.into(),
            role: Role::Other,
            mode: ConnectionMode::KeepAlive,
            offered,
            scheduled: counted as u64,
            achieved: offered,
            p50_ms: Some(1.0),
            p50_from_send_ms: Some(1.0),
            p90_ms: Some(2.0),
            p99_ms: Some(3.0),
            max_ms: Some(4.0),
            refused: 0,
            failed: 0,
            connections_opened: 1000,
            stored: Some(counted as i64),
            stored_by_last_answer: Some(counted as i64),
            all_stored: true,
            cpu_seconds: cpu.iter().map(|(n, s)| (n.to_string(), *s)).collect(),
            cpu_ms_per_1000: Some(total * 1e6 / counted),
            loadgen_cpu_percent: Some(loadgen_percent),
            send_lag_p99_ms: Some(1.0),
            load_average: String::new(),
            held: true,
            loadgen_limited: false,
        }
    }

    fn report(steps: Vec<StepResult>) -> Report {
        Report {
            started_at: String::new(),
            machine: Machine {
                nproc: 2,
                cpu_model: "test".into(),
                memory_gib: 1.0,
                kernel: "test".into(),
            },
            devices: 1000,
            hold_secs: 10.0,
            p99_bound_ms: 100.0,
            targets: vec![
                target("Sensorhub", Role::Sensorhub),
                target("via", Role::SensorhubTraefik),
                target("seed", Role::Seed),
                target("ceiling", Role::TraefikCeiling),
            ],
            steps,
        }
    }

    #[test]
    fn the_split_is_per_1000_readings_largest_first() {
        // 1,000/s for 10 s: 10,000 readings; 0.3 core-s of RabbitMQ is 30 core-ms per 1,000
        let step = held(
            "Sensorhub",
            1000.0,
            &[("ingest-http", 0.2), ("rabbitmq", 0.3), ("postgresql", 0.1)],
            10.0,
        );
        let split = step.cpu_split();
        assert_eq!(split.len(), 3);
        assert_eq!(split[0].0, "rabbitmq");
        assert!((split[0].1 - 30.0).abs() < 1e-9);
        assert!((split[2].1 - 10.0).abs() < 1e-9);
        assert!((step.cpu_of(&["rabbitmq", "postgresql"]) - 40.0).abs() < 1e-9);
        // 10% of a core at 1,000 answers/s: 100 core-ms per 1,000
        assert!((step.loadgen_ms_per_1000().unwrap() - 100.0).abs() < 1e-9);
        assert!((step.machine_ms_per_1000().unwrap() - 160.0).abs() < 1e-9);
    }

    #[test]
    fn the_engines_are_weighed_against_a_tenth_of_the_seed() {
        let r = report(vec![
            held(
                "Sensorhub",
                1000.0,
                &[("ingest-http", 0.2), ("rabbitmq", 0.3), ("postgresql", 0.1)],
                10.0,
            ),
            // 4 core-s on 2,000 readings: 2,000 core-ms per 1,000, a tenth of it 200
            held(
                "seed",
                200.0,
                &[("seed-design", 3.0), ("postgresql", 1.0)],
                5.0,
            ),
        ]);
        let lines = r.cpu_explained();
        assert_eq!(lines.len(), 2, "{lines:?}");
        // the seed: 2,000 + 5% of a core at 200/s (250) = 2,250; Sensorhub 60 + 100
        assert!(
            lines[1].contains("at most 225 core-ms per 1,000 (a tenth of the seed's 2,250); Sensorhub's cost 160, loadgen's part of it 100"),
            "{}",
            lines[1]
        );
        assert!(
            lines[0].contains("a tenth of the seed's path is 200 core-ms")
                && lines[0].contains("RabbitMQ and PostgreSQL alone took 40 of Sensorhub's (20% of that budget), its own services 20"),
            "{}",
            lines[0]
        );
    }

    #[test]
    fn traefik_s_share_predicts_the_ratio_to_its_ceiling() {
        let r = report(vec![
            // 1,000/s through Traefik: Traefik 100, Sensorhub 100, loadgen 100 core-ms per 1,000
            held(
                "via",
                1000.0,
                &[("traefik", 1.0), ("ingest-http", 0.6), ("rabbitmq", 0.4)],
                10.0,
            ),
            // 2,000/s through the ceiling: 100 + 50 loadgen = 150 core-ms per 1,000
            held(
                "ceiling",
                2000.0,
                &[("traefik", 1.6), ("responder", 0.4)],
                10.0,
            ),
        ]);
        let lines = r.cpu_explained();
        assert_eq!(lines.len(), 1, "{lines:?}");
        let line = &lines[0];
        assert!(
            line.contains("cost the machine 300 core-ms per 1,000 (Traefik 100, loadgen 100, Sensorhub 100), through the ceiling 150"),
            "{line}"
        );
        assert!(
            line.contains("predicts 50% of the ceiling (measured 50%)"),
            "{line}"
        );
        // 150 / 0.8 = 187.5, less Traefik's 100 and loadgen's 100: nothing is left
        assert!(line.ends_with("at most nothing at all"), "{line}");
        let nothing_held = report(Vec::new());
        assert_eq!(nothing_held.cpu_table(), "", "no held step, no table");
        let table = r.cpu_table();
        assert!(
            table.contains("| via | keep-alive, a connection per device | 1,000 | traefik 100 · ingest-http 60 · rabbitmq 40 | 100 | 300 |"),
            "{table}"
        );
    }
}
