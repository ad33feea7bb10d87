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
}

impl StoreError {
    /// Whether retrying later may succeed (the database is down, restarting or overloaded), as opposed
    /// to an error in what was asked.
    pub fn is_transient(&self) -> bool {
        use diesel::result::{DatabaseErrorKind, Error};
        match self {
            StoreError::Pool(_) | StoreError::Connection(_) => true,
            StoreError::Query(Error::DatabaseError(kind, _)) => matches!(
                kind,
                DatabaseErrorKind::ClosedConnection
                    | DatabaseErrorKind::SerializationFailure
                    | DatabaseErrorKind::Unknown
            ),
            StoreError::Query(Error::BrokenTransactionManager) => true,
            _ => false,
        }
    }
}
