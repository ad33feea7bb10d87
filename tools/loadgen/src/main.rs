use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    loadgen::run(loadgen::Args::parse()).await
}
