//! `loadgen idle`: what an idle keep-alive connection costs a server in memory. Opens N
//! connections, sends one request on each and reads its answer (so the server has set the
//! connection up as a device's would be between readings), holds them all open, and prints the
//! growth of the server's resident memory divided by N.
//!
//! Resident memory (VmRSS) rather than allocated bytes: it is what the machine pays. Socket
//! buffers are the kernel's and not in it; the figure is the process's own share.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

/// Opens --connections keep-alive connections to --addr, one request each, holds them, and
/// prints how much the server process (--pid) grew per connection.
#[derive(clap::Args, Debug, Clone)]
pub struct IdleArgs {
    /// The server's address (host:port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: String,
    /// The server's process id, whose resident memory is read from /proc.
    #[arg(long)]
    pub pid: u32,
    /// How many connections to open and hold.
    #[arg(long, default_value_t = 10_000)]
    pub connections: usize,
    /// The request each connection sends once (a path answered without a token).
    #[arg(long, default_value = "/healthz")]
    pub path: String,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 200)]
    pub concurrency: usize,
    /// How long to hold them before measuring (the server's keep-alive timeout must be longer).
    #[arg(long, default_value_t = 3.0)]
    pub settle_secs: f64,
}

pub async fn run(args: IdleArgs) -> anyhow::Result<()> {
    let baseline = resident_kib(args.pid)?;
    let started = Instant::now();
    let held = open_all(&args).await?;
    let opened_in = started.elapsed();
    tokio::time::sleep(Duration::from_secs_f64(args.settle_secs)).await;
    let loaded = resident_kib(args.pid)?;
    let still_open = count_open(&held);
    let per_connection = (loaded as f64 - baseline as f64) * 1024.0 / held.len() as f64;
    println!(
        "{} connections to {} ({} still open after {:.0} s), opened in {:.1} s",
        held.len(),
        args.addr,
        still_open,
        args.settle_secs,
        opened_in.as_secs_f64()
    );
    println!(
        "server pid {} resident: {baseline} KiB before, {loaded} KiB held",
        args.pid
    );
    println!(
        "per idle connection: {:.0} bytes ({:.1} KiB)",
        per_connection,
        per_connection / 1024.0
    );
    if still_open < held.len() {
        bail!(
            "the server closed {} of the connections before the measurement: the figure is not per held connection",
            held.len() - still_open
        );
    }
    Ok(())
}

/// Opens the connections, `concurrency` at a time, each answered once.
async fn open_all(args: &IdleArgs) -> anyhow::Result<Vec<TcpStream>> {
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: loadgen-idle\r\n\r\n",
        args.path, args.addr
    );
    let mut held = Vec::with_capacity(args.connections);
    let mut opening = JoinSet::new();
    for _ in 0..args.connections {
        if opening.len() >= args.concurrency
            && let Some(done) = opening.join_next().await
        {
            held.push(done??);
        }
        opening.spawn(open_one(args.addr.clone(), request.clone()));
    }
    while let Some(done) = opening.join_next().await {
        held.push(done??);
    }
    Ok(held)
}

/// One connection, one request, its whole answer read (headers and a Content-Length body).
async fn open_one(addr: String, request: String) -> anyhow::Result<TcpStream> {
    let mut stream = TcpStream::connect(&addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    stream.write_all(request.as_bytes()).await?;
    let mut answer = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("{addr} closed the connection before answering in full");
        }
        answer.extend_from_slice(&chunk[..n]);
        if answered_in_full(&answer) {
            break;
        }
    }
    if !answer.starts_with(b"HTTP/1.1 2") {
        bail!(
            "{addr} answered {:?}",
            String::from_utf8_lossy(&answer[..answer.len().min(40)])
        );
    }
    Ok(stream)
}

fn answered_in_full(answer: &[u8]) -> bool {
    let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&answer[..end]).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    answer.len() >= end + 4 + length
}

/// Connections the server has not closed: a closed one reads as end of stream at once.
fn count_open(held: &[TcpStream]) -> usize {
    let mut probe = [0u8; 1];
    held.iter()
        .filter(|s| !matches!(s.try_read(&mut probe), Ok(0)))
        .count()
}

fn resident_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS in /proc/PID/status")
}
