#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot get a PostgreSQL connection: {0}")]
    Pool(#[from] diesel::r2d2::PoolError),
    #[error("cannot connect to PostgreSQL: {0}")]
    Connection(#[from] diesel::ConnectionError),
    #[error("database error: {0}")]
    Query(#[from] diesel::result::Error),
    #[error(
        "the database is not migrated ({} pending migration(s), first {}); run `sensorctl migrate`",
        pending.len(),
        pending.first().map(String::as_str).unwrap_or("?")
    )]
    Unmigrated { pending: Vec<String> },
    #[error("migrations failed: {0}")]
    Migration(String),
    /// A number with no decimal form (never a finite double, which every stored reading holds).
    #[error("cannot summarise a reading: {0}")]
    Unrepresentable(String),
}

impl StoreError {
    /// Whether retrying later may succeed because the database could not serve the request now
    /// (unreachable, restarting, out of connections, timed out), as opposed to an error in what was
    /// asked or in this code, which a retry repeats. Deny by default: an error not known to be
    /// transient is not, so that bad input or a bug is never reported as an outage.
    pub fn is_transient(&self) -> bool {
        use diesel::result::{DatabaseErrorKind, Error};
        match self {
            StoreError::Pool(_) | StoreError::Connection(_) => true,
            StoreError::Query(Error::DatabaseError(kind, info)) => match kind {
                DatabaseErrorKind::ClosedConnection
                | DatabaseErrorKind::UnableToSendCommand
                | DatabaseErrorKind::SerializationFailure => true,
                _ => is_transient_message(info.message()),
            },
            StoreError::Query(Error::BrokenTransactionManager) => true,
            _ => false,
        }
    }
}

/// diesel names only a few SQLSTATEs and does not expose the code, so the server errors that mean
/// "not now" are recognised by PostgreSQL's (English) primary messages: statement and lock timeouts
/// and cancellations (57014, 55P03), the server terminating the connection or starting up or
/// shutting down (57P01-57P03), and deadlocks (40P01). A server configured to answer in another
/// language makes these 500s instead of 503s: logged, never mistaken for bad input.
fn is_transient_message(message: &str) -> bool {
    const TRANSIENT_PREFIXES: [&str; 5] = [
        "canceling statement due to",
        "terminating connection",
        "the database system is",
        "deadlock detected",
        "could not obtain lock",
    ];
    TRANSIENT_PREFIXES
        .iter()
        .any(|prefix| message.starts_with(prefix))
}
