//! Which app tokens (roles reader and admin) query-api accepts: those recorded in PostgreSQL when
//! issued (`sensorctl token issue`), not revoked, with an expiry no further from their issue than
//! the configured cap. A copy of the table is kept in memory and followed like the device registry
//! (a notification at each change, a re-read every few seconds in any case), so a revoked token is
//! refused at once without a database query per request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::follow::{Followed, Follower, Progress, PromptReads};
use crate::{Claims, Role};

/// One row of the app tokens table as the database has it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppTokenChange {
    pub id: String,
    pub revoked: bool,
    pub expires_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Why an otherwise valid app token is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AppTokenRefusal {
    #[error("app tokens must expire; this one has no expiry")]
    NoExpiry,
    #[error(
        "the token is valid for {lifetime_secs}s from its issue, more than the {max_secs}s allowed; issue a shorter one"
    )]
    LifetimeTooLong { lifetime_secs: i64, max_secs: u64 },
    #[error("a {0} token is not an app token")]
    NotAnAppToken(&'static str),
    #[error("the token is not recorded as issued (unknown token id)")]
    Unknown,
    #[error("the token was revoked")]
    Revoked,
    #[error("the list of app tokens has not been read yet; try again shortly")]
    NotLoaded,
}

#[derive(Debug, Clone, Copy)]
struct Recorded {
    revoked: bool,
    expires_at: DateTime<Utc>,
}

pub struct AppTokenRegistry {
    tokens: RwLock<HashMap<String, Recorded>>,
    progress: Mutex<Progress>,
    max_lifetime_secs: u64,
    prompt: Option<PromptReads>,
}

impl AppTokenRegistry {
    /// `max_lifetime`: the longest `exp - iat` accepted (sensorctl refuses to issue longer ones).
    pub fn new(max_lifetime: Duration) -> Self {
        Self {
            tokens: RwLock::default(),
            progress: Mutex::default(),
            max_lifetime_secs: max_lifetime.as_secs(),
            prompt: None,
        }
    }

    /// A registry that, when a token's id is not in its copy (issued a moment ago), has `follower`
    /// read the database now (shared, spaced reads: see [`Follower`]) in
    /// [`check_promptly`](Self::check_promptly); an id still unknown after that is not asked about
    /// again for `unknown_for`.
    pub fn with_prompt_reads(
        max_lifetime: Duration,
        follower: Arc<Follower>,
        unknown_for: Duration,
    ) -> Self {
        Self {
            prompt: Some(PromptReads::new(follower, unknown_for)),
            ..Self::new(max_lifetime)
        }
    }

    /// [`check`](Self::check), after a prompt read of the database when the token's id is not in
    /// the copy yet (with prompt reads set up): a token issued a moment ago is let in at once.
    pub async fn check_promptly(&self, claims: &Claims) -> Result<(), AppTokenRefusal> {
        let checked = self.check(claims);
        let Some(prompt) = &self.prompt else {
            return checked;
        };
        if !matches!(
            checked,
            Err(AppTokenRefusal::Unknown | AppTokenRefusal::NotLoaded)
        ) || !prompt.read_for(&claims.jti).await
        {
            return checked;
        }
        let checked = self.check(claims);
        if checked == Err(AppTokenRefusal::Unknown) {
            prompt.still_unknown(&claims.jti);
        }
        checked
    }

    /// Whether the app token with these (verified) claims may be used: it has an expiry within the
    /// cap, is recorded and is not revoked.
    pub fn check(&self, claims: &Claims) -> Result<(), AppTokenRefusal> {
        if claims.role == Role::Device {
            return Err(AppTokenRefusal::NotAnAppToken(claims.role.as_str()));
        }
        let exp = claims.exp.ok_or(AppTokenRefusal::NoExpiry)?;
        let lifetime_secs = exp.saturating_sub(claims.iat);
        if lifetime_secs < 0 || lifetime_secs as u64 > self.max_lifetime_secs {
            return Err(AppTokenRefusal::LifetimeTooLong {
                lifetime_secs,
                max_secs: self.max_lifetime_secs,
            });
        }
        if !self.progress.lock().map(|p| p.is_loaded()).unwrap_or(false) {
            return Err(AppTokenRefusal::NotLoaded);
        }
        let tokens = self.tokens.read().map_err(|_| AppTokenRefusal::NotLoaded)?;
        match tokens.get(&claims.jti) {
            Some(token) if token.revoked => Err(AppTokenRefusal::Revoked),
            Some(_) => Ok(()),
            None => Err(AppTokenRefusal::Unknown),
        }
    }

    /// For readiness: read at least once, and recently (revocations are being followed).
    pub fn health(&self, max_age: Duration) -> Result<(), String> {
        self.progress
            .lock()
            .map_err(|e| e.to_string())?
            .health("app token list", max_age)
    }
}

impl Followed for AppTokenRegistry {
    type Change = AppTokenChange;
    const WHAT: &'static str = "app token list";

    fn since(&self) -> Option<DateTime<Utc>> {
        self.progress.lock().ok().and_then(|p| p.since())
    }

    fn apply(&self, changes: Vec<Self::Change>) {
        if let Ok(mut tokens) = self.tokens.write() {
            for change in &changes {
                tokens.insert(
                    change.id.clone(),
                    Recorded {
                        revoked: change.revoked,
                        expires_at: change.expires_at,
                    },
                );
            }
            // Expired tokens are refused by their `exp`; a day's grace covers any clock leeway.
            let forget_before = Utc::now() - chrono::Duration::days(1);
            tokens.retain(|_, t| t.expires_at > forget_before);
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

    fn change(id: &str, revoked: bool) -> AppTokenChange {
        AppTokenChange {
            id: id.into(),
            revoked,
            expires_at: Utc::now() + chrono::Duration::hours(1),
            updated_at: Utc::now(),
        }
    }

    #[test]
    fn recorded_unrevoked_tokens_within_the_cap_only() {
        let registry = AppTokenRegistry::new(Duration::from_secs(3600));
        let now = Utc::now().timestamp();
        let mut claims = Claims::app("a", Role::Reader, 3600, now);
        assert_eq!(registry.check(&claims), Err(AppTokenRefusal::NotLoaded));
        registry.apply(vec![]);
        assert_eq!(registry.check(&claims), Err(AppTokenRefusal::Unknown));
        registry.apply(vec![change(&claims.jti, false)]);
        assert_eq!(registry.check(&claims), Ok(()));
        registry.apply(vec![change(&claims.jti, true)]);
        assert_eq!(registry.check(&claims), Err(AppTokenRefusal::Revoked));

        let long = Claims::app("a", Role::Admin, 3601, now);
        registry.apply(vec![change(&long.jti, false)]);
        assert!(matches!(
            registry.check(&long),
            Err(AppTokenRefusal::LifetimeTooLong { .. })
        ));
        claims.exp = None;
        assert_eq!(registry.check(&claims), Err(AppTokenRefusal::NoExpiry));
        let device = Claims::device("pi", now);
        assert!(registry.check(&device).is_err());
    }
}
