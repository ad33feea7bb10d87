#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a measuring tool stops, with the message, where the system it drives is not as it must be; it serves no one"
)]
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    loadgen::main_with(loadgen::Cli::parse()).await
}
