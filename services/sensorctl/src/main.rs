use clap::Parser;
use sensorctl::Cli;

fn main() -> anyhow::Result<()> {
    sensorctl::run(Cli::parse())
}
