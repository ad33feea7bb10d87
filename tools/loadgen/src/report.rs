//! The figures: a Markdown table for people (and README), JSON for machines.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use system::numbers::readable;

use crate::stats::Summary;

#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub text: String,
    pub met: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub workload: String,
    pub name: String,
    pub unit: &'static str,
    pub sensorhub: Option<Summary>,
    pub seed: Option<Summary>,
    /// Sensorhub's median over the seed's (or over the ceiling named in `ratio_of`).
    pub ratio: Option<f64>,
    pub ratio_of: Option<String>,
    pub target: Option<Target>,
}

impl Figure {
    /// Sensorhub's and the seed's runs of a figure, compared with nothing and with no target.
    pub fn new(
        workload: &str,
        name: &str,
        unit: &'static str,
        (sensorhub, seed): (Option<Summary>, Option<Summary>),
    ) -> Self {
        Self {
            workload: workload.to_owned(),
            name: name.to_owned(),
            unit,
            sensorhub,
            seed,
            ratio: None,
            ratio_of: None,
            target: None,
        }
    }

    /// With Sensorhub's median over the seed's.
    pub fn vs_seed(mut self) -> Self {
        self.ratio = median_ratio(self.sensorhub.as_ref(), self.seed.as_ref());
        self
    }

    /// With Sensorhub's median over that of `ceiling`, which the table names `of`.
    pub fn vs(mut self, of: &str, ceiling: Option<&Summary>) -> Self {
        self.ratio = median_ratio(self.sensorhub.as_ref(), ceiling);
        self.ratio_of = Some(of.to_owned());
        self
    }

    /// With the target `text`, met or missed as `met` finds this figure; none when it cannot tell.
    pub fn target(mut self, text: &str, met: impl FnOnce(&Self) -> Option<bool>) -> Self {
        self.target = met(&self).map(|met| Target {
            text: text.to_owned(),
            met,
        });
        self
    }
}

fn median_ratio(a: Option<&Summary>, b: Option<&Summary>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b.median > 0.0 => Some(a.median / b.median),
        _ => None,
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Resource {
    pub workload: String,
    pub process: String,
    /// Percent of one core, over the load and the drain that followed it.
    pub cpu_percent: Option<Summary>,
    pub peak_rss_mib: Option<f64>,
    /// False: the peak since the process started (VmHWM could not be reset).
    pub peak_since_workload_start: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu_model: String,
    pub memory_gib: f64,
    pub kernel: String,
}

impl Machine {
    /// This machine (where loadgen runs; on one box, also where the services run).
    pub fn here() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_else(|| "unknown".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_kib: f64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        Self {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model,
            memory_gib: memory_kib / 1024.0 / 1024.0,
            kernel,
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "{} cores ({}), {:.0} GiB RAM, Linux {}",
            self.nproc, self.cpu_model, self.memory_gib, self.kernel
        )
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub started_at: String,
    pub machine: Machine,
    pub settings: serde_json::Value,
    pub figures: Vec<Figure>,
    pub resources: Vec<Resource>,
    pub notes: Vec<String>,
}

fn cell(s: &Option<Summary>) -> String {
    match s {
        None => "–".into(),
        Some(s) if s.runs.len() == 1 || s.min == s.max => readable(s.median),
        Some(s) => format!(
            "{} ({}–{})",
            readable(s.median),
            readable(s.min),
            readable(s.max)
        ),
    }
}

/// A table names each workload once, on the first of its rows: `workload` there, nothing below it.
fn first_of_group<'a>(last: &mut &'a str, workload: &'a str) -> &'a str {
    if workload == *last {
        ""
    } else {
        *last = workload;
        workload
    }
}

impl Report {
    /// The figures as Markdown tables.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let runs = self
            .settings
            .get("runs")
            .and_then(|r| r.as_u64())
            .unwrap_or(1);
        let _ = writeln!(
            out,
            "Machine: {}. Median of {runs} run(s), (min–max).\n",
            self.machine.describe()
        );
        out.push_str("| workload | figure | Sensorhub | seed design | ratio | target |\n");
        out.push_str("|---|---|---|---|---|---|\n");
        let mut last_workload = "";
        for f in &self.figures {
            let workload = first_of_group(&mut last_workload, &f.workload);
            let ratio = match (f.ratio, &f.ratio_of) {
                (Some(r), Some(of)) if r < 1.0 => format!("{:.0}% of {of}", r * 100.0),
                (Some(r), Some(of)) => format!("{r:.2}× {of}"),
                (Some(r), None) => format!("{r:.1}×"),
                (None, _) => String::new(),
            };
            let target = match &f.target {
                Some(t) => format!("{} {}", t.text, if t.met { "✅ met" } else { "❌ missed" }),
                None => String::new(),
            };
            let name = if f.unit.is_empty() {
                f.name.clone()
            } else {
                format!("{} ({})", f.name, f.unit)
            };
            let _ = writeln!(
                out,
                "| {workload} | {name} | {} | {} | {ratio} | {target} |",
                cell(&f.sensorhub),
                cell(&f.seed)
            );
        }
        if !self.resources.is_empty() {
            out.push_str("\n| workload | process | CPU (% of one core) | peak RSS (MiB) |\n");
            out.push_str("|---|---|---|---|\n");
            let mut last_workload = "";
            for r in &self.resources {
                let workload = first_of_group(&mut last_workload, &r.workload);
                let peak = match r.peak_rss_mib {
                    Some(p) if r.peak_since_workload_start => format!("{p:.1}"),
                    Some(p) => format!("{p:.1} (since start)"),
                    None => "–".into(),
                };
                let _ = writeln!(
                    out,
                    "| {workload} | {} | {} | {peak} |",
                    r.process,
                    cell(&r.cpu_percent)
                );
            }
        }
        for note in &self.notes {
            let _ = writeln!(out, "\n{note}");
        }
        out
    }
}
