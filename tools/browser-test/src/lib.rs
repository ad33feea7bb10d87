//! The web dashboard (served by query-api) tested in a real browser: `tests/dashboard.rs` starts
//! ingest-http, the persister and query-api against the real PostgreSQL and RabbitMQ, fills the
//! database, and runs `dashboard.mjs` (Debian's Chromium driven by the pinned `playwright-core`
//! of `package-lock.json`), which fails over the dashboard's budgets. Nothing to link against:
//! this crate is its test.
