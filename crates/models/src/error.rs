use std::fmt;

/// Why an input was refused: the field it concerns (a path such as `readings[3].metrics.temp`) and a
/// reason a person can act on. Services turn it into a 400 (HTTP) or an invalid-queue entry (MQTT).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationError {
    pub field: String,
    pub reason: String,
    pub kind: ValidationKind,
}

/// What kind of refusal, for those who count or route them (ingest-mqtt's invalid messages by kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValidationKind {
    /// Not JSON at all.
    NotJson,
    /// JSON, but not a valid reading (or batch of readings).
    Invalid,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
            kind: ValidationKind::Invalid,
        }
    }

    pub(crate) fn not_json(reason: impl Into<String>) -> Self {
        Self {
            kind: ValidationKind::NotJson,
            ..Self::new("body", reason)
        }
    }

    /// The same error, with its field nested under `prefix` (`metrics` + `temp` → `metrics.temp`).
    pub(crate) fn within(mut self, prefix: &str) -> Self {
        self.field = if self.field.is_empty() {
            prefix.to_owned()
        } else if self.field.starts_with('[') {
            format!("{prefix}{}", self.field)
        } else {
            format!("{prefix}.{}", self.field)
        };
        self
    }
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}
