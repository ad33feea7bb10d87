//! What time it is, and whether that can be believed.
//!
//! A Pi has no real-time clock: it boots with the time fake-hwclock saved at the last shutdown
//! (or 1970), and only NTP puts it right, seconds or hours later. A reading taken before then
//! has a wrong wall time but a right *boot time* (`CLOCK_BOOTTIME`, nanoseconds since this boot,
//! which the NTP step does not move). So every reading records the boot it was taken in and its
//! boot time; one taken while the clock is not trusted waits in the outbox with no wall time, and
//! once the clock is synchronised it is stamped `boot time + (wall − boot time now)`: its true
//! time. A reading from an earlier boot that never saw a synchronised clock cannot be placed in
//! time; it is set aside as untimed and counted (`status` shows it), never stored at a guess.

use std::path::PathBuf;

use chrono::{DateTime, TimeZone, Utc};

use crate::config::ClockSync;

/// For tests only: a file holding `<offset seconds> <synced|unsynced>`. The agent's wall clock
/// is then the system's moved by the offset, and whether it is synchronised is the file's word
/// (the kernel is not asked), so a test can start the agent in 1970 and sync it later.
pub const TEST_CLOCK_ENV: &str = "SENSORHUB_AGENT_TEST_CLOCK";

/// No wall time before this is believed, whatever the kernel says: no agent of this version ran
/// before it was written. (The server refuses readings before 2000 in any case.)
const FLOOR_UNIX_SECS: i64 = 1_767_225_600; // 2026-01-01T00:00:00Z

/// One look at the clocks.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub wall: DateTime<Utc>,
    /// Nanoseconds since this boot, suspend included.
    pub boottime_ns: i64,
    /// Whether `wall` can be believed.
    pub synced: bool,
}

impl Now {
    /// The wall time of an earlier boot time of this boot, by this (synchronised) look's offset.
    pub fn wall_at(&self, boottime_ns: i64) -> DateTime<Utc> {
        self.wall - chrono::Duration::nanoseconds(self.boottime_ns - boottime_ns)
    }
}

#[derive(Debug, Clone)]
pub struct Clock {
    sync: ClockSync,
    boot_id: String,
    test_file: Option<PathBuf>,
}

impl Clock {
    pub fn new(sync: ClockSync) -> Self {
        Self {
            sync,
            boot_id: boot_id(),
            test_file: std::env::var_os(TEST_CLOCK_ENV).map(PathBuf::from),
        }
    }

    /// This boot's id (the kernel's `boot_id`).
    pub fn boot_id(&self) -> &str {
        &self.boot_id
    }

    pub fn now(&self) -> Now {
        let boottime = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
        let boottime_ns = boottime.tv_sec * 1_000_000_000 + boottime.tv_nsec;
        let system = Utc::now();
        let (wall, believed) = match &self.test_file {
            Some(file) => test_clock(file, system),
            None => (
                system,
                self.sync == ClockSync::System || kernel_synchronised(),
            ),
        };
        let floor = Utc.timestamp_opt(FLOOR_UNIX_SECS, 0).single();
        Now {
            wall,
            boottime_ns,
            synced: believed && floor.is_none_or(|floor| wall >= floor),
        }
    }
}

/// The kernel's own word: `adjtimex(2)` answers `TIME_ERROR` while the clock is
/// unsynchronised (`STA_UNSYNC`), which NTP clients (systemd-timesyncd, chrony, ntpd) clear once
/// they have set it. This is what `timedatectl`'s "System clock synchronized" reads.
#[allow(
    unsafe_code,
    reason = "adjtimex(2) has no wrapper in a maintained crate; with modes 0 it only reads the \
              kernel's clock status into a zeroed struct that lives on this stack frame"
)]
fn kernel_synchronised() -> bool {
    const TIME_ERROR: libc::c_int = 5;
    // SAFETY: `timex` is plain integers; all zeroes is a valid value and, with `modes` 0, asks
    // for a read only. The pointer is to a local that outlives the call.
    let state = unsafe {
        let mut timex: libc::timex = std::mem::zeroed();
        libc::adjtimex(&mut timex)
    };
    state >= 0 && state != TIME_ERROR
}

fn test_clock(file: &std::path::Path, system: DateTime<Utc>) -> (DateTime<Utc>, bool) {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let mut words = text.split_whitespace();
    let offset: i64 = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
    let synced = words.next() == Some("synced");
    (system + chrono::Duration::seconds(offset), synced)
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|text| text.trim().to_owned())
        .ok()
        .filter(|id| !id.is_empty())
        // without one, every start counts as a new boot: untimed readings of an earlier run are
        // then set aside rather than stamped with a time they may not have
        .unwrap_or_else(|| format!("run-{}", uuid::Uuid::new_v4()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a test stops at the first surprise")]
    use super::*;

    #[test]
    fn a_time_before_the_floor_is_never_believed() {
        let dir = std::env::temp_dir().join(format!("agent-clock-{}", uuid::Uuid::new_v4()));
        std::fs::write(&dir, format!("{} synced", -Utc::now().timestamp() + 1000)).unwrap();
        let (wall, synced) = test_clock(&dir, Utc::now());
        assert!(synced);
        assert!(wall.timestamp() < 2000);
        let clock = Clock {
            sync: ClockSync::System,
            boot_id: "b".into(),
            test_file: Some(dir.clone()),
        };
        assert!(!clock.now().synced, "1970 is not believed");
        std::fs::write(&dir, "0 synced").unwrap();
        assert!(clock.now().synced);
        std::fs::remove_file(dir).unwrap();
    }

    #[test]
    fn an_earlier_boot_time_maps_back_by_the_offset() {
        let now = Now {
            wall: Utc.timestamp_opt(1_800_000_000, 0).unwrap(),
            boottime_ns: 100_000_000_000,
            synced: true,
        };
        assert_eq!(
            now.wall_at(40_000_000_000),
            Utc.timestamp_opt(1_799_999_940, 0).unwrap()
        );
    }

    #[test]
    fn the_boot_id_is_stable_within_a_boot() {
        assert_eq!(boot_id(), boot_id());
    }
}
