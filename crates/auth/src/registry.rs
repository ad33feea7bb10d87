//! Which device tokens are current, as the ingest services know it: a copy of the database's
//! device registry, refreshed every few seconds, so a revocation is refused everywhere within one
//! refresh interval, without a restart and without a database query per request.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

/// Rows are read again from a little before the newest change seen: a transaction that committed
/// late with an earlier `updated_at` is still picked up.
const OVERLAP: chrono::Duration = chrono::Duration::seconds(30);

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
    /// The registry has not been read yet: nobody can be checked.
    NotLoaded,
}

#[derive(Default)]
struct Progress {
    newest: Option<DateTime<Utc>>,
    loaded_at: Option<Instant>,
    last_error: Option<String>,
}

#[derive(Default)]
pub struct DeviceRegistry {
    current: RwLock<HashMap<String, String>>,
    progress: Mutex<Progress>,
}

impl DeviceRegistry {
    pub fn check(&self, device_id: &str, token_id: &str) -> Access {
        if self
            .progress
            .lock()
            .map(|p| p.loaded_at.is_none())
            .unwrap_or(true)
        {
            return Access::NotLoaded;
        }
        match self.current.read() {
            Ok(current) if current.get(device_id).is_some_and(|t| t == token_id) => Access::Allowed,
            Ok(_) => Access::Refused,
            Err(_) => Access::NotLoaded,
        }
    }

    /// Where the next refresh starts reading.
    pub fn since(&self) -> Option<DateTime<Utc>> {
        self.progress
            .lock()
            .ok()
            .and_then(|p| p.newest)
            .map(|t| t - OVERLAP)
    }

    pub fn apply(&self, changes: Vec<CredentialChange>) {
        if let Ok(mut current) = self.current.write() {
            for change in &changes {
                if change.revoked {
                    current.remove(&change.device_id);
                } else {
                    current.insert(change.device_id.clone(), change.token_id.clone());
                }
            }
        }
        if let Ok(mut progress) = self.progress.lock() {
            if let Some(newest) = changes.iter().map(|c| c.updated_at).max() {
                progress.newest = Some(progress.newest.map_or(newest, |n| n.max(newest)));
            }
            progress.loaded_at = Some(Instant::now());
            progress.last_error = None;
        }
    }

    fn failed(&self, error: String) {
        if let Ok(mut progress) = self.progress.lock() {
            progress.last_error = Some(error);
        }
    }

    /// For readiness: read at least once, and recently (revocations are being followed).
    pub fn health(&self, max_age: Duration) -> Result<(), String> {
        let progress = self.progress.lock().map_err(|e| e.to_string())?;
        match (progress.loaded_at, &progress.last_error) {
            (None, Some(e)) => Err(format!("device registry not loaded: {e}")),
            (None, None) => Err("device registry not loaded yet".into()),
            (Some(at), error) if at.elapsed() > max_age => Err(format!(
                "device registry last refreshed {}s ago{}",
                at.elapsed().as_secs(),
                error.as_ref().map(|e| format!(": {e}")).unwrap_or_default()
            )),
            _ => Ok(()),
        }
    }

    pub fn len(&self) -> usize {
        self.current.read().map(|c| c.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Refreshes `registry` every `interval` with what `load(since)` returns, for as long as the task
/// runs. Failures keep the last known registry (and show in [`DeviceRegistry::health`]).
pub async fn keep_fresh<F, Fut>(registry: Arc<DeviceRegistry>, interval: Duration, load: F)
where
    F: Fn(Option<DateTime<Utc>>) -> Fut,
    Fut: Future<Output = Result<Vec<CredentialChange>, String>>,
{
    loop {
        match load(registry.since()).await {
            Ok(changes) => registry.apply(changes),
            Err(e) => {
                tracing::warn!(error = %e, "cannot refresh the device registry; keeping the last one");
                registry.failed(e);
            }
        }
        tokio::time::sleep(interval).await;
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
