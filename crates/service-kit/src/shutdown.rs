//! The signal that starts a graceful shutdown: SIGTERM (docker stop, systemd) or SIGINT (Ctrl-C).

/// Resolves when the process is asked to stop.
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = tokio::signal::ctrl_c() => {},
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops gracefully");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutdown requested");
}

/// Serves an actix server (built with `disable_signals()`: the service, not actix, decides when to
/// stop) until `stop` resolves, then stops it gracefully: no new connections, the requests in flight
/// answered (within the server's shutdown timeout), and returns.
pub async fn serve_until(
    server: actix_web::dev::Server,
    stop: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let handle = server.handle();
    let mut server = std::pin::pin!(server);
    tokio::select! {
        served = &mut server => return served,
        _ = stop => {}
    }
    // the server's own future must keep running while it drains, so both are awaited together
    let ((), served) = tokio::join!(handle.stop(true), server);
    served
}
