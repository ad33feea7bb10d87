//! The connection cap: past `http_max_connections`, a new connection is answered 503 and closed
//! rather than left waiting; under it, nothing changes.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;

/// Sends one request for `path` on `stream` (keeping it open) and returns the response's head.
async fn get(stream: &mut TcpStream, path: &str) -> String {
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: sensorhub\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
        .await
        .expect("an answer, not a hang")
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).to_lowercase()
}

#[tokio::test]
async fn a_connection_past_the_cap_is_answered_503_and_closed() {
    let stack = Stack::new();
    // the harness's own client keeps one connection open (it asked /readyz, it reads /metrics)
    let ingest = stack.ingest_with(|s| s.http_max_connections = 3).await;
    let addr = format!("127.0.0.1:{}", ingest.port());
    assert_eq!(ingest.metric("sensorhub_http_connections_open").await, 1.0);

    let mut first = TcpStream::connect(&addr).await.unwrap();
    let mut second = TcpStream::connect(&addr).await.unwrap();
    assert!(get(&mut first, "/readyz").await.starts_with("http/1.1 200"));
    assert!(
        get(&mut second, "/readyz")
            .await
            .starts_with("http/1.1 200")
    );
    assert_eq!(ingest.metric("sensorhub_http_connections_open").await, 3.0);

    let mut third = TcpStream::connect(&addr).await.unwrap();
    let refused = get(&mut third, "/data").await;
    assert!(refused.starts_with("http/1.1 503"), "{refused}");
    assert!(refused.contains("retry-after:"), "{refused}");
    assert!(refused.contains("connection: close"), "{refused}");
    assert!(refused.contains("limit of 3 connections"), "{refused}");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), third.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "the refused connection is closed by the server"
    );

    // a full replica is still alive, and its metrics say why it refuses
    let mut fourth = TcpStream::connect(&addr).await.unwrap();
    assert!(
        get(&mut fourth, "/healthz")
            .await
            .starts_with("http/1.1 200")
    );
    drop(fourth);
    assert_eq!(
        ingest
            .metric("sensorhub_http_connections_refused_total")
            .await,
        1.0
    );

    // the connections under the cap were not disturbed
    assert!(get(&mut first, "/readyz").await.starts_with("http/1.1 200"));

    // once a connection closes, a new one is served
    drop(second);
    drop(first);
    eventually(WAIT, "the two closed connections counted out", || async {
        (ingest.metric("sensorhub_http_connections_open").await <= 1.0).then_some(())
    })
    .await;
    let mut again = TcpStream::connect(&addr).await.unwrap();
    assert!(get(&mut again, "/readyz").await.starts_with("http/1.1 200"));
}
