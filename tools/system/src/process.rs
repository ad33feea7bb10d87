//! One process of the system under test, its output appended to a log file of its own. It can be
//! killed with SIGKILL (it and every process it started, as when its container or machine dies) or
//! stopped with SIGTERM, and nothing outlives its handle: dropped, it is killed.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::procs;

pub struct Process {
    label: String,
    log: PathBuf,
    child: Option<Child>,
}

impl Process {
    /// Starts `command` with its standard output and error appended to `log` (created if need be).
    pub fn start(label: &str, mut command: Command, log: &Path) -> anyhow::Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("cannot start {label} ({command:?})"))?;
        Ok(Self {
            label: label.to_owned(),
            log: log.to_owned(),
            child: Some(child),
        })
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Neither exited nor killed.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// How it ended, when it exited by itself (not killed nor stopped here).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status)
    }

    /// SIGKILL to the process and every process it started, at once: no goodbye, as a crash or the
    /// OOM killer would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let mut pids = procs::descendants(child.id());
            pids.push(child.id());
            procs::signal("KILL", &pids);
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for the process to exit by itself (SIGKILL after `grace`). Returns how
    /// long it took, or None when it had to be killed (or was not running).
    pub async fn terminate(&mut self, grace: Duration) -> Option<Duration> {
        let started = Instant::now();
        let pid = self.pid()?;
        procs::signal("TERM", &[pid]);
        while started.elapsed() < grace {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(_)) = child.try_wait()
            {
                self.child = None;
                return Some(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.kill();
        None
    }

    /// Lets it run on after this handle (and this program) is gone; returns its pid.
    pub fn detach(mut self) -> Option<u32> {
        self.child.take().map(|c| c.id())
    }

    /// The log's last `lines` lines.
    pub fn tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// It exited and its log says its port was taken. A free port is found by binding port 0 and
    /// letting it go, so another process (or an outgoing connection's ephemeral port) may take it
    /// before the service binds it: then start it again on another.
    pub fn lost_its_port(&mut self) -> bool {
        !self.is_running()
            && std::fs::read_to_string(&self.log)
                .is_ok_and(|log| log.to_lowercase().contains("address already in use"))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_process_is_stopped_by_sigterm_and_its_log_kept() {
        let dir = std::env::temp_dir().join(format!("system-process-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("sh.log");
        let mut command = Command::new("sh");
        command.args([
            "-c",
            "echo started; trap 'echo bye; exit 0' TERM; while :; do sleep 0.05; done",
        ]);
        let mut process = Process::start("sh", command, &log).unwrap();
        assert!(process.is_running());
        let deadline = Instant::now() + Duration::from_secs(10);
        while !process.tail(5).contains("started") {
            assert!(Instant::now() < deadline, "no output in {}", log.display());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let took = process.terminate(Duration::from_secs(10)).await;
        assert!(took.is_some(), "it stopped by itself");
        assert!(!process.is_running());
        assert!(process.tail(5).contains("bye"), "{}", process.tail(5));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn dropped_it_is_killed_with_its_children() {
        let dir = std::env::temp_dir().join(format!("system-drop-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut command = Command::new("sh");
        command.args(["-c", "sleep 30 & wait"]);
        let process = Process::start("sh", command, &dir.join("sh.log")).unwrap();
        let pid = process.pid().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut children = procs::descendants(pid);
        while children.is_empty() {
            assert!(Instant::now() < deadline, "sh started no child");
            std::thread::sleep(Duration::from_millis(20));
            children = procs::descendants(pid);
        }
        drop(process);
        let gone = |pid: u32| {
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            state.is_empty() || state.contains(") Z")
        };
        while !children.iter().all(|&c| gone(c)) {
            assert!(
                Instant::now() < deadline,
                "{children:?} outlived the handle"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
