//! `loadgen responder`: an HTTP/1.1 server that answers every request `200 {"status":"success"}`
//! and does nothing else, to put behind Traefik and measure Traefik's own ceiling (what Sensorhub
//! behind Traefik is compared with). It reads each request's body (so keep-alive connections stay
//! usable) and nothing more; on this machine it answers far faster than Traefik forwards.

use std::convert::Infallible;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// Answers every request 200 {"status":"success"} (GET /readyz too, for Traefik's health check).
#[derive(clap::Args, Debug, Clone)]
pub struct ResponderArgs {
    /// Where to listen.
    #[arg(long, default_value = "127.0.0.1:27199")]
    pub addr: String,
}

pub async fn run(args: ResponderArgs) -> anyhow::Result<()> {
    let listener = TcpListener::bind(&args.addr)
        .await
        .with_context(|| format!("listening on {}", args.addr))?;
    eprintln!("responder listening on {}", listener.local_addr()?);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // out of file descriptors, or a connection reset before it was accepted: go on
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            // a client that goes away mid-request is no concern of a do-nothing server
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service_fn(answer))
                .await;
        });
    }
}

async fn answer(
    request: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    // read the body to its end, so the connection can carry the next request
    let _ = request.into_body().collect().await;
    let mut response = Response::new(Full::new(Bytes::from_static(br#"{"status":"success"}"#)));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    Ok(response)
}
