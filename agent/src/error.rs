//! The agent's one error type. Each says what to do about it: these reach a person on the Pi
//! (`check`, the journal), not a program.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration file, or a file it names, is not usable.
    #[error("configuration: {0}")]
    Config(String),
    /// The outbox database could not be opened, read or written.
    #[error("outbox {path}: {source}")]
    Outbox {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    /// A source could not be read, or gave nothing usable.
    #[error("{0}")]
    Source(String),
    /// The HTTP client could not be set up (a bad CA file, say).
    #[error("HTTP client: {0}")]
    Client(String),
    /// One of the agent's loops ended, which they never do unless they panicked.
    #[error("a task of the agent stopped: {0}")]
    Stopped(String),
}
