//! Which device tokens are current, as the ingest services know it: a copy of the database's
//! device registry, re-read when PostgreSQL notifies a change and every few seconds in any case, so
//! a revocation is refused everywhere at once (at the latest within one refresh interval), without a
//! restart and without a database query per request. A device the copy does not know (registered a
//! moment ago) asks for a prompt, shared and spaced re-read.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::follow::{Followed, Follower, Progress, PromptReads};

/// One row of the registry as the database has it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialChange {
    pub device_id: String,
    pub token_id: String,
    pub revoked: bool,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The device is registered and this is its current token.
    Allowed,
    /// Unknown device, revoked device, or a token that is not the device's current one.
    Refused,
    /// The registry has not been read yet (or the read that would tell failed): nobody can be
    /// checked.
    NotLoaded,
}

#[derive(Default)]
pub struct DeviceRegistry {
    current: RwLock<HashMap<String, String>>,
    progress: Mutex<Progress>,
    prompt: Option<PromptReads>,
}

impl DeviceRegistry {
    /// A registry that, when a request meets a device (or token id) it does not know, has
    /// `follower` read the database now (shared, spaced reads: see [`Follower`]) rather than refuse
    /// until the next scheduled read; a pair still unknown after that is refused without asking
    /// again for `unknown_for`.
    pub fn with_prompt_reads(follower: Arc<Follower>, unknown_for: Duration) -> Self {
        Self {
            prompt: Some(PromptReads::new(follower, unknown_for)),
            ..Self::default()
        }
    }

    pub fn check(&self, device_id: &str, token_id: &str) -> Access {
        if !self.progress.lock().map(|p| p.is_loaded()).unwrap_or(false) {
            return Access::NotLoaded;
        }
        match self.current.read() {
            Ok(current) if current.get(device_id).is_some_and(|t| t == token_id) => Access::Allowed,
            Ok(_) => Access::Refused,
            Err(_) => Access::NotLoaded,
        }
    }

    /// [`check`](Self::check), and when the copy does not allow the pair, a prompt read of the
    /// database first (with prompt reads set up): a device registered a moment ago is let in at
    /// once.
    pub async fn check_promptly(&self, device_id: &str, token_id: &str) -> Access {
        let access = self.check(device_id, token_id);
        let Some(prompt) = &self.prompt else {
            return access;
        };
        if access == Access::Allowed {
            return access;
        }
        // a device and one of its token ids: the pair a read may find
        let key = format!("{device_id}\u{0}{token_id}");
        if !prompt.read_for(&key).await {
            return Access::Refused;
        }
        let failing = self.progress.lock().map(|p| p.failing()).unwrap_or(true);
        match self.check(device_id, token_id) {
            // the copy may be stale: the device should try again rather than give up
            Access::Refused if failing => Access::NotLoaded,
            Access::Refused => {
                prompt.still_unknown(&key);
                Access::Refused
            }
            other => other,
        }
    }

    /// For readiness: read at least once, and recently (revocations are being followed).
    pub fn health(&self, max_age: Duration) -> Result<(), String> {
        self.progress
            .lock()
            .map_err(|e| e.to_string())?
            .health("device registry", max_age)
    }

    pub fn len(&self) -> usize {
        self.current.read().map(|c| c.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Followed for DeviceRegistry {
    type Change = CredentialChange;
    const WHAT: &'static str = "device registry";

    fn since(&self) -> Option<DateTime<Utc>> {
        self.progress.lock().ok().and_then(|p| p.since())
    }

    fn apply(&self, changes: Vec<Self::Change>) {
        if let Ok(mut current) = self.current.write() {
            for change in &changes {
                if change.revoked {
                    current.remove(&change.device_id);
                } else {
                    current.insert(change.device_id.clone(), change.token_id.clone());
                }
            }
        }
        Progress::record_applied(&self.progress, changes.iter().map(|c| c.updated_at).max());
    }

    fn failed(&self, error: String) {
        Progress::record_failed(&self.progress, error);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(device: &str, token: &str, revoked: bool, secs: i64) -> CredentialChange {
        CredentialChange {
            device_id: device.into(),
            token_id: token.into(),
            revoked,
            updated_at: DateTime::from_timestamp(1_795_600_000 + secs, 0).unwrap(),
        }
    }

    #[test]
    fn only_the_current_token_of_a_registered_device_is_allowed() {
        let r = DeviceRegistry::default();
        assert_eq!(r.check("a", "t1"), Access::NotLoaded);
        r.apply(vec![change("a", "t1", false, 0)]);
        assert_eq!(r.check("a", "t1"), Access::Allowed);
        assert_eq!(r.check("a", "t0"), Access::Refused);
        assert_eq!(r.check("b", "t1"), Access::Refused);
        r.apply(vec![change("a", "t1", true, 5)]);
        assert_eq!(r.check("a", "t1"), Access::Refused);
        r.apply(vec![change("a", "t2", false, 9)]);
        assert_eq!(r.check("a", "t2"), Access::Allowed);
        assert_eq!(
            r.since(),
            Some(DateTime::from_timestamp(1_795_600_009 - 30, 0).unwrap())
        );
        assert!(r.health(Duration::from_secs(10)).is_ok());
    }
}
