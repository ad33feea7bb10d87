//! CPU time and peak memory of the processes under test, and the processes below a process, from
//! /proc (same machine only); signals to a set of processes.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct Watched {
    pub name: String,
    pub pid: u32,
    /// The process and all its children (PostgreSQL's backends): CPU only.
    pub tree: bool,
}

impl Watched {
    /// `name=pid`, the process alone.
    pub fn parse(text: &str) -> Result<Self, String> {
        Self::parse_with(text, false)
    }

    /// `name=pid`, the process and its children.
    pub fn parse_tree(text: &str) -> Result<Self, String> {
        Self::parse_with(text, true)
    }

    fn parse_with(text: &str, tree: bool) -> Result<Self, String> {
        let (name, pid) = text
            .split_once('=')
            .ok_or_else(|| format!("expected NAME=PID, got {text}"))?;
        let pid = pid
            .parse()
            .map_err(|_| format!("{text}: {pid} is not a process id"))?;
        Ok(Self {
            name: name.to_owned(),
            pid,
            tree,
        })
    }
}

fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// From /proc/<pid>/stat: (parent pid, utime + stime, cutime + cstime) in clock ticks.
fn stat(pid: u32) -> Option<(u32, u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // the command name (in parentheses) may hold spaces: count fields after its closing parenthesis
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| -> Option<u64> { fields.get(i)?.parse().ok() };
    let ppid = u32::try_from(field(1)?).ok()?;
    Some((ppid, field(11)? + field(12)?, field(13)? + field(14)?))
}

/// utime + stime, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    stat(pid).map(|(_, own, _)| own)
}

/// The process, its children alive now, and those it has reaped (cutime), in clock ticks.
fn tree_ticks(pid: u32) -> Option<u64> {
    let (_, own, reaped) = stat(pid)?;
    let mut total = own + reaped;
    for child in pids() {
        if let Some((ppid, own, reaped)) = stat(child)
            && ppid == pid
        {
            total += own + reaped;
        }
    }
    Some(total)
}

/// Every process alive now, from /proc.
pub fn pids() -> impl Iterator<Item = u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
}

/// The parent of a process alive now.
pub fn parent_pid(pid: u32) -> Option<u32> {
    stat(pid).map(|(ppid, _, _)| ppid)
}

/// Every process below `pid`.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for child in pids() {
        if let Some(parent) = parent_pid(child) {
            children.entry(parent).or_default().push(child);
        }
    }
    let mut found = Vec::new();
    let mut stack = vec![pid];
    while let Some(p) = stack.pop() {
        for &c in children.get(&p).into_iter().flatten() {
            found.push(c);
            stack.push(c);
        }
    }
    found
}

/// Sends a signal (`KILL`, `TERM`, ...) to every one of `pids`, at once.
pub fn signal(name: &str, pids: &[u32]) {
    if pids.is_empty() {
        return;
    }
    let _ = Command::new("kill")
        .arg(format!("-{name}"))
        .args(pids.iter().map(u32::to_string))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Whether this program runs as root.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|v| v.split_whitespace().next() == Some("0"))
        })
        .unwrap_or(false)
}

fn ticks(w: &Watched) -> Option<u64> {
    if w.tree {
        tree_ticks(w.pid)
    } else {
        cpu_ticks(w.pid)
    }
}

/// Peak resident set size (VmHWM), in KiB.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Resets VmHWM to the current RSS (needs to own the process, or root); false when not allowed.
fn reset_peak_rss(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

pub struct Usage {
    pub name: String,
    /// Percent of one core over the window.
    pub cpu_percent: Option<f64>,
}

/// CPU used between `start` and `finish`.
pub struct CpuWindow {
    started: Instant,
    ticks: Vec<(Watched, Option<u64>)>,
    hz: f64,
}

impl CpuWindow {
    pub fn start(watched: &[Watched]) -> Self {
        Self {
            started: Instant::now(),
            ticks: watched.iter().map(|w| (w.clone(), ticks(w))).collect(),
            hz: clock_ticks_per_second(),
        }
    }

    pub fn finish(self) -> Vec<Usage> {
        let seconds = self.started.elapsed().as_secs_f64().max(1e-3);
        self.ticks
            .into_iter()
            .map(|(w, before)| {
                let after = ticks(&w);
                let cpu_percent = match (before, after) {
                    (Some(b), Some(a)) => {
                        Some((a.saturating_sub(b)) as f64 / self.hz / seconds * 100.0)
                    }
                    _ => None,
                };
                Usage {
                    name: w.name,
                    cpu_percent,
                }
            })
            .collect()
    }
}

/// Peak RSS over a workload: reset at its start when allowed (else the peak since the process started).
pub struct PeakWindow {
    reset: Vec<(Watched, bool)>,
}

pub struct Peak {
    pub name: String,
    pub peak_mib: Option<f64>,
    /// False: the figure is the peak since the process started.
    pub since_reset: bool,
}

impl PeakWindow {
    pub fn start(watched: &[Watched]) -> Self {
        Self {
            reset: watched
                .iter()
                .filter(|w| !w.tree)
                .map(|w| (w.clone(), reset_peak_rss(w.pid)))
                .collect(),
        }
    }

    pub fn finish(self) -> Vec<Peak> {
        self.reset
            .into_iter()
            .map(|(w, reset)| Peak {
                peak_mib: peak_rss_kib(w.pid).map(|k| k as f64 / 1024.0),
                name: w.name,
                since_reset: reset,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_process() {
        let me = std::process::id();
        assert!(cpu_ticks(me).is_some());
        assert!(peak_rss_kib(me).unwrap() > 0);
        assert!(Watched::parse("persister=12").is_ok());
        assert!(Watched::parse("persister").is_err());
    }

    #[test]
    fn finds_the_children_of_a_process() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & sleep 30 & wait"])
            .spawn()
            .unwrap();
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        let mut found = descendants(child.id());
        while found.len() < 2 && Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
            found = descendants(child.id());
        }
        assert_eq!(found.len(), 2, "{found:?}");
        let mut all = found.clone();
        all.push(child.id());
        signal("KILL", &all);
        child.wait().unwrap();
        // the grandchildren are reparented and reaped by init: gone, or zombies until then
        let gone = |pid: u32| {
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            state.is_empty() || state.contains(") Z")
        };
        while !found.iter().all(|&pid| gone(pid)) {
            assert!(Instant::now() < deadline, "{found:?} survived SIGKILL");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}
